"""Loading an HF model for calibration/generation and fingerprinting it."""

from __future__ import annotations

from pathlib import Path

import torch

from calibration.capture import decoder_layers
from steering.errors import GuarditError
from steering.pack import ModelFingerprint, fingerprint


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from an HF folder, in eval mode, tokenizer padding on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise GuarditError(f"model folder {d} not found or has no config.json (run 'guardit model prepare')")
    tok = AutoTokenizer.from_pretrained(d)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    return model, tok


def hf_fingerprint(model, name: str | None = None) -> ModelFingerprint:
    cfg = model.config
    text_cfg = getattr(cfg, "text_config", None) or cfg
    return fingerprint(
        name=name or Path(str(getattr(cfg, "_name_or_path", "") or "model")).name,
        model_type=str(text_cfg.model_type),
        num_layers=len(decoder_layers(model)),
        hidden_size=int(text_cfg.hidden_size),
        vocab_size=int(text_cfg.vocab_size),
        embed_weight=model.get_input_embeddings().weight,
    )
