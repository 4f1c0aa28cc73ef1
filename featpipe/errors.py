"""The one base class of errors a user can fix: the CLI prints them as one line and exits 2.

Every other exception is featpipe's own bug and keeps its traceback."""
from __future__ import annotations

import errno


class UserError(ValueError):
    """Bad input, a mismatched file or an option that cannot work; the message says what and where."""


def os_error_text(exc: OSError) -> str:
    """An operating-system refusal (disk full, read-only or missing folder) as one line with what to do."""
    where = f"{exc.filename}: " if exc.filename else ""
    what = exc.strerror or str(exc)
    hint = {errno.ENOSPC: "free some space (or pick another --cache-dir/--out) and rerun the same command",
            errno.EDQUOT: "free some space (or pick another --cache-dir/--out) and rerun the same command",
            errno.EFBIG: "the file system refused a file this large; pick another --cache-dir/--out",
            errno.EACCES: "pick a folder you can write to, or fix its permissions",
            errno.EPERM: "pick a folder you can write to, or fix its permissions",
            errno.EROFS: "the file system is read-only; pick another folder",
            errno.ENOENT: "check the path",
            errno.ENOTDIR: "a path component is a file, not a folder; check the path",
            errno.EISDIR: "that is a folder; give a file",
            errno.EEXIST: "something is already there; remove it or pick another path"}.get(exc.errno, "")
    return f"{where}{what}" + (f"; {hint}" if hint else "")
