"""The disk cache of generated modules: content-hash keys, corruption recovery, concurrency."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from attnopt.kernels import kernel_cache

TEXT = 'ANSWER = 42\n\ndef double(x):\n    """Stand-in for a generated kernel module."""\n    return 2 * x\n'


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernel_cache, "_loaded", {})
    return tmp_path


def test_module_is_stored_under_its_content_hash_and_loaded(cache_dir):
    module = kernel_cache.load_module(TEXT)
    assert module.ANSWER == 42 and module.double(3) == 6
    path = cache_dir / f"attnopt_{kernel_cache.content_hash(TEXT)}.py"
    assert path.read_text() == TEXT and Path(module.__file__) == path


def test_source_of_loaded_functions_is_inspectable_as_triton_needs(cache_dir):
    import inspect

    assert "Stand-in" in inspect.getsource(kernel_cache.load_module(TEXT).double)


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],
        lambda text: "raise RuntimeError('corrupted entry was executed')\n",
        lambda text: text.replace("42", "43"),
        lambda text: "",
    ],
    ids=["truncated", "replaced", "edited", "empty"],
)
def test_corrupted_entry_is_detected_regenerated_and_never_executed(cache_dir, damage):
    path = kernel_cache.entry_path(TEXT)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(damage(TEXT))
    module = kernel_cache.load_module(TEXT)
    assert module.ANSWER == 42
    assert path.read_text() == TEXT


def test_intact_entry_is_reused_without_rewriting(cache_dir):
    path = kernel_cache.entry_path(TEXT)
    kernel_cache.load_module(TEXT)
    written = path.stat().st_mtime_ns
    kernel_cache._loaded.clear()
    kernel_cache.load_module(TEXT)
    assert path.stat().st_mtime_ns == written


BIG_TEXT = TEXT + "# padding so that a non-atomic write would be seen half-done\n" * 40_000


def _rewrite_repeatedly(cache: str, rounds: int) -> None:
    import os

    os.environ["ATTNOPT_CACHE_DIR"] = cache
    for _ in range(rounds):
        kernel_cache._loaded.clear()
        kernel_cache.entry_path(BIG_TEXT).unlink(missing_ok=True)
        assert kernel_cache.load_module(BIG_TEXT).ANSWER == 42


def _read_until_stopped(path: str, stop, queue) -> None:
    seen = set()
    while not stop.is_set():
        try:
            seen.add(Path(path).read_text() == BIG_TEXT)
        except FileNotFoundError:
            pass
    queue.put(seen)


@pytest.mark.slow  # four processes
def test_concurrent_writers_never_expose_a_partial_entry(cache_dir):
    context = multiprocessing.get_context("fork")
    queue, stop = context.Queue(), context.Event()
    path = str(kernel_cache.entry_path(BIG_TEXT))
    reader = context.Process(target=_read_until_stopped, args=(path, stop, queue))
    writers = [context.Process(target=_rewrite_repeatedly, args=(str(cache_dir), 25)) for _ in range(3)]
    for process in [reader, *writers]:
        process.start()
    for process in writers:
        process.join(timeout=120)
    stop.set()
    seen = queue.get(timeout=120)
    reader.join(timeout=120)
    assert [process.exitcode for process in writers] == [0, 0, 0]
    assert seen <= {True}, "a reader saw an incomplete cache entry"
    assert Path(path).read_text() == BIG_TEXT
    assert [p.name for p in cache_dir.iterdir()] == [Path(path).name]  # no temporary files left


def test_source_stays_inspectable_when_the_line_cache_is_cleared(cache_dir):
    import inspect
    import linecache

    module = kernel_cache.load_module(TEXT)
    linecache.clearcache()
    assert "Stand-in" in inspect.getsource(module.double)
