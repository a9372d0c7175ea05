"""fit() from Python shows what the CLI shows (the end summary) without any logging set-up; quiet on request. The
eval line under the progress bar is a log line as the others are (trainer.log, the user's handlers), shown once."""
import re
import subprocess
import sys

import pytest

from conftest import run_cli


SCRIPT = """
import logging, sys
import keras
from trainer import Trainer
sys.path.insert(0, {tests!r})
from conftest import blobs
{configure}
trainer = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  optimizer=lambda: keras.optimizers.SGD(0.1, momentum=0.5),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                  log_every=5, progress_bar=False)
trainer.fit(blobs(), blobs(), steps=10)
trainer.fit(blobs(), blobs(), steps=20)
{then}
"""

# After a verbose Trainer, in the same process: a quiet one (verbose=False) shows nothing, though a Trainer before
# it added our handler (a quiet Trainer in a fresh process has none to take away).
THEN_QUIET = """
print("--- quiet from here ---", file=sys.stderr, flush=True)
quiet = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=lambda: keras.optimizers.SGD(0.1), log_every=5, progress_bar=False, verbose=False)
quiet.fit(blobs(), blobs(), steps=10)
quiet.fit(blobs(), blobs(), steps=20)
"""


def _fit(tmp_path, configure="", then="", merged=False):
    """The script's CompletedProcess; merged: stderr into stdout, as `2>&1` has them."""
    from pathlib import Path

    script = SCRIPT.format(tests=str(Path(__file__).parent), configure=configure, then=then)
    streams = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT) if merged else dict(capture_output=True)
    return subprocess.run([sys.executable, "-c", script], text=True, cwd=tmp_path, timeout=300, **streams)


# With the progress bar (forced: a pipe is no terminal), the eval line is a log line as the others are (it was
# tqdm.write's, on stdout).
THEN_BAR = """
Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=lambda: keras.optimizers.Adam(0.01), log_every=5, progress_bar=True).fit(blobs(), blobs(), steps=7)
"""


@pytest.mark.slow
def test_fit_shows_the_summary_on_stderr_by_default_and_not_when_quiet(tmp_path):
    result = _fit(tmp_path, then=THEN_BAR + THEN_QUIET)  # one process: the start-up is most of the cost
    assert result.returncode == 0, result.stderr[-2000:]
    shown, quiet = result.stderr.split("--- quiet from here ---\n")
    assert shown.count("[trainer.callbacks][INFO] - eval @ step 7: loss=") == 1, shown[-3000:]  # under the bar
    assert "eval @" not in result.stdout
    assert shown.count("[trainer.callbacks][INFO] - Done: 10 steps") == 2, shown[-3000:]  # once per fit()
    assert "Final eval: loss=" in shown and "step 5/10: loss=" in shown
    assert shown.count("[trainer.distribute][INFO] - Strategy: DefaultDistributionStrategy over") == 1  # as the CLI's
    # logged while the first Trainer is built, before any fit(): shown as in the CLI (it was dropped)
    assert shown.count("[trainer.update][INFO] - Optimizer model: SGD") == 1, shown[:2000]
    assert "Done:" not in quiet and "Final eval" not in quiet and "step 5/10" not in quiet, quiet[-3000:]


THEN_QUIET_WARNINGS = """
print("--- quiet warnings ---", file=sys.stderr, flush=True)
quiet = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],  # not the default best_metric's name
                optimizer=lambda: keras.optimizers.SGD(0.1), run_dir="run", progress_bar=False, verbose=False)
quiet.fit(blobs(), blobs(), steps=4)  # a checkpoint save: absl adds its bare root handler
quiet.fit(blobs(), blobs(), steps=4)  # nothing to train
"""


@pytest.mark.slow
def test_a_quiet_trainers_warnings_have_the_format_of_the_others(tmp_path):
    """verbose=False: the warnings still show, as `[trainer.core][WARNING] - ...` (they came bare, or after a
    checkpoint save as absl's root handler's `WARNING:trainer.checkpoint:`, beside the verbose lines' format)."""
    result = _fit(tmp_path, then=THEN_QUIET_WARNINGS)
    assert result.returncode == 0, result.stderr[-2000:]
    quiet = result.stderr.split("--- quiet warnings ---\n")[1]
    assert "WARNING:trainer" not in quiet, quiet[-3000:]
    assert quiet.count("[trainer.checkpoint][WARNING] - trainer.best_metric='accuracy' is not among") == 1, quiet
    assert quiet.count("[trainer.core][WARNING] - fit(steps=4) trains until step 4 in total") == 1, quiet
    assert "[trainer.callbacks][INFO]" not in quiet


@pytest.mark.slow
def test_configured_logging_gets_each_line_once(tmp_path):
    """Root logging configured by the user (as Hydra does for the CLI): no handler of ours, no doubled line."""
    result = _fit(tmp_path, configure="logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("Done: 10 steps") == 2, result.stderr[-3000:]
    assert "[trainer.callbacks][INFO]" not in result.stderr



@pytest.mark.slow
def test_basic_config_with_no_level_shows_each_info_line_once(tmp_path):
    """`logging.basicConfig()` with no level leaves the root logger at WARNING: the trainer's INFO lines still show,
    once each, through the user's root handler; a root handler at WARNING gets them from ours instead."""
    plain = _fit(tmp_path, configure="logging.basicConfig(format='ROOT| %(name)s: %(message)s')")
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stderr.count("Done: 10 steps") == 2 and plain.stderr.count("ROOT| trainer.callbacks: Done") == 2, \
        plain.stderr[-3000:]
    assert plain.stderr.count("step 5/10: loss=") == 1 and "[trainer.callbacks][INFO]" not in plain.stderr
    warning = _fit(tmp_path, configure="logging.basicConfig(format='ROOT| %(message)s'); "
                                       "logging.getLogger().handlers[0].setLevel(logging.WARNING)")
    assert warning.returncode == 0, warning.stderr[-2000:]
    assert warning.stderr.count("[trainer.callbacks][INFO] - Done: 10 steps") == 2, warning.stderr[-3000:]
    assert warning.stderr.count("Done: 10 steps") == 2 and "ROOT| Done" not in warning.stderr

@pytest.mark.slow
def test_a_root_level_the_user_chose_is_kept(tmp_path):
    """basicConfig(level=logging.ERROR): the user asked for errors only; the trainer's INFO lines stay out (the
    trainer logger is set to INFO only over Python's default WARNING root)."""
    errors_only = _fit(tmp_path, configure="logging.basicConfig(level=logging.ERROR, format='ROOT| %(message)s')")
    assert errors_only.returncode == 0, errors_only.stderr[-2000:]
    assert "Done: 10 steps" not in errors_only.stderr and "step 5/10: loss=" not in errors_only.stderr, \
        errors_only.stderr[-3000:]


USERS_HANDLER_LATER = """
import io, json, logging, sys, keras
from trainer import Trainer
sys.path.insert(0, {tests!r})
from conftest import blobs

def fit(run):
    Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=run, log_every=2, checkpoint_every=2,
            progress_bar=False).fit(blobs(), steps=4)

fit("teacher")  # nothing configured; two Trainers in one process, as distillation trains a teacher first
fit("student")
print("--- the user's handler from here ---", file=sys.stderr, flush=True)
package, mine = logging.getLogger("trainer"), io.StringIO()
package.propagate = False  # the user's choice, kept
handler = logging.StreamHandler(mine)
handler.setFormatter(logging.Formatter("MINE %(message)s"))
package.addHandler(handler)
fit("third")
Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),  # the progress bar: on
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=lambda: keras.optimizers.SGD(0.1)).fit(blobs(), blobs(), steps=3)
print("RESULT", json.dumps(dict(propagate=package.propagate, mine=mine.getvalue().splitlines())))
"""


@pytest.fixture(scope="module")
def users_handler_later(tmp_path_factory):
    """One process for the two tests below (TensorFlow's start-up was most of each one's cost): (stderr before the
    user's handler, stderr after it, the handler's lines and the logger's propagate flag)."""
    import json
    from pathlib import Path

    script = USERS_HANDLER_LATER.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=tmp_path_factory.mktemp("console"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    before, after = result.stderr.split("--- the user's handler from here ---\n")
    out = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT "):])
    return before.splitlines(), after.splitlines(), out


@pytest.mark.slow
def test_each_line_once_after_a_checkpoint_save_and_with_two_trainers(users_handler_later):
    """TensorFlow's saver logs through absl, which adds a bare root handler (logging.basicConfig()) at the
    first save: the `trainer` lines must not then print a second time through it."""
    lines, _, _ = users_handler_later
    for said in ("step 4/4: loss=", "Saved checkpoint", "Done: 4 steps"):
        assert sum(said in line for line in lines) in (2, 4), "\n".join(lines[-40:])  # once per Trainer (per save)
    assert sum("step 4/4: loss=" in line for line in lines) == 2
    assert not any(line.startswith("INFO:trainer") for line in lines), "\n".join(lines[-40:])


@pytest.mark.slow
def test_a_user_handler_on_the_trainer_logger_gets_each_line_once_and_propagate_stays_theirs(users_handler_later):
    """A user who sets logging.getLogger("trainer").propagate = False and adds a handler (after Trainers before
    added ours) gets each line once, in that handler only, the eval line under the progress bar too (a notebook's
    handler); fit() no longer sets propagate back to True."""
    before, after, out = users_handler_later
    assert out["propagate"] is False
    mine = out["mine"]
    for said in ("step 4/4: loss=", "Done: 4 steps", "Saved checkpoint"):
        assert not any(said in line for line in after), "\n".join(after[-40:])  # in the user's handler only
    for said in ("step 4/4: loss=", "Done: 4 steps"):
        assert sum(said in line for line in mine) == 1, mine  # the third Trainer's, in the user's handler once
    assert (2 * sum("Saved checkpoint" in line for line in mine)
            == sum("Saved checkpoint" in line for line in before) > 0)
    assert not any(line.startswith("INFO:trainer") for line in after), "\n".join(after[-40:])
    # under the progress bar too: the eval line (tqdm.write printed it on stdout only, past every handler)
    assert sum("eval @ step 3: loss=" in line for line in mine) == 1, mine
    assert not any("eval @" in line for line in after), "\n".join(after[-40:])


WARNING_HANDLER = """
import io, logging, sys, keras
from trainer import Trainer
from trainer.callbacks.base import Callback
sys.path.insert(0, {tests!r})
from conftest import blobs
mine = io.StringIO()

class AddsWarningHandler(Callback):  # a library that configures warnings only, mid-fit
    def on_log(self, trainer, step, logs):
        if step == 5:
            handler = logging.StreamHandler(mine)
            handler.setLevel(logging.WARNING)
            logging.getLogger().addHandler(handler)

Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=lambda: keras.optimizers.SGD(0.1),
        log_every=5, progress_bar=False, callbacks=[AddsWarningHandler()]).fit(blobs(), steps=10)
logging.getLogger("trainer.core").warning("a warning")
print("MINE", repr(mine.getvalue()))
"""


@pytest.mark.slow
def test_a_warning_level_handler_of_the_users_does_not_silence_the_info_lines(tmp_path):
    """A root handler that shows WARNING and above, added mid-fit, does not show an INFO progress line: ours still
    prints it (it took any handler of the user's as showing every line); a warning goes to the user's handler."""
    from pathlib import Path

    script = WARNING_HANDLER.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 10/10: loss=" in result.stderr and "Done: 10 steps" in result.stderr, result.stderr[-3000:]
    assert "MINE 'a warning\\n'" in result.stdout
    assert "a warning" not in result.stderr  # shown by the user's handler, not ours too


def test_the_eval_line_under_the_progress_bar_is_in_trainer_log_and_printed_once(tmp_path, tiny):
    """The CLI with its progress bar (forced: the test's stderr is no terminal): `eval @ step N` is a line of the
    run folder's trainer.log, as the other lines are (it went to stdout only), and the terminal shows it once."""
    run_dir = tmp_path / "run"
    with_bar = [o for o in tiny if not o.startswith("trainer.progress_bar=")] + ["trainer.progress_bar=true"]
    result = run_cli(*with_bar, "trainer.eval_every=20", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    text, shown = (run_dir / "trainer.log").read_text(), result.stdout + result.stderr
    for step in (20, 40):
        assert text.count(f"[trainer.callbacks][INFO] - eval @ step {step} (10 batches): loss=") == 1, text[-3000:]
        assert shown.count(f"eval @ step {step} ") == 1, shown[-3000:]
    assert "train:" in result.stderr  # the bar was there


def _screen(text: str) -> list[str]:
    """The rows a terminal shows for `text`: '\\r' goes back to the row's start, '\\n' down a row, tqdm's
    '\\x1b[A' (a second bar's) up one, and a character overwrites the one under the cursor."""
    rows, row, col = [[]], 0, 0
    for ch in text.replace("\x1b[A", "\x00"):
        if ch == "\n":
            row, col = row + 1, 0
            rows.extend([] for _ in range(row + 1 - len(rows)))
        elif ch == "\r":
            col = 0
        elif ch == "\x00":
            row = max(row - 1, 0)
        else:
            cells = rows[row]
            cells.extend(" " for _ in range(col + 1 - len(cells)))
            cells[col], col = ch, col + 1
    return ["".join(cells).rstrip() for cells in rows]


def assert_log_lines_start_their_rows(text: str, expected: tuple) -> None:
    """Each log record the terminal shows starts its row, with no bar text before or after it (the bar was
    cleared for it and drawn again after), and the lines `expected` are among them."""
    rows = _screen(text)
    logged = [row for row in rows if "[trainer." in row]
    for row in logged:
        assert re.match(r"(\[[-\d :,]+\])?\[trainer[.\w]*\]\[[A-Z]+\] - ", row), f"glued onto a bar: {row!r}"
        assert "%|" not in row and "it/s]" not in row and "step/s]" not in row, f"bar text on a log row: {row!r}"
    for line in expected:
        assert sum(line in row for row in logged) == 1, (line, "\n".join(rows[-60:]))
    assert any(row.startswith("train:") and "%|" in row for row in rows), text[-2000:]  # the bar was drawn


@pytest.mark.slow
def test_log_lines_clear_the_bar_and_train_lines_go_to_trainer_log_only(tmp_path, tiny):
    """The CLI with its bar (forced: a pipe is no terminal), stdout and stderr in one stream as `2>&1 | tee` has
    them: every log line (the first loop's, each checkpoint's, the eval's) starts its own row; the train lines (the
    bar shows them) are in trainer.log, with the memory, and not on the terminal."""
    run_dir = tmp_path / "run"
    with_bar = [o for o in tiny if not o.startswith("trainer.progress_bar=")] + ["trainer.progress_bar=true"]
    result = subprocess.run([sys.executable, "-m", "trainer", *with_bar, "trainer.eval_every=20",
                             f"hydra.run.dir={run_dir}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert_log_lines_start_their_rows(result.stdout, (
        "First loop (trace/compile", "checkpoints/ckpt-20", "checkpoints/ckpt-40",
        "eval @ step 20 (10 batches)", "Done: 40 steps"))
    text = (run_dir / "trainer.log").read_text()
    for step in (10, 20, 30, 40):
        assert text.count(f"[trainer.callbacks][INFO] - step {step}/40: loss=") == 1, text[-3000:]
    assert re.search(r"step 40/40: loss=.* \| mem \d+ MiB", text), text[-3000:]
    assert "step 10/40:" not in result.stdout, result.stdout[-3000:]  # the bar shows it


@pytest.mark.slow
def test_from_python_log_lines_clear_the_bar_and_the_bar_alone_shows_the_train_lines(tmp_path):
    """fit() from Python with the bar (forced), stderr and stdout in one stream: the first loop's line, the
    eval line and the summary each start their own row (the first loop's was glued onto the bar); no train line."""
    result = _fit(tmp_path, then=THEN_BAR, merged=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert_log_lines_start_their_rows(result.stdout, ("eval @ step 7: loss=", "Done: 7 steps"))
    assert result.stdout.count("First loop (trace/compile") == 3, result.stdout[-3000:]  # one per fit()
    assert "step 5/7:" not in result.stdout, result.stdout[-3000:]  # the bar shows it


def test_the_bar_is_drawn_on_a_terminal_only_unless_forced(tmp_path, tiny):
    """trainer.progress_bar's default decides as tqdm's disable=None: stderr to a file or a pipe (`2>log`, here
    the test's capture) gets the log lines, not bar frames; stderr a terminal, or progress_bar=true, the bar."""
    import sys
    from unittest import mock

    from trainer.console import bar_shown

    args = [o for o in tiny if not o.startswith("trainer.progress_bar=")]
    piped = run_cli(*args, f"hydra.run.dir={tmp_path / 'piped'}")
    output = piped.stdout + piped.stderr
    assert piped.returncode == 0, output[-3000:]
    assert "%|" not in output and "step/s" not in output, output[-3000:]  # no frame of the bar
    assert re.search(r"step 40/40: loss=\d+\.\d{4}", output), output[-3000:]  # the lines the bar would show
    forced = run_cli(*args, "trainer.progress_bar=true", f"hydra.run.dir={tmp_path / 'forced'}")
    assert forced.returncode == 0 and re.search(r"train: +\d+%\|", forced.stderr), forced.stderr[-3000:]
    with mock.patch.object(sys, "stderr", mock.Mock(isatty=lambda: True)):
        assert bar_shown(None) and not bar_shown(False)
    with mock.patch.object(sys, "stderr", mock.Mock(isatty=lambda: False)):
        assert not bar_shown(None) and bar_shown(True)


def test_the_auto_progress_bar_needs_a_terminal_with_columns(monkeypatch):
    """progress_bar=null draws the bar on a terminal; one that reports 0 columns (a fresh pty, `docker exec -t`)
    would show nothing at all, so it gets the log lines; a file gets them too."""
    import fcntl
    import os
    import struct
    import termios

    from trainer.console import bar_shown

    master, slave = os.openpty()
    with os.fdopen(slave, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        assert bar_shown(None) is False  # a new pty is 0 x 0
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        assert bar_shown(None) is True
        assert bar_shown(False) is False
    os.close(master)
    with open(os.devnull, "w") as file:
        monkeypatch.setattr(sys, "stderr", file)
        assert bar_shown(None) is False and bar_shown(True) is True


QUIET_THEN_VERBOSE = """
import sys, keras
from trainer import Trainer
sys.path.insert(0, {tests!r})
from conftest import blobs

def make(verbose):
    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.SGD(0.1), log_every=2, progress_bar=False, verbose=verbose)

make(False).fit(blobs(), steps=2)
print("--- verbose after a quiet fit ---", file=sys.stderr, flush=True)
make(True).fit(blobs(), steps=2)
print("--- verbose built before a quiet one ---", file=sys.stderr, flush=True)
verbose = make(True)
make(False)
verbose.fit(blobs(), steps=2)
"""


@pytest.mark.slow
def test_a_verbose_trainer_after_a_quiet_one_in_the_same_process_shows_its_lines(tmp_path):
    """A quiet Trainer keeps our handler (for its warnings) and undoes the INFO level: a verbose Trainer after it
    (made after, or fitted after) still shows its INFO lines (it printed none)."""
    from pathlib import Path

    script = QUIET_THEN_VERBOSE.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    quiet, after_quiet = result.stderr.split("--- verbose after a quiet fit ---\n")
    after_quiet, built_before = after_quiet.split("--- verbose built before a quiet one ---\n")
    assert "[INFO]" not in quiet, quiet[-3000:]
    for shown in (after_quiet, built_before):
        assert "[trainer.core][INFO]" in shown, shown[-3000:]
        assert shown.count("[trainer.callbacks][INFO] - Done: 2 steps") == 1, shown[-3000:]
