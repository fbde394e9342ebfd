"""The one exception type for bad user input (the CLI turns it into exit code 2)."""


class InputError(ValueError):
    """A setting, file or rank given by the user is wrong; the message says how to fix it."""


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (its name if it has none), for a one-line error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def check_output_file(path: str, overwrite: bool, option: str) -> None:
    """An output FILE the user named: its folder exists, it is not a folder, and it is new unless `overwrite`."""
    import os

    if os.path.isdir(path):
        raise InputError(f"{option} {path} is a folder; give a file name")
    if os.path.lexists(path) and not overwrite:
        raise InputError(f"{option} {path} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"{option}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option}: cannot write to {parent} (permission denied)")
