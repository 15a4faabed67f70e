"""Model side of the engine: finding a model, building it from the registry, loading weights."""

from engine.models.loader import load_hf_config, load_model, resolve_model
from engine.models.registry import get_model_class, supported_architectures

__all__ = ["get_model_class", "load_hf_config", "load_model", "resolve_model", "supported_architectures"]
