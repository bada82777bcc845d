"""Writing files so that an interrupted write never leaves a half-written file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_atomically(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Calls ``write(temporary_path)``, flushes it to disk, then moves it onto ``path``.

    The temporary file sits beside ``path`` (same file system, so the final
    ``os.replace`` is atomic); on any error it is removed and ``path`` keeps its old
    content. The result gets the permissions a plain ``open()`` would give.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
        >>> write_atomically(target, lambda p: pathlib.Path(p).write_text("saved"))
        >>> target.read_text()
        'saved'
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as stream:
            os.fsync(stream.fileno())
        # mkstemp creates 0600 files (and some writers recreate the file).
        os.chmod(temporary, _default_file_mode())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
