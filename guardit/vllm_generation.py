"""Greedy generation with the real vLLM engine and the guardit plugin (offline ``LLM``).

Packs are handed to the engine processes through the environment (``GUARDIT_PACKS``); gate
results come back through the engine's event log (``GUARDIT_RUN_DIR``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from calibration.capture import encode_chat
from calibration.prompts import PromptRecord
from guardit.generation import answer_recheck, result_row, take_reruns
from integrations.vllm import config as vcfg
from steering.errors import GuarditError
from steering.pack import load_packs
from steering.policy import KEY_ALPHA, KEY_ANGLE, KEY_FORCE, KEY_PACKS, KEY_RID
from steering.runtime import SteeringBank

BANK_ATTR = "guardit_bank"  # the engine's packs, for the answer check (engine_generate)
VLLM_PRECISIONS = ("float32", "bfloat16")
ENV_CPU_KV = "VLLM_CPU_KVCACHE_SPACE"  # vLLM CPU: KV cache size in GiB (default: derived from free memory)


def make_llm(
    model_dir: str | Path,
    pack_dirs: Sequence[str | Path] = (),
    run_dir: str | Path | None = None,
    allow_precision_change: bool = False,
    **kw,
):
    """A vLLM engine with the given packs loaded (CPU-friendly defaults; ``kw`` overrides them and
    goes to ``vllm.LLM``). ``allow_precision_change``: accept packs calibrated at another precision
    of the model (e.g. float32 packs on ``dtype="bfloat16"``).

    The default is eager (``enforce_eager=True``): these one-shot engines (``guardit generate``,
    ``guardit eval``) generate for a few prompts, and compiling the model takes longer than that.
    guardit runs in vLLM's compiled mode too: pass ``enforce_eager=False``."""
    packs = load_packs(list(pack_dirs))  # validate before the engine starts: clear errors, fail fast
    os.environ[vcfg.ENV_PACKS] = os.pathsep.join(str(Path(p).resolve()) for p in pack_dirs)
    if allow_precision_change:
        os.environ[vcfg.ENV_ALLOW_PRECISION] = "1"
    else:
        os.environ.pop(vcfg.ENV_ALLOW_PRECISION, None)
    os.environ.pop(vcfg.ENV_CONFIG, None)
    os.environ[vcfg.ENV_RUN_DIR] = str(run_dir or tempfile.mkdtemp(prefix="guardit-run-"))
    from vllm import LLM

    args = dict(
        model=str(model_dir),
        enforce_eager=True,
        dtype="float32",
        gpu_memory_utilization=0.5,
        max_model_len=1024,
        seed=0,
    )
    args.update(kw)
    env = _tp_defaults(args) if int(args.get("tensor_parallel_size", 1)) > 1 else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the engine's processes as they start, then put back
    try:
        llm = LLM(**args)
    except RuntimeError as e:
        if "Engine core initialization failed" not in str(e):
            raise
        raise GuarditError(
            "the vLLM engine failed to start (vLLM's log above names the cause; on a CPU short of memory, "
            f"set {ENV_CPU_KV}=N to give its KV cache N GiB instead of half the NUMA node)"
        ) from e
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    setattr(llm, BANK_ATTR, SteeringBank(packs))  # the answer check runs here, in the driver
    return llm


def _tp_defaults(args: dict) -> dict[str, str]:
    """Tensor parallelism runs on the executor vLLM chooses (its multiprocessing one on one node,
    Ray's on a Ray cluster). Returns the environment the engine's workers need (on a CPU:
    :func:`integrations.vllm.config.cpu_worker_binding`)."""
    from vllm.platforms import current_platform

    return vcfg.cpu_worker_binding(int(args["tensor_parallel_size"])) if current_platform.is_cpu() else {}


# How long the engine-core process gets to exit by itself. vLLM's default (5 s) is shorter than its
# worker's own exit wait, so on a busy CPU the engine core was killed mid-teardown and its shared
# memory was left behind ("resource_tracker: ... leaked shared_memory objects").
SHUTDOWN_TIMEOUT_S = 60.0


def shutdown(llm) -> None:
    """Stop an engine's background processes now (instead of at garbage collection), letting them
    exit cleanly."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown(timeout=SHUTDOWN_TIMEOUT_S)
    gc.collect()


def engine_generate(
    llm,
    records: Sequence[PromptRecord],
    packs: Sequence[str] = (),
    max_tokens: int = 48,
    force: bool = False,
    angle: float | None = None,
    alpha: float | None = None,
) -> list[dict]:
    """Generate for each record on a running engine; packs named by concept id. Packs with an
    answer check (engines from :func:`make_llm`) check each finished answer and generate a row again
    with the fired packs forced, as ``guardit.generation`` does on HF. ``alpha``: the gates' level
    (``guardit_alpha``; None: each pack's calibrated level)."""
    tok = llm.get_tokenizer()
    ids = encode_chat(tok, [r.conversation() for r in records])
    token_ids, gates = _submit(llm, ids, [list(packs)] * len(ids), force, angle, max_tokens, alpha)
    outputs = [tok.decode(x, skip_special_tokens=True) for x in token_ids]
    bank: SteeringBank | None = getattr(llm, BANK_ATTR, None)
    if packs and not force and bank is not None and bank.has_answer_check():
        redo = answer_recheck(bank, tok, ids, outputs, gates, alpha)
        again = [i for i, r in enumerate(redo) if r]
        if again:
            reruns = _submit(llm, [ids[i] for i in again], [sorted(redo[i]) for i in again], True, angle, max_tokens)
            take_reruns(tok, again, *reruns, token_ids, outputs, gates)
    return [result_row(*x) for x in zip(records, outputs, token_ids, gates)]


def _submit(
    llm,
    ids: list[list[int]],
    packs: list[list[str]],
    force: bool,
    angle: float | None,
    max_tokens: int,
    alpha: float | None = None,
) -> tuple[list[list[int]], list[dict]]:
    """One ``llm.generate`` call: per prompt its packs; returns the new token ids (without
    end-of-sequence) and the gate readings that the engine logged for each prompt."""
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    tag = os.urandom(4).hex()
    params = []
    for i, row_packs in enumerate(packs):
        extra = {}
        if row_packs:
            extra = {KEY_PACKS: ",".join(row_packs), KEY_RID: f"{tag}-{i}"}
            if force:
                extra[KEY_FORCE] = True
            if angle is not None:
                extra[KEY_ANGLE] = angle
            if alpha is not None:
                extra[KEY_ALPHA] = alpha
        params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra or None))
    path = vcfg.events_path()
    offset = path.stat().st_size if path is not None and path.is_file() else 0
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
    events, _ = vcfg.read_events(path, offset) if path is not None else ([], 0)
    logged: dict[str, dict] = {}
    for e in events:
        if e.get("rid"):
            text = e.get("text_scores", {})
            logged[e["rid"]] = {
                p: {
                    "score": e["scores"].get(p),
                    "fired": p in e["fired"],
                    **({"text_score": text[p]} if p in text else {}),
                }
                for p in e["evaluated"]
            }
    token_ids = [[t for t in out.outputs[0].token_ids if t != tok.eos_token_id] for out in outs]
    return token_ids, [logged.get(f"{tag}-{i}", {}) if packs[i] else {} for i in range(len(ids))]


def vllm_generate(
    model_dir,
    records,
    pack_dirs=(),
    max_tokens: int = 48,
    force: bool = False,
    alpha: float | None = None,
    precision: str = "float32",
    allow_precision_change: bool = False,
    tensor_parallel_size: int = 1,
) -> list[dict]:
    """One-shot: start an engine with ``pack_dirs`` and generate (all packs apply to every prompt).
    ``precision``: the engine's dtype, ``float32`` or ``bfloat16`` (int8 copies are HF's here).
    ``tensor_parallel_size`` > 1 splits the model over that many workers (:func:`make_llm`)."""
    if precision not in VLLM_PRECISIONS:
        raise GuarditError(f"precision: {precision!r} is not one of {', '.join(VLLM_PRECISIONS)} on the vLLM engine")
    packs = load_packs(list(pack_dirs))
    for p in packs:  # before the engine starts: the engine's precision rule, and a level a pack cannot serve
        p.check_model(p.meta.model.model_copy(update={"precision": precision}), allow_precision_change)
        if alpha is not None:
            p.at_alpha(alpha)
    llm = make_llm(
        model_dir,
        pack_dirs,
        allow_precision_change=allow_precision_change,
        dtype=precision,
        tensor_parallel_size=tensor_parallel_size,
    )
    try:
        return engine_generate(llm, records, [p.id for p in packs], max_tokens=max_tokens, force=force, alpha=alpha)
    finally:
        shutdown(llm)


def vllm_generate_pair(model_dir, records, pack_dirs, max_tokens: int = 48) -> tuple[list[dict], list[dict]]:
    """Vanilla and steered outputs from one engine (requests without packs are untouched)."""
    packs = load_packs(list(pack_dirs))
    llm = make_llm(model_dir, pack_dirs)
    try:
        before = engine_generate(llm, records, (), max_tokens)
        after = engine_generate(llm, records, [p.id for p in packs], max_tokens)
    finally:
        shutdown(llm)
    return before, after
