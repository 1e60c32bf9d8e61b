"""Loading an HF model for calibration/generation and fingerprinting it."""

from __future__ import annotations

from pathlib import Path

import torch

from calibration.capture import decoder_layers
from steering.errors import GuarditError
from steering.pack import ModelFingerprint, fingerprint

PRECISIONS = ("float32", "bfloat16", "int8-dynamic")
INT8_DYNAMIC = "int8-dynamic"


def load_model(model_dir: str | Path, precision: str = "float32"):
    """(model, tokenizer) from an HF folder, in eval mode, tokenizer padding on the left.

    ``precision``: ``float32`` (what calibration uses), ``bfloat16``, or ``int8-dynamic``: the
    float32 model with every linear layer but the output head replaced by PyTorch's dynamically
    quantized int8 one (weights per output channel, activations quantized per batch at run time);
    the embedding and the output head (tied to it here) stay float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    if precision not in PRECISIONS:
        raise GuarditError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise GuarditError(f"model folder {d} not found or has no config.json (run 'guardit model prepare')")
    tok = AutoTokenizer.from_pretrained(d)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    if precision == INT8_DYNAMIC:
        model = _int8_dynamic(model)
    return model, tok


def _int8_dynamic(model):
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    head = model.get_output_embeddings()
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    with warnings.catch_warnings():  # torch.ao's deprecation notices (torchao is its successor)
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8)


def model_precision(model) -> str:
    """How the model's weights are held: a quantization method from its config, ``int8-dynamic``
    when PyTorch's dynamically quantized layers are in it, else the dtype of its floating weights."""
    quant = getattr(model.config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        return str(method or "quantized")
    if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
        return INT8_DYNAMIC
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    return str(dtype).removeprefix("torch.")


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
        precision=model_precision(model),
    )
