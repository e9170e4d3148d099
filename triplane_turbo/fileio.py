"""Writing files so that readers never see half of one: a temporary file beside the target, renamed.

Used for everything the library and the app write that someone may read meanwhile: meshes, the app's
result store, checkpoints, manifests.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write to; renamed onto ``path`` when the block ends
    without an error, removed otherwise.

    The temporary file lives in the same folder so that ``os.replace`` is a same-filesystem rename;
    ``mode`` is applied before the rename (``mkstemp`` creates files readable by their owner only,
    and written meshes are served files).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """Writes ``data`` to ``path`` atomically (see ``atomic_path``), flushed to disk first."""
    with atomic_path(path, mode) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
