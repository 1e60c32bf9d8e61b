"""What the engine loads: concept packs named by the environment (set by ``guardit serve`` or by
:func:`guardit.vllm_generation.make_llm`), so every vLLM process sees the same set.

- ``GUARDIT_POLICY_STORE``: a policy store (:mod:`integrations.vllm.store`; ``guardit serve``):
  the policies can change while the server runs, and the packs are every pack installed; else
- ``GUARDIT_CONFIG``: a policies YAML (its ``packs`` section), or
- ``GUARDIT_PACKS``: pack directories separated by ``os.pathsep`` (``:``).
- ``GUARDIT_RUN_DIR``: where the engine appends gate events (``events.jsonl``).
- ``GUARDIT_ALLOW_PRECISION_CHANGE=1``: packs calibrated at another precision of the served model
  are accepted (``--allow-precision-change``; :meth:`steering.pack.ConceptPack.check_model`).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from integrations.vllm.store import PolicyStore
from steering.errors import GuarditError, PackError
from steering.pack import META_FILE, PackMeta
from steering.policy import DEFAULT_MAX_PACKS, PolicyConfig

ENV_CONFIG = "GUARDIT_CONFIG"
ENV_PACKS = "GUARDIT_PACKS"
ENV_RUN_DIR = "GUARDIT_RUN_DIR"
ENV_MODEL = "GUARDIT_MODEL"  # the served model's folder, for the server's answer check (set by guardit serve)
ENV_ALLOW_PRECISION = "GUARDIT_ALLOW_PRECISION_CHANGE"
ENV_STORE = "GUARDIT_POLICY_STORE"
ENV_PREFIX = "GUARDIT_"  # every variable above: what vLLM's Ray executor must copy to its workers
# vLLM's Ray executor copies to its workers (on every node) only the variables it knows, plus
# those with a prefix listed here (comma-separated).
RAY_PREFIXES = "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"
ENV_CPU_BIND = "VLLM_CPU_OMP_THREADS_BIND"  # vLLM CPU: each worker's cores ("0-3|4-7"; default "auto")


def cpu_worker_binding(tensor_parallel_size: int) -> dict[str, str]:
    """The environment a CPU engine split over ``tensor_parallel_size`` workers needs on this
    machine. vLLM's automatic binding first reserves one core per worker for its scheduler, which
    leaves none on a small machine; there, unless the user chose a binding, each worker gets an
    equal share of this process's cores. Empty: leave the binding to vLLM."""
    tp = tensor_parallel_size
    cores = sorted(os.sched_getaffinity(0))
    if tp <= 1 or ENV_CPU_BIND in os.environ or len(cores) >= 2 * tp:
        return {}
    if len(cores) < tp:
        raise GuarditError(
            f"tensor_parallel_size: {tp} workers need at least {tp} CPU cores (this process has {len(cores)})"
        )
    share = len(cores) // tp
    return {ENV_CPU_BIND: "|".join(",".join(map(str, cores[r * share : (r + 1) * share])) for r in range(tp))}


def carry_over_to_ray_workers() -> None:
    """Add guardit's prefix to the variables vLLM's Ray executor copies to its workers, so a
    multi-node engine's workers load the same packs and policies as a local one's."""
    prefixes = [p.strip() for p in os.environ.get(RAY_PREFIXES, "").split(",") if p.strip()]
    if ENV_PREFIX not in prefixes:
        os.environ[RAY_PREFIXES] = ",".join([*prefixes, ENV_PREFIX])


@functools.lru_cache(maxsize=4)
def _store(root: str) -> PolicyStore:
    return PolicyStore(root)


def store() -> PolicyStore | None:
    """The policy store named by the environment (one object per process), or None."""
    root = os.environ.get(ENV_STORE)
    return _store(root) if root else None


def configured() -> bool:
    """Does this process serve packs, now or (with a store) after a live change?"""
    return store() is not None or bool(pack_dirs())


def policies() -> PolicyConfig | None:
    """The policies in force: the store's current version, or the config file; None offline."""
    s = store()
    if s is not None:
        return s.config()
    return PolicyConfig.load(os.environ[ENV_CONFIG]) if os.environ.get(ENV_CONFIG) else None


def _version() -> str:
    s = store()
    return str(s.version()) if s is not None else ""


def allow_precision_change() -> bool:
    """Whether packs made at another precision of the served model are accepted knowingly."""
    value = os.environ.get(ENV_ALLOW_PRECISION, "")
    if value not in ("", "0", "1"):
        raise PackError(f"{ENV_ALLOW_PRECISION}: {value!r} is not 0 or 1")
    return value == "1"


def pack_dirs() -> dict[str, Path]:
    """Concept id -> pack directory, from the environment (empty when nothing is configured; with a
    store, every pack installed so far)."""
    s = store()
    if s is not None:
        return s.pack_dirs()
    if os.environ.get(ENV_CONFIG):
        cfg = PolicyConfig.load(os.environ[ENV_CONFIG])
        return {k: Path(v) for k, v in cfg.packs.items()}
    out: dict[str, Path] = {}
    for raw in filter(None, os.environ.get(ENV_PACKS, "").split(os.pathsep)):
        d = Path(raw)
        meta_path = d / META_FILE
        if not meta_path.is_file():
            raise PackError(f"{ENV_PACKS}: concept pack {d} has no {META_FILE}")
        meta = PackMeta.model_validate_json(meta_path.read_text())
        if meta.concept_id in out:
            raise PackError(f"{ENV_PACKS}: concept '{meta.concept_id}' is given twice")
        out[meta.concept_id] = d
    return out


@functools.lru_cache(maxsize=1)
def _known(config: str, packs: str, store: str, version: str) -> tuple[frozenset[str], int]:
    ids = frozenset(pack_dirs())
    cfg = policies()
    return ids, cfg.max_packs_per_request if cfg is not None else DEFAULT_MAX_PACKS


def known_packs() -> tuple[frozenset[str], int]:
    """(loaded concept ids, max packs per request), cached per environment and policy version."""
    return _known(*_env(), _version())


@functools.lru_cache(maxsize=1)
def _metas(config: str, packs: str, store: str, version: str) -> dict[str, PackMeta]:
    return {k: PackMeta.model_validate_json((d / META_FILE).read_text()) for k, d in pack_dirs().items()}


def pack_metas() -> dict[str, PackMeta]:
    """Concept id -> the loaded pack's metadata (what a request's gate level is checked against),
    cached per environment and policy version."""
    return _metas(*_env(), _version())


def _env() -> tuple[str, str, str]:
    return os.environ.get(ENV_CONFIG, ""), os.environ.get(ENV_PACKS, ""), os.environ.get(ENV_STORE, "")


def events_path() -> Path | None:
    d = os.environ.get(ENV_RUN_DIR)
    return Path(d) / "events.jsonl" if d else None


def fingerprint_path() -> Path | None:
    """Where the engine writes the served model's fingerprint at start-up."""
    d = os.environ.get(ENV_RUN_DIR)
    return Path(d) / "model.json" if d else None


def read_events(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """New complete event lines after byte ``offset``; returns (events, new offset)."""
    if not path.is_file():
        return [], offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end
