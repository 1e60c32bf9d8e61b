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
from calibration.capture import capture, encode_chat
from calibration.prompts import PromptRecord
from guardit import baselines as edits
from guardit.generation import hf_generate, leaked
from steering.errors import GuarditError
from steering.pack import ConceptPack

FORGET_PREFIXES = ("forget_test", "paraphrase", "language", "adversarial")
METHODS = ("vanilla", "guardit", "rotation_no_gate", "ablation", "actadd")


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
def perplexity(model, tok, prompts: list[str], outputs: list[list[int]]) -> float:
    """Perplexity of ``outputs`` (token ids) given their chat-formatted prompts, under ``model``."""
    nll, n = 0.0, 0
    for p, o in zip(encode_chat(tok, prompts), outputs):
        if not o:
            continue
        logits = model(torch.tensor([p + o])).logits[0, len(p) - 1 : -1]
        nll += torch.nn.functional.cross_entropy(logits.float(), torch.tensor(o), reduction="sum").item()
        n += len(o)
    return math.exp(nll / n) if n else float("nan")


def _actadd_shift(model, tok, pack: ConceptPack, suite: Path) -> dict[int, float] | None:
    if not ((suite / "forget.jsonl").is_file() and (suite / "retain.jsonl").is_file()):
        return None
    f = capture(model, encode_chat(tok, [r.prompt for r in read_prompts(suite / "forget.jsonl")]), progress=False)
    r = capture(model, encode_chat(tok, [r.prompt for r in read_prompts(suite / "retain.jsonl")]), progress=False)
    shift = {}
    for j, layer in enumerate(pack.meta.layers):
        d = pack.planes[j, 0]
        mf = torch.stack([t[:, layer].mean(0) for t in f.tokens]) @ d
        mr = torch.stack([t[:, layer].mean(0) for t in r.tokens]) @ d
        shift[layer] = float(mf.mean() - mr.mean())
    return shift


def run_eval(model_dir, pack_dir, suite_dir, out_dir, engine: str = "hf", max_tokens: int = 40,
             baselines: bool = True) -> dict:
    if engine != "hf":
        raise GuarditError("guardit eval supports --engine hf for now (gates agree with vLLM; see tests)")
    suite, out = Path(suite_dir), Path(out_dir)
    model, tok = load_model(model_dir)
    pack = ConceptPack.from_pretrained(pack_dir, hf_fingerprint(model))
    splits = _splits(suite)
    methods = list(METHODS) if baselines else ["vanilla", "guardit"]
    shift = _actadd_shift(model, tok, pack, suite) if "actadd" in methods else None
    if shift is None and "actadd" in methods:
        methods.remove("actadd")
    (out / "outputs").mkdir(parents=True, exist_ok=True)
    steps = [(m, s) for m in methods for s in splits]
    for method, split in tqdm(steps, desc="evaluating", unit="run"):
        recs = splits[split]
        if method == "vanilla":
            rows = hf_generate(model, tok, recs, max_tokens=max_tokens, progress=False)
        elif method in ("guardit", "rotation_no_gate"):
            rows = hf_generate(model, tok, recs, [pack], max_tokens=max_tokens, force=method != "guardit", progress=False)
        else:
            ctx = edits.ablation(model, pack) if method == "ablation" else edits.actadd(model, pack, shift)  # type: ignore[arg-type]
            with ctx:
                rows = hf_generate(model, tok, recs, max_tokens=max_tokens, progress=False)
        write_jsonl(out / "outputs" / f"{method}__{split}.jsonl", rows)
    # utility: perplexity of neutral text with the pack loaded (gate closed) and forced open
    neutral = [r.prompt for r in builtin_prompts("neutral")][:16]
    if (suite / "neutral.txt").is_file():
        neutral = [l.strip() for l in (suite / "neutral.txt").read_text().splitlines() if l.strip()][:32]
    neutral_recs = [PromptRecord(prompt=p) for p in neutral]
    van = hf_generate(model, tok, neutral_recs, max_tokens=max_tokens, progress=False)
    write_jsonl(out / "outputs" / "vanilla__neutral.jsonl", van)
    ids = [r["token_ids"] for r in van]
    from integrations.hf import steer

    ppl = {"vanilla": perplexity(model, tok, neutral, ids)}
    for name, force in (("pack_loaded_gate_closed", False), ("rotation_forced", True)):
        with steer(model, [pack], force=force):
            ppl[name] = perplexity(model, tok, neutral, ids)
    fluency = {}
    for method in methods:
        rows = [json.loads(l) for l in (out / "outputs" / f"{method}__forget_test.jsonl").read_text().splitlines()]
        fluency[method] = perplexity(model, tok, [r["prompt"] for r in rows], [r["token_ids"] for r in rows])
    (out / "utility.json").write_text(json.dumps({"neutral_perplexity": ppl, "answer_perplexity_under_vanilla": fluency}, indent=2))
    meta = {"pack": pack.id, "alpha": pack.meta.gate.alpha, "threshold": pack.meta.gate.threshold,
            "gate_layer": pack.meta.gate.layer, "layers": pack.meta.layers, "max_tokens": max_tokens,
            "methods": methods, "splits": list(splits)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    report = summarize(out)
    write_report(out, report)
    return report


def _load(out: Path, method: str, split: str) -> list[dict]:
    return [json.loads(l) for l in (out / "outputs" / f"{method}__{split}.jsonl").read_text().splitlines()]


def summarize(out_dir) -> dict:
    """Every number of the report, recomputed from the saved outputs."""
    out = Path(out_dir)
    meta = json.loads((out / "meta.json").read_text())
    util = json.loads((out / "utility.json").read_text())
    table: dict[str, dict] = {}
    for method in meta["methods"]:
        row: dict[str, float | None] = {}
        for split in meta["splits"]:
            van, got = _load(out, "vanilla", split), _load(out, method, split)
            if is_forget(split):
                knew = [i for i, r in enumerate(van) if leaked(r["output"], r.get("answers", []))]
                row[f"{split}.leak_rate"] = float(np.mean([leaked(r["output"], r.get("answers", [])) for r in got]))
                row[f"{split}.leak_among_known"] = (
                    float(np.mean([leaked(got[i]["output"], got[i].get("answers", [])) for i in knew])) if knew else None
                )
                if method == "guardit":
                    row[f"{split}.gate_fire_rate"] = float(np.mean([any(g["fired"] for g in r["gate"].values()) for r in got]))
            else:
                row["retain.bit_identical"] = float(np.mean([a["token_ids"] == b["token_ids"] for a, b in zip(van, got)]))
                row["retain.answer_accuracy"] = float(np.mean([leaked(r["output"], r.get("answers", [])) for r in got]))
                if method == "guardit":
                    row["retain.gate_false_fire_rate"] = float(np.mean([any(g["fired"] for g in r["gate"].values()) for r in got]))
        row["answer_perplexity_under_vanilla"] = util["answer_perplexity_under_vanilla"].get(method)
        table[method] = row
    return {"meta": meta, "methods": table, "neutral_perplexity": util["neutral_perplexity"]}


def write_report(out: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "report.json").write_text(json.dumps(report, indent=2))
    meta, table = report["meta"], report["methods"]
    forget_splits = [s for s in meta["splits"] if is_forget(s)]
    # leakage per method and split
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(forget_splits))
    for k, split in enumerate(forget_splits):
        vals = [table[m].get(f"{split}.leak_rate") or 0 for m in meta["methods"]]
        ax.bar(np.arange(len(meta["methods"])) + k * width, vals, width, label=split)
    ax.set_xticks(np.arange(len(meta["methods"])) + width * (len(forget_splits) - 1) / 2, meta["methods"], rotation=15)
    ax.set_ylabel("leak rate"); ax.set_ylim(0, 1); ax.legend(); ax.set_title(f"Forgetting: {meta['pack']}")
    fig.tight_layout(); fig.savefig(out / "leakage.png", dpi=110); plt.close(fig)
    # gate scores
    f_scores = [list(r["gate"].values())[0]["score"] for r in _load(out, "guardit", "forget_test")]
    r_scores = [list(r["gate"].values())[0]["score"] for r in _load(out, "guardit", "retain_test")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.hist(f_scores, bins=15, alpha=0.6, label="forget"); a1.hist(r_scores, bins=15, alpha=0.6, label="retain")
    a1.axvline(meta["threshold"], color="k", ls="--", label=f"τ (α={meta['alpha']})"); a1.legend(); a1.set_title("gate scores")
    from sklearn.metrics import roc_curve

    y = np.r_[np.ones(len(f_scores)), np.zeros(len(r_scores))]
    fpr, tpr, _ = roc_curve(y, np.r_[f_scores, r_scores])
    a2.plot(fpr, tpr); a2.plot([0, 1], [0, 1], ":", color="grey")
    op_t = np.mean(np.array(f_scores) > meta["threshold"]); op_f = np.mean(np.array(r_scores) > meta["threshold"])
    a2.scatter([op_f], [op_t], color="red", zorder=3, label="chosen τ"); a2.set_xlabel("FPR"); a2.set_ylabel("TPR")
    a2.legend(); a2.set_title("gate ROC (test splits)")
    fig.tight_layout(); fig.savefig(out / "gate.png", dpi=110); plt.close(fig)

    def fmt(v):
        return "—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    cols = [f"{s}.leak_rate" for s in forget_splits] + ["forget_test.leak_among_known", "retain.bit_identical",
            "retain.answer_accuracy", "retain.gate_false_fire_rate", "answer_perplexity_under_vanilla"]
    lines = [f"# guardit evaluation: `{meta['pack']}`", "",
             f"Gate: layer {meta['gate_layer']}, threshold {meta['threshold']:.3f} at α = {meta['alpha']}; "
             f"steered layers {meta['layers']}; greedy, {meta['max_tokens']} new tokens.", "",
             "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in meta["methods"]:
        lines.append(f"| {m} | " + " | ".join(fmt(table[m].get(c)) for c in cols) + " |")
    npp = report["neutral_perplexity"]
    lines += ["", "Perplexity of the vanilla answers to neutral prompts: "
              + ", ".join(f"{k} {v:.3f}" for k, v in npp.items()), "",
              "![leakage](leakage.png)", "", "![gate](gate.png)", "", "## Examples (vanilla | guardit)", ""]
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
