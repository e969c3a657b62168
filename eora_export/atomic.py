"""All-or-nothing output writes: build under a temporary name, rename when complete.

An interrupted run (Ctrl-C, SIGTERM, a crash, a full disk) leaves the previous output
as it was and no temporary debris.

Interrupt safety: a signal can land between any two Python steps, including just after a
temporary file or folder was created. So each temporary name is chosen *before* it is
created (and the cleanup removes it by name), and the cleanup runs to its end even if
an interrupt lands inside it (the interrupt is raised again afterwards).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def default_mode(directory: bool = False) -> int:
    """What open()/mkdir() would give under the current umask (mkstemp/mkdtemp use 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _fresh_name(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"


def _remove(path: Path | None) -> None:
    """Delete ``path`` (file or folder) if it exists, finishing even when an interrupt lands meanwhile."""
    if path is None:
        return
    pending: BaseException | None = None
    while True:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            break
        except KeyboardInterrupt as e:
            pending = e
    if pending is not None:
        raise pending


def _create(path: Path, directory: bool) -> bool:
    """Create ``path`` exclusively; False when the name is taken (pick another)."""
    try:
        if directory:
            os.mkdir(path, 0o700)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    return True


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        while True:  # the name is known before the file exists, so the cleanup can always find it
            tmp = _fresh_name(path, f".tmp{path.suffix}")
            if _create(tmp, directory=False):
                break
        yield tmp
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it takes ``path``'s place.

    An existing folder at ``path`` is swapped out only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    old: Path | None = None
    try:
        while True:
            tmp = _fresh_name(path, ".tmp")
            if _create(tmp, directory=True):
                break
        yield tmp
        os.chmod(tmp, default_mode(directory=True))
        if path.exists():
            while True:
                old = _fresh_name(path, ".old")
                if _create(old, directory=True):
                    break
            os.replace(path, old / "previous")
        os.replace(tmp, path)
    except BaseException:
        if old is not None and (old / "previous").exists() and not path.exists():
            os.replace(old / "previous", path)
        raise
    finally:
        try:
            _remove(tmp)
        finally:
            _remove(old)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
