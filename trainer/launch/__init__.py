"""`python -m trainer.launch`: starts, watches and restarts the workers of a multi-worker run (see __main__).

A worker it started knows it from its environment (LAUNCHED_WITH: the launcher's own options), so the command
a worker gives to resume the run is the launcher's, not `python -m trainer ... strategy=multi_worker`, which
exits 2 without a TF_CONFIG."""
from __future__ import annotations

import os
import shlex
from typing import List, Optional

LAUNCHED_WITH = "TRAINER_LAUNCH_OPTIONS"  # in each worker's environment: the launcher's options, as a shell line
ADDED = "strategy=multi_worker"  # the override the launcher adds to every worker's command


def launch_command(overrides: List[str]) -> Optional[str]:
    """The launcher command that runs a worker's `overrides` again (the one it adds left out), or None in a
    process the launcher did not start."""
    options = os.environ.get(LAUNCHED_WITH)
    if options is None:
        return None
    kept = [o for o in overrides if o != ADDED]
    return " ".join(["python -m trainer.launch", *([options] if options else []), "--", *map(shlex.quote, kept)])
