"""lightgate's inference engine: token-granular KV memory, continuous batching, a worker process.

The public surface is this module's `__all__`; everything else is internal.
"""

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.errors import EngineDeadError, EngineOverloadedError, PromptTooLongError
from engine.llm import LLM
from engine.multimodal import ImageInput, ImageProcessor
from engine.output_stream import OutputStream
from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.stats import EngineStats
from engine.structured_output import StructuredOutput, TaggedJSON

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "AsyncEngine",
    "CompletionOutput",
    "EngineConfig",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "ImageInput",
    "ImageProcessor",
    "Logprob",
    "OutputStream",
    "PromptTooLongError",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutput",
    "TaggedJSON",
    "__version__",
]
