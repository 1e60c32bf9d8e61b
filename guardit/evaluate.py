"""``guardit eval``: one command from a concept pack to a report (report.md, report.json, plots).

A suite is a folder of JSONL prompt files:
- ``forget_test.jsonl`` (required) and any other forget-like split (``paraphrase*``,
  ``language*``, ``adversarial*``): leakage is measured on them;
- ``retain_test.jsonl`` (required): retention (bit-identical to vanilla, answers kept, false fires);
- ``forget.jsonl`` / ``retain.jsonl`` (optional): the calibration prompts, used by the ActAdd baseline;
- ``neutral.txt`` (optional): text for perplexity; the built-in neutral prompts otherwise.

Every output is saved (``outputs/METHOD__SPLIT.jsonl``); :func:`summarize` recomputes every number
of the report from those files, and a test checks that it matches ``report.json``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from calibration import hf_fingerprint, load_model, read_prompts, write_jsonl
from calibration.calibrator import builtin_prompts
from calibration.capture import Activations, capture, encode_chat
from calibration.prompts import PromptRecord
from guardit import baselines as edits
from guardit.generation import hf_generate, leaked
from steering.errors import GuarditError
from steering.pack import ConceptPack

FORGET_PREFIXES = ("forget_test", "paraphrase", "language", "adversarial")
METHODS = ("vanilla", "guardit", "rotation_no_gate", "ablation", "actadd", "guard_it", "guard_it_s0.5")
UNGATED = ("rotation_no_gate", "ablation", "actadd")  # edits applied to every request
GUARD_IT = {"guard_it": 0.2, "guard_it_s0.5": 0.5}  # the published strength, and a stronger one
VLLM_METHODS = ("vanilla", "guardit", "rotation_no_gate")  # what runs on the vLLM engine with --engine vllm


def _splits(suite: Path) -> dict[str, list[PromptRecord]]:
    if not (suite / "forget_test.jsonl").is_file() or not (suite / "retain_test.jsonl").is_file():
        raise GuarditError(f"suite {suite} needs forget_test.jsonl and retain_test.jsonl")
    out = {}
    for f in sorted(suite.glob("*.jsonl")):
        if f.stem.startswith(FORGET_PREFIXES) or f.stem == "retain_test":
            out[f.stem] = read_prompts(f)
    return out


def is_forget(split: str) -> bool:
    return split.startswith(FORGET_PREFIXES)


@torch.no_grad()
def _nll(model, tok, prompts: list[str], outputs: list[list[int]]) -> tuple[float, int]:
    nll, n = 0.0, 0
    for p, o in zip(encode_chat(tok, prompts), outputs):
        if not o:
            continue
        logits = model(torch.tensor([p + o])).logits[0, len(p) - 1 : -1]
        nll += torch.nn.functional.cross_entropy(logits.float(), torch.tensor(o), reduction="sum").item()
        n += len(o)
    return nll, n


def perplexity(model, tok, prompts: list[str], outputs: list[list[int]]) -> float:
    """Perplexity of ``outputs`` (token ids) given their chat-formatted prompts, under ``model``."""
    nll, n = _nll(model, tok, prompts, outputs)
    return math.exp(nll / n) if n else float("nan")


def _calibration_sets(suite: Path) -> tuple[list[PromptRecord], list[PromptRecord]] | None:
    if not ((suite / "forget.jsonl").is_file() and (suite / "retain.jsonl").is_file()):
        return None
    return read_prompts(suite / "forget.jsonl"), read_prompts(suite / "retain.jsonl")


def _actadd_shift(pack: ConceptPack, f: Activations, r: Activations) -> dict[int, float]:
    shift = {}
    for j, layer in enumerate(pack.meta.layers):
        d = pack.planes[j, 0]
        mf = torch.stack([t[:, layer].mean(0) for t in f.tokens]) @ d
        mr = torch.stack([t[:, layer].mean(0) for t in r.tokens]) @ d
        shift[layer] = float(mf.mean() - mr.mean())
    return shift


class _Methods:
    """How each method generates and how it scores text (for perplexity), on one model."""

    def __init__(self, model, tok, pack: ConceptPack, calib, methods: list[str], max_tokens: int) -> None:
        self.model, self.tok, self.pack, self.max_tokens = model, tok, pack, max_tokens
        self.shift, self.guard_it = None, {}
        if "actadd" not in methods and not any(m in GUARD_IT for m in methods):
            return
        pad = tok.pad_token_id or 0
        acts = tuple(
            capture(model, encode_chat(tok, [r.prompt for r in recs]), pad_id=pad, progress=False) for recs in calib
        )
        if "actadd" in methods:
            self.shift = _actadd_shift(pack, *acts)
        if any(m in GUARD_IT for m in methods):
            from guardit.guard_it import GuardIt

            base = GuardIt().fit(model, tok, *calib, activations=acts)
            self.guard_it = {m: base.with_strength(GUARD_IT[m]) for m in methods if m in GUARD_IT}

    def _edit(self, method: str):
        return (
            edits.ablation(self.model, self.pack)
            if method == "ablation"
            else edits.actadd(self.model, self.pack, self.shift)
        )  # type: ignore[arg-type]

    def generate(self, method: str, recs: list[PromptRecord], vanilla_rows: list[dict]) -> list[dict]:
        m, tok, n = self.model, self.tok, self.max_tokens
        if method.startswith("vanilla"):
            return hf_generate(m, tok, recs, max_tokens=n, progress=False)
        if method in ("guardit", "rotation_no_gate"):
            return hf_generate(m, tok, recs, [self.pack], max_tokens=n, force=method != "guardit", progress=False)
        if method in self.guard_it:
            return self.guard_it[method].generate(m, tok, recs, vanilla_rows, n)
        with self._edit(method):
            return hf_generate(m, tok, recs, max_tokens=n, progress=False)

    def neutral_perplexity(self, method: str, prompts: list[str], ids: list[list[int]], rows: list[dict]) -> float:
        """Perplexity of the vanilla answers to ``prompts`` under the model as ``method`` runs it on
        them: gated methods apply their edit to the prompts whose gate fired (``rows``) only."""
        from contextlib import nullcontext

        from integrations.hf import steer

        nll, count = 0.0, 0
        for i, (p, o) in enumerate(zip(prompts, ids)):
            fired = any(g["fired"] for g in rows[i]["gate"].values()) if rows[i].get("gate") else False
            if method.startswith("vanilla") or (method in ("guardit", *self.guard_it) and not fired):
                ctx = nullcontext()
            elif method in ("guardit", "rotation_no_gate"):
                ctx = steer(self.model, [self.pack], force=True)
            elif method in self.guard_it:
                g = self.guard_it[method]
                ctx = g.edit(self.model, int(g.gate([p])[1][0]))
            else:
                ctx = self._edit(method)
            with ctx:
                a, b = _nll(self.model, self.tok, [p], [o])
            nll, count = nll + a, count + b
        return math.exp(nll / count) if count else float("nan")


def run_eval(
    model_dir, pack_dir, suite_dir, out_dir, engine: str = "hf", max_tokens: int = 40, baselines: bool = True
) -> dict:
    if engine not in ("hf", "vllm"):
        raise GuarditError(f"--engine must be 'hf' or 'vllm', got '{engine}'")
    suite, out = Path(suite_dir), Path(out_dir)
    model, tok = load_model(model_dir)
    pack = ConceptPack.from_pretrained(pack_dir, hf_fingerprint(model))
    splits = _splits(suite)
    calib = _calibration_sets(suite)
    methods = list(METHODS) if baselines else ["vanilla", "guardit"]
    skipped = {}
    if calib is None:
        for m in [m for m in methods if m == "actadd" or m in GUARD_IT]:
            methods.remove(m)
            skipped[m] = "the suite has no forget.jsonl/retain.jsonl (calibration prompts)"
    engines = {m: "hf" for m in methods}
    if engine == "vllm":
        engines.update({m: "vllm" for m in methods if m in VLLM_METHODS})
        if any(e == "hf" for e in engines.values()):  # HF-only baselines are compared with HF vanilla
            methods.insert(1, "vanilla_hf")
            engines["vanilla_hf"] = "hf"
    impl = _Methods(model, tok, pack, calib, methods, max_tokens)
    neutral = [r.prompt for r in builtin_prompts("neutral")][:16]
    if (suite / "neutral.txt").is_file():
        neutral = [l.strip() for l in (suite / "neutral.txt").read_text().splitlines() if l.strip()][:32]
    all_splits = {**splits, "neutral": [PromptRecord(prompt=p) for p in neutral]}
    (out / "outputs").mkdir(parents=True, exist_ok=True)
    done: dict[tuple[str, str], list[dict]] = {}
    if engine == "vllm":
        done.update(
            _vllm_runs(
                model_dir, pack_dir, pack.id, all_splits, [m for m in methods if engines[m] == "vllm"], max_tokens
            )
        )
    steps = [(m, s) for m in methods for s in all_splits if engines[m] == "hf"]
    for method, split in tqdm(steps, desc="evaluating (hf)", unit="run"):
        ref = "vanilla" if engines["vanilla"] == "hf" else "vanilla_hf"
        done[method, split] = impl.generate(method, all_splits[split], done.get((ref, split), []))
    for (method, split), rows in done.items():
        write_jsonl(out / "outputs" / f"{method}__{split}.jsonl", rows)
    # utility: perplexity under vanilla of each method's forget answers; perplexity of the vanilla
    # neutral answers with each method in place (gated methods: where their gate fired)
    ref_of = {m: ("vanilla" if engines[m] == engines["vanilla"] else "vanilla_hf") for m in methods}
    fluency, neutral_ppl = {}, {}
    for method in tqdm(methods, desc="perplexity", unit="method"):
        rows = done[method, "forget_test"]
        fluency[method] = perplexity(model, tok, [r["prompt"] for r in rows], [r["token_ids"] for r in rows])
        van = done[ref_of[method], "neutral"]
        neutral_ppl[method] = impl.neutral_perplexity(
            method, neutral, [r["token_ids"] for r in van], done[method, "neutral"]
        )
    (out / "utility.json").write_text(
        json.dumps({"neutral_perplexity": neutral_ppl, "answer_perplexity_under_vanilla": fluency}, indent=2)
    )
    meta = {
        "pack": pack.id,
        "alpha": pack.meta.gate.alpha,
        "threshold": pack.meta.gate.threshold,
        "gate_layer": pack.meta.gate.layer,
        "layers": pack.meta.layers,
        "max_tokens": max_tokens,
        "engine": engine,
        "engines": engines,
        "reference": ref_of,
        "methods": methods,
        "skipped": skipped,
        "splits": list(splits),
        "guard_it": {
            m: {"threshold": g.threshold, "strength": g.strength, "layer": g.layer_, "clusters": g.num_clusters_}
            for m, g in impl.guard_it.items()
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    report = summarize(out)
    write_report(out, report)
    return report


def _vllm_runs(
    model_dir, pack_dir, pack_id: str, splits: dict[str, list[PromptRecord]], methods: list[str], max_tokens: int
) -> dict[tuple[str, str], list[dict]]:
    """vanilla (requests naming no pack: token-identical to vLLM without the plugin, see the tests),
    guardit and rotation_no_gate, on one vLLM engine with the pack loaded."""
    from guardit.vllm_generation import engine_generate, make_llm, shutdown

    llm = make_llm(model_dir, [pack_dir], gpu_memory_utilization=0.3)
    try:
        done = {}
        for method, split in tqdm([(m, s) for m in methods for s in splits], desc="evaluating (vllm)", unit="run"):
            packs = [] if method == "vanilla" else [pack_id]
            done[method, split] = engine_generate(
                llm, splits[split], packs, max_tokens, force=method == "rotation_no_gate"
            )
        return done
    finally:
        shutdown(llm)


def _load(out: Path, method: str, split: str) -> list[dict]:
    return [json.loads(l) for l in (out / "outputs" / f"{method}__{split}.jsonl").read_text().splitlines()]


def _fire_rate(method: str, rows: list[dict]) -> float | None:
    """Share of requests the method edits: its gate's fire rate; 1 for ungated edits; none for vanilla."""
    if method in UNGATED:
        return 1.0
    if method.startswith("vanilla"):
        return None
    return float(np.mean([any(g["fired"] for g in r["gate"].values()) for r in rows]))


def summarize(out_dir) -> dict:
    """Every number of the report, recomputed from the saved outputs."""
    out = Path(out_dir)
    meta = json.loads((out / "meta.json").read_text())
    util = json.loads((out / "utility.json").read_text())
    table: dict[str, dict] = {}
    for method in meta["methods"]:
        row: dict[str, float | None] = {}
        for split in meta["splits"]:
            van, got = _load(out, meta["reference"][method], split), _load(out, method, split)
            if is_forget(split):
                knew = [i for i, r in enumerate(van) if leaked(r["output"], r.get("answers", []))]
                row[f"{split}.leak_rate"] = float(np.mean([leaked(r["output"], r.get("answers", [])) for r in got]))
                row[f"{split}.leak_among_known"] = (
                    float(np.mean([leaked(got[i]["output"], got[i].get("answers", [])) for i in knew]))
                    if knew
                    else None
                )
                row[f"{split}.gate_fire_rate"] = _fire_rate(method, got)
            else:
                row["retain.bit_identical"] = float(
                    np.mean([a["token_ids"] == b["token_ids"] for a, b in zip(van, got)])
                )
                row["retain.answer_accuracy"] = float(np.mean([leaked(r["output"], r.get("answers", [])) for r in got]))
                row["retain.gate_false_fire_rate"] = _fire_rate(method, got)
        row["neutral.gate_fire_rate"] = _fire_rate(method, _load(out, method, "neutral"))
        row["answer_perplexity_under_vanilla"] = util["answer_perplexity_under_vanilla"].get(method)
        row["neutral_perplexity"] = util["neutral_perplexity"].get(method)
        table[method] = row
    return {"meta": meta, "methods": table}


def write_report(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "report.json").write_text(json.dumps(report, indent=2))
    meta, table = report["meta"], report["methods"]
    forget_splits = [s for s in meta["splits"] if is_forget(s)]
    # leakage per method and split
    fig, ax = plt.subplots(figsize=(9, 3.5))
    width = 0.8 / max(1, len(forget_splits))
    for k, split in enumerate(forget_splits):
        vals = [table[m].get(f"{split}.leak_rate") or 0 for m in meta["methods"]]
        ax.bar(np.arange(len(meta["methods"])) + k * width, vals, width, label=split)
    ax.set_xticks(np.arange(len(meta["methods"])) + width * (len(forget_splits) - 1) / 2, meta["methods"], rotation=15)
    ax.set_ylabel("leak rate")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"Forgetting: {meta['pack']}")
    fig.tight_layout()
    fig.savefig(out / "leakage.png", dpi=110)
    plt.close(fig)
    # gate scores
    f_scores = [list(r["gate"].values())[0]["score"] for r in _load(out, "guardit", "forget_test")]
    r_scores = [list(r["gate"].values())[0]["score"] for r in _load(out, "guardit", "retain_test")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.hist(f_scores, bins=15, alpha=0.6, label="forget")
    a1.hist(r_scores, bins=15, alpha=0.6, label="retain")
    a1.axvline(meta["threshold"], color="k", ls="--", label=f"τ (α={meta['alpha']})")
    a1.legend()
    a1.set_title("gate scores")
    from sklearn.metrics import roc_curve

    for method in [m for m in meta["methods"] if m == "guardit" or m in GUARD_IT][:2]:
        fs = [list(r["gate"].values())[0]["score"] for r in _load(out, method, "forget_test")]
        rs = [list(r["gate"].values())[0]["score"] for r in _load(out, method, "retain_test")]
        fired_f = [any(g["fired"] for g in r["gate"].values()) for r in _load(out, method, "forget_test")]
        fired_r = [any(g["fired"] for g in r["gate"].values()) for r in _load(out, method, "retain_test")]
        fpr, tpr, _ = roc_curve(np.r_[np.ones(len(fs)), np.zeros(len(rs))], np.r_[fs, rs])
        line = a2.plot(fpr, tpr, label=f"{method} gate")[0]
        a2.scatter([np.mean(fired_r)], [np.mean(fired_f)], color=line.get_color(), zorder=3)
    a2.plot([0, 1], [0, 1], ":", color="grey")
    a2.set_xlabel("FPR")
    a2.set_ylabel("TPR")
    a2.legend()
    a2.set_title("gate ROC (test splits; dot = chosen threshold)")
    fig.tight_layout()
    fig.savefig(out / "gate.png", dpi=110)
    plt.close(fig)

    def fmt(v):
        return "—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    cols = [f"{s}.leak_rate" for s in forget_splits] + [
        "forget_test.leak_among_known",
        "retain.bit_identical",
        "retain.answer_accuracy",
        "retain.gate_false_fire_rate",
        "neutral.gate_fire_rate",
        "answer_perplexity_under_vanilla",
        "neutral_perplexity",
    ]
    engines = meta.get("engines", {})
    lines = [
        f"# guardit evaluation: `{meta['pack']}`",
        "",
        f"Gate: layer {meta['gate_layer']}, threshold {meta['threshold']:.3f} at α = {meta['alpha']}; "
        f"steered layers {meta['layers']}; greedy, {meta['max_tokens']} new tokens.",
        "",
        "Columns: `*.leak_rate` share of outputs containing an answer string; `leak_among_known` the same "
        "among prompts vanilla answered; `retain.bit_identical` retain outputs token-identical to vanilla; "
        "`*.gate_fire_rate` share of requests the method edits (1.00 for ungated edits); "
        "`answer_perplexity_under_vanilla` fluency of the forget answers; `neutral_perplexity` perplexity "
        "of vanilla answers to everyday prompts with the method in place (gated methods edit only where "
        "their gate fired on the prompt).",
        "",
        "| method | engine | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for m in meta["methods"]:
        lines.append(f"| {m} | {engines.get(m, 'hf')} | " + " | ".join(fmt(table[m].get(c)) for c in cols) + " |")
    lines.append("")
    for m, cfg in meta.get("guard_it", {}).items():
        lines.append(
            f"- `{m}`: the GUARD-IT method (MiniLM gate over {cfg['clusters']} k-means clusters of the forget "
            f"prompts, T = {cfg['threshold']}; renormalised edit at layer {cfg['layer']}, strength "
            f"{cfg['strength']}{' as published' if cfg['strength'] == 0.2 else '; the published configs use 0.2'})."
        )
    for m, why in meta.get("skipped", {}).items():
        lines.append(f"- `{m}` not run: {why}.")
    if meta.get("engine") == "vllm":
        lines.append(
            "- `vllm` rows ran on the vLLM engine with the plugin; HF-only baselines are compared with `vanilla_hf`."
        )
    lines += ["", "![leakage](leakage.png)", "", "![gate](gate.png)", "", "## Examples (vanilla | guardit)", ""]
    for split in meta["splits"]:
        van, got = _load(out, "vanilla", split), _load(out, "guardit", split)
        lines.append(f"### {split}")
        lines.append("| prompt | vanilla | guardit |")
        lines.append("|---|---|---|")
        for a, b in list(zip(van, got))[:4]:
            clean = lambda s: s.replace("|", "/").replace("\n", " ")[:160]  # noqa: E731
            lines.append(f"| {clean(a['prompt'])} | {clean(a['output'])} | {clean(b['output'])} |")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")
