"""Hydra's own command-line flags, read as Hydra's argument parser reads them (abbreviations included:
`--multi`, `--config-d`), for trainer/argv_check.py and trainer/cli_help.py before Hydra runs."""
from __future__ import annotations

from typing import List, Optional, Sequence


def hydra_args(args: Sequence[str]):
    """Hydra's own argument parser on `args`: (its namespace, the arguments it leaves), abbreviated flags
    (`--multi`, `--config-d`) read as Hydra reads them; None when it rejects them (Hydra then says why)."""
    import contextlib
    import io

    from hydra._internal.utils import get_args_parser

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):  # --version
            return get_args_parser().parse_known_args(list(args))
    except SystemExit:  # a flag without its argument, an ambiguous abbreviation
        return None


def other_configs(args: Sequence[str]) -> bool:
    """Whether `args` point Hydra at configs besides this package's conf/ (--config-dir/-name/-path, however
    abbreviated, or hydra.searchpath): their groups and keys are Hydra's to judge."""
    parsed = hydra_args(args)
    if parsed is None:
        return True
    ns = parsed[0]
    return (any(v is not None for v in (ns.config_dir, ns.config_name, ns.config_path))
            or any(o.lstrip("+").startswith("hydra.searchpath") for o in ns.overrides))


def positionals(args: Sequence[str]) -> List[str]:
    """The overrides of `args` as Hydra's argument parser finds them (not a flag's argument: --cfg job)."""
    parsed = hydra_args(args)
    if parsed is None:  # a flag without its argument: Hydra's parser says which
        return [a for a in args if "=" in a and not a.startswith("-")]
    return list(parsed[0].overrides)


def commands_problem(args: Sequence[str]) -> Optional[str]:
    """`-m ... --cfg job`: two of Hydra's commands at once, which Hydra refuses with a ValueError traceback."""
    parsed = hydra_args(args)
    if parsed is None or parsed[0].help or parsed[0].hydra_help:  # Hydra answers these first
        return None
    ns = parsed[0]
    given = [name for name, on in (("--run", ns.run), ("--multirun", ns.multirun), ("--cfg", ns.cfg is not None),
                                   ("--info", ns.info is not None), ("--shell-completion", ns.shell_completion))
             if on]
    if len(given) < 2:
        return None
    hint = " (--cfg job prints one run's config, its values of a sweep the first)" if "--cfg" in given else ""
    return (f"{' '.join(given)}: Hydra does one of --run, --multirun (-m), --cfg, --info and --shell-completion "
            f"at a time. Fix: keep one of them{hint}.")
