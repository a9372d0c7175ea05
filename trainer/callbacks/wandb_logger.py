"""WandbLogger: a run's logs in Weights & Biases, with W&B's own client (`logger=[...,wandb]`).

Offline unless there is a login: with no WANDB_MODE, no WANDB_API_KEY and no W&B entry in ~/.netrc, the
run is written under <run>/wandb/offline-run-*/ for `wandb sync` later, and the log says so (a run must
not stop, nor hang, on a missing account or network).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict, List, Optional

from trainer.callbacks.loggers import Logger, scalars
from trainer.config import ConfigError
from trainer.errors import UserError

log = logging.getLogger("trainer.callbacks")

WANDB_INSTALL = 'pip install -e ".[wandb]"'


def wandb_host() -> str:
    """The W&B server wandb.init talks to: WANDB_BASE_URL, else the client's default (it changes between
    versions: https://api.forge.coreweave.com in wandb 0.31, not api.wandb.ai)."""
    import wandb

    return os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url


def has_wandb_login() -> bool:
    """An API key in the environment, or a netrc entry for W&B's host (what `wandb login` writes), found by
    wandb's own netrc lookup (its host aliases included)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    from wandb.sdk.lib.wbauth import read_netrc_auth

    try:
        return read_netrc_auth(host=wandb_host()) is not None
    except Exception as e:  # noqa: BLE001 - a malformed key: wandb.init would refuse it too; say so and go offline
        log.warning("W&B: the netrc entry for %s is not usable (%s); logging offline", wandb_host(), e)
        return False


class WandbUnavailable(UserError, RuntimeError):
    """wandb.init failed (no network, a refused login): the message names the offline mode (exit 2)."""


class WandbLogger(Logger):
    """Logs the run to W&B: the config, metrics by step (`train/loss`, `eval/accuracy`), how it ended
    (summary `end`: finished | interrupted | failed; W&B's exit code 0, else 1; an interrupted run is also
    marked preempting, W&B's state for a run that will resume). A
    resumed run continues the same W&B run: its id is kept in the run folder (wandb_run_id) and given to
    `wandb.init(id=..., resume="allow")`.

    Args:
      project: the W&B project; the CLI's default is the recipe.
      entity: the W&B user or team; None: the login's default.
      name: the W&B run's display name; None: the run folder's name.
      mode: "online", "offline" or "disabled"; None: WANDB_MODE if set, else online with a login (an API key
        or `wandb login`), else offline.
      tags: the run's tags.
      params: logged in the W&B config beside `trainer.hparams` (the CLI sets those: the composed config).
    """

    RUN_ID_FILE = "wandb_run_id"

    def __init__(self, project: str = "trainer", entity: Optional[str] = None, name: Optional[str] = None,
                 mode: Optional[str] = None, tags: Optional[List[str]] = None, params: Optional[Dict[str, Any]] = None):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("logger=wandb needs the Weights & Biases client, which is not installed. Fix: "
                              f"{WANDB_INSTALL} (or drop wandb from logger=[...])") from None
        if mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"logger.wandb.mode={mode!r} is not one of online|offline|disabled (or null: offline "
                              "without a W&B login)")
        self.project, self.entity, self.name, self.mode = project, entity, name, mode
        self.tags, self.params = list(tags or []), dict(params or {})
        self.run = None
        self.started_service = False

    def chosen_mode(self) -> Optional[str]:
        """The mode wandb.init gets: ours, else WANDB_MODE's (None: wandb reads it), else by the login."""
        if self.mode is not None or os.environ.get("WANDB_MODE"):
            return self.mode
        if has_wandb_login():
            return "online"
        log.info("W&B: no login (WANDB_API_KEY or `wandb login`), so the run is logged offline under the run folder's "
                 "wandb/; upload it with `wandb sync <run>/wandb/offline-run-*`")
        return "offline"

    def on_train_begin(self, trainer):
        import wandb

        folder = self.in_run_dir(trainer, None, "wandb").parent  # wandb.init(dir=...) writes its own wandb/ there
        kept = folder / self.RUN_ID_FILE
        run_id = kept.read_text().strip() if kept.exists() else None
        self.started_service = not os.environ.get("WANDB_SERVICE")  # else another user of wandb in this process owns it
        self.process_hooks = (sys.exit, sys.excepthook)  # wandb.init wraps them (its ExitHooks); put back at teardown
        try:
            self.run = wandb.init(project=self.project, entity=self.entity, name=self.name or folder.name,
                                  tags=self.tags, id=run_id, resume="allow", dir=str(folder), mode=self.chosen_mode(),
                                  reinit="create_new", settings=wandb.Settings(console="off"))
        except wandb.errors.Error as e:  # no network, a refused key: W&B's own error, not a bug of the run
            self.teardown()
            reason = " ".join(str(e).split())[:300]
            raise WandbUnavailable(f"W&B could not start its run ({type(e).__name__}: {reason}). Fix: log offline with "
                                   "logger.wandb.mode=offline (or WANDB_MODE=offline) and `wandb sync` later, or check "
                                   "the network and the login") from None
        self.run.config.update({**getattr(trainer, "hparams", {}), **self.params}, allow_val_change=True)
        if run_id is None:
            kept.write_text(self.run.id + "\n")
            log.info("W&B run %s in project %r (%s)", self.run.id, self.project, self.run.settings.mode)
        else:
            log.info("W&B run %s continued (%s)", run_id, self.run.settings.mode)

    def record(self, trainer, split, step, logs):
        values = {f"{split}/{name}": float(value) for name, value in scalars(logs).items()}
        if values and self.run is not None:
            self.run.log(values, step=step)

    def on_train_end(self, trainer, summary):
        if self.run is None:
            return
        end = "failed" if summary.get("failed") else "interrupted" if summary.get("interrupted") else "finished"
        self.run.summary["end"] = end
        if end == "interrupted":
            self.run.mark_preempting()  # W&B's mark of a run that stopped to be resumed
        self.run.finish(exit_code=0 if end == "finished" else 1)
        self.run = None
        self.teardown()

    def teardown(self):
        """Stops the wandb-core process this logger started and undoes what wandb.init left in this process
        (WANDB_SERVICE, its wrappers of sys.exit and sys.excepthook), so fit() leaves the process as it found it."""
        import wandb

        if getattr(self, "started_service", False) and hasattr(wandb, "teardown"):
            wandb.teardown()
            os.environ.pop("WANDB_SERVICE", None)
            from wandb.sdk.lib.exit_hooks import ExitHooks

            if isinstance(getattr(sys.exit, "__self__", None), ExitHooks):
                sys.exit = self.process_hooks[0]
            if isinstance(getattr(sys.excepthook, "__self__", None), ExitHooks):
                sys.excepthook = self.process_hooks[1]
