"""The GGUF conversion cache: keyed by content, one entry for the same bytes under any path,
older formats' entries removed when a new one is written unless a process uses them."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from torch import nn

from engine.models import gguf as gguf_convert
from engine.models import gguf_cache, load_model, resolve_model
from engine.models.gguf_tensors import GGUF_TENSORS_FILE
from tests.engine.models.harness import Harness, save_tiny_model, tiny_config
from tests.engine.models.test_gguf import write_gguf

QT = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    cfg = tiny_config("llama", num_hidden_layers=1, tie_word_embeddings=False)
    return save_tiny_model(str(tmp_path_factory.mktemp("hf")), cfg)


def _no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_convert, "convert_gguf", fail)


@torch.inference_mode()
def test_a_copy_elsewhere_finds_the_entry_and_is_read_from_there(
    tiny_hf: nn.Module, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new virtual environment or clone holds the same file under another path: no second
    conversion, and the entry reads the new copy (the first may be gone)."""
    first = tmp_path / "a" / "tiny.gguf"
    first.parent.mkdir()
    write_gguf(first, tiny_hf, QT.Q8_0)
    entry = resolve_model(str(first), str(cache))
    expected = Harness(load_model(entry, torch.float32, "cpu")).prefill(0, [3, 5, 7])
    second = tmp_path / "b" / "tiny.gguf"
    second.parent.mkdir()
    shutil.copyfile(first, second)
    _no_conversion(monkeypatch)
    assert resolve_model(str(second), str(cache)) == entry
    assert json.loads(Path(entry, GGUF_TENSORS_FILE).read_text())["source"] == str(second)
    os.remove(first)
    assert torch.equal(Harness(load_model(entry, torch.float32, "cpu")).prefill(0, [3, 5, 7]), expected)


def test_other_metadata_is_another_entry(tiny_hf: nn.Module, tmp_path: Path, cache: Path) -> None:
    file = tmp_path / "tiny.gguf"
    write_gguf(file, tiny_hf, QT.Q8_0)
    first = resolve_model(str(file), str(cache))
    write_gguf(file, tiny_hf, QT.Q8_0, name="renamed")  # the same weights, another header
    assert resolve_model(str(file), str(cache)) != first


def _fake_entry(cache: Path, name: str, fmt: str | None = None, lock: bool = False) -> Path:
    entry = cache / name
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")
    (entry / "model.safetensors").write_bytes(b"\0" * 1024)
    if fmt is not None:
        (entry / gguf_cache.FORMAT_FILE).write_text(fmt)
    if lock:
        (entry / gguf_cache.LOCK_FILE).touch()
    return entry


def test_stale_entries_of_older_formats_are_removed_unless_in_use(
    tiny_hf: nn.Module, tmp_path: Path, cache: Path
) -> None:
    file = tmp_path / "tiny.gguf"
    write_gguf(file, tiny_hf, QT.Q8_0)
    stale = _fake_entry(cache, "tiny-0123456789abcdef")  # format 3: no format file, no lock
    stale_locked = _fake_entry(cache, "tiny-1123456789abcdef", fmt="3x", lock=True)
    open_now = _fake_entry(cache, "tiny-2123456789abcdef")
    held = _fake_entry(cache, "tiny-3123456789abcdef", fmt="3x", lock=True)
    current = _fake_entry(cache, "tiny-4123456789abcdef", fmt=gguf_cache._CACHE_FORMAT)  # another file
    other_stem = _fake_entry(cache, "tinier-0123456789abcdef")
    not_an_entry = _fake_entry(cache, "tiny-notes")
    lock_fd = os.open(held / gguf_cache.LOCK_FILE, os.O_RDWR)
    fcntl.flock(lock_fd, fcntl.LOCK_SH)  # a running server of that format
    with open(open_now / "model.safetensors", "rb"):  # a process still loading it
        entry = resolve_model(str(file), str(cache))
    os.close(lock_fd)
    assert not stale.exists() and not stale_locked.exists()
    assert all(p.exists() for p in (open_now, held, current, other_stem, not_an_entry))
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [Path(entry).name, open_now.name, held.name, current.name, other_stem.name, not_an_entry.name]
    )


def test_a_cached_entry_removes_stale_ones_written_since(tiny_hf: nn.Module, tmp_path: Path, cache: Path) -> None:
    """An older version's entry of the same file, written after ours (two versions installed
    side by side), goes at our next start, which finds its own entry cached."""
    file = tmp_path / "tiny.gguf"
    write_gguf(file, tiny_hf, QT.Q8_0)
    entry = resolve_model(str(file), str(cache))
    stale = _fake_entry(cache, "tiny-0123456789abcdef")  # format 3: no format file, no lock
    assert resolve_model(str(file), str(cache)) == entry
    assert not stale.exists() and Path(entry).is_dir()


def test_an_entry_this_process_resolved_is_kept_by_a_newer_format(
    tiny_hf: nn.Module, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock each resolving process holds keeps its entry through a format change."""
    file = tmp_path / "tiny.gguf"
    write_gguf(file, tiny_hf, QT.Q8_0)
    old = resolve_model(str(file), str(cache))
    monkeypatch.setattr(gguf_cache, "_CACHE_FORMAT", "next")
    new = resolve_model(str(file), str(cache))
    assert new != old and os.path.isdir(old)  # held by this process
    os.close(gguf_cache._held.pop(old))  # as when that process exits
    monkeypatch.setattr(gguf_cache, "_CACHE_FORMAT", "after-next")
    newest = resolve_model(str(file), str(cache))
    assert not os.path.exists(old) and os.path.isdir(new) and os.path.isdir(newest)


def test_a_conversion_parses_the_file_once(
    tiny_hf: nn.Module, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The architecture, transformers' config and tokenizer loaders and the tensors all read one
    parse of the file's metadata (seconds each for a large vocabulary); afterwards GGUFReader
    is gguf's own class again."""
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_hf, QT.Q8_0)
    original = gguf.GGUFReader
    parses = []

    class Counting(original):  # type: ignore[misc,valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            parses.append(args[0])
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    entry = resolve_model(str(path), str(cache))
    assert parses == [str(path)]
    assert gguf.GGUFReader is Counting
    assert Harness(load_model(entry, torch.float32, "cpu")).prefill(0, [3, 5, 7]).shape[0] == 3
