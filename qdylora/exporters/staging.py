"""All-or-nothing output folders.

An export is written into a hidden temporary folder beside the target and renamed into
place only when complete, so the target either does not exist or is whole, even if the
process is killed mid-write. A later export into the same folder removes the temporary
folders (`.NAME.qdylora-tmp-PID-*`) that dead processes left behind, and says so. A
moved-aside previous output (`.NAME.qdylora-old-PID-*`, left only if a process died
between its two renames) holds a user's data: it is put back if the target is missing,
and otherwise reported, never deleted.

Inputs are compared by their REAL paths (symlinks and `..` resolved), so no spelling of
a path lets `--overwrite` replace, or write inside, the adapter or base being read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import InputError, check_creatable

_TMP = ".qdylora-tmp-"
_OLD = ".qdylora-old-"
log = logging.getLogger("qdylora")


@contextlib.contextmanager
def staged_output(
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    protect: Sequence[str | os.PathLike | None] = (),
    inside_ok: bool = False,
) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes `out_dir`, on any error it is removed.

    Raises `InputError` if `out_dir` exists and `overwrite` is false, if it is not a folder
    or lies under a file or an unwritable folder, or if it is, contains or lies inside one
    of the `protect` folders (the adapter being exported, the base model), which
    `--overwrite` must never delete or change. `inside_ok` lets the output be a new
    subfolder of an input (the Axolotl plugin's `OUTPUT/exports`): only reading the input.
    """
    out = _target(out_dir)
    check_not_input(out, protect, inside_ok=inside_ok)
    _remove_stale(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InputError(f"output {out} exists and is not a folder; choose another --out")
        if not overwrite:
            raise InputError(f"output folder {out} already exists; pass --overwrite to replace it")
    check_creatable(out, "--out")  # the temporary folder is created beside it
    created = _first_missing(out.parent)
    tmp = out.parent / f".{out.name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise InputError(f"cannot create {out}: {exc.strerror or exc}; choose another --out") from exc
    try:
        yield tmp
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _target(out_dir: str | os.PathLike) -> Path:
    """The path a rename must replace: the real parent folder plus the last name as given.

    The parent is resolved (a symlink or `..` in it points where the OS would go); the last
    component is kept, so an output that is itself a symlink is replaced as a link, and
    the folder it points to is left alone.
    """
    p = Path(out_dir).expanduser()
    if p.name in ("", ".", ".."):
        return Path(os.path.realpath(p))
    return Path(os.path.realpath(p.parent)) / p.name


def check_not_input(
    out: str | os.PathLike, inputs: Sequence[str | os.PathLike | None], *, inside_ok: bool = False
) -> None:
    """Raise `InputError` if `out` is, contains or lies inside one of `inputs` (real paths).

    Symlinks and `..` are resolved on both sides, so `run-link` or `run/../run` is seen
    to be `run`. Writing inside an input would also change it, so that is refused too,
    unless `inside_ok` (then only "is" and "contains" are refused).
    """
    real_out = Path(os.path.realpath(Path(out).expanduser()))
    for keep in inputs:
        if keep is None:
            continue
        real_keep = Path(os.path.realpath(Path(keep).expanduser()))
        inside = real_keep in real_out.parents and not inside_ok
        if real_out == real_keep or inside or real_out in real_keep.parents:
            raise InputError(
                f"output {out} is, contains or lies inside the input {keep} (real path {real_keep}); "
                "choose an --out outside it"
            )


def _commit(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, moving an existing `out` aside first and deleting it after."""
    if not (out.exists() or out.is_symlink()):
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}{_OLD}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_symlink() or not old.is_dir():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def _first_missing(folder: Path) -> Path | None:
    """The outermost ancestor of `folder` (or itself) that does not exist yet."""
    missing = None
    for p in [folder, *folder.parents]:
        if p.exists():
            break
        missing = p
    return missing


def _remove_stale(out: Path) -> None:
    """Clear what dead processes left beside `out`: temporaries go, moved-aside outputs stay.

    A `.qdylora-tmp-` folder is an unfinished export: deleted, with a message. A
    `.qdylora-old-` folder is the previous `out`, moved aside by a process that died before
    it could delete it (after writing the new `out`) or before renaming the new one in
    (then `out` is missing): it is restored in the second case and reported in the first.
    """
    for leftover in sorted(out.parent.glob(f".*{_TMP}*")):  # any export's, in the folder written to
        if _dead_writer(leftover, _TMP):
            shutil.rmtree(leftover, ignore_errors=True)
            log.warning("removed %s, an unfinished export left by a process that no longer runs", leftover)
    for leftover in sorted(out.parent.glob(f".{out.name}{_OLD}*")):
        if not _dead_writer(leftover, _OLD):
            continue
        if not (out.exists() or out.is_symlink()):
            os.replace(leftover, out)
            log.warning("restored %s from %s, where an interrupted export had moved it", out, leftover)
        else:
            log.warning(
                "%s holds an earlier %s that an interrupted export moved aside; qdylora never deletes it: "
                "remove it yourself if you do not need it", leftover, out.name,
            )


def _dead_writer(leftover: Path, marker: str) -> bool:
    """Whether the process named in `.NAME<marker>PID-XXXX` is gone."""
    pid = leftover.name.rpartition(marker)[2].split("-", 1)[0]
    return pid.isdigit() and not _alive(int(pid))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
