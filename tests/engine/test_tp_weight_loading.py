"""Each tensor-parallel rank reads only its shard of the checkpoint from disk.

safetensors' `safe_open` (and, for a converted GGUF, the source that reads its tensors from
the GGUF file) is wrapped so that every read is recorded: which tensor, which index
range along each dim, how many bytes came back. Loading rank 0 and rank 1 of a tp=2 model in
this process (no process group is needed to load) must read each checkpoint tensor exactly
once per rank, exactly the rows / columns of that rank's shard (whole tensors only for the
replicated ones: norms, a kv head shared by several ranks, row-parallel biases), and never a
whole tensor through `get_tensor`. That tp=2 still computes what tp=1 does is
`tests/engine/test_tensor_parallel.py`'s job.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

from engine.distributed import LazyWeight, read_weight
from engine.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from engine.models import load_model, resolve_model
from engine.models.gguf_source import GGUFTensorSource
from tests.engine.models.harness import save_tiny_model, tiny_config

TP = 2
Region = tuple[tuple[int, int], ...]  # (start, stop) per dim


class _RecordingSlice:
    def __init__(self, inner: Any, name: str, log: list[tuple[str, Region, int]]) -> None:
        self._inner, self._name, self._log = inner, name, log

    def get_shape(self) -> list[int]:
        return list(self._inner.get_shape())

    def get_dtype(self) -> str:
        return str(self._inner.get_dtype())

    def __getitem__(self, index: Any) -> torch.Tensor:
        tensor: torch.Tensor = self._inner[index]
        shape = self.get_shape()
        index = index if isinstance(index, tuple) else (index,)
        assert all(isinstance(s, slice) and s.step is None for s in index), index
        region = tuple(
            (s.indices(n)[0], s.indices(n)[1]) for s, n in zip(index, shape, strict=False)
        ) + tuple((0, n) for n in shape[len(index) :])
        self._log.append((self._name, region, tensor.nbytes))
        return tensor


class _RecordingFile:
    def __init__(self, inner: Any, log: list[tuple[str, Region, int]]) -> None:
        self._inner, self._log = inner, log

    def __enter__(self) -> _RecordingFile:
        self._inner.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._inner.__exit__(*exc)

    def keys(self) -> Any:
        return self._inner.keys()

    def get_slice(self, name: str) -> _RecordingSlice:
        return _RecordingSlice(self._inner.get_slice(name), name, self._log)

    def get_tensor(self, name: str) -> torch.Tensor:
        raise AssertionError(f"{name} was read whole through get_tensor")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Region, int]]]:
    log: list[tuple[str, Region, int]] = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda *a, **k: _RecordingFile(real(*a, **k), log))
    real_gguf_read = GGUFTensorSource.__getitem__

    class GGUFSlice:  # what `_RecordingSlice` needs of a reference read from the GGUF file
        def __init__(self, source: GGUFTensorSource) -> None:
            self.source = source

        def get_shape(self) -> list[int]:
            return list(self.source.ref.shape)

        def __getitem__(self, index: Any) -> torch.Tensor:
            return real_gguf_read(self.source, index)

    def gguf_read(source: GGUFTensorSource, index: Any) -> torch.Tensor:
        return _RecordingSlice(GGUFSlice(source), source.name, log)[index]

    monkeypatch.setattr(GGUFTensorSource, "__getitem__", gguf_read)
    yield log


def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    from engine.models.loader import iterate_weights

    return {name: tuple(weight.shape) for name, weight in iterate_weights(path)}


def _split(n: int, rank: int) -> tuple[int, int]:
    assert n % TP == 0
    return rank * n // TP, (rank + 1) * n // TP


def _expected_region(name: str, shape: tuple[int, ...], rank: int, config: Any) -> Region:
    """The index range rank `rank` of TP must read of checkpoint tensor `name` (Megatron layout)."""
    whole = [(0, n) for n in shape]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        shard = math.ceil(shape[0] / TP)
        whole[0] = (min(rank * shard, shape[0]), min((rank + 1) * shard, shape[0]))
    elif any(p in name for p in (".q_proj.", ".gate_proj.", ".up_proj.")):
        whole[0] = _split(shape[0], rank)
    elif ".k_proj." in name or ".v_proj." in name:
        kv_heads = config.num_key_value_heads
        if kv_heads >= TP:
            whole[0] = _split(shape[0], rank)
        else:  # replicated: rank r reads kv head r // (TP / KV)
            head = rank // (TP // kv_heads)
            size = shape[0] // kv_heads
            whole[0] = (head * size, (head + 1) * size)
    elif (".o_proj." in name or ".down_proj." in name) and name.endswith(".weight"):
        whole[1] = _split(shape[1], rank)
    return tuple(whole)  # norms, row-parallel biases: whole


def _assert_each_rank_reads_its_shard(
    path: str, config: Any, reads: list[tuple[str, Region, int]]
) -> list[int]:
    shapes = _checkpoint_shapes(path)
    assert "model.layers.0.self_attn.q_proj.weight" in shapes  # a real checkpoint, not a stub
    itemsize = 4  # the tiny checkpoints are float32
    bytes_per_rank = []
    for rank in range(TP):
        reads.clear()
        load_model(path, torch.float32, "cpu", tp_rank=rank, tp_size=TP)
        names = [name for name, _, _ in reads]
        assert sorted(names) == sorted(shapes), "every checkpoint tensor is read exactly once"
        for name, region, nbytes in reads:
            expected = _expected_region(name, shapes[name], rank, config)
            assert region == expected, (rank, name)
            assert nbytes == math.prod(stop - start for start, stop in region) * itemsize
        bytes_per_rank.append(sum(nbytes for _, _, nbytes in reads))
    return bytes_per_rank


@pytest.mark.parametrize(
    "kind,overrides",
    [
        ("llama", {}),  # 2 kv heads: one per rank; untied lm_head
        ("qwen2", {}),  # q/k/v biases, tied embeddings (no lm_head tensor)
        ("llama", {"num_key_value_heads": 1}),  # the single kv head is read by both ranks
    ],
    ids=["llama", "qwen2", "llama-kv1"],
)
def test_each_rank_reads_only_its_shard(
    tmp_path: Path, reads: list[tuple[str, Region, int]], kind: str, overrides: dict[str, Any]
) -> None:
    config = tiny_config(kind, vocab_size=251, **overrides)  # 251: rank 1's vocabulary shard is short
    save_tiny_model(str(tmp_path), config)
    total = sum(math.prod(s) for s in _checkpoint_shapes(str(tmp_path)).values()) * 4
    per_rank = _assert_each_rank_reads_its_shard(str(tmp_path), config, reads)
    # Only norms (and a replicated kv head) are read by both ranks: each reads about half.
    assert all(n < 0.55 * total for n in per_rank), (per_rank, total)
    assert sum(per_rank) >= total  # together the ranks read everything at least once


def test_gguf_model_is_read_by_shard_too(
    tmp_path: Path, reads: list[tuple[str, Region, int]]
) -> None:
    from tests.engine.models.test_gguf import QT, write_gguf

    config = tiny_config("llama", tie_word_embeddings=False)
    hf = save_tiny_model(str(tmp_path / "hf"), config)
    write_gguf(tmp_path / "tiny.gguf", hf, QT.F32)
    converted = resolve_model(str(tmp_path / "tiny.gguf"), str(tmp_path / "cache"))  # norms in safetensors, the rest read from the GGUF file
    per_rank = _assert_each_rank_reads_its_shard(converted, config, reads)
    total = sum(math.prod(s) for s in _checkpoint_shapes(converted).values()) * 4
    assert all(n < 0.55 * total for n in per_rank), (per_rank, total)


def test_lazy_weight_reads_only_its_region() -> None:
    full = torch.arange(48.0).reshape(6, 8)
    asked: list[Any] = []

    class Source:
        def __getitem__(self, index: Any) -> torch.Tensor:
            asked.append(index)
            return full[index]

    lazy = LazyWeight(Source(), full.shape)
    part = lazy.narrow(0, 2, 3).narrow(1, 4, 4)
    assert part.shape == (3, 4) and asked == []  # narrowing reads nothing
    assert torch.equal(read_weight(part), full[2:5, 4:8])
    assert asked == [(slice(2, 5), slice(4, 8))]
    with pytest.raises(ValueError, match="cannot take"):
        lazy.narrow(0, 4, 3)
    assert read_weight(full) is full  # a plain tensor passes through


def test_a_checkpoint_of_the_wrong_size_is_refused_before_reading() -> None:
    class Unreadable:
        def __getitem__(self, index: Any) -> torch.Tensor:
            raise AssertionError("read before the shape check")

    col = ColumnParallelLinear(8, 6, tp_rank=1, tp_size=TP)
    with pytest.raises(ValueError, match="needs 6 along dim 0"):
        col.weight.weight_loader(col.weight, LazyWeight(Unreadable(), (8, 8)))  # type: ignore[attr-defined]
    row = RowParallelLinear(6, 5, tp_rank=0, tp_size=TP)
    with pytest.raises(ValueError, match="needs 6 along dim 1"):
        row.weight.weight_loader(row.weight, LazyWeight(Unreadable(), (5, 4)))  # type: ignore[attr-defined]
    emb = VocabParallelEmbedding(10, 4, tp_rank=1, tp_size=TP)
    with pytest.raises(ValueError, match="embedding shape mismatch"):
        emb.weight.weight_loader(emb.weight, LazyWeight(Unreadable(), (10, 3)))  # type: ignore[attr-defined]
