"""The store's inter-process writer lock: flock(2) on ``<store>/lock``.

Each acquisition opens its own file description, so two threads of one process
exclude each other just as two processes do.  Waiting polls with back-off up to
a timeout instead of failing at once (a peer's save may take a while) or
blocking forever (a stuck peer must not hang every other process silently).
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from typing import TYPE_CHECKING

from hydra_cas.errors import LockTimeoutError, StorageError

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

__all__ = ["StoreLock"]

logger = logging.getLogger(__name__)


class StoreLock:
    """A context manager holding the exclusive store lock."""

    def __init__(self, path: Path, timeout: float = 60.0) -> None:
        self.path = path
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> StoreLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise StorageError(
                f"cannot open the store lock {self.path}: {exc.strerror}",
                errno=exc.errno,
                path=str(self.path),
            ) from exc
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockTimeoutError(
                        f"another process has held the store lock {self.path} for over "
                        f"{self.timeout:g} s; wait for it to finish or raise lock_timeout"
                    ) from None
                if not waited:
                    logger.debug("waiting for store lock %s", self.path)
                    waited = True
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            except OSError as exc:
                os.close(fd)
                raise StorageError(
                    f"cannot lock {self.path}: {exc.strerror}", errno=exc.errno, path=str(self.path)
                ) from exc
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the description releases the flock
