"""sftlab's one cache root (converted models, hashes, cached base outputs, fetched packages) and the paths in it.

At the bottom of the house: models.py (loading) and fetch.py (fetching on demand) both name paths here, so
neither needs the other for them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """One cache for all of sftlab (converted models, hashes, cached base outputs); SFTLAB_CACHE overrides it."""
    root = os.environ.get("SFTLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sftlab")
    return Path(root)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_cache_dir(gguf: Path) -> Path:
    """Where a GGUF file's converted safetensors folder lives (keyed by its path, size and mtime)."""
    st = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{tag}"
