"""Finding the decoder layers of an HF-style causal LM (pure torch module traversal)."""

from __future__ import annotations

import torch

_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers", "transformer.h")


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a Llama/Qwen/Gemma/Mistral-style causal LM."""
    for path in _LAYER_PATHS:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise TypeError(f"cannot find the decoder layers of {type(model).__name__}")
