"""`LLM`: the offline API. Add every prompt, step until all finish, return in input order."""

from __future__ import annotations

import atexit
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.multimodal import ImageInput, ImageProcessor
from engine.outputs import OutputAccumulator, RequestOutput
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from typing_extensions import TypeIs

PromptType = str | list[int]


def _is_one_prompt(prompts: PromptType | Sequence[PromptType]) -> TypeIs[PromptType]:
    """A text or a list of token ids, not a list of prompts."""
    return isinstance(prompts, str) or (bool(prompts) and isinstance(prompts[0], int))


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        kv_cache_dtype: str = "auto",
        kv_cache_memory_gb: float | None = None,
        max_model_len: int | None = None,
        **kwargs: Any,
    ) -> None:
        config = EngineConfig(
            model=model,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            kv_cache_dtype=kv_cache_dtype,
            kv_cache_memory_gb=kv_cache_memory_gb,
            max_model_len=max_model_len,
            **kwargs,
        )
        self._core: EngineCore | None = EngineCore(config)
        self._ids = itertools.count()
        atexit.register(self.shutdown)

    @property
    def core(self) -> EngineCore:
        if self._core is None:
            raise RuntimeError("this LLM has been shut down")
        return self._core

    @property
    def kv_cache_tokens(self) -> int:
        return self.core.allocator.num_slots

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def image_processor(self) -> ImageProcessor | None:
        """A vision-language model's image preprocessing and placeholders; None for text only."""
        return self.core.image_processor

    def get_tokenizer(self) -> Any:
        return self.core.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        images: Sequence[Sequence[ImageInput]] | None = None,
    ) -> list[RequestOutput]:
        """`images`, for a vision-language model: one list per prompt (`ImageProcessor.preprocess`),
        filling its image placeholders in order. A text prompt names each image once, by the
        processor's `placeholder` text, and is tokenized and widened to the images' tokens as a
        chat is (`expand_placeholders`); token ids come widened already."""
        prompt_list: list[PromptType] = [prompts] if _is_one_prompt(prompts) else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompt_list)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompt_list):
            raise ValueError("give one SamplingParams, or one per prompt")
        images_list = list(images) if images is not None else [()] * len(prompt_list)
        if len(images_list) != len(prompt_list):
            raise ValueError("give one list of images per prompt", "images")
        core = self.core
        order: list[str] = []
        accs: dict[str, OutputAccumulator] = {}
        texts: dict[str, str] = {}  # request id -> its text prompt, sent as ids (images widened)
        try:
            for prompt, params, prompt_images in zip(prompt_list, params_list, images_list, strict=True):
                request_id = f"offline-{next(self._ids)}"
                if isinstance(prompt, str) and prompt_images:
                    texts[request_id] = prompt
                    prompt = _expanded(core, prompt, prompt_images)
                core.add_request(request_id, prompt, params, prompt_images)
                order.append(request_id)
                accs[request_id] = OutputAccumulator(params.n)
            while core.has_work:
                for out in core.step():
                    accs[out.request_id].add(out)
        except BaseException:
            for request_id in order:
                core.abort_request(request_id)
            core.drain()
            raise
        results = [accs[r].result() for r in order]
        for out in results:
            out.prompt = texts.get(out.request_id, out.prompt)
        return results

    def shutdown(self) -> None:
        if self._core is not None:
            self._core.shutdown()
            self._core = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _expanded(core: EngineCore, prompt: str, images: Sequence[ImageInput]) -> PromptType:
    """A text prompt with one placeholder per image -> its token ids, each placeholder widened to
    its image's tokens (as the chat path reads a chat); ValueError naming `prompt` when the
    placeholders and the images differ in number. Left as it is for the engine to refuse without a
    tokenizer or an image processor."""
    processor = core.image_processor
    if processor is None or core.tokenizer is None:
        return prompt
    ids = core.tokenizer.encode(prompt, add_special_tokens=False)
    try:
        return processor.expand_placeholders(ids, images)
    except ValueError as e:
        raise ValueError(e.args[0], "prompt") from None
