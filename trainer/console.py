"""What fit() shows on the terminal when called from Python: the CLI's log lines and end summary.

The CLI gets its log output from Hydra, which configures the root logger. A Python user who configured
nothing would see none of the INFO lines (Python's last-resort handler shows WARNING and above), so
fit() sets the `trainer` logger's level to INFO (unless set) and adds one stderr handler to it, which prints a line
only when no handler of the user's shows it (so each line once, with or without a logging set-up). While the
progress bar is drawn, the console handlers write with the bar cleared and drawn again (while_a_bar_is_shown).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

BAR_SHOWS = "trainer_bar_shows"  # a record's attribute: the progress bar shows its line (the train lines)


class _StderrHandler(logging.StreamHandler):
    """Ours: prints a `trainer` line unless a handler of the user's on its way up shows it (one of the
    `trainer` loggers', or a configured root's), and keeps the bare root handler of `logging.basicConfig()`
    from printing it a second time. It decides per line and never sets `propagate`: that is the user's."""

    def emit(self, record: logging.LogRecord) -> None:
        handlers = _handlers_reached(record)
        if any(h is not self and not _bare(h) for h in handlers):
            return  # the user's handler shows it
        record.trainer_shown = True  # the bare root handlers drop it (_DropShown)
        for handler in handlers:
            if _bare(handler) and not any(isinstance(f, _DropShown) for f in handler.filters):
                handler.addFilter(_DropShown())
        super().emit(record)


class _DropShown(logging.Filter):
    """On the bare root handler (absl adds it at TensorFlow's first checkpoint save): a line ours printed is
    not printed again; everything else passes as before."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "trainer_shown", False)


def _bare(handler: logging.Handler) -> bool:
    """The handler a plain `logging.basicConfig()` adds to the root logger (absl's call, too)."""
    return type(handler) is logging.StreamHandler and getattr(handler.formatter, "_fmt", None) == logging.BASIC_FORMAT


def log_command_to_stderr(level: int) -> None:
    """A command's (export, evaluate, predict, convert, the doctor, lr_find) log lines on stderr as `LEVEL name:
    message`, each once. TensorFlow gives its logger a handler of its own when it loads before the root logger has
    one (the commands load it first, quietly, before their slow steps): through the root's handler too, each of its
    lines came twice (`INFO:tensorflow:Assets written to: X` and `INFO tensorflow: Assets written to: X`). That
    handler goes; TensorFlow adds none when it loads later, the root's being there (its own rule)."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    tensorflow = logging.getLogger("tensorflow")
    for handler in list(tensorflow.handlers):
        if _bare(handler):
            tensorflow.removeHandler(handler)


def _handlers_reached(record: logging.LogRecord):
    """The handlers that show `record`, as Logger.callHandlers walks them (propagate as set): a handler whose
    level is above the record's (a WARNING-level one of the user's) does not show an INFO line."""
    logger, reached = logging.getLogger(record.name), []
    while logger:
        reached.extend(h for h in logger.handlers if record.levelno >= h.level)
        logger = logger.parent if logger.propagate else None
    return reached


def _columns(terminal) -> Optional[int]:
    """The terminal's width; None when it cannot be measured (a stand-in object without a real descriptor)."""
    try:
        return os.get_terminal_size(terminal.fileno()).columns
    except (AttributeError, ValueError, OSError, TypeError):
        return None


def bar_shown(progress_bar: Optional[bool]) -> bool:
    """trainer.progress_bar as set; None (auto) draws the bar where someone watches it, as tqdm's disable=None:
    stderr (where tqdm draws) a terminal of some width, or a Jupyter kernel (tqdm.auto's widget). A log file
    (`2>log`, a batch job's output) gets the log lines instead of every frame of the bar, and so does a terminal
    that reports 0 columns (`docker exec -t`, some CI runners), where tqdm would draw nothing at all."""
    if progress_bar is not None:
        return bool(progress_bar)
    try:
        if sys.stderr.isatty():
            return _columns(sys.stderr) != 0
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        pass
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def show_logs_unless_configured(verbose: bool) -> None:
    """Logs the `trainer` logger's INFO lines: its level is INFO (unless set), and ours prints each line no handler
    of the user's shows (none, or a root handler at WARNING as `logging.basicConfig()` with no level leaves the
    root logger: it silenced every INFO line). Quiet (verbose=False): ours prints the warnings only, in the same
    format (they came through Python's last resort bare, or absl's root handler as `WARNING:trainer.checkpoint:`,
    beside the `[trainer...]` lines of a verbose Trainer). Called by every fit(); idempotent."""
    package = logging.getLogger("trainer")
    ours = [h for h in package.handlers if isinstance(h, _StderrHandler)]
    if not verbose and getattr(package, "_trainer_set_level", False):  # quiet: the level we set is undone
        package.setLevel(logging.NOTSET)
        package._trainer_set_level = False
    level = logging.NOTSET if verbose else logging.WARNING
    if ours and len(ours) < len(package.handlers):
        for handler in ours:  # a handler of the user's on the trainer logger since
            package.removeHandler(handler)
        return
    if package.handlers and not ours:
        return  # the user's handler: their levels
    # The root logger's WARNING (Python's default, and basicConfig's without a level) would drop the INFO lines;
    # a level the user chose (basicConfig(level=logging.ERROR), or one on the trainer logger) is theirs. Set again
    # when ours is kept from a quiet Trainer, which undid it: a verbose one after it printed nothing.
    if verbose and package.level == logging.NOTSET and logging.getLogger().level == logging.WARNING:
        package.setLevel(logging.INFO)
        package._trainer_set_level = True
    if ours:
        for handler in ours:
            handler.setLevel(level)
        return
    handler = _StderrHandler(sys.stderr)
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("[%(name)s][%(levelname)s] - %(message)s"))  # as the CLI's
    package.addHandler(handler)


def while_a_bar_is_shown(bar_class):
    """While a tqdm bar is drawn, each console handler (a StreamHandler on stdout or stderr, as tqdm's
    logging_redirect_tqdm reads it: Hydra's, ours, the user's) of the root and `trainer` loggers writes inside
    `bar_class.external_write_mode`: the bars cleared, then drawn again, as tqdm.write does; a line written under
    the bar was glued onto its line. Lines the bar shows (BAR_SHOWS) go to the log files only. Handlers stay
    in place, so the decisions above (who prints a line) stand. Returns the undo, for the bar's close."""
    loggers = [logging.getLogger()] + [logger for name, logger in logging.Logger.manager.loggerDict.items()
                                       if name.split(".")[0] == "trainer" and isinstance(logger, logging.Logger)]
    handlers = {id(h): h for logger in loggers for h in logger.handlers if _console(h) and "emit" not in vars(h)}
    for handler in handlers.values():
        handler.emit = _beside_bars(handler, handler.emit, bar_class)
    return lambda: [vars(handler).pop("emit", None) for handler in handlers.values()]


def _console(handler: logging.Handler) -> bool:
    std = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return isinstance(handler, logging.StreamHandler) and any(handler.stream is s for s in std)


def _beside_bars(handler: logging.StreamHandler, emit, bar_class):
    def emit_beside_bars(record: logging.LogRecord) -> None:
        if getattr(record, BAR_SHOWS, False):
            return
        with bar_class.external_write_mode(file=handler.stream):
            emit(record)

    return emit_beside_bars


def say_once_when_log_files_fail() -> None:
    """A log file that cannot be written (a full disk) made Python's logging print a `--- Logging error ---`
    traceback for every line. Each of the root logger's file handlers now says so in one line, then is
    taken away; the lines still reach the terminal, and the error that follows (exit 2) says the fix."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and not getattr(handler, "_says_once", False):
            handler._says_once = True
            handler.handleError = _dropper(handler)


def _dropper(handler: logging.FileHandler):
    def handle_error(record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):  # a bad format call (a callback's): Python's report; the file stays
            logging.FileHandler.handleError(handler, record)
            return
        why = getattr(error, "strerror", None) or error
        root = logging.getLogger()  # a new list: the loop that called this goes on over the old one
        root.handlers = [h for h in root.handlers if h is not handler]
        print(f"[trainer][ERROR] - the log file {handler.baseFilename} cannot be written ({why}): log lines go to "
              "the terminal only from here", file=sys.stderr, flush=True)
        try:
            handler.close()
        except OSError:  # flushing the same full disk
            pass

    return handle_error


def log_to_worker_file(run_dir, strategy_name: str) -> None:
    """A non-chief worker of a multi_worker run (TF_CONFIG's task) logs to trainer.<task>.log from its first line
    on, its `Recipe` and `Strategy` lines too, so the chief's trainer.log stays one clean file."""
    import json
    from pathlib import Path

    from trainer.runlock import is_chief_process

    if is_chief_process(strategy_name):
        return
    task = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task") or {}
    name = Path(run_dir) / f"trainer.{task.get('type')}{task.get('index', 0)}.log"
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            replacement = logging.FileHandler(name)
            replacement.setFormatter(handler.formatter)
            root.addHandler(replacement)
    logging.getLogger("trainer").info("Non-chief worker: checkpoints, metrics and TensorBoard files go to temporary "
                                      "folders only")
