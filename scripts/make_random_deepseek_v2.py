"""Write a DeepSeek-V2-Lite-shaped model with random bf16 weights (for GPU benchmarks).

    python scripts/make_random_deepseek_v2.py --out /tmp/dsv2lite --tokenizer-dir .gpu_tok/tok
    python scripts/make_random_deepseek_v2.py --out /tmp/dsv2lite-dense --dense   # MLA, dense MLPs only

The shape is DeepSeek-V2-Lite's (27 layers, hidden 2048, 16 heads, kv_lora_rank 512, no q
low-rank, 64 routed experts of which 6 per token, 2 shared, the first layer dense, YaRN x40);
`--dense` makes every layer a dense MLP (`first_k_dense_replace` = layers), `--set key=value`
overrides any config field (value read as JSON). Tensors are written under the names of the
released checkpoints (one tensor per expert), in safetensors shards with an index; norms are
ones, everything else N(0, 0.02). With `--tokenizer-dir` its tokenizer files are copied and its
BOS / EOS ids go into config.json. It prints the weights' size and the bytes a one-sequence decode
step reads (`active_bytes`: every tensor but the embedding table and the experts a token does not
pick), the floor of a bs1 step's time at the GPU's memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any

import torch

# the sibling module, also where this file is loaded by path rather than run (appended: nothing shadowed)
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from safetensors_shards import default_generator, random_bf16, write_shards  # noqa: E402

LITE: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "n_shared_experts": 2, "n_routed_experts": 64, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
    "norm_topk_prob": False, "scoring_func": "softmax",
    "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128,
    "max_position_embeddings": 163840, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 100000, "eos_token_id": 100001, "torch_dtype": "bfloat16",
}


def _is_moe(config: dict[str, Any], layer: int) -> bool:
    return (
        config.get("n_routed_experts") is not None and layer >= config["first_k_dense_replace"]
        and layer % config.get("moe_layer_freq", 1) == 0
    )


def _attention_shapes(c: dict[str, Any], prefix: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    hidden, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    if c["q_lora_rank"] is None:
        yield f"{prefix}.q_proj.weight", (heads * qk, hidden)
    else:
        yield f"{prefix}.q_a_proj.weight", (c["q_lora_rank"], hidden)
        yield f"{prefix}.q_a_layernorm.weight", (c["q_lora_rank"],)
        yield f"{prefix}.q_b_proj.weight", (heads * qk, c["q_lora_rank"])
    yield f"{prefix}.kv_a_proj_with_mqa.weight", (c["kv_lora_rank"] + c["qk_rope_head_dim"], hidden)
    yield f"{prefix}.kv_a_layernorm.weight", (c["kv_lora_rank"],)
    yield f"{prefix}.kv_b_proj.weight", (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"])
    yield f"{prefix}.o_proj.weight", (hidden, heads * c["v_head_dim"])


def _mlp_shapes(prefix: str, hidden: int, inter: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{prefix}.gate_proj.weight", (inter, hidden)
    yield f"{prefix}.up_proj.weight", (inter, hidden)
    yield f"{prefix}.down_proj.weight", (hidden, inter)


def tensor_shapes(c: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of the checkpoint, in the released checkpoints' names."""
    hidden = c["hidden_size"]
    yield "model.embed_tokens.weight", (c["vocab_size"], hidden)
    for layer in range(c["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        yield f"{prefix}.input_layernorm.weight", (hidden,)
        yield f"{prefix}.post_attention_layernorm.weight", (hidden,)
        yield from _attention_shapes(c, f"{prefix}.self_attn")
        if not _is_moe(c, layer):
            yield from _mlp_shapes(f"{prefix}.mlp", hidden, c["intermediate_size"])
            continue
        yield f"{prefix}.mlp.gate.weight", (c["n_routed_experts"], hidden)
        for expert in range(c["n_routed_experts"]):
            yield from _mlp_shapes(f"{prefix}.mlp.experts.{expert}", hidden, c["moe_intermediate_size"])
        shared = c["moe_intermediate_size"] * c["n_shared_experts"]
        yield from _mlp_shapes(f"{prefix}.mlp.shared_experts", hidden, shared)
    yield "model.norm.weight", (hidden,)
    if not c["tie_word_embeddings"]:
        yield "lm_head.weight", (c["vocab_size"], hidden)


def active_bytes(c: dict[str, Any]) -> int:
    """bf16 bytes one token's decode step reads: attention, dense MLPs, routers, shared experts,
    its `num_experts_per_tok` routed experts per MoE layer, norms and the LM head; of the
    embedding table only its row."""
    total = 0
    for name, shape in tensor_shapes(c):
        numel = 1
        for dim in shape:
            numel *= dim
        if name == "model.embed_tokens.weight":
            numel = shape[1]
        elif ".mlp.experts." in name:
            numel = numel * c["num_experts_per_tok"] // c["n_routed_experts"]
        total += 2 * numel
    return total


def write_model(out: str, config: dict[str, Any], seed: int = 0) -> None:
    """Write config.json and the random weights (safetensors shards + index) into `out`."""
    generator = default_generator(seed)
    write_shards(out, (
        (name, torch.ones(shape, dtype=torch.bfloat16) if name.endswith("norm.weight") else random_bf16(shape, generator))
        for name, shape in tensor_shapes(config)
    ))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _tokenizer_ids(tokenizer_dir: str, out: str) -> dict[str, int]:
    """Copy the tokenizer files; their BOS / EOS ids for config.json."""
    for name in os.listdir(tokenizer_dir):
        if name.startswith("tokenizer") or name.endswith(".jinja") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(tokenizer_dir, name), out)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    return {k: v for k, v in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id))
            if v is not None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer-dir")
    parser.add_argument("--dense", action="store_true", help="every layer a dense MLP (no experts)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a config field")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = dict(LITE)
    for item in args.set:
        key, _, value = item.partition("=")
        config[key] = json.loads(value)
    if args.dense:
        config["first_k_dense_replace"] = config["num_hidden_layers"]
    os.makedirs(args.out, exist_ok=True)
    if args.tokenizer_dir:
        config.update(_tokenizer_ids(args.tokenizer_dir, args.out))
    write_model(args.out, config, args.seed)
    weights = sum(2 * torch.Size(shape).numel() for _, shape in tensor_shapes(config))
    print(f"wrote {args.out}: {weights / 2**30:.2f} GiB of weights; a bs1 decode step reads "
          f"{active_bytes(config) / 2**30:.3f} GiB (active parameters)")


if __name__ == "__main__":
    main()
