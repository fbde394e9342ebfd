"""The one exception type for bad user input (the CLI turns it into exit code 2), and the
small checks of user input that several layers share."""

import os
from pathlib import Path


class InputError(ValueError):
    """A setting, file or rank given by the user is wrong; the message says how to fix it."""


def is_int(value: object) -> bool:
    """An integer setting: an int, but not a bool (YAML's and JSON's true/false are ints to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_creatable(path: str | os.PathLike, what: str) -> None:
    """The nearest existing ancestor of `path` is a folder we may write to (so `path` can be created)."""
    path = Path(os.path.abspath(path))
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{what} {path} lies under {parent}, which is a file; choose another")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise InputError(f"cannot write to {parent} (permission denied); choose another {what}")
            return


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (its name if it has none), for a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_output_file(path: str, overwrite: bool, option: str) -> None:
    """An output FILE the user named: its folder exists, it is not a folder, and it is new unless `overwrite`."""
    if os.path.isdir(path):
        raise InputError(f"{option} {path} is a folder; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise InputError(f"{option} {path} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"{option}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option}: cannot write to {parent} (permission denied)")
