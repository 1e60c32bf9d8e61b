"""Writing a file so that a reader in another process sees the old content or the new, never part."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a uniquely named file beside it, renamed over ``path``
    (atomic on one filesystem; two writers at once: the later rename wins). Raises OSError."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
