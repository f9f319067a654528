"""Writing a bundle so that it is whole or absent: a staging folder beside the target, renamed into place at the end;
the staging folders of killed exports are cleaned up by the next one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgekit.runtimes.errors import ExportError


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the staging folders that exports to ``target`` killed before their cleanup left behind (those whose
    process is gone); return them."""
    stale = []
    for p in target.parent.glob(f".{target.name}.*-*"):
        kind, _, rest = p.name[len(target.name) + 2:].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("partial", "old") or not p.is_dir() or p.is_symlink():
            continue
        if pid.isdigit() and _alive(int(pid)):
            continue  # another export is writing it now
        shutil.rmtree(p, ignore_errors=True)
        stale.append(p)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True


@contextmanager
def staging_dir(target: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it is renamed to ``target``, on failure removed.

    The rename is the last step, so an interrupted export leaves ``target`` untouched (absent or the old bundle).
    """
    target = Path(target)
    if target.exists() and not force:
        raise ExportError(
            f"Output folder '{target}' already exists. HINT: pass --force to replace it, or choose another -o path."
        )
    if target.exists() and not target.is_dir():
        raise ExportError(f"Output path '{target}' exists and is a file, not a folder. HINT: choose another -o path.")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
