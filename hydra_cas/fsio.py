"""The one place where hydra_cas changes files on disk.

Every write, fsync, rename, link, mkdir and unlink the store performs goes
through this module, for two reasons: an ``OSError`` becomes a
:class:`~hydra_cas.errors.StorageError` that names the operation, the path and a
likely fix; and tests can make the Nth operation of a kind fail
(:func:`inject_faults`) to prove that a full disk or an I/O error never leaves a
half-written object or manifest behind.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import os
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from hydra_cas.errors import StorageError

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = [
    "FaultHook",
    "inject_faults",
    "create_temp",
    "write_all",
    "fsync",
    "fsync_dir",
    "replace",
    "makedirs",
    "unlink",
    "chmod",
    "close",
    "unique_token",
    "discard",
]

logger = logging.getLogger(__name__)

#: Called as hook(op, path) before each operation; it may raise OSError.
FaultHook = Callable[[str, str], None]
_hook: FaultHook | None = None

_HINTS = {
    errno_mod.ENOSPC: "the disk is full; free space and retry",
    errno_mod.EDQUOT: "the disk quota is exhausted; free space and retry",
    errno_mod.EACCES: "permission denied; check the store's owner and mode",
    errno_mod.EPERM: "operation not permitted; check the store's owner and mode",
    errno_mod.EROFS: "the file system is read-only",
    errno_mod.EIO: "the disk reported an I/O error; check the device",
}


@contextlib.contextmanager
def inject_faults(hook: FaultHook) -> Iterator[None]:
    """Run the block with ``hook`` called before every file operation (tests only)."""
    global _hook
    previous, _hook = _hook, hook
    try:
        yield
    finally:
        _hook = previous


def _fail(op: str, path: str | os.PathLike[str], exc: OSError) -> StorageError:
    hint = _HINTS.get(exc.errno or 0, exc.strerror or str(exc))
    return StorageError(
        f"{op} failed for {os.fspath(path)}: {exc.strerror or exc} ({hint})",
        errno=exc.errno,
        path=os.fspath(path),
    )


def _check(op: str, path: str | os.PathLike[str]) -> None:
    if _hook is not None:
        _hook(op, os.fspath(path))


def unique_token() -> str:
    """A name part no other process or thread will pick: pid plus 64 random bits."""
    return f"{os.getpid()}-{secrets.token_hex(8)}"


def create_temp(directory: str | os.PathLike[str], suffix: str = ".tmp") -> tuple[int, str]:
    """Create a new, empty, private file in ``directory``; return (fd, path)."""
    path = os.path.join(os.fspath(directory), unique_token() + suffix)
    try:
        _check("open", path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise _fail("creating a temp file", path, exc) from exc
    return fd, path


def write_all(fd: int, data: bytes | bytearray | memoryview, path: str) -> None:
    """Write every byte of ``data`` (os.write may write less than asked)."""
    view = memoryview(data).cast("B")
    try:
        while view:
            _check("write", path)
            written = os.write(fd, view)
            view = view[written:]
    except OSError as exc:
        raise _fail("writing", path, exc) from exc


def fsync(fd: int, path: str) -> None:
    try:
        _check("fsync", path)
        os.fsync(fd)
    except OSError as exc:
        raise _fail("fsync", path, exc) from exc


def close(fd: int, path: str) -> None:
    try:
        os.close(fd)
    except OSError as exc:
        raise _fail("closing", path, exc) from exc


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    try:
        _check("fsync_dir", path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise _fail("opening directory", path, exc) from exc
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some file systems refuse fsync on directories; that is not data loss.
        if exc.errno not in (errno_mod.EINVAL, errno_mod.ENOTSUP):
            raise _fail("fsync of directory", path, exc) from exc
    finally:
        os.close(fd)


def replace(src: str, dst: str) -> None:
    """Atomically rename ``src`` over ``dst``."""
    try:
        _check("rename", dst)
        os.replace(src, dst)
    except OSError as exc:
        raise _fail("renaming into place", dst, exc) from exc


def makedirs(path: str | os.PathLike[str]) -> bool:
    """Create ``path`` and missing parents; return True if anything was created."""
    if os.path.isdir(path):
        return False
    try:
        _check("mkdir", path)
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise _fail("creating directory", path, exc) from exc
    return True


def unlink(path: str | os.PathLike[str], *, missing_ok: bool = True) -> bool:
    """Remove a file; return False if it was already gone and that is allowed."""
    try:
        _check("unlink", path)
        os.unlink(path)
    except FileNotFoundError:
        if missing_ok:
            return False
        raise
    except OSError as exc:
        raise _fail("removing", path, exc) from exc
    return True


def chmod(path: str, mode: int) -> None:
    try:
        _check("chmod", path)
        os.chmod(path, mode)
    except OSError as exc:
        raise _fail("chmod", path, exc) from exc


def discard(path: str) -> None:
    """Best-effort removal of a temp file while another error is already propagating."""
    try:
        os.unlink(path)
    except OSError:
        logger.debug("could not remove temp file %s; gc will", path)
