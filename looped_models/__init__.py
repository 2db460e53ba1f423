"""Flax NNX looped (recurrent-depth) transformer: layers, input injection, the looped model."""

from looped_models.config import ModelSpec, validate_model_config
from looped_models.model import LoopedTransformer, LoopOutput

__all__ = ["LoopedTransformer", "LoopOutput", "ModelSpec", "validate_model_config"]
