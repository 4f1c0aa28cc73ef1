"""Writing files so that a crash, a full disk or a second process never leaves a half-written one."""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import UserError

_KINDS = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device",
          stat.S_IFDIR: "a folder", stat.S_IFSOCK: "a socket"}


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside `path` (unique to this process) to write to; on success its bytes
    and its new name are flushed to disk and it replaces `path`, on any failure it is removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not exc.filename:  # a failed write() names no file: name the one meant
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a file created or renamed in it) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for reading, only if it is a regular file (through symlinks); anything else raises an
    OSError saying what it is. Opened non-blocking first: a plain open() of a named pipe waits for a writer
    forever, and a device or folder is no photo."""
    return open(path, "rb", opener=_regular_fd)


def _regular_fd(path: str, flags: int) -> int:
    fd = os.open(path, flags | os.O_NONBLOCK)
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            raise OSError(errno.EINVAL, f"not a regular file but {_KINDS.get(kind, 'a special file')}", str(path))
        os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open_regular(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def disk_size(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _identity(path: Path) -> tuple[str, tuple[int, int] | None]:
    """Where writing `path` lands: its resolved name (through symlinks), and its file's (device, inode) when
    it exists, which also catches a hard link under another name."""
    try:
        st = os.stat(path)
        inode = (st.st_dev, st.st_ino)
    except OSError:
        inode = None
    return os.path.realpath(path), inode


def check_outputs(outputs: dict[str, Sequence[Path]], inputs: dict[str, Sequence[Path]]) -> None:
    """Refuse, before any work, an output that is one of the inputs (or another output): the same file or
    folder entry, through symlinks and hard links. Keys name what the paths were given as (flags)."""
    seen: dict[object, tuple[str, Path]] = {}
    for flag, paths in inputs.items():
        for p in paths:
            name, inode = _identity(Path(p))
            seen.setdefault(name, (flag, Path(p)))
            if inode:
                seen.setdefault(inode, (flag, Path(p)))
    for flag, paths in outputs.items():
        for p in paths:
            name, inode = _identity(Path(p))
            other = seen.get(name) or (seen.get(inode) if inode else None)
            if other:
                raise UserError(f"{flag} {p} is {other[0]} {other[1]}: writing it would overwrite that; "
                                f"give {flag} another path")
            seen[name] = (flag, Path(p))
            if inode:
                seen[inode] = (flag, Path(p))
