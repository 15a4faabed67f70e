"""Remote-code families (InternLM2, ChatGLM, MiniCPM): config and tokenizer read without their code.

Each checkpoint directory here names, in `auto_map`, a Python file that raises when imported
(`remote_families._write`), so a load that ran it would fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from engine import LLM, SamplingParams
from engine.models import load_hf_config
from engine.tokenizer import eos_token_ids, load_tokenizer
from tests.engine.models.remote_families import save_chatglm, save_family, save_internlm2, save_minicpm

_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


def _write_tokenizer(path: Path, tokenizer_json: bool, remote_class: str | None) -> None:
    """A word-level tokenizer (t0 .. t199, <s>, </s>, <unk>) and tokenizer_config.json; with
    `remote_class`, the config maps AutoTokenizer to a file of the directory that raises."""
    vocab = {f"t{i}": i for i in range(200)} | {"<s>": 200, "</s>": 201, "<unk>": 202}
    if tokenizer_json:
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer.save(str(path / "tokenizer.json"))
    else:
        (path / "tokenizer.model").write_bytes(b"\x00 a model only its own code reads")
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": _TEMPLATE,
              "tokenizer_class": remote_class or "PreTrainedTokenizerFast"}
    if remote_class is not None:
        config["auto_map"] = {"AutoTokenizer": [f"tokenization_x.{remote_class}", None]}
        (path / "tokenization_x.py").write_text('raise RuntimeError("remote code ran")\n')
    (path / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("kind", ["internlm2", "chatglm", "minicpm"])
def test_config_is_read_without_running_remote_code(kind: str, tmp_path: Path) -> None:
    save_family(kind, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    config = load_hf_config(str(tmp_path))
    assert config.model_type == kind and config.architectures == raw["architectures"]
    assert not hasattr(config, "auto_map")
    for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps"):
        assert getattr(config, name) is not None, name
    assert config.eos_token_id == 2


def test_minicpm_scalings_and_dynamic_rope_are_read(tmp_path: Path) -> None:
    save_minicpm(tmp_path / "minicpm")
    config = load_hf_config(str(tmp_path / "minicpm"))
    assert (config.scale_emb, config.scale_depth, config.dim_model_base) == (12.0, 1.4, 32.0)
    assert config.tie_word_embeddings is True
    save_internlm2(tmp_path / "internlm2", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6})
    config = load_hf_config(str(tmp_path / "internlm2"))
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}


@pytest.mark.parametrize("kind", ["internlm2", "chatglm"])
def test_remote_tokenizer_class_is_replaced_by_its_tokenizer_json(kind: str, tmp_path: Path) -> None:
    save_family(kind, tmp_path)
    _write_tokenizer(tmp_path, tokenizer_json=True, remote_class="OwnTokenizer")
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer is not None
    assert tokenizer("t5 t17 t199")["input_ids"] == [5, 17, 199]
    assert tokenizer.decode([5, 17]) == "t5 t17"
    assert tokenizer.eos_token_id == 201
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "t3"}], tokenize=False)
    assert chat == "<|user|>t3"
    assert eos_token_ids(str(tmp_path), load_hf_config(str(tmp_path)), tokenizer) == {2, 201}


def test_minicpm_tokenizer_of_a_transformers_class_loads(tmp_path: Path) -> None:
    save_minicpm(tmp_path)
    _write_tokenizer(tmp_path, tokenizer_json=True, remote_class=None)
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer is not None and tokenizer("t1 t2")["input_ids"] == [1, 2]


def test_chatglm_tokenizer_that_exists_only_as_code_is_refused(tmp_path: Path) -> None:
    save_chatglm(tmp_path)
    _write_tokenizer(tmp_path, tokenizer_json=False, remote_class="ChatGLMTokenizer")
    with pytest.raises(ValueError, match="ChatGLMTokenizer.*does not run.*--tokenizer"):
        load_tokenizer(str(tmp_path))


def test_a_remote_code_family_serves_text_end_to_end(tmp_path: Path) -> None:
    """Engine, worker and the worker's grammar compiler all read config and tokenizer without
    the directory's code; the text decodes the greedy tokens transformers' reference picks."""
    import torch

    hf = save_chatglm(tmp_path)
    _write_tokenizer(tmp_path, tokenizer_json=True, remote_class="ChatGLMTokenizer")
    prompt = "t5 t17 t3 t99"
    with torch.inference_mode():
        expected = hf.generate(torch.tensor([[5, 17, 3, 99]]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with LLM(str(tmp_path), dtype="float32", kv_cache_memory_gb=0.01) as llm:
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert out.prompt_token_ids == [5, 17, 3, 99]
    assert out.outputs[0].token_ids == expected[0, 4:].tolist()
    words = [f"t{i}" for i in out.outputs[0].token_ids if i < 200]  # ids past the word-level vocabulary: no text
    assert words and out.outputs[0].text.split() == words


def test_internlm2_tokenizer_model_without_its_converter_packages_says_what_to_install(tmp_path: Path) -> None:
    """InternLM2's tokenizer.model is a plain SentencePiece model that transformers converts,
    given the sentencepiece and protobuf packages (not dependencies of lightgate)."""
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is not None:
        pytest.skip("sentencepiece is installed: transformers converts the file")
    save_internlm2(tmp_path)
    _write_tokenizer(tmp_path, tokenizer_json=False, remote_class="InternLM2Tokenizer")
    with pytest.raises(ValueError, match="tokenizer.model .*needs the sentencepiece and protobuf packages"):
        load_tokenizer(str(tmp_path))
