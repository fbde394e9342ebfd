"""What the commands share: the error that exits 2, the rank-list type, the data and method options.

Importing this module imports click and nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..config import RECOMMENDED, check_method
from ..errors import InputError


class UserError(click.ClickException):
    """An `InputError` on its way out: one line on stderr, exit code 2."""

    exit_code = 2


class RankList(click.ParamType):
    """'1,2,8', '1-4,16' or, where allowed, 'recommended' (the sweep's pick) -> a sorted list.

    A bad list is one line naming the option (exit 2), not click's usage block.
    """

    name = "ranks"

    def __init__(self, recommended: bool = False) -> None:
        self.recommended = recommended

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[int | str]:
        if isinstance(value, list):
            return value
        ranks: set[int] = set()
        named: list[str] = []
        example = "1,2,8 or 1-4,16" + (" or recommended" if self.recommended else "")
        try:
            for part in str(value).split(","):
                part = part.strip()
                if self.recommended and part.lower() == RECOMMENDED:
                    named = [RECOMMENDED]
                elif "-" in part:
                    lo, hi = (int(x) for x in part.split("-", 1))
                    if lo > hi:
                        raise ValueError
                    ranks.update(range(lo, hi + 1))
                else:
                    ranks.add(int(part))
        except ValueError:
            self._fail(f"{value!r} is not a list of ranks such as {example}", param)
        if ranks and min(ranks) < 1:
            self._fail(f"ranks must be >= 1, got {value!r}", param)
        return sorted(ranks) + named

    @staticmethod
    def _fail(message: str, param: click.Parameter | None) -> None:
        name = param.opts[0] if param is not None and param.opts else "ranks"
        raise UserError(f"{name}: {message}")


def check_method_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--method prefix|svd, checked so that a typo is one line (exit 2), not click's usage block."""
    if value is None:
        return None
    try:
        return check_method(value.strip().lower())
    except InputError as exc:
        raise UserError(str(exc)) from None


METHOD_HELP = (
    "prefix: the first b rows/columns (the rank QDyLoRA trained); svd: the best rank-b approximation of each "
    "layer's delta (any LoRA adapter, no --force needed). Default: prefix, or the sweep's method with --rank recommended."
)


def data_options(fn: Callable) -> Callable:
    """Options that say how a prompt/answer file becomes evaluation examples (a `DataSpec`)."""
    for opt in reversed(
        [
            click.option("--data", "data_path", required=True, help="JSON/JSONL file (or datasets name) to evaluate on."),
            click.option("--prompt-field", default=None, help="Prompt column (default: auto-detected)."),
            click.option("--answer-field", default=None, help="Answer column (default: auto-detected)."),
            click.option("--template", default="{prompt}\n", show_default=True, help="Prompt template."),
            click.option("--max-length", default=512, show_default=True, type=int),
            click.option("--limit", default=None, type=int, help="Use only the first N records."),
        ]
    ):
        fn = opt(fn)
    return fn


def settings_options(cls: type, skip: tuple[str, ...] = ()) -> Callable:
    """One option per field of a settings dataclass (`--steps-fraction` for `steps_fraction`), its
    help from the field; unset options are left out, so the dataclass's defaults and checks
    (one line each) apply. A new field is a new option; `skip` names fields the command declares
    itself (with its own help)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)

    def decorate(fn: Callable) -> Callable:
        for f in reversed([f for f in dataclasses.fields(cls) if f.name not in skip]):
            kinds = set(typing.get_args(hints[f.name])) or {hints[f.name]}
            kind = click.INT if kinds <= {int, type(None)} else click.FLOAT if kinds <= {float, int} else None
            default = "" if f.default is None else f" [default: {f.default}]"
            fn = click.option(f"--{f.name.replace('_', '-')}", f.name, type=kind, default=None,
                              help=f.metadata["help"] + default)(fn)
        return fn

    return decorate
