"""Quiet by default: the CLI shows qdylora's own messages, and holds back library lines that
say nothing to its user (bitsandbytes' optional-kernel notice, DeepSpeed's "Setting
accelerator to CPU", libraries' deprecation warnings about each other). `-v/--verbose` or
QDYLORA_VERBOSE=1 shows everything.

Filters are attached to the named loggers before those libraries are imported (a logger's
filters survive the library's own logging setup), so nothing here imports them.
"""

from __future__ import annotations

import logging
import os
import warnings

import click

# logger name -> message prefixes that are noise for a CLI user
NOISE = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "DeepSpeed": ("Setting accelerator to CPU",),
}
VERBOSE_ENV = "QDYLORA_VERBOSE"


class _Noise(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


class _EchoHandler(logging.Handler):
    """The `qdylora` logger's messages on the terminal's stderr, as plain lines."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


def is_verbose(flag: bool = False) -> bool:
    return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def configure(verbose: bool = False) -> None:
    """Set up the terminal's messages for one CLI invocation."""
    log = logging.getLogger("qdylora")
    if not any(isinstance(h, _EchoHandler) for h in log.handlers):
        log.addHandler(_EchoHandler(logging.INFO))
    log.setLevel(logging.INFO)
    log.propagate = False
    if is_verbose(verbose):
        return
    for name, prefixes in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Noise) for f in logger.filters):
            logger.addFilter(_Noise(prefixes))
    # warnings between libraries (e.g. PEFT calling a deprecated transformers property) are
    # for their developers; ours are fixed at the source instead of hidden
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
