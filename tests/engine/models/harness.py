"""A minimal model runner for tests: a KV pool, req_to_token, prefill (chunked) + greedy decode.

Slots are handed out from a shuffled free list so that every test goes through the
req_to_token indirection rather than relying on contiguous slots.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.messages import SeqStep
from engine.model_config import ModelConfig
from engine.multimodal import PromptImage
from engine.worker.forward_context import build_forward_context, set_forward_context
from engine.worker.image_inputs import ImageInputs
from engine.worker.kv_pool import KVLayout


class Harness:
    def __init__(
        self,
        model: nn.Module,
        num_slots: int = 2048,
        max_rows: int = 8,
        max_len: int = 512,
        kv_dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        shape = ModelConfig.from_hf_config(model.config)
        # The model's device (a GPU for scripts that score a model there; the tests' is the CPU).
        # (GGUF-served layers keep their weights on the meta device: the blocks are buffers.)
        devices = (p.device for p in model.parameters() if p.device.type != "meta")
        self.device = next(devices, torch.device("cpu"))
        # The model runner's pool layout (int8: int8 values and per (slot, kv head) scales; one
        # latent per token and layer for multi-head latent attention).
        self.kv = KVLayout.for_model(shape, 1, kv_dtype).allocate(num_slots, str(self.device))
        self.model = model
        # Stale garbage in unused entries: attention must never read past seq_len.
        self.req_to_token = torch.randint(0, num_slots, (max_rows, max_len), dtype=torch.int32).to(self.device)
        generator = torch.Generator().manual_seed(seed)
        self.free_slots: list[int] = torch.randperm(num_slots, generator=generator).tolist()
        self.seq_lens = [0] * max_rows
        # A vision-language model's images per row (`add_images`), placed as the worker places them.
        self.images = ImageInputs(model, self.device)

    def add_images(self, row: int, images: Sequence[PromptImage]) -> None:
        self.images.set_row(row, images)

    @torch.inference_mode()
    def step(self, batch: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """batch: (row, new token ids) per sequence -> per sequence logits [n_new, vocab] float32."""
        rows = [row for row, _ in batch]
        starts = [self.seq_lens[row] for row in rows]
        new_lens = [len(ids) for _, ids in batch]
        slots = [self.free_slots.pop() for _ in range(sum(new_lens))]
        offset = 0
        for row, start, n in zip(rows, starts, new_lens, strict=True):
            self.req_to_token[row, start : start + n] = torch.tensor(
                slots[offset : offset + n], dtype=torch.int32
            )
            self.seq_lens[row] = start + n
            offset += n
        ctx = build_forward_context(
            self.kv, self.req_to_token, rows, starts, new_lens, torch.tensor(slots, dtype=torch.int64)
        )
        input_ids = torch.tensor([t for _, ids in batch for t in ids], dtype=torch.int64, device=self.device)
        seqs = [SeqStep(row, start, ids, [], False) for (row, ids), start in zip(batch, starts, strict=True)]
        rope = self.images.rope_positions(seqs)  # an M-RoPE model's rows with images, as the worker gives them
        if rope is not None:
            ctx.positions = torch.from_numpy(np.ascontiguousarray(rope)).to(self.device)
        image_embeds = self.images.step_embeds(seqs)
        with set_forward_context(ctx):
            hidden = self.model(input_ids, ctx.positions, *(() if image_embeds is None else (image_embeds,)))
        logits = self.model.compute_logits(hidden)  # type: ignore[operator]
        return list(logits.split(new_lens))

    def prefill(self, row: int, prompt: list[int], chunk_sizes: list[int] | None = None) -> torch.Tensor:
        """Feed `prompt` (in chunks of the given sizes, the rest last) -> logits [len, vocab]."""
        chunks, pos = [], 0
        for size in chunk_sizes or []:
            chunks.append(prompt[pos : pos + size])
            pos += size
        chunks.append(prompt[pos:])
        return torch.cat([self.step([(row, chunk)])[0] for chunk in chunks if chunk])

    def generate(self, prompt: list[int], max_new_tokens: int, row: int = 0) -> list[int]:
        """Greedy decoding of one sequence."""
        logits = self.prefill(row, prompt)
        out = [int(logits[-1].argmax())]
        while len(out) < max_new_tokens:
            out.append(int(self.step([(row, [out[-1]])])[0][-1].argmax()))
        return out


# The sizes of every tiny test model, whatever its family.
TINY_SIZES: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
)


def tiny_config(kind: str = "llama", **overrides: Any) -> Any:
    """A small transformers config of the given family; `initializer_range` is large so that
    random logits are peaked and greedy decoding has no near-ties."""
    from transformers import BloomConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    common: dict[str, Any] = dict(TINY_SIZES)
    if kind == "bloom":  # multi-head, MLP of 4 x hidden, no position table (ALiBi)
        for name in ("intermediate_size", "num_key_value_heads", "max_position_embeddings"):
            del common[name]
    common.update(overrides)
    if kind == "bloom":
        # No end token: with BLOOM's default (2) a random model may pick it first, and the
        # reference's `min_new_tokens` would then suppress it where the engine does not.
        common.setdefault("eos_token_id", None)
        return BloomConfig(architectures=["BloomForCausalLM"], **common)
    if kind == "llama":
        return LlamaConfig(architectures=["LlamaForCausalLM"], **common)
    if kind == "mistral":
        common.setdefault("sliding_window", 6)
        return MistralConfig(architectures=["MistralForCausalLM"], **common)
    if kind == "qwen2":
        common.setdefault("tie_word_embeddings", True)
        return Qwen2Config(architectures=["Qwen2ForCausalLM"], **common)
    if kind == "qwen3":
        common.setdefault("head_dim", 32)  # not hidden / heads, as in the real ones (128 with 1 024)
        return Qwen3Config(architectures=["Qwen3ForCausalLM"], **common)
    if kind == "phi3":
        common.setdefault("pad_token_id", 0)
        common.setdefault("bos_token_id", 1)
        common.setdefault("eos_token_id", 2)  # its default, 32 000, lies past a tiny vocabulary
        return Phi3Config(architectures=["Phi3ForCausalLM"], **common)
    if kind in ("stablelm", "cohere", "cohere2"):
        return _stablelm_cohere_config(kind, common)
    if kind in ("gpt_bigcode", "starcoder2"):
        return _starcoder_config(kind, common)
    if kind in ("mixtral", "qwen2_moe", "qwen3_moe"):
        return _tiny_moe_config(kind, common)
    if kind == "deepseek_v2":
        return _deepseek_v2_config(common)
    if kind == "deepseek_v2_moe":
        return _deepseek_v2_config(common, moe=True)
    raise ValueError(kind)


def _tiny_moe_config(kind: str, common: dict[str, Any]) -> Any:
    """Mixture-of-experts families: 8 experts, top 2 (Qwen2-MoE: a shared expert and a dense
    second layer; Qwen3-MoE: the chosen weights renormalised)."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common.setdefault("num_experts_per_tok", 2)
    if kind == "mixtral":
        common.setdefault("num_local_experts", 8)
        return MixtralConfig(architectures=["MixtralForCausalLM"], **common)
    common.setdefault("num_experts", 8)
    common.setdefault("moe_intermediate_size", 32)
    if kind == "qwen2_moe":
        common.setdefault("shared_expert_intermediate_size", 48)
        common.setdefault("mlp_only_layers", [1])
        return Qwen2MoeConfig(architectures=["Qwen2MoeForCausalLM"], **common)
    if kind == "qwen3_moe":
        common.setdefault("head_dim", 32)
        common.setdefault("norm_topk_prob", True)
        return Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], **common)
    raise ValueError(kind)


def _deepseek_v2_config(common: dict[str, Any], moe: bool = False) -> Any:
    """Multi-head latent attention with dense MLPs only (every layer before first_k_dense_replace);
    with `moe`, a dense first layer then mixture-of-experts layers: DeepSeek-V2's grouped top-k
    (top 3 of the experts of the best 2 of 4 groups of 2), 2 shared experts, routed weights
    scaled by 1.5."""
    from transformers import DeepseekV2Config

    if moe:
        for name, value in (
            ("first_k_dense_replace", 1), ("n_routed_experts", 8), ("num_experts_per_tok", 3),
            ("moe_intermediate_size", 32), ("n_shared_experts", 2), ("topk_method", "group_limited_greedy"),
            ("n_group", 4), ("topk_group", 2), ("routed_scaling_factor", 1.5),
        ):
            common.setdefault(name, value)
    common.pop("num_key_value_heads")
    for name, value in (
        ("kv_lora_rank", 32), ("q_lora_rank", 48), ("qk_nope_head_dim", 16), ("qk_rope_head_dim", 16),
        ("v_head_dim", 24), ("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2),
    ):
        common.setdefault(name, value)
    common.setdefault("first_k_dense_replace", common["num_hidden_layers"])
    return DeepseekV2Config(architectures=["DeepseekV2ForCausalLM"], **common)


def _starcoder_config(kind: str, common: dict[str, Any]) -> Any:
    from transformers import GPTBigCodeConfig, Starcoder2Config

    for name, token_id in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):
        common.setdefault(name, token_id)  # the defaults (50 256) lie past a tiny vocabulary
    if kind == "starcoder2":
        return Starcoder2Config(architectures=["Starcoder2ForCausalLM"], **common)
    # GPTBigCode: one kv head (`multi_query`, the default) or one per head; MLP width `n_inner`
    common.pop("num_key_value_heads")
    common.setdefault("n_inner", common.pop("intermediate_size"))
    return GPTBigCodeConfig(architectures=["GPTBigCodeForCausalLM"], **common)


def _stablelm_cohere_config(kind: str, common: dict[str, Any]) -> Any:
    from transformers import Cohere2Config, CohereConfig, StableLmConfig

    common.setdefault("pad_token_id", 0)
    common.setdefault("bos_token_id", 1)
    # No end-of-sequence token: the defaults lie past a tiny vocabulary, and one inside it would be
    # held back by transformers' `min_new_tokens` in the greedy reference, but not by the harness.
    common.setdefault("eos_token_id", None)
    if kind == "stablelm":  # partial rotary (a quarter of each head), LayerNorm with bias
        # stablelm-2-12b's per-head q/k norms unless told otherwise: the GPU checks cover them
        common.setdefault("qk_layernorm", True)
        return StableLmConfig(architectures=["StableLmForCausalLM"], **common)
    common.setdefault("logit_scale", 0.5)
    if kind == "cohere":
        return CohereConfig(architectures=["CohereForCausalLM"], **common)
    common.setdefault("sliding_window", 6)  # short, so that the windowed layers differ from global
    common.setdefault("sliding_window_pattern", 2)  # layer 0 sliding (rotary), layer 1 global (none)
    return Cohere2Config(architectures=["Cohere2ForCausalLM"], **common)


# Families whose norms get random weights and biases (transformers starts them at ones and
# zeros): their per-head q/k norms must land on the right heads, on every tensor-parallel rank,
# and a norm of ones would hide a mix-up.
_RANDOM_NORM_FAMILIES = {"stablelm", "cohere", "cohere2"}


@torch.no_grad()
def _randomize_norms(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "norm" in name and not name.startswith("lm_head"):
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.1 * noise)


# BLOOM: every linear layer has a bias (transformers starts them at zero, which would hide a
# misplaced row of its per-head fused q/k/v bias) and LayerNorms with bias (`ln_f` among them).
_RANDOM_BIAS_FAMILIES = {"bloom"}


@torch.no_grad()
def _randomize_biases_and_layer_norms(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(2)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if name.endswith(".bias"):
            param.copy_(0.1 * noise)
        elif name.endswith(("layernorm.weight", "ln_f.weight")):
            param.copy_(1.0 + 0.3 * noise)


def save_tiny_model(path: str, config: Any, seed: int = 0, **save_kwargs: Any) -> nn.Module:
    """Random-weight transformers model saved (safetensors) to `path`; returns it in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if config.model_type in _RANDOM_NORM_FAMILIES:
        _randomize_norms(model)
    if config.model_type in _RANDOM_BIAS_FAMILIES:
        _randomize_biases_and_layer_norms(model)
    model.save_pretrained(path, **save_kwargs)
    return model


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def converted_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a converted GGUF directory, read whole as the dense load path reads it
    (norms from its safetensors, the rest dequantized from the GGUF file)."""
    from engine.distributed.lazy_weight import read_weight
    from engine.models.loader import iterate_weights

    return {name: read_weight(weight) for name, weight in iterate_weights(directory)}


def dense_checkpoint(directory: str, out_dir: str) -> str:
    """A copy of a converted GGUF directory with all its tensors in one dense
    `model.safetensors` (what transformers' `from_pretrained` loads); returns `out_dir`."""
    import shutil

    from safetensors.torch import save_file

    from engine.models.gguf_cache import FORMAT_FILE, LOCK_FILE
    from engine.models.gguf_tensors import GGUF_TENSORS_FILE

    skipped = shutil.ignore_patterns("model.safetensors", GGUF_TENSORS_FILE, LOCK_FILE, FORMAT_FILE)
    shutil.copytree(directory, out_dir, ignore=skipped)  # config and tokenizer files
    save_file(converted_tensors(directory), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir
