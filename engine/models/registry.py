"""Architecture registry: `config.json`'s `architectures[0]` -> model class, imported lazily."""

from __future__ import annotations

import importlib

from engine.models.causal_lm import CausalLM

# architecture name -> (module under engine.models, class name)
_MODELS: dict[str, tuple[str, str]] = {
    "BloomForCausalLM": ("bloom", "BloomForCausalLM"),
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("llama", "Qwen3ForCausalLM"),
    "Phi3ForCausalLM": ("llama", "Phi3ForCausalLM"),
    "StableLmForCausalLM": ("stablelm", "StableLmForCausalLM"),
    "CohereForCausalLM": ("cohere", "CohereForCausalLM"),
    "Cohere2ForCausalLM": ("cohere", "Cohere2ForCausalLM"),
    "GPTBigCodeForCausalLM": ("starcoder", "GPTBigCodeForCausalLM"),
    "Starcoder2ForCausalLM": ("starcoder", "Starcoder2ForCausalLM"),
    "InternLM2ForCausalLM": ("internlm", "InternLM2ForCausalLM"),
    "InternLM3ForCausalLM": ("internlm", "InternLM3ForCausalLM"),
    "GlmForCausalLM": ("glm", "GlmForCausalLM"),
    "Glm4ForCausalLM": ("glm", "Glm4ForCausalLM"),
    "ChatGLMModel": ("glm", "ChatGLMForCausalLM"),
    "ChatGLMForConditionalGeneration": ("glm", "ChatGLMForCausalLM"),
    "MiniCPMForCausalLM": ("minicpm", "MiniCPMForCausalLM"),
    "MiniCPM3ForCausalLM": ("minicpm", "MiniCPM3ForCausalLM"),
    "LlavaForConditionalGeneration": ("llava", "LlavaForConditionalGeneration"),
    "LlavaNextForConditionalGeneration": ("llava", "LlavaNextForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_vl", "Qwen2_5_VLForConditionalGeneration"),
    "MixtralForCausalLM": ("moe", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("moe", "Qwen3MoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("deepseek_v2", "DeepseekV2ForCausalLM"),
}


# Architectures refused with a reason rather than "unsupported".
_REFUSED: dict[str, str] = {
    "QWenLMHeadModel": (
        "the first Qwen and Qwen-VL (QWenLMHeadModel) are not served: their modelling code ships with the "
        "checkpoint (Qwen-VL's vision resampler and its image references inside the prompt text among it), "
        "and lightgate runs no model code from a model directory; Qwen2 / Qwen2.5 (Qwen2ForCausalLM) and "
        "Qwen2-VL / Qwen2.5-VL (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration) are served"
    ),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(architecture: str) -> type[CausalLM]:
    if architecture in _REFUSED:
        raise ValueError(_REFUSED[architecture])
    try:
        module_name, class_name = _MODELS[architecture]
    except KeyError:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        ) from None
    module = importlib.import_module(f"engine.models.{module_name}")
    cls: type[CausalLM] = getattr(module, class_name)
    return cls
