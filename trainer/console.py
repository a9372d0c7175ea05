"""What fit() shows on the terminal when called from Python: the CLI's log lines and end summary.

The CLI gets its log output from Hydra, which configures the root logger. A Python user who configured
nothing would see none of the INFO lines (Python's last-resort handler shows WARNING and above), so
fit() adds one stderr handler to the `trainer` logger, and only while no logging is configured.
"""
from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Ours: recognised (and taken away once the user configures logging, so no line is doubled)."""


def show_logs_unless_configured(verbose: bool) -> None:
    """Logs the `trainer` logger's INFO lines to stderr when neither it nor the root logger has a handler
    (the CLI's Hydra and pytest configure the root one). Called by every fit(); idempotent."""
    package, root = logging.getLogger("trainer"), logging.getLogger()
    ours = [h for h in package.handlers if isinstance(h, _StderrHandler)]
    if ours and (root.handlers or not verbose):  # configured since, or quiet asked for
        for handler in ours:
            package.removeHandler(handler)
        return
    if ours or not verbose or package.handlers or root.handlers:
        return
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))  # as the CLI's
    package.addHandler(handler)
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
