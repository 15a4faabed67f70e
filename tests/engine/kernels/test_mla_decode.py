"""MLA decode kernel (absorbed form over the latent pool) against a few-line torch reference.

Without CUDA it runs under the Triton interpreter (conftest) at tiny shapes; the launcher's
splits are forced so that several splits, empty ones and several key blocks are covered.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.kernels.mla_decode import mla_decode_attention
from engine.layers import mla
from engine.layers.attention import quantize_int8
from engine.models import load_model
from tests.engine.models.harness import Harness, rel_err, save_tiny_model, tiny_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
R, DR = 32, 16


def _case(
    seq_lens: list[int], heads: int, dtype: torch.dtype, int8: bool, seed: int = 0, r: int = R, dr: int = DR
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    num_slots = sum(seq_lens) + 7
    entries = torch.randn(num_slots + 1, 1, r + dr, generator=gen)
    entries[-1] = float("nan")  # the dummy slot: never read
    # each sequence's keys at shuffled slots, rows of req_to_token in reverse order
    perm = torch.randperm(num_slots, generator=gen).tolist()
    req_to_token = torch.full((len(seq_lens) + 1, max(seq_lens) + 5), num_slots, dtype=torch.int32)
    rows = list(range(len(seq_lens)))[::-1]
    offset = 0
    for row, n in zip(rows, seq_lens, strict=True):
        req_to_token[row, :n] = torch.tensor(perm[offset : offset + n], dtype=torch.int32)
        offset += n
    scale = None
    if int8:
        values, scale = quantize_int8(entries[:-1])
        pool = torch.cat([values, torch.zeros(1, 1, r + dr, dtype=torch.int8)])
        scale = torch.cat([scale, torch.ones(1, 1, dtype=scale.dtype)])
        keys = pool.float() * scale.float().unsqueeze(-1)
    else:
        pool = entries.to(dtype)
        keys = pool.float()
    q = torch.randn(len(seq_lens), heads, r + dr, generator=gen).to(dtype)
    return dict(q=q, pool=pool, scale=scale, keys=keys, req_to_token=req_to_token, rows=rows, seq_lens=seq_lens)


def _reference(c: dict, sm_scale: float, r: int = R) -> torch.Tensor:
    outs = []
    for b, (row, n) in enumerate(zip(c["rows"], c["seq_lens"], strict=True)):
        if n == 0:
            outs.append(torch.zeros(c["q"].shape[1], r))
            continue
        keys = c["keys"][c["req_to_token"][row, :n].long(), 0]  # [L, R + DR]
        p = torch.softmax(c["q"][b].float() @ keys.T * sm_scale, dim=-1)  # [H, L]
        outs.append(p @ keys[:, :r])
    return torch.stack(outs)


# bfloat16 dots only on a GPU: the CPU interpreter computes them wrongly (float16 stands in)
_BF16 = pytest.param(
    torch.bfloat16, False, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
)


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize(
    "dtype,int8", [(torch.float32, False), (torch.float16, False), (torch.float32, True), (torch.float16, True), _BF16]
)
def test_mla_decode_matches_reference(num_splits: int | None, dtype: torch.dtype, int8: bool) -> None:
    seq_lens = [1, 70, 33, 5]  # with 3 splits the 1- and 5-key sequences leave splits empty
    c = _case(seq_lens, heads=20, dtype=dtype, int8=int8)  # 20 heads: a partial second head block
    sm_scale = 0.17
    dev = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    out = mla_decode_attention(
        dev(c["q"]), dev(c["pool"]), dev(c["req_to_token"]), dev(torch.tensor(c["rows"])),
        dev(torch.tensor(seq_lens)), R, sm_scale, max(seq_lens), pool_scale=dev(c["scale"]), num_splits=num_splits,
    )
    assert out.shape == (4, 20, R) and out.dtype == dtype
    expected = _reference(c, sm_scale)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3}.get(dtype, 2e-2)
    torch.testing.assert_close(out.float().cpu(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_padding_row_of_a_graph_batch_gets_zeros(num_splits: int) -> None:
    c = _case([1, 9], heads=4, dtype=torch.float32, int8=False)
    c["seq_lens"] = [0, 9]  # row 0: a CUDA graph's padding row, no keys
    out = mla_decode_attention(
        c["q"].to(DEVICE), c["pool"].to(DEVICE), c["req_to_token"].to(DEVICE), torch.tensor(c["rows"], device=DEVICE),
        torch.tensor([0, 9], device=DEVICE), R, 0.2, 9, num_splits=num_splits,
    ).cpu()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out[1], _reference(c, 0.2)[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.int8])
def test_deepseek_v2_decode_through_the_kernel_matches_torch(
    kv_dtype: torch.dtype, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DeepSeek-V2 model's batched decode steps: the same logits through the kernel as
    through the torch path (the kernel forced on, on the CPU under the interpreter)."""
    save_tiny_model(str(tmp_path), tiny_config("deepseek_v2"))
    model = load_model(str(tmp_path), torch.float32, "cpu")
    prompts = [[5, 9, 33, 7], list(range(40, 77)), [3]]

    def decode_logits() -> list[torch.Tensor]:
        harness = Harness(model, kv_dtype=kv_dtype)
        for row, prompt in enumerate(prompts):
            harness.prefill(row, prompt)
        return [torch.cat(harness.step([(row, [11 + step]) for row in range(3)])) for step in range(3)]

    expected = decode_logits()
    launches: list[int] = []
    kernel = mla.mla_decode_attention

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        launches.append(1)
        return kernel(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(mla, "use_decode_kernel", lambda q: True)
    monkeypatch.setattr(mla, "mla_decode_attention", counted)
    for got, want in zip(decode_logits(), expected, strict=True):
        assert rel_err(got, want) < 1e-5
    assert len(launches) == 4 * 2  # both layers of the 3 decode steps and the one-token prompt's step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_deepseek_v2_shapes(batch: int, int8: bool, heads: int) -> None:
    # kv_lora_rank 512, rope 64, 16 heads (DeepSeek-V2-Lite) or 128 (DeepSeek-V2), bf16, contexts up to 4k
    gen = torch.Generator().manual_seed(batch)
    seq_lens = torch.randint(1, 4097, (batch,), generator=gen).tolist()
    c = _case(seq_lens, heads=heads, dtype=torch.bfloat16, int8=int8, seed=batch, r=512, dr=64)
    scale = c["scale"].cuda() if c["scale"] is not None else None
    out = mla_decode_attention(
        c["q"].cuda(), c["pool"].cuda(), c["req_to_token"].cuda(), torch.tensor(c["rows"]).cuda(),
        torch.tensor(seq_lens).cuda(), 512, 192**-0.5, max(seq_lens), pool_scale=scale,
    )
    torch.testing.assert_close(out.float().cpu(), _reference(c, 192**-0.5, r=512), atol=2e-2, rtol=2e-2)
