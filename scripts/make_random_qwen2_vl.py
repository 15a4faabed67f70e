"""Write a Qwen2-VL-7B-shaped model with random bf16 weights (for GPU benchmarks of image chats).

    python scripts/make_random_qwen2_vl.py --out /tmp/qwen2vl7b --tokenizer-dir .gpu_tok/tok
    python scripts/make_random_qwen2_vl.py --out /tmp/qwen25vl7b --qwen2_5 --tokenizer-dir .gpu_tok/tok

The shape is Qwen2-VL-7B-Instruct's (28 layers, hidden 3584, 28 heads, 4 kv heads, M-RoPE
16 / 24 / 24; a 32-block tower of width 1280, 14 px patches, 2 x 2 merge), or with `--qwen2_5`
Qwen2.5-VL-7B's tower (RMSNorm, SwiGLU, 112 px windows, full attention at blocks 7, 15, 23, 31).
`--set key=value` overrides a config field (value read as JSON; `vision_config` merges). The
config.json is written in the published (flat) layout, the tensors under transformers' names in
safetensors shards with an index; norms are ones, everything else N(0, 0.02). With
`--tokenizer-dir` its tokenizer files are copied, Qwen2-VL's vision tokens added to it with a
chat template that places image parts as `<|vision_start|><|image_pad|><|vision_end|>`, and its
ids written into config.json; the image processor's config (transformers' defaults: min 56 x 56,
max 28 x 28 x 1280 pixels) is written beside.
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

QWEN2_VL_7B: dict[str, Any] = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False, "torch_dtype": "bfloat16",
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
QWEN2_5_VL_TOWER: dict[str, Any] = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu", "tokens_per_second": 2,
}
_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tensor_shapes(config_dir: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, from transformers' model built on the meta device."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    for name, param in model.state_dict().items():
        yield name, tuple(param.shape)


def _tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Norm weights ones, norm biases zeros, everything else random."""
    if "norm" in name or ".ln_q." in name:
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    return random_bf16(shape, generator)


def write_weights(out: str, seed: int = 0) -> int:
    """The random weights of `out`/config.json (safetensors shards + index) -> their bytes."""
    generator = default_generator(seed)
    return write_shards(out, ((name, _tensor(name, shape, generator)) for name, shape in tensor_shapes(out)))


def _tokenizer(tokenizer_dir: str, out: str) -> dict[str, int]:
    """Copy the tokenizer files, add the vision tokens and the template -> the config's token ids."""
    from transformers import AutoTokenizer

    for name in os.listdir(tokenizer_dir):
        if name.startswith("tokenizer") or name.endswith(".jinja") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(tokenizer_dir, name), out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_tokens(list(_VISION_TOKENS), special_tokens=True)
    tokenizer.chat_template = _TEMPLATE
    tokenizer.save_pretrained(out)
    start, end, image, video = tokenizer.convert_tokens_to_ids(list(_VISION_TOKENS))
    ids = {"vision_start_token_id": start, "vision_end_token_id": end, "image_token_id": image, "video_token_id": video,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer-dir")
    parser.add_argument("--qwen2_5", action="store_true", help="Qwen2.5-VL's tower (windows, RMSNorm, SwiGLU)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a config field")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = json.loads(json.dumps(QWEN2_VL_7B))
    if args.qwen2_5:
        config.update(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
                      vision_config=dict(QWEN2_5_VL_TOWER))
    for item in args.set:
        key, _, value = item.partition("=")
        if key == "vision_config":
            config["vision_config"].update(json.loads(value))
        else:
            config[key] = json.loads(value)
    os.makedirs(args.out, exist_ok=True)
    if args.tokenizer_dir:
        config.update(_tokenizer(args.tokenizer_dir, args.out))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    from transformers import Qwen2VLImageProcessorPil

    vision = config["vision_config"]
    Qwen2VLImageProcessorPil(patch_size=vision["patch_size"], temporal_patch_size=vision["temporal_patch_size"],
                             merge_size=vision["spatial_merge_size"]).save_pretrained(args.out)
    print(f"wrote {args.out}: {write_weights(args.out, args.seed) / 2**30:.2f} GiB of weights")


if __name__ == "__main__":
    main()
