"""All-or-nothing output folders.

An export is written into a hidden temporary folder beside the target and renamed into
place only when complete, so the target either does not exist or is whole, even if the
process is killed mid-write. A later export into the same place removes temporary
folders that a dead process left behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import InputError

_TMP = ".qdylora-tmp-"
_OLD = ".qdylora-old-"


@contextlib.contextmanager
def staged_output(
    out_dir: str | os.PathLike, *, overwrite: bool = False, protect: Sequence[str | os.PathLike | None] = ()
) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes `out_dir`, on any error it is removed.

    Raises `InputError` if `out_dir` exists and `overwrite` is false, if it is not a folder,
    or if it is (or contains) one of the `protect` folders (the adapter being exported,
    the base model), which `--overwrite` must never delete.
    """
    out = Path(out_dir).expanduser().absolute()
    for keep in protect:
        if keep is None:
            continue
        keep_path = Path(keep).expanduser().absolute()
        if out == keep_path or out in keep_path.parents:
            raise InputError(f"output {out} would replace the input folder {keep_path}; choose another --out")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InputError(f"output {out} exists and is not a folder; choose another --out")
        if not overwrite:
            raise InputError(f"output folder {out} already exists; pass --overwrite to replace it")
    created = _first_missing(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = out.parent / f".{out.name}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


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
    """Delete temporary folders for `out` whose writing process is gone."""
    for marker in (_TMP, _OLD):
        for leftover in out.parent.glob(f".{out.name}{marker}*"):
            pid = leftover.name[len(f".{out.name}{marker}") :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


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
