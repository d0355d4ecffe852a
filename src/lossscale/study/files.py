"""Durable files for the study: atomic writes, an exclusive lock on the output folder, contained paths.

* :func:`atomic_write` writes through a uniquely named temporary file in the destination's folder, flushed
  to disk, then renamed over the destination (``os.replace`` is atomic on POSIX and Windows): a reader sees
  the old file or the new one, never a partial one, and concurrent writers never share a temporary file.
* :class:`OutputLock` holds an exclusive lock on ``OUT/.lossscale.lock`` for a study's lifetime. The lock is
  the operating system's (``flock`` on POSIX, ``msvcrt.locking`` on Windows), so it is released by the
  kernel when its holder dies, however it dies: a lock file left by a killed study is stale by construction
  and the next study takes it over (and says so). The file holds the holder's PID, which a refused study
  names.
* :func:`contained` resolves a file name inside a folder and refuses any that would land outside it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from types import TracebackType

__all__ = ["atomic_write", "OutputLock", "LockHeldError", "contained", "LOCK_NAME"]

LOCK_NAME = ".lossscale.lock"

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _read_umask() -> int:
    # The only way to read the umask is to set it; done once, at import, not while other threads create files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically: a unique temporary file beside it, fsync, ``os.replace``.

    On any failure the temporary file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder or ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp creates the file 0600; give it the permissions an ordinary open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def contained(folder: str | os.PathLike[str], name: str) -> str:
    """``folder/name``, after checking that it resolves (symbolic links and ``..`` followed) to a path
    inside ``folder``; a ``ValueError`` naming both otherwise."""
    root = os.path.realpath(os.fspath(folder))
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root or path == root:
        raise ValueError(f"refusing to write {name!r}: it resolves to {path}, outside the output folder {root}")
    return path


class LockHeldError(RuntimeError):
    """Another live process holds the output folder's lock (``pid``: its PID, when it could be read)."""

    def __init__(self, path: str, pid: int | None) -> None:
        who = f"process {pid}" if pid is not None else "another process"
        super().__init__(f"{os.path.dirname(path) or '.'} is in use by {who} (lock file {path}); "
                         "wait for it to finish or choose another --out")
        self.path = path
        self.pid = pid


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:  # pragma: no cover - Windows refuses reads of a locked byte range
        return None
    return int(text) if text.isdigit() else None


class OutputLock:
    """An exclusive, process-lifetime lock on a folder (``with OutputLock(out) as lock: ...``).

    ``acquire()`` raises :class:`LockHeldError` naming the holder's PID when a live process holds it, and
    sets ``stale_pid`` to the PID a dead holder left in the file (its lock died with it). The lock file is
    kept on release (emptied), so that no two processes can ever lock two different files of the same name.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = os.path.join(os.fspath(folder), LOCK_NAME)
        self.stale_pid: int | None = None
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock(fd)
        except OSError:
            pid = _read_pid(fd)
            os.close(fd)
            raise LockHeldError(self.path, pid) from None
        try:
            old = _read_pid(fd)
            if old is not None and old != os.getpid():
                self.stale_pid = old
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    @staticmethod
    def _lock(fd: int) -> None:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows: a byte-range lock, also released by the OS when the holder dies
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no PID left behind: an empty lock file is a released one
        os.close(fd)  # closing the descriptor releases the lock

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
