"""``guardit eval``: one command from a concept pack to a report (report.md, report.json, plots).

A suite is a folder of JSONL prompt files:
- ``forget_test.jsonl`` (required) and any other forget-like split (``paraphrase*``,
  ``language*``, ``adversarial*``): leakage is measured on them;
- ``retain_test.jsonl`` (required): retention (bit-identical to vanilla, answers kept, false fires);
- ``forget.jsonl`` / ``retain.jsonl`` (optional): the calibration prompts, used by the ActAdd and
  paper baselines;
- ``neutral.txt`` (optional): text for perplexity; the built-in neutral prompts otherwise.

The methods compared are the registry :data:`METHODS`: references, guardit (the pack as
calibrated, and each other gate kind the pack recorded, side by side), and baselines. Every output
is saved (``outputs/METHOD__SPLIT.jsonl``); :func:`summarize` recomputes every number of the report
from those files, and a test checks that it matches ``report.json``.
"""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from calibration import hf_fingerprint, load_model, read_prompts, write_jsonl
from calibration.calibrator import builtin_prompts
from calibration.capture import Activations, answer_nll, capture, encode_chat
from calibration.prompts import PromptRecord, single_prompts
from guardit import baselines as edits
from guardit.generation import gives_answer, hf_generate
from guardit.report import fired, load_outputs, write_report
from steering.errors import GuarditError
from steering.pack import GATE_KINDS, ConceptPack

FORGET_PREFIXES = ("forget_test", "paraphrase", "language", "adversarial")
NO_CALIBRATION_SETS = "the suite has no forget.jsonl/retain.jsonl (calibration prompts)"


@dataclass(frozen=True)
class Method:
    """One row of the report: how it edits the model and where it can run."""

    name: str
    edits: Literal["none", "gated", "all"]  # which requests it changes: none (a reference), fired ones, all
    vllm: bool = False  # runs on the vLLM engine under --engine vllm (the others run on HF)
    needs_calibration_sets: bool = False  # needs the suite's forget.jsonl / retain.jsonl
    baseline: bool = False  # a comparison, left out by --no-baselines
    gate_kind: str | None = None  # guardit served with this calibrated gate kind instead of the pack's own
    strength: float | None = None  # the paper baseline's edit strength
    about: str = ""


def _kind_method(kind: str) -> Method:
    about = f"the same pack served with its {kind} gate"
    return Method(f"guardit_{kind}_gate", "gated", baseline=True, gate_kind=kind, about=about)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("vanilla", "none", vllm=True, about="the model without edits"),
        Method("vanilla_hf", "none", about="HF vanilla, the reference of HF-only rows under --engine vllm"),
        Method("guardit", "gated", vllm=True, about="the pack as calibrated"),
        *(_kind_method(k) for k in GATE_KINDS),
        Method("rotation_no_gate", "all", vllm=True, baseline=True, about="the pack's rotation on every request"),
        Method("ablation", "all", baseline=True, about="the concept direction projected out at the steered layers"),
        Method("actadd", "all", needs_calibration_sets=True, baseline=True, about="activation addition"),
        Method(
            "paper_baseline",
            "gated",
            needs_calibration_sets=True,
            baseline=True,
            strength=0.2,
            about="GUARD-IT (arXiv 2605.12765): MiniLM k-means gate, renormalised edit, as published",
        ),
        Method(
            "paper_baseline_s0.5",
            "gated",
            needs_calibration_sets=True,
            baseline=True,
            strength=0.5,
            about="the paper baseline with a stronger edit",
        ),
    )  # fmt: skip
}


def method_names(pack: ConceptPack, baselines: bool, calibration_sets: bool) -> tuple[list[str], dict[str, str]]:
    """The methods a run compares, in report order, and those left out with the reason."""
    names, skipped = [], {}
    for m in METHODS.values():
        if m.name == "vanilla_hf" or (m.baseline and not baselines):
            continue
        if m.gate_kind is not None and (m.gate_kind == pack.meta.gate.kind or m.gate_kind not in pack.meta.gate.kinds):
            continue
        if m.needs_calibration_sets and not calibration_sets:
            skipped[m.name] = NO_CALIBRATION_SETS
            continue
        names.append(m.name)
    return names, skipped


def read_suite(suite: Path) -> dict[str, list[PromptRecord]]:
    """A suite's test splits by name: its forget-like splits and ``retain_test``."""
    if not (suite / "forget_test.jsonl").is_file() or not (suite / "retain_test.jsonl").is_file():
        raise GuarditError(f"suite {suite} needs forget_test.jsonl and retain_test.jsonl")
    out = {}
    for f in sorted(suite.glob("*.jsonl")):
        if f.stem.startswith(FORGET_PREFIXES) or f.stem == "retain_test":
            out[f.stem] = read_prompts(f)
            single_prompts(out[f.stem], f.stem)  # its baselines read one prompt per request
    return out


def is_forget(split: str) -> bool:
    return split.startswith(FORGET_PREFIXES)


def _nll(model, tok, prompts: list[str], outputs: list[list[int]]) -> tuple[float, int]:
    """(total nats, tokens) of ``outputs`` after their chat-formatted prompts, each prompt run
    alone and unpadded, as one request."""
    return answer_nll(model, encode_chat(tok, prompts), outputs, tok.pad_token_id or 0, batch_size=1)


def perplexity(model, tok, prompts: list[str], outputs: list[list[int]]) -> float:
    """Perplexity of ``outputs`` (token ids) given their chat-formatted prompts, under ``model``."""
    nll, n = _nll(model, tok, prompts, outputs)
    return math.exp(nll / n) if n else float("nan")


def _calibration_sets(suite: Path) -> tuple[list[PromptRecord], list[PromptRecord]] | None:
    if not ((suite / "forget.jsonl").is_file() and (suite / "retain.jsonl").is_file()):
        return None
    forget, retain = read_prompts(suite / "forget.jsonl"), read_prompts(suite / "retain.jsonl")
    single_prompts(forget, "forget")  # the baselines read one prompt per request
    single_prompts(retain, "retain")
    return forget, retain


def _actadd_shift(pack: ConceptPack, f: Activations, r: Activations) -> dict[int, float]:
    shift = {}
    for j, layer in enumerate(pack.meta.layers):
        d = pack.planes[j, 0]
        mf = torch.stack([t[:, layer].mean(0) for t in f.tokens]) @ d
        mr = torch.stack([t[:, layer].mean(0) for t in r.tokens]) @ d
        shift[layer] = float(mf.mean() - mr.mean())
    return shift


class _Runner:
    """How each method generates and how it edits the model for one prompt (perplexity)."""

    def __init__(self, model, tok, pack: ConceptPack, calib, methods: list[str], max_tokens: int) -> None:
        self.model, self.tok, self.pack, self.max_tokens = model, tok, pack, max_tokens
        self.packs = {m: pack.with_gate_kind(METHODS[m].gate_kind or pack.meta.gate.kind) for m in methods
                      if m == "guardit" or METHODS[m].gate_kind}  # fmt: skip
        self.shift, self.paper = None, {}
        wanted = [m for m in methods if METHODS[m].needs_calibration_sets]
        if not wanted:
            return
        pad = tok.pad_token_id or 0
        acts = tuple(
            capture(model, encode_chat(tok, [r.prompt for r in recs]), pad_id=pad, progress=False) for recs in calib
        )
        if "actadd" in wanted:
            self.shift = _actadd_shift(pack, *acts)
        papers = [m for m in wanted if METHODS[m].strength is not None]
        if papers:
            from guardit.paper_baseline import PaperBaseline

            base = PaperBaseline().fit(model, tok, *calib, activations=acts)
            self.paper = {m: base.with_strength(METHODS[m].strength) for m in papers}  # type: ignore[arg-type]

    def _edit(self, method: str) -> AbstractContextManager:
        if method == "ablation":
            return edits.ablation(self.model, self.pack)
        return edits.actadd(self.model, self.pack, self.shift)  # type: ignore[arg-type]

    def generate(self, method: str, recs: list[PromptRecord], vanilla_rows: list[dict]) -> list[dict]:
        m, tok, n = self.model, self.tok, self.max_tokens
        if METHODS[method].edits == "none":
            return hf_generate(m, tok, recs, max_tokens=n, progress=False)
        if method in self.packs:
            return hf_generate(m, tok, recs, [self.packs[method]], max_tokens=n, progress=False)
        if method == "rotation_no_gate":
            return hf_generate(m, tok, recs, [self.pack], max_tokens=n, force=True, progress=False)
        if method in self.paper:
            return self.paper[method].generate(m, tok, recs, vanilla_rows, n)
        with self._edit(method):
            return hf_generate(m, tok, recs, max_tokens=n, progress=False)

    def edit_for(self, method: str, prompt: str, gate_fired: bool) -> AbstractContextManager:
        """The model as ``method`` runs it on ``prompt`` (gated methods: edited only if it fired)."""
        from integrations.hf import steer

        kind = METHODS[method].edits
        if kind == "none" or (kind == "gated" and not gate_fired):
            return nullcontext()
        if method in self.packs or method == "rotation_no_gate":
            return steer(self.model, [self.pack], force=True)
        if method in self.paper:
            g = self.paper[method]
            return g.edit(self.model, int(g.gate([prompt])[1][0]))
        return self._edit(method)

    def neutral_perplexity(self, method: str, prompts: list[str], ids: list[list[int]], rows: list[dict]) -> float:
        """Perplexity of the vanilla answers to ``prompts`` under the model as ``method`` runs it on
        them: gated methods apply their edit to the prompts whose gate fired (``rows``) only."""
        nll, count = 0.0, 0
        for i, (p, o) in enumerate(zip(prompts, ids)):
            with self.edit_for(method, p, fired(rows[i])):
                a, b = _nll(self.model, self.tok, [p], [o])
            nll, count = nll + a, count + b
        return math.exp(nll / count) if count else float("nan")


def _engines(methods: list[str], engine: str) -> dict[str, str]:
    """Which engine runs each method; under --engine vllm, HF-only rows get HF vanilla (vanilla_hf)
    as their reference, inserted after vanilla."""
    engines = {m: "vllm" if engine == "vllm" and METHODS[m].vllm else "hf" for m in methods}
    if engine == "vllm" and "hf" in engines.values():
        methods.insert(1, "vanilla_hf")
        engines["vanilla_hf"] = "hf"
    return engines


def _neutral_prompts(suite: Path) -> list[str]:
    if (suite / "neutral.txt").is_file():
        return [l.strip() for l in (suite / "neutral.txt").read_text().splitlines() if l.strip()][:32]
    return [r.prompt for r in builtin_prompts("neutral")][:16]


def run_eval(
    model_dir,
    pack_dir,
    suite_dir,
    out_dir,
    engine: str = "hf",
    max_tokens: int = 40,
    baselines: bool = True,
    llm=None,
) -> dict:
    """Generate every method's outputs on every split, measure fluency, write the report. Under
    ``engine="vllm"`` the vLLM rows run on ``llm`` when given (a running engine of the same model
    with the pack loaded, left running), otherwise on an engine started for them."""
    if engine not in ("hf", "vllm"):
        raise GuarditError(f"--engine must be 'hf' or 'vllm', got '{engine}'")
    suite, out = Path(suite_dir), Path(out_dir)
    model, tok = load_model(model_dir)
    pack = ConceptPack.from_pretrained(pack_dir, hf_fingerprint(model))
    splits = read_suite(suite)
    calib = _calibration_sets(suite)
    methods, skipped = method_names(pack, baselines, calib is not None)
    engines = _engines(methods, engine)
    runner = _Runner(model, tok, pack, calib, methods, max_tokens)
    neutral = _neutral_prompts(suite)
    all_splits = {**splits, "neutral": [PromptRecord(prompt=p) for p in neutral]}
    done: dict[tuple[str, str], list[dict]] = {}
    on_vllm = [m for m in methods if engines[m] == "vllm"]
    if on_vllm:
        done.update(_vllm_runs(model_dir, pack_dir, pack.id, all_splits, on_vllm, max_tokens, llm))
    ref_of = {m: ("vanilla" if engines[m] == engines["vanilla"] else "vanilla_hf") for m in methods}
    steps = [(m, s) for m in methods for s in all_splits if engines[m] == "hf"]
    for method, split in tqdm(steps, desc="evaluating (hf)", unit="run"):
        done[method, split] = runner.generate(method, all_splits[split], done.get((ref_of[method], split), []))
    (out / "outputs").mkdir(parents=True, exist_ok=True)
    for (method, split), rows in done.items():
        write_jsonl(out / "outputs" / f"{method}__{split}.jsonl", rows)
    _write_utility(out, model, tok, runner, methods, ref_of, neutral, done)
    meta = {
        "pack": pack.id,
        "model": pack.meta.model.name,
        "gate_kind": pack.meta.gate.kind,
        "alpha": pack.meta.gate.alpha,
        "threshold": pack.meta.gate.threshold,
        "text_threshold": None if pack.meta.gate.text is None else pack.meta.gate.text.threshold,
        "gate_layer": pack.meta.gate.layer,
        "layers": pack.meta.layers,
        "max_tokens": max_tokens,
        "engine": engine,
        "engines": engines,
        "reference": ref_of,
        "methods": methods,
        "skipped": skipped,
        "splits": list(splits),
        "forget_splits": [s for s in splits if is_forget(s)],
        "gated": [m for m in methods if METHODS[m].edits == "gated"],
        "about": {m: METHODS[m].about for m in methods},
        "paper_baseline": {
            m: {"threshold": g.threshold, "strength": g.strength, "layer": g.layer_, "clusters": g.num_clusters_}
            for m, g in runner.paper.items()
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    report = summarize(out)
    write_report(out, report)
    return report


def _write_utility(out: Path, model, tok, runner: _Runner, methods, ref_of, neutral: list[str], done) -> None:
    """Perplexity under vanilla of each method's forget answers, and perplexity of the vanilla
    neutral answers with each method in place (gated methods: where their gate fired)."""
    fluency, neutral_ppl = {}, {}
    for method in tqdm(methods, desc="perplexity", unit="method"):
        rows = done[method, "forget_test"]
        fluency[method] = perplexity(model, tok, [r["prompt"] for r in rows], [r["token_ids"] for r in rows])
        van = done[ref_of[method], "neutral"]
        ids = [r["token_ids"] for r in van]
        neutral_ppl[method] = runner.neutral_perplexity(method, neutral, ids, done[method, "neutral"])
    utility = {"neutral_perplexity": neutral_ppl, "answer_perplexity_under_vanilla": fluency}
    (out / "utility.json").write_text(json.dumps(utility, indent=2))


def _vllm_runs(
    model_dir,
    pack_dir,
    pack_id: str,
    splits: dict[str, list[PromptRecord]],
    methods: list[str],
    max_tokens: int,
    llm=None,
) -> dict[tuple[str, str], list[dict]]:
    """The vLLM rows on one engine with the pack loaded: vanilla (requests naming no pack:
    token-identical to vLLM without the plugin, see the tests), guardit and rotation_no_gate. The
    engine is ``llm`` when given (kept running), otherwise one started here (and shut down)."""
    from guardit.vllm_generation import engine_generate, make_llm, shutdown

    started = llm is None
    if started:
        llm = make_llm(model_dir, [pack_dir], gpu_memory_utilization=0.3)
    try:
        done = {}
        for method, split in tqdm([(m, s) for m in methods for s in splits], desc="evaluating (vllm)", unit="run"):
            packs = [] if METHODS[method].edits == "none" else [pack_id]
            force = METHODS[method].edits == "all"
            done[method, split] = engine_generate(llm, splits[split], packs, max_tokens, force=force)
        return done
    finally:
        if started:
            shutdown(llm)


def _fire_rate(method: str, rows: list[dict]) -> float | None:
    """Share of requests the method edits: its gate's fire rate; 1 for ungated edits; none for references."""
    edits_ = METHODS[method].edits
    if edits_ == "all":
        return 1.0
    if edits_ == "none":
        return None
    return float(np.mean([fired(r) for r in rows]))


def summarize(out_dir) -> dict:
    """Every number of the report, recomputed from the saved outputs."""
    out = Path(out_dir)
    meta = json.loads((out / "meta.json").read_text())
    util = json.loads((out / "utility.json").read_text())
    table: dict[str, dict] = {}
    for method in meta["methods"]:
        row: dict[str, float | None] = {}
        for split in meta["splits"]:
            van, got = load_outputs(out, meta["reference"][method], split), load_outputs(out, method, split)
            if is_forget(split):
                knew = [i for i, r in enumerate(van) if gives_answer(r)]
                row[f"{split}.leak_rate"] = float(np.mean([gives_answer(r) for r in got]))
                row[f"{split}.leak_among_known"] = (
                    float(np.mean([gives_answer(got[i]) for i in knew])) if knew else None
                )
                row[f"{split}.gate_fire_rate"] = _fire_rate(method, got)
            else:
                same = [a["token_ids"] == b["token_ids"] for a, b in zip(van, got)]
                row["retain.bit_identical"] = float(np.mean(same))
                row["retain.answer_accuracy"] = float(np.mean([gives_answer(r) for r in got]))
                row["retain.gate_false_fire_rate"] = _fire_rate(method, got)
        row["neutral.gate_fire_rate"] = _fire_rate(method, load_outputs(out, method, "neutral"))
        row["answer_perplexity_under_vanilla"] = util["answer_perplexity_under_vanilla"].get(method)
        row["neutral_perplexity"] = util["neutral_perplexity"].get(method)
        table[method] = row
    return {"meta": meta, "methods": table}
