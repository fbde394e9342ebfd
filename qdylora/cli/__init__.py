"""`qdylora` command line: one click group, one module per command, thin over the Python API.

Each command imports what it needs (torch, transformers, ...) inside its function, so
`qdylora --help` and `qdylora info` start in a fraction of a second. Bad input (unknown
keys, missing files, ranks out of range) prints one line and exits 2. Library noise that
says nothing to the user is held back unless `-v/--verbose` or `QDYLORA_VERBOSE=1`.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import InputError
from . import quiet
from .params import UserError


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InputError as exc:
            raise UserError(str(exc)) from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qdylora")
@click.option("-v", "--verbose", is_flag=True, help="Show library messages and warnings (also: QDYLORA_VERBOSE=1).")
def main(verbose: bool) -> None:
    """QDyLoRA: train one 4-bit LoRA adapter, then use any rank from r_min to r_max."""
    quiet.configure(verbose)


def _register() -> None:
    from .demo import demo
    from .export import export
    from .generate import generate
    from .heal import heal
    from .info import info
    from .plan import plan
    from .sweep import sweep
    from .train import train

    for command in (train, sweep, info, export, generate, heal, demo, plan):
        main.add_command(command)


_register()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
