"""The documentation: every code block of README.md and docs/ runs as written (or says why it cannot), the
site builds with `mkdocs build --strict`, and the configuration reference matches the config dataclasses.

How blocks run (see docs/getting-started.md#tests for the reader's view):
- ```python blocks run as a script in a fresh folder; they are written small enough to run as they are.
- Commands and scripts run in the test's process through their real entry points (tests/cli_runner.py),
  or in a new one where that is not faithful (an `export`ed variable, devices set up, distribution).
- ```bash blocks run line by line in a fresh folder (relative paths such as runs/a are shared by the
  lines of one block). `python -m trainer ...` gets the shrinking overrides of conftest.TINY appended (a
  key the line sets and TINY also sets takes TINY's value);
  `python -m trainer.export|convert|evaluate|predict|plot|doctor|lr_find` and `python <repo script>` run as
  written; `export NAME=VALUE` sets the environment of the later lines. A
  line's comment `(exit N)` is the exit code it must end with (else 0).
- ```text blocks are output or listings, not code.
- `<!-- no-test: REASON -->` on the line before a block marks it as not run (hardware, data, time); its
  `python -m trainer` commands are still composed against the config schema in-process, which is fast.
- A block that appeared earlier, a bash block whose lines begin an earlier block's (same commands, same order,
  comments aside: docs/concepts/checkpoints.md's first block is README's run-folder block), or a stateless
  `python -m trainer` line (no run folder named) that appeared earlier, runs once.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from cli_runner import run_module, run_script
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"bash", "python", "text"}
MARKER = re.compile(r"^<!--\s*no-test:\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^```(?P<lang>\S*)\s*$")


@dataclass
class Command:
    argv: List[str]
    env: Dict[str, str]
    exit_code: int
    line: str

    @property
    def trainer_overrides(self) -> Optional[List[str]]:
        """The overrides of a `python -m trainer` command; None for any other command."""
        if self.argv[:3] == ["python", "-m", "trainer"]:
            return self.argv[3:]
        return None


@dataclass
class Block:
    path: Path
    line: int
    lang: str
    code: str
    skip: Optional[str]  # the no-test reason
    duplicate_lines: set = field(default_factory=set)

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def commands(self) -> List[Command]:
        """The block's bash lines (continuations joined), parsed."""
        out = []
        for raw in re.sub(r"\\\n\s*", " ", self.code).splitlines():
            words = shlex.split(raw, comments=True)
            if not words:
                continue
            expected = re.search(r"#.*\(exit (\d+)\)", raw)
            if words[0] == "export":
                out.append(Command(words, {}, 0, raw))
                continue
            prefix = {}
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                name, value = words.pop(0).split("=", 1)
                prefix[name] = value
            out.append(Command(words, prefix, int(expected.group(1)) if expected else 0, raw))
        return out


def read_blocks(path: Path) -> List[Block]:
    lines = path.read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        found.append(Block(path, i + 1, m["lang"], "\n".join(lines[i + 1:end]) + "\n",
                           marker["reason"] if marker else None))
        i = end + 1
    return found


def _stateless(command: Command) -> bool:
    overrides = command.trainer_overrides
    return overrides is not None and not any("runs/" in o or o.startswith("hydra.run.dir=") for o in overrides)


def _steps(commands: List[Command]) -> List[tuple]:
    """What a bash block runs, comments aside: each line's argv, environment and expected exit code."""
    return [(tuple(c.argv), tuple(sorted(c.env.items())), c.exit_code) for c in commands]


def all_blocks() -> List[Block]:
    blocks, seen, ran = [], set(), []  # ran: the steps of each bash block that runs
    for path in DOC_FILES:
        for block in read_blocks(path):
            if block.skip is None and block.lang in ("bash", "python") and block.code in seen:
                block.skip = "duplicate"  # the same block ran earlier
            elif block.skip is None and block.lang == "bash" and any(
                    earlier[:len(block.commands())] == _steps(block.commands()) for earlier in ran):
                block.skip = "duplicate"  # an earlier block ran these lines in this order, from a fresh folder as here
            elif block.skip is None and block.lang == "bash":
                commands = block.commands()
                for command in commands:
                    key = tuple(command.argv)
                    if _stateless(command) and key in seen:
                        block.duplicate_lines.add(command.line)
                    seen.add(key)
                if len(block.duplicate_lines) == len(commands):
                    block.skip = "duplicate"  # every line ran earlier
            if block.skip is None:
                seen.add(block.code)
                if block.lang == "bash":
                    ran.append(_steps(block.commands()))
            blocks.append(block)
    return blocks


BLOCKS = all_blocks()
RUN = [b for b in BLOCKS if b.skip is None and b.lang in ("bash", "python")]


def with_tiny(command: Command) -> List[str]:
    """The command's overrides with TINY's; a command documented to fail keeps its own values."""
    overrides = command.trainer_overrides
    keys = {o.split("=", 1)[0] for o in overrides}
    if command.exit_code != 0:
        return overrides + [o for o in TINY if o.split("=", 1)[0] not in keys]
    tiny_keys = {o.split("=", 1)[0] for o in TINY}
    return [o for o in overrides if o.split("=", 1)[0] not in tiny_keys] + TINY


def resolve(command: Command) -> List[str]:
    """The argv to run for a documented command, or a failure naming why it cannot run."""
    argv = command.argv
    if argv[0] != "python":
        pytest.fail(f"{command.line!r}: the test runs only python commands; mark the block with "
                    "<!-- no-test: REASON -->")
    if command.trainer_overrides is not None:
        return ["python", "-m", "trainer", *with_tiny(command)]
    if argv[1:2] == ["-m"] and argv[2] in ("trainer.export", "trainer.convert", "trainer.evaluate", "trainer.predict",
                                           "trainer.plot", "trainer.doctor", "trainer.lr_find"):
        return list(argv)
    if len(argv) > 1 and (ROOT / argv[1]).is_file():
        return ["python", str(ROOT / argv[1]), *argv[2:]]
    pytest.fail(f"{command.line!r}: not a command this test knows how to run; mark the block with "
                "<!-- no-test: REASON -->")


def test_every_block_is_runnable_or_says_why_not():
    problems = []
    for block in BLOCKS:
        if block.lang not in LANGUAGES:
            problems.append(f"{block.id}: fence language {block.lang!r} (use bash, python, or text for output)")
        if block.skip is not None and not block.skip.strip():
            problems.append(f"{block.id}: a no-test marker needs a reason")
        if block.skip is not None and block.lang == "text":
            problems.append(f"{block.id}: a text block is never run; the marker is misleading")
    assert not problems, "\n".join(problems)
    readme_run = [b for b in RUN if b.path.name == "README.md"]  # the front door's blocks really run
    assert any(b.lang == "python" and "Trainer(" in b.code for b in readme_run)
    assert any(b.lang == "bash" and b.code.startswith("python -m trainer ") for b in readme_run)


# A Python block runs in its own interpreter when it sets up devices or distribution: TensorFlow allows
# that only before it initializes, which in the test's process happened long ago.
NEEDS_OWN_PROCESS = ("logical_cpus", "set_logical_device_configuration", "MirroredStrategy", "TF_CONFIG")


def run_command(argv: List[str], cwd: Path, env: Dict[str, str]):
    """A documented `python ...` command, in the test's process where that is faithful (tests/cli_runner.py):
    `-m MODULE` through its real entry point, a script through runpy; an `export`ed variable needs a process."""
    if argv[1] == "-m":
        return run_module(argv[2], argv[3:], cwd=cwd, env=env or None)
    return run_script(argv[1], argv[2:], cwd=cwd, env=env or None)


# Blocks that train and time many configurations run in the slow stage; tests/test_doctor.py covers the
# doctor in the default one.
SLOW_BLOCK_COMMANDS = ("python -m trainer.doctor --quick",)


def _staged(block: Block):
    """A block over the default stage's 30 s is slow: the doctor, and a Python block in its own process (a fresh
    TensorFlow, a split CPU: 20-40 s on 2 shared cores). test_distribute.py checks the same in its CPU-split script."""
    slow = any(command in block.code for command in SLOW_BLOCK_COMMANDS) or (
        block.lang == "python" and any(word in block.code for word in NEEDS_OWN_PROCESS))
    return pytest.param(block, id=block.id, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("block", [_staged(b) for b in RUN])
def test_doc_block_runs(block: Block, tmp_path):
    if block.lang == "python":
        script = tmp_path / "block.py"
        script.write_text(block.code)
        own_process = any(word in block.code for word in NEEDS_OWN_PROCESS)
        result = run_script(script, cwd=tmp_path, process=own_process)
        assert result.returncode == 0, f"{block.id}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        return
    env: Dict[str, str] = {}
    for command in block.commands():
        if command.argv[0] == "export":
            env.update(dict(word.split("=", 1) for word in command.argv[1:]))
            continue
        if command.line in block.duplicate_lines:
            continue  # the same stateless command ran in an earlier block
        result = run_command(resolve(command), tmp_path, {**env, **command.env})
        assert result.returncode == command.exit_code, (
            f"{block.id}: {command.line.strip()}\nexit {result.returncode}, expected {command.exit_code}\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )


def _compose_args(overrides: List[str]) -> List[List[str]]:
    """Hydra overrides as compose() takes them: no flags, no hydra.* keys, one list per sweep job (an
    interval, which only Optuna samples: one job)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    kept = [o for o in overrides if not o.startswith("-") and o != "job" and not o.startswith("hydra.")]
    jobs: List[List[str]] = [[]]
    for override in OverridesParser.create().parse_overrides(kept):
        text = override.input_line
        if override.is_interval_sweep():  # an Optuna search space: its lower end stands for it
            jobs = [job + [f"{override.get_key_element()}={override.value().start}"] for job in jobs]
        elif override.is_sweep_override():
            key = override.get_key_element()
            jobs = [job + [f"{key}={value}"] for job in jobs for value in override.sweep_string_iterator()]
        else:
            jobs = [job + [text] for job in jobs]
    return jobs


def test_documented_commands_compose_against_the_schema():
    """Every `python -m trainer` line, run or not: its overrides name real keys, types and options."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from trainer.argv_check import problem_in
    from trainer.assemble import register_configs

    register_configs()
    checked, problems, seen = 0, [], {}  # seen: a job's composition error (None: composed), each job composed once
    with initialize_config_module("trainer.conf", version_base="1.3"):
        for block in BLOCKS:
            if block.lang != "bash":
                continue
            for command in block.commands():
                if command.trainer_overrides is None:
                    continue
                for job in _compose_args(command.trainer_overrides):
                    if tuple(job) not in seen:
                        try:
                            OmegaConf.to_container(compose("config", overrides=job), resolve=True)
                            seen[tuple(job)] = None
                        except Exception as e:  # noqa: BLE001 - any composition error is the finding
                            seen[tuple(job)] = e
                    error = seen[tuple(job)]
                    composed = error is None
                    checked += 1
                    if composed and command.exit_code == 1:
                        problems.append(f"{block.id}: {command.line.strip()}: documented as a "
                                        "config error, but it composes")
                    # a wrong type, said before Hydra composes
                    caught_first = command.exit_code == 2 and problem_in(job)
                    if not composed and command.exit_code != 1 and not caught_first:
                        problems.append(f"{block.id}: {command.line.strip()}: {type(error).__name__}: {error}")
    assert not problems, "\n".join(problems)
    assert checked >= 40


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    for command in ("bash scripts/setup.sh && python -m trainer", "bash scripts/setup.sh && python -m pytest -q -n 2"):
        assert f"```bash\n{command}\n```" in readme, command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "bash scripts/setup.sh" in ci and "python -m pytest -q -n 2" in ci
    assert (ci.index("ruff check trainer tests scripts benchmarks examples recipes")
            < ci.index("python -m pytest -q -n 2"))
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert 'pip install -q -e ".[text,test,bench,docs,mlflow,wandb,export,sweep,profile]"' in setup


def test_the_code_passes_the_linter_ci_runs():
    """.ci/run's `ruff check` (pyproject.toml's [tool.ruff]: pyflakes' rules), with the version the test extra pins."""
    import tomllib

    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert "ruff==0.14.0" in pins
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "trainer", "tests", "scripts", "benchmarks",
                             "examples", "recipes"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]


def _mkdocs(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=config_dir,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=300)


def test_site_builds_strict(tmp_path):
    result = _mkdocs(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    page = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "trainer.max_steps" in page and "total train steps" in page


def test_strict_build_fails_on_a_broken_link(tmp_path):
    """The check above is not vacuous: a link to a heading that does not exist fails the build."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    with open(tmp_path / "docs" / "index.md", "a") as f:
        f.write("\nSee [the missing part](faults.md#no-such-heading).\n")
    result = _mkdocs(tmp_path, tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-heading" in result.stdout + result.stderr


def _reference_module():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_complete_and_up_to_date():
    ref = _reference_module()
    text, missing = ref.render()
    assert missing == [], f"config fields without a description (add a # comment): {missing}"
    assert ref.stale_fallbacks() == [], "FALLBACK entries to remove from scripts/config_reference.py"
    assert ref.OUT.read_text() == text, ("docs/reference/config.md is out of date: run python "
                                         "scripts/config_reference.py")


def test_config_reference_reads_comments_and_reports_undescribed_fields(tmp_path, monkeypatch):
    ref = _reference_module()
    (tmp_path / "doc_schema.py").write_text(
        "from dataclasses import dataclass\n\n"
        "@dataclass\nclass Base:\n"
        "    # said above\n    # over two lines\n    above: int = 1\n"
        "    trailing: str = 'x'  # said after\n\n"
        "@dataclass\nclass Child(Base):\n    trailing: str = 'y'\n    bare: float = 0.5\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import doc_schema

    assert ref.describe(doc_schema.Base, "above")[0] == "said above over two lines"
    assert ref.describe(doc_schema.Child, "trailing")[0] == "said after"  # an override inherits it
    rows, missing = ref.table(doc_schema.Child, "x.")
    assert missing == ["Child.bare"]
    assert "| `x.trailing` | `str` | `y` | said after |" in rows
