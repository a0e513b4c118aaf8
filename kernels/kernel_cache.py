"""Disk cache of generated kernel modules, keyed by the SHA-256 of their text.

Each module is stored as <cache_dir>/attnopt_<hash>.py: its file name in tracebacks and in
Triton's view of the source, which linecache serves from the verified text. Writes go to a
temporary file in the same folder and are renamed into place (os.replace is atomic), so
concurrent processes only ever see complete files; as every writer of one name writes the same
bytes, racing writers agree. On load the file's bytes are hashed again: an entry that does not
match its name (truncated, edited, half-copied) is rewritten from the freshly generated text,
and the module is always executed from text whose hash was just checked — a corrupted entry is
never imported. When the entry cannot be written (the cache folder is a file, read-only, or
holds a folder in the entry's place) the module runs from memory, with a warning.
"""

from __future__ import annotations

import hashlib
import linecache
import os
import tempfile
import warnings
from pathlib import Path
from types import ModuleType

from . import config

_loaded: dict[str, ModuleType] = {}


def content_hash(text: str) -> str:
    """Hex SHA-256 of the module text: its cache key and file name."""
    return hashlib.sha256(text.encode()).hexdigest()


def entry_path(text: str) -> Path:
    """Where the module with this text is stored."""
    return config.cache_dir() / f"attnopt_{content_hash(text)}.py"


def _is_intact(path: Path, digest: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == digest
    except OSError:
        return False


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".py")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def load_module(text: str) -> ModuleType:
    """The module whose source is `text`: stored on disk if missing or corrupt, then executed."""
    digest = content_hash(text)
    module = _loaded.get(digest)
    if module is not None:
        return module
    path = entry_path(text)
    if not _is_intact(path, digest):
        try:
            _write_atomically(path, text)
        except OSError as error:
            warnings.warn(f"attnopt could not store a generated kernel module at {path} ({error}); it runs from "
                          "memory. Set ATTNOPT_CACHE_DIR to a writable folder to keep kernels between runs.",
                          stacklevel=2)
    module = ModuleType(f"attnopt_generated_{digest[:16]}")
    module.__file__ = str(path)
    # serve inspect.getsource (used by triton.jit) the verified text, not a re-read of the file
    linecache.cache[str(path)] = (len(text), None, text.splitlines(keepends=True), str(path))
    exec(compile(text, str(path), "exec"), module.__dict__)
    _loaded[digest] = module
    return module
