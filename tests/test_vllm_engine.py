"""The real vLLM engine (offline LLM) with the plugin: vanilla parity, HF agreement, chunked prefill."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import EXAMPLES
from helpers import small_suite
from serving import core_halves, finished, launch, stop_process

from calibration import hf_fingerprint, read_prompts
from calibration.capture import encode_chat
from calibration.prompts import PromptRecord
from guardit.generation import hf_generate, leaked
from guardit.vllm_generation import ENV_CPU_KV
from steering.names import names_answered
from steering.pack import ConceptPack, load_packs

pytestmark = [pytest.mark.vllm, pytest.mark.model]
CONCEPTS = ("harry_potter", "einstein")
LATE = "lord_of_the_rings"  # untuned; its pack gates after some of its steered layers
# Small token budget per step: prompts (~35-45 tokens) are split over several prefill chunks.
ENGINE_KW = {
    "max_num_batched_tokens": 32,
    "max_num_seqs": 32,
    "enable_chunked_prefill": True,
    "gpu_memory_utilization": 0.25,
}
MAX_TOKENS = 32


def _records():
    recs = {}
    for c in (*CONCEPTS, LATE):
        for split in ("forget_test", "retain_test"):
            recs[(c, split)] = read_prompts(EXAMPLES / c / f"{split}.jsonl")
    return recs


def _every_record() -> list[PromptRecord]:
    """Every example test prompt of _records, in order: what the vanilla reference runs."""
    return [r for rs in _records().values() for r in rs]


@pytest.fixture(scope="module")
def vanilla_run(model_dir, hf_model, tmp_path_factory):
    """Vanilla vLLM (separate process, plugin off) on every example test prompt, started on the
    second half of the cores so that the plugin engine can start beside it on the first."""
    _, tok = hf_model
    recs = _every_record()
    f = tmp_path_factory.mktemp("ref") / "prompts.json"
    f.write_text(json.dumps(encode_chat(tok, [r.prompt for r in recs])))
    # An explicit KV cache: vLLM's CPU default (half the NUMA node) would leave too little for the
    # plugin engine starting beside it.
    env = {ENV_CPU_KV: "1", **core_halves()[1]}
    args = (str(model_dir), str(f), str(MAX_TOKENS), json.dumps(ENGINE_KW))
    proc, d = _start_script(f.parent, "vllm_reference.py", *args, env=env)
    yield proc, d
    stop_process(proc)  # if the module stopped before reading it


@pytest.fixture(scope="module")
def engine(packs_dir, model_dir, tmp_path_factory, vanilla_run, text_variants):
    """The plugin engine, on the first half of the cores (started while the vanilla reference runs)."""
    from guardit.vllm_generation import make_llm, shutdown

    with pytest.MonkeyPatch.context() as env:  # read by the engine's process as it starts
        for k, v in core_halves()[0].items():
            env.setenv(k, v)
        llm = make_llm(
            model_dir,
            [
                packs_dir / "harry-potter",
                packs_dir / "einstein",
                packs_dir / "lord-of-the-rings",
                text_variants / "hp-text-open",
                text_variants / "hp-text-closed",
                text_variants / "hp-named",
                text_variants / "hp-answer-open",
                text_variants / "hp-probe",
            ],
            run_dir=tmp_path_factory.mktemp("run"),
            **ENGINE_KW,
        )
    yield llm
    shutdown(llm)


def _start_script(d: Path, script: str, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """Start one of the tests' engine scripts in its own process, its output in ``d`` (read it
    with :func:`_script_result`)."""
    d.mkdir(parents=True, exist_ok=True)
    return launch(d, [str(Path(__file__).parent / script), *args], env), d


def _script_result(started: tuple[subprocess.Popen, Path]):
    """What a started script printed after RESULT (waits for it)."""
    done = finished(*started)
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(line[0][7:])


@pytest.fixture(scope="module")
def vanilla_tokens(vanilla_run, engine, hf_model):
    """Token ids from vanilla vLLM for every example test prompt (waits for the reference, once the
    plugin engine has started beside it)."""
    _, tok = hf_model
    recs = _every_record()
    out = _script_result(vanilla_run)
    eos = tok.eos_token_id
    return {r.prompt: [t for t in o if t != eos] for r, o in zip(recs, out)}


def test_no_policy_and_closed_gates_give_vanilla_tokens(engine, vanilla_tokens):
    from guardit.vllm_generation import engine_generate

    recs = _records()
    retain = recs[("harry_potter", "retain_test")] + recs[("einstein", "retain_test")]
    forget = recs[("harry_potter", "forget_test")] + recs[("einstein", "forget_test")]
    plain = engine_generate(engine, retain + forget, (), MAX_TOKENS)
    assert all(r["token_ids"] == vanilla_tokens[r["prompt"]] for r in plain)
    gated = engine_generate(engine, retain, ["einstein", "harry-potter"], MAX_TOKENS)
    closed = [r for r in gated if not any(g["fired"] for g in r["gate"].values())]
    assert len(closed) >= 0.9 * len(retain)
    assert all(r["token_ids"] == vanilla_tokens[r["prompt"]] for r in closed)


@pytest.mark.parametrize("concept", CONCEPTS)
def test_vllm_and_hf_agree_on_gates_and_vllm_forgets(engine, hf_model, packs_dir, concept):
    from guardit.vllm_generation import engine_generate

    model, tok = hf_model
    pack_id = concept.replace("_", "-")
    packs = load_packs([packs_dir / pack_id], hf_fingerprint(model))
    recs = _records()
    for split in ("forget_test", "retain_test"):
        hf_rows = hf_generate(model, tok, recs[(concept, split)], packs, max_tokens=4, progress=False)
        v_rows = engine_generate(engine, recs[(concept, split)], [pack_id], MAX_TOKENS)
        assert [r["gate"][pack_id]["fired"] for r in v_rows] == [r["gate"][pack_id]["fired"] for r in hf_rows]
        for a, b in zip(v_rows, hf_rows):
            assert a["gate"][pack_id]["score"] == pytest.approx(b["gate"][pack_id]["score"], abs=2e-2)
        if split == "forget_test":
            leaks = sum(leaked(r["output"], r["answers"]) for r in v_rows)
            assert leaks <= 0.10 * len(v_rows), [r["output"] for r in v_rows]


def test_a_request_level_on_vllm_gates_as_the_pack_placed_there_on_hf(engine, hf_model, packs_dir):
    """guardit_alpha on the engine (each request's thresholds placed from the pack's out-of-fold
    scores) gives HF's decisions with the pack at that level, on the Harry Potter retain
    test split, where the stricter level fires more; a level the pack cannot serve fails that
    request alone, naming guardit_alpha."""
    from guardit.vllm_generation import engine_generate

    model, tok = hf_model
    (pack,) = load_packs([packs_dir / "harry-potter"], hf_fingerprint(model))
    recs = _records()[("harry_potter", "retain_test")]
    hf_rows = hf_generate(model, tok, recs, [pack.at_alpha(0.5)], max_tokens=MAX_TOKENS, progress=False)
    strict = engine_generate(engine, recs, [pack.id], MAX_TOKENS, alpha=0.5)
    calibrated = engine_generate(engine, recs, [pack.id], MAX_TOKENS)

    def fired(rows):
        return [r["gate"][pack.id]["fired"] for r in rows]

    assert fired(strict) == fired(hf_rows) and sum(fired(strict)) > sum(fired(calibrated))
    # rows closed at both levels are vanilla; (rotated rows may differ from HF's in late tokens:
    # float rounding of two engines, then greedy decoding)
    same = [i for i, (a, b) in enumerate(zip(fired(strict), fired(calibrated))) if not a and not b]
    assert same and all(strict[i]["token_ids"] == calibrated[i]["token_ids"] for i in same)
    from vllm.exceptions import VLLMValidationError  # vLLM's wrapper of the validator's ValueError

    with pytest.raises(VLLMValidationError, match="guardit_alpha: 0.01 is below the least level"):
        engine_generate(engine, recs[:1], [pack.id], 4, alpha=0.01)


def test_late_gate_pack_same_decisions_and_tokens_as_hf(engine, hf_model, packs_dir, vanilla_tokens):
    """A pack whose gate decides after some of its steered layers (so those rotate only generated
    tokens), with prompts split over prefill chunks: vLLM fires where HF does, closed requests
    stay vanilla token for token, fired ones are steered as on HF."""
    from guardit.vllm_generation import engine_generate

    model, tok = hf_model
    pack_id = LATE.replace("_", "-")
    packs = load_packs([packs_dir / pack_id], hf_fingerprint(model))
    meta = packs[0].meta
    assert meta.gate.layer > meta.layers[0] and meta.steer_scope == "all"
    recs = _records()
    prompts = recs[(LATE, "forget_test")] + recs[(LATE, "retain_test")]
    hf_rows = hf_generate(model, tok, prompts, packs, max_tokens=MAX_TOKENS, progress=False)
    v_rows = engine_generate(engine, prompts, [pack_id], MAX_TOKENS)
    fired = [r["gate"][pack_id]["fired"] for r in v_rows]
    assert fired == [r["gate"][pack_id]["fired"] for r in hf_rows]
    assert sum(fired[: len(recs[(LATE, "forget_test")])]) >= 8 and not any(fired[len(recs[(LATE, "forget_test")]) :])
    for v, h, f in zip(v_rows, hf_rows, fired):
        if f:
            assert v["token_ids"] != vanilla_tokens[v["prompt"]]
            assert v["token_ids"][:8] == h["token_ids"][:8]
        else:
            assert v["token_ids"] == vanilla_tokens[v["prompt"]]


def test_eval_on_vllm_engine(tmp_path, packs_dir, model_dir, engine):
    """--engine vllm: vanilla, guardit and the ungated rotation run on the real engine with the plugin
    (the module's engine, which has the pack loaded)."""
    from guardit.evaluate import run_eval, summarize

    suite = small_suite(tmp_path, n=4)
    out = tmp_path / "report"
    pack = packs_dir / "harry-potter"
    report = run_eval(model_dir, pack, suite, out, engine="vllm", max_tokens=16, baselines=False, llm=engine)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(summarize(out)))
    assert report["meta"]["engines"] == {"vanilla": "vllm", "guardit": "vllm"}
    g, v = report["methods"]["guardit"], report["methods"]["vanilla"]
    assert g["forget_test.gate_fire_rate"] >= 0.75 and g["forget_test.leak_rate"] <= 0.25
    assert g["retain.bit_identical"] >= 3 / 4 and v["forget_test.leak_rate"] >= 0.5


def test_the_probe_leaves_earlier_turns_out_across_prefill_chunks_as_on_hf(engine, hf_model, packs_dir):
    """Conversations of about 70 tokens, prefilled in 32-token chunks: each request's probe leaves
    its earlier turns out (they end in a later chunk than the one they start in), so its pooled
    probe score and decision equal HF's, which reads the whole prompt at once; the late ask fires
    and the late benign one does not."""
    from guardit.vllm_generation import engine_generate

    model, tok = hf_model
    turns = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 is 4."},
        {"role": "user", "content": "Can you name a large river?"},
        {"role": "assistant", "content": "The Nile."},
    ]
    records = [
        PromptRecord(messages=[*turns, {"role": "user", "content": q}])
        for q in ("Who is Harry Potter's best friend?", "What is the capital of Italy?", "Who wrote Hamlet?")
    ]
    assert all(
        len(x) > 2 * ENGINE_KW["max_num_batched_tokens"] for x in encode_chat(tok, [r.conversation() for r in records])
    )
    packs = load_packs([packs_dir / "harry-potter"], hf_fingerprint(model))
    assert packs[0].meta.gate.turn_header
    hf_rows = hf_generate(model, tok, records, packs, max_tokens=8, progress=False)
    v_rows = engine_generate(engine, records, ["harry-potter"], 8)
    v_scores = [r["gate"]["harry-potter"]["score"] for r in v_rows]
    assert v_scores == pytest.approx([r["gate"]["harry-potter"]["score"] for r in hf_rows], abs=2e-3)
    assert [r["gate"]["harry-potter"]["fired"] for r in v_rows] == [r["gate"]["harry-potter"]["fired"] for r in hf_rows]
    assert v_rows[0]["gate"]["harry-potter"]["fired"] and not v_rows[1]["gate"]["harry-potter"]["fired"]


def _launch_generate_cli(model_dir: Path, d: Path, prompts: list[dict], kv_cache_gib: int, *flags: str):
    """`guardit generate --engine vllm` on prompt records written to ``d``, started in a subprocess (a
    second engine in this process would double memory use) with an explicit vLLM CPU KV cache of
    ``kv_cache_gib`` GiB, its output in ``d`` (``serving.launch``); read it with ``serving.finished``."""
    path = d / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    argv = [
        "generate",
        "--engine",
        "vllm",
        "--model",
        str(model_dir),
        "--prompts",
        str(path),
        "--out",
        str(d / "o.jsonl"),
    ]
    return launch(d, ["-m", "guardit.cli", *argv, *flags], {ENV_CPU_KV: str(kv_cache_gib)})


@pytest.fixture(scope="module")
def start_failure(model_dir, tmp_path_factory):
    """`guardit generate --engine vllm` with a KV cache larger than the machine (4096 GiB), launched
    when first asked for and not waited for: it loads the model on one core while the output-format
    test's engine runs on the other (vLLM computes on one core of 2)."""
    d = tmp_path_factory.mktemp("start-failure")
    proc = _launch_generate_cli(model_dir, d, [{"prompt": "Who is Harry Potter's best friend?"}], 4096)
    yield d, proc
    stop_process(proc)


def test_generate_cli_vllm_engine_output_format(tmp_path, packs_dir, model_dir, hf_model, start_failure):
    """`guardit generate --engine vllm` writes the same records as --engine hf, conversations
    (``messages``) and the records' own fields included, with the same gate readings and outputs."""
    turns = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 is 4."}]
    records = [
        {"prompt": "Who is Harry Potter's best friend?", "answers": ["Ron"]},
        {"messages": [*turns, {"role": "user", "content": "Who is Harry Potter's best friend?"}], "kind": "late"},
        {"messages": [*turns, {"role": "user", "content": "What is the capital of Italy?"}], "kind": "benign"},
    ]
    # The module's engine and the HF model are still alive, so the CLI's engine gets an explicit 1 GiB
    # KV cache: vLLM's CPU default (half the NUMA node, less what the worker holds) fails to start
    # when the node is that busy (seen on a fresh CI machine: "Engine core initialization failed").
    pack = packs_dir / "harry-potter"
    flags = ("--pack", str(pack), "--max-tokens", "16")
    proc = finished(_launch_generate_cli(model_dir, tmp_path, records, 1, *flags), tmp_path, timeout=600)
    # vLLM logs (an engine worker's root cause included) go to stdout.
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert set(rows[0]) >= {"prompt", "output", "gate", "answers"}
    assert rows[1]["messages"] == records[1]["messages"] and rows[2]["kind"] == "benign"
    assert isinstance(rows[0]["gate"]["harry-potter"]["score"], float)
    assert [r["gate"]["harry-potter"]["fired"] for r in rows] == [True, True, False]
    model, tok = hf_model
    hf = hf_generate(model, tok, [PromptRecord.model_validate(r) for r in records], [ConceptPack.from_pretrained(pack)],
                     max_tokens=16, progress=False)  # fmt: skip
    assert [r["output"] for r in rows] == [r["output"] for r in hf]


def test_generate_cli_engine_start_failure_is_one_error_line(start_failure):
    """An engine that cannot start (here: a KV cache larger than the machine) is one clear error line, exit 2."""
    d, launched = start_failure
    proc = finished(launched, d, timeout=600)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    # Exactly one guardit error line (Python's resource_tracker may warn after it, at interpreter exit).
    errors = [line for line in proc.stderr.splitlines() if line.startswith("guardit: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("guardit: error: the vLLM engine failed to start") and ENV_CPU_KV in errors[0]
    assert not (d / "o.jsonl").exists()


@pytest.fixture(scope="module")
def compiled(packs_dir, model_dir, hf_model, tmp_path_factory):
    """The Harry Potter test splits on guardit's engine compiled as vLLM does by default (no
    enforce_eager; chunked prefill as in ENGINE_KW), and on compiled vanilla vLLM (the plugin off),
    each in its own process. Compile warm-up is slow, so the two engines are started once."""
    _, tok = hf_model
    recs = [r for s in ("forget_test", "retain_test") for r in _records()[("harry_potter", s)]]
    f = tmp_path_factory.mktemp("compiled") / "prompts.json"
    f.write_text(json.dumps(encode_chat(tok, [r.prompt for r in recs])))
    kw = json.dumps({**ENGINE_KW, "enforce_eager": False})
    pack, run = str(packs_dir / "harry-potter"), str(f.parent / "run")
    first, second = core_halves()  # side by side, each on half the cores
    guardit_args = (str(model_dir), pack, run, json.dumps(ENGINE_KW), str(MAX_TOKENS))
    vanilla_args = (str(model_dir), str(f), str(MAX_TOKENS), kw)
    procs = {
        "guardit": _start_script(
            f.parent / "guardit", "vllm_compiled.py", *guardit_args, env={ENV_CPU_KV: "1", **first}
        ),
        "vanilla": _start_script(
            f.parent / "vanilla", "vllm_reference.py", *vanilla_args, env={ENV_CPU_KV: "1", **second}
        ),
    }
    runs = {k: _script_result(p) for k, p in procs.items()}
    eos = tok.eos_token_id
    vanilla = [[t for t in o if t != eos] for o in runs["vanilla"]]
    return recs, vanilla, runs["guardit"]


def test_compiled_engine_steers_like_eager_and_leaves_the_rest_vanilla(engine, compiled):
    """guardit in vLLM's default compiled mode: requests without packs and requests whose gates stay
    closed give compiled vanilla's tokens; the gates decide as on the eager engine and fired requests
    get the eager engine's tokens (the Harry Potter facts forgotten); a batch mixing requests with
    and without the pack gives each request's tokens when run alone; prompts split over prefill
    chunks throughout (ENGINE_KW)."""
    from guardit.vllm_generation import engine_generate

    recs, vanilla, out = compiled
    assert out["eager"] is False and out["mode"] != "NONE", out["mode"]
    assert [r["token_ids"] for r in out["plain"]] == vanilla
    eager = engine_generate(engine, recs, ["harry-potter"], MAX_TOKENS)
    fired = [r["gate"]["harry-potter"]["fired"] for r in out["gated"]]
    assert fired == [r["gate"]["harry-potter"]["fired"] for r in eager]
    n_forget = len(_records()[("harry_potter", "forget_test")])
    assert sum(fired[:n_forget]) >= 0.9 * n_forget and sum(fired[n_forget:]) <= 2
    for r, e, v, f in zip(out["gated"], eager, vanilla, fired):
        assert r["token_ids"] == (e["token_ids"] if f else v)
    assert not any(leaked(r["output"], r["answers"]) for r in out["gated"][:n_forget])
    # Mixed batch (the pack on even rows): rows without it are vanilla; rows with it are as when the
    # whole batch named it, except the answer check's reruns (engine_generate's; not done here).
    assert out["mixed"][:4] == out["solo"]
    for i, (toks, r) in enumerate(zip(out["mixed"], out["gated"])):
        if i % 2:
            assert toks == vanilla[i]
        elif r["gate"]["harry-potter"].get("by") != "answer":
            assert toks == r["token_ids"]


def test_cuda_graphs_pipeline_stages_or_an_unrun_hook_stop_the_engine():
    """The start-up check refuses CUDA graph capture and pipeline stages (torch.compile alone is
    fine); a forward in which a hooked layer's op did not run stops the engine."""
    from types import SimpleNamespace

    from helpers import toy_pack
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

    from integrations.vllm.patch import EngineState, _check_mode
    from steering.runtime import SteeringBank

    def runner(cc: CompilationConfig, stages: int = 1, tp: int = 1):
        parallel = SimpleNamespace(pipeline_parallel_size=stages, tensor_parallel_size=tp)
        return SimpleNamespace(vllm_config=SimpleNamespace(compilation_config=cc, parallel_config=parallel))

    eager = CompilationConfig(mode=CompilationMode.NONE, cudagraph_mode=CUDAGraphMode.NONE)
    for mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL_AND_PIECEWISE):
        with pytest.raises(RuntimeError, match="cudagraph_mode=NONE"):
            _check_mode(runner(CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=mode)))
    with pytest.raises(RuntimeError, match="split into 2 pipeline stages"):
        _check_mode(runner(eager, stages=2))
    _check_mode(runner(eager))
    _check_mode(runner(eager, tp=2))
    for mode in (CompilationMode.VLLM_COMPILE, CompilationMode.DYNAMO_TRACE_ONCE):
        _check_mode(runner(CompilationConfig(mode=mode, cudagraph_mode=CUDAGraphMode.NONE)))
    state = EngineState()
    state.bank = SteeringBank([toy_pack()])
    state.called = set(state.bank.layers)
    state.check_hooks_ran()
    state.called = {state.bank.layers[0]}
    with pytest.raises(RuntimeError, match=r"hooks of decoder layers \[3, 4\] did not run"):
        state.check_hooks_ran()


def test_text_gate_decides_before_prefill_on_vllm(engine, vanilla_tokens):
    """The text gate runs in the engine, once per request before its prefill (chunked here): fired,
    the request is rotated from its first chunk exactly as a forced one; closed (encoder-only), it
    is vanilla token for token. The decision is the engine's: a client field cannot set it. An
    answer check that fires generates the request again, forced (the same tokens as forcing it), and
    one fires on every answer whose first sentence names the concept."""
    from guardit.vllm_generation import engine_generate

    recs = _records()
    prompts = recs[("harry_potter", "retain_test")][:6] + recs[("harry_potter", "forget_test")][:2]
    forced = engine_generate(engine, prompts, ["harry-potter"], MAX_TOKENS, force=True)
    opened = engine_generate(engine, prompts, ["hp-text-open"], MAX_TOKENS)
    assert [r["token_ids"] for r in opened] == [r["token_ids"] for r in forced]
    assert all(r["gate"]["hp-text-open"]["fired"] and "text_score" in r["gate"]["hp-text-open"] for r in opened)
    closed = engine_generate(engine, prompts, ["hp-text-closed"], MAX_TOKENS)
    assert all(r["token_ids"] == vanilla_tokens[r["prompt"]] for r in closed)
    assert not any(r["gate"]["hp-text-closed"]["fired"] for r in closed)
    answered = engine_generate(engine, prompts, ["hp-answer-open"], MAX_TOKENS)
    assert [r["token_ids"] for r in answered] == [r["token_ids"] for r in forced]
    assert all(r["gate"]["hp-answer-open"]["by"] == "answer" for r in answered)
    assert all("answer_score" in r["gate"]["hp-text-closed"] for r in closed)
    named = engine_generate(engine, prompts, ["hp-named"], MAX_TOKENS)
    says = [names_answered(r["output"], ["harry potter"]) != [] for r in closed]
    assert any(says) and not all(says)
    for r, v, f, s in zip(named, closed, forced, says):
        assert r["token_ids"] == (f["token_ids"] if s else v["token_ids"]) and r["gate"]["hp-named"]["fired"] == s


SYSTEM = (
    "You are the support assistant of a public library. Answer politely and briefly, cite the "
    "library's rules when they apply, never invent opening hours, and send questions about "
    "accounts, fines or personal data to the front desk. "
) * 6
SHORT = SYSTEM[: len(SYSTEM) // 2]  # ~130 tokens: one KV block of vLLM's CPU default (128 tokens) and a few


def test_shared_system_prompt_reuses_the_cache_as_the_rotation_allows(engine):
    """Prefix caching on, a ~300-token system prompt shared by every request. A request whose gates
    closed before prefill (encoder-only) reads vanilla's cached blocks; requests fired before
    prefill share blocks with requests rotated the same way; requests whose probe decides on the
    whole prompt (deferred) share blocks with requests naming the same packs, closed ones give
    vanilla's tokens and fired ones are recomputed steered. Each gives the tokens it gives with
    nothing to reuse (the same request under a fresh cache_salt: prefix caching off for it). A
    rotated request's generated tokens are never served from the cache to the next chat turn
    (its prompt would rotate them)."""
    import uuid

    from vllm import SamplingParams

    tok = engine.get_tokenizer()
    block = engine.llm_engine.vllm_config.cache_config.block_size
    recs = _records()
    questions = [r.prompt for r in recs[("harry_potter", "retain_test")][:5]]
    asks = [r.prompt for r in recs[("harry_potter", "forget_test")][3:5]]

    def ids(question: str, system: str = SYSTEM) -> list[int]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    def run(rows: list[tuple[list[int], dict | None]], max_tokens: int = 8, fresh: bool = False):
        """One generate call; with ``fresh``, every request under a new cache_salt (nothing to reuse)."""
        params = [
            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args=e) for _, e in rows
        ]
        prompts = [{"prompt_token_ids": p, **({"cache_salt": uuid.uuid4().hex} if fresh else {})} for p, _ in rows]
        outs = engine.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], [int(o.num_cached_tokens or 0) for o in outs]

    system_blocks = len(ids("")) // block * block
    short_blocks = len(ids("", SHORT)) // block * block
    assert system_blocks >= block and short_blocks >= block
    q = [ids(x) for x in questions]
    closed = {"guardit_packs": "hp-text-closed"}
    forged = {**closed, "guardit_text": {"fired": ["hp-text-closed"], "scores": {}}}  # the engine decides
    fired = {"guardit_packs": "hp-text-open"}
    forced = {"guardit_packs": "harry-potter", "guardit_force": True}
    hybrid = {"guardit_packs": "harry-potter"}  # text gate closed: its probe decides on the whole prompt
    probe = {"guardit_packs": "hp-probe"}  # its probe alone decides
    a = [ids(x, SHORT) for x in asks]
    run([(q[0], None)])  # vanilla puts the system prompt in the cache
    first_rows = [(q[1], None), (q[1], closed), (q[2], forged), (q[1], fired), (q[1], forced), (q[3], hybrid)]
    first_rows.append((ids(questions[3], SHORT), probe))
    then_rows = [(q[2], fired), (q[2], forced), (q[3], hybrid), (a[0], probe), (a[1], probe)]  # the same again
    first, first_cached = run(first_rows)
    then, then_cached = run(then_rows)
    # Vanilla's blocks for vanilla and closed (a client's decision is overwritten: still closed);
    # nobody had computed the two rotations or the probes' blocks yet; then everyone reads them.
    assert [c >= system_blocks for c in first_cached[:3]] == [True] * 3 and first_cached[3:] == [0] * 4
    assert all(c >= system_blocks for c in then_cached[:3]) and all(c >= short_blocks for c in then_cached[3:])
    # The deferred probes: closed on the retain question (vanilla's tokens); fired on the asks,
    # which are then recomputed steered.
    vanilla, _ = run([(q[3], None), (a[0], None), (a[1], None)])
    assert then[2] == vanilla[0] and then[3] != vanilla[1] and then[4] != vanilla[2]

    # Next chat turn after a rotated answer that fills a block: only the first turn's prompt is reused.
    x = questions[4]
    turn = ids(x)
    while not 0 < -len(turn) % block < MAX_TOKENS:
        x += " Please."
        turn = ids(x)
    (answer,), _ = run([(turn, fired)], max_tokens=MAX_TOKENS)
    follow = tok.encode("<|im_end|>\n<|im_start|>user\nAnd why?<|im_end|>\n<|im_start|>assistant\n")
    second = turn + answer + follow
    assert (len(turn) + len(answer)) // block > len(turn) // block  # the answer completed a block
    (reply,), (cached,) = run([(second, fired)])
    assert block <= cached <= len(turn) // block * block

    # A client cannot put its vanilla KV under a rotation's salt.
    with pytest.raises(ValueError, match="cache_salt"):
        engine.generate([{"prompt_token_ids": q[1], "cache_salt": "x|guardit:key"}], use_tqdm=False)

    # Every request gives the tokens it gives with nothing to reuse.
    reference, _ = run([*first_rows, *then_rows, (second, fired)], fresh=True)
    assert [*first, *then, reply] == reference


def test_a_deferred_probe_reading_cached_blocks_decides_as_hf_on_the_whole_prompt(engine, hf_model, text_variants):
    """The probe's scores of a cached prefix are kept with its blocks: asks and retain questions
    behind a system prompt, asked twice with a pack whose probe alone decides (the
    second time every request reads the system prompt from the prefix cache, the rest prefilled
    in 32-token chunks), get HF's pooled score and decision over the whole prompt both times, and
    a fired (recomputed) request's event comes once."""
    from guardit.vllm_generation import engine_generate

    model, tok = hf_model
    recs = _records()
    asks = recs[("harry_potter", "forget_test")][2:6] + recs[("harry_potter", "retain_test")][:4]
    records = [PromptRecord(messages=[{"role": "system", "content": SHORT}, *r.conversation()]) for r in asks]
    packs = load_packs([text_variants / "hp-probe"], hf_fingerprint(model))
    hf_rows = hf_generate(model, tok, records, packs, max_tokens=4, progress=False)
    hf_fired = [r["gate"]["hp-probe"]["fired"] for r in hf_rows]
    assert any(hf_fired) and not all(hf_fired)
    from integrations.vllm import config as vcfg

    path = vcfg.events_path()
    assert path is not None
    tokens = []
    for _ in range(2):
        offset = path.stat().st_size if path.is_file() else 0
        v_rows = engine_generate(engine, records, ["hp-probe"], 4)
        tokens.append([r["token_ids"] for r in v_rows])
        rids = [e["rid"] for e in vcfg.read_events(path, offset)[0]]
        assert len(rids) == len(set(rids)) == len(records)  # one event per request, restarted or not
        assert [r["gate"]["hp-probe"]["fired"] for r in v_rows] == hf_fired
        v_scores = [r["gate"]["hp-probe"]["score"] for r in v_rows]
        assert v_scores == pytest.approx([r["gate"]["hp-probe"]["score"] for r in hf_rows], abs=2e-2)
    assert tokens[0] == tokens[1]
