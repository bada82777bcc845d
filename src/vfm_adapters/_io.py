"""Writing files so that an interrupted write never leaves a half-written file behind.

A full disk, an exceeded quota or a read-only file system is reported as
:class:`DiskWriteError`, which names the file and says that its previous version is
intact, instead of a writer's internal error (torch's "unexpected pos N vs M").
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

#: errno -> what it means for the user, for the errors a larger disk or a writable place fixes.
_DISK_ERRORS = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
                errno.EROFS: "Read-only file system"}
#: The same conditions as reported in the messages of writers that lose the errno (safetensors, torch).
_DISK_MESSAGES = {"No space left on device": errno.ENOSPC, "StorageFull": errno.ENOSPC, "os error 28": errno.ENOSPC,
                  "Disk quota exceeded": errno.EDQUOT, "FilesystemQuotaExceeded": errno.EDQUOT,
                  "Read-only file system": errno.EROFS, "ReadOnlyFilesystem": errno.EROFS}


class DiskWriteError(OSError):
    """A write that failed for lack of space, quota or write permission on the file system.

    ``errno`` is the system's code (``ENOSPC``, ``EDQUOT`` or ``EROFS``); the message
    names the file and what is left on disk.
    """

    def __init__(self, code: int, message: str, filename: str) -> None:
        super().__init__(code, message, filename)
        self.message = message

    def __str__(self) -> str:
        return self.message


def disk_error_code(error: BaseException) -> int | None:
    """The ``ENOSPC``/``EDQUOT``/``EROFS`` code behind ``error`` (or its causes), else ``None``.

    Example:
        >>> disk_error_code(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
        True
        >>> disk_error_code(ValueError("bad")) is None
        True
    """
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in _DISK_ERRORS:
            return error.errno
        text = str(error)
        for needle, code in _DISK_MESSAGES.items():
            if needle in text:
                return code
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def disk_write_error(error: BaseException, path: str | os.PathLike, existed: bool,
                     what: str | None = None) -> DiskWriteError | None:
    """A :class:`DiskWriteError` for ``error`` if it is a disk-space/quota/read-only failure, else ``None``."""
    code = disk_error_code(error)
    if code is None:
        return None
    what = what or Path(path).name
    state = (f"the previous {what} is intact" if existed else "nothing was written (no partial file is left)")
    return DiskWriteError(code, f"{_DISK_ERRORS[code]} writing {path}; {state}", str(path))


class _RecordingWriter:
    """A binary stream that remembers the ``OSError`` a write raised (torch.save replaces it by its own error)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.error = stream, None

    def write(self, data: Any) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.stream.flush()


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a Python file, so a failed write surfaces as its ``OSError``
    (torch reports only "unexpected pos N vs M" otherwise)."""
    import torch

    with open(path, "wb") as stream:
        writer = _RecordingWriter(stream)
        try:
            torch.save(obj, writer)
        except Exception as error:
            if writer.error is not None:
                raise writer.error from error
            raise


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends ``text`` to a log file; a full disk raises :class:`DiskWriteError` naming it.

    Example:
        >>> import tempfile, pathlib
        >>> log = pathlib.Path(tempfile.mkdtemp()) / "log.jsonl"
        >>> append_text(log, "a;"); append_text(log, "b;"); log.read_text()
        'a;b;'
    """
    existed = os.path.exists(path)
    try:
        with open(path, "a") as stream:
            stream.write(text)
    except OSError as error:
        translated = disk_write_error(error, path, existed, "log")
        if translated is not None:
            raise translated from error
        raise


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | os.PathLike, write: Callable[[str], Any], what: str | None = None) -> None:
    """Calls ``write(temporary_path)``, flushes it to disk, then moves it onto ``path``.

    The temporary file sits beside ``path`` (same file system, so the final
    ``os.replace`` is atomic); on any error it is removed and ``path`` keeps its old
    content. The result gets the permissions a plain ``open()`` would give. A full
    disk, an exceeded quota or a read-only file system raises :class:`DiskWriteError`
    ("No space left on device writing PATH; the previous WHAT is intact"), ``what``
    naming the file's role (default: its name).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
        >>> write_atomically(target, lambda p: pathlib.Path(p).write_text("saved"))
        >>> target.read_text()
        'saved'
    """
    path = Path(path)
    existed = path.exists()
    try:
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        translated = disk_write_error(error, path, existed, what)
        if translated is not None:
            raise translated from error
        raise
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        # mkstemp creates 0600 files (and some writers recreate the file).
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    except BaseException as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        translated = disk_write_error(error, path, existed, what) if isinstance(error, Exception) else None
        if translated is not None:
            raise translated from error
        raise
