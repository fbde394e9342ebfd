"""The one exception type for bad user input (the CLI turns it into exit code 2)."""


class InputError(ValueError):
    """A setting, file or rank given by the user is wrong; the message says how to fix it."""
