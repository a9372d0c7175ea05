"""The errors the library raises on purpose, and the one mapping from an error to an exit code.

Every `python -m trainer.*` command exits through `exit_code_of` (or `report_error`): an error of this
hierarchy anywhere in the cause chain exits with its class's `exit_code`, its message in one line and no
traceback; anything else is a bug and keeps its traceback. A new error type subclasses `UserError` (or
`NumericalFailure`) where it is raised and needs no edit here or in any command.

The lowest layer: it imports nothing of the trainer and not TensorFlow.
"""
from __future__ import annotations

import re

import functools
import sys
from typing import Callable, Optional, Tuple, Type, Union

EXIT_BUG = 1  # Python's own exit code for an uncaught exception
EXIT_USER_ERROR = 2
EXIT_NUMERICAL = 3
EXIT_SIGNAL = {"SIGTERM": 143, "SIGINT": 130}  # 128 + the signal's number, as a shell reports it


class TrainerError(Exception):
    """Base of the errors raised on purpose. `exit_code`: what a command exits with when it ends on one."""

    exit_code = EXIT_BUG


class UserError(TrainerError):
    """Bad input (a config value, data, a run folder, an argument): the message says what and the fix.
    A command exits 2 and prints no traceback."""

    exit_code = EXIT_USER_ERROR


class NumericalFailure(TrainerError):
    """The numbers cannot be trusted: training went non-finite or diverged, or an export does not reproduce
    the model. A command exits 3."""

    exit_code = EXIT_NUMERICAL


def find_error(error: BaseException, types: Tuple[Type[BaseException], ...] = (TrainerError,),
               implicit: bool = False) -> Optional[BaseException]:
    """The first error of `types` in `error`'s cause chain (itself, its __cause__, ...), else None.

    Hydra's instantiate re-raises what a builder raised as the cause of its own error, so a recipe's
    DataError arrives wrapped. `implicit`: also follow __context__ (an error raised while handling another,
    as TensorFlow's file ops do with the OSError of a full disk)."""
    seen = error
    while seen is not None and not isinstance(seen, types):
        seen = seen.__cause__ or (seen.__context__ if implicit else None)
    return seen


def exit_code_of(error: BaseException,
                 bad_input: Tuple[Type[BaseException], ...] = ()) -> Optional[Tuple[int, BaseException]]:
    """(exit code, the error whose message says why) for an error of ours in `error`'s chain, else None (a
    bug). `bad_input`: errors not of ours that a command knows to mean bad input for it (exit 2)."""
    ours = find_error(error)
    if ours is not None:
        return ours.exit_code, ours
    foreign = find_error(error, bad_input) if bad_input else None
    return None if foreign is None else (EXIT_USER_ERROR, foreign)


def report_error(error: BaseException, bad_input: Tuple[Type[BaseException], ...] = (),
                 prefix: str = "error: ") -> Optional[int]:
    """Prints the message of the error of ours in `error`'s chain to stderr and returns its exit code; None
    for a bug, which the caller raises again (`if code is None: raise`) to keep its traceback."""
    found = exit_code_of(error, bad_input)
    if found is None:
        return None
    code, cause = found
    print(f"{prefix}{cause}", file=sys.stderr)
    return code


def reports_errors(bad_input: Union[Tuple[Type[BaseException], ...], Callable[[], tuple]] = (), prefix: str = "error: ",
                   exits: bool = False) -> Callable:
    """Decorates a command's `main`: an error of ours (or of `bad_input`: a tuple, or a function giving one
    when an error is being reported, so a command need not import TensorFlow to name its errors) anywhere in
    it prints its one line (`report_error`) and `main` returns its exit code, or with `exits` raises
    SystemExit with it; anything else is a bug and keeps its traceback."""
    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - ours exit with their code and message; a bug is raised again
                code = report_error(e, bad_input() if callable(bad_input) else bad_input, prefix)
                if code is None:
                    raise
                if exits:
                    sys.exit(code)
                return code
        return run
    return decorate


def first_sentence(text: str) -> str:
    """`text`'s first sentence (to a period before a capital: "... Fix: ..." is left out), else all of it."""
    text = " ".join(text.split())
    found = re.match(r"(.+?\.)\s+(?=[A-Z])", text)
    return found.group(1) if found else text
