"""The evaluation report's plots and markdown, written from ``guardit.evaluate.summarize``'s numbers
and the saved outputs (``outputs/METHOD__SPLIT.jsonl``). What it needs to know of the methods (which
are gated, what each is) comes in the report's ``meta``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from guardit.generation import gives_answer

COLUMNS = (
    "forget_test.leak_among_known",
    "retain.bit_identical",
    "retain.answer_accuracy",
    "retain.gate_false_fire_rate",
    "neutral.gate_fire_rate",
    "answer_perplexity_under_vanilla",
    "neutral_perplexity",
)
COLUMN_NOTE = (
    "Columns: `*.leak_rate` share of outputs containing an answer string; `leak_among_known` the same "
    "among prompts vanilla answered; `retain.bit_identical` retain outputs token-identical to vanilla; "
    "`*.gate_fire_rate` share of requests the method edits (1.00 for ungated edits); "
    "`answer_perplexity_under_vanilla` fluency of the forget answers; `neutral_perplexity` perplexity "
    "of vanilla answers to everyday prompts with the method in place (gated methods edit only where "
    "their gate fired on the prompt)."
)


def write_report(out: Path, report: dict) -> None:
    """report.json, leakage.png, gate.png and report.md in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_leakage(out, report)
    plot_gates(out, report)
    (out / "report.md").write_text("\n".join(markdown(out, report)) + "\n")


def load_outputs(out: Path, method: str, split: str) -> list[dict]:
    return [json.loads(l) for l in (out / "outputs" / f"{method}__{split}.jsonl").read_text().splitlines()]


def fired(row: dict) -> bool:
    return any(g["fired"] for g in row.get("gate", {}).values())


def plot_leakage(out: Path, report: dict) -> None:
    """Leak rate per method and forget split."""
    import matplotlib.pyplot as plt

    meta, table = report["meta"], report["methods"]
    splits = meta["forget_splits"]
    methods = meta["methods"]
    fig, ax = plt.subplots(figsize=(max(9, 1.1 * len(methods)), 3.5))
    width = 0.8 / max(1, len(splits))
    for k, split in enumerate(splits):
        vals = [table[m].get(f"{split}.leak_rate") or 0 for m in methods]
        ax.bar(np.arange(len(methods)) + k * width, vals, width, label=split)
    ax.set_xticks(np.arange(len(methods)) + width * (len(splits) - 1) / 2, methods, rotation=15)
    ax.set_ylabel("leak rate")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"Forgetting: {meta['pack']}")
    fig.tight_layout()
    fig.savefig(out / "leakage.png", dpi=110)
    plt.close(fig)


def _scores(rows: list[dict], key: str) -> list[float]:
    return [list(r["gate"].values())[0].get(key, float("nan")) for r in rows]


def plot_gates(out: Path, report: dict) -> None:
    """The pack's score histograms on the test splits, and the ROC of each score it has (probe,
    text) with each gated method's operating point (its fire rates on retain and forget tests)."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    meta = report["meta"]
    f_rows, r_rows = load_outputs(out, "guardit", "forget_test"), load_outputs(out, "guardit", "retain_test")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.hist(_scores(f_rows, "score"), bins=15, alpha=0.6, label="forget")
    a1.hist(_scores(r_rows, "score"), bins=15, alpha=0.6, label="retain")
    a1.axvline(meta["threshold"], color="k", ls="--", label=f"τ (α={meta['alpha']})")
    a1.legend()
    a1.set_title("probe scores")
    y = np.r_[np.ones(len(f_rows)), np.zeros(len(r_rows))]
    for key, label in (("score", "probe score"), ("text_score", "text score")):
        s = np.r_[_scores(f_rows, key), _scores(r_rows, key)]
        if np.isfinite(s).all():
            fpr, tpr, _ = roc_curve(y, s)
            a2.plot(fpr, tpr, label=label)
    for method in meta["gated"]:
        fired_f = [fired(r) for r in load_outputs(out, method, "forget_test")]
        fired_r = [fired(r) for r in load_outputs(out, method, "retain_test")]
        a2.scatter([np.mean(fired_r)], [np.mean(fired_f)], zorder=3, label=method)
    a2.plot([0, 1], [0, 1], ":", color="grey")
    a2.set_xlabel("FPR")
    a2.set_ylabel("TPR")
    a2.legend(fontsize=7)
    a2.set_title("gate ROC (test splits; dots: each gate as served)")
    fig.tight_layout()
    fig.savefig(out / "gate.png", dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def _clean(s: str) -> str:
    return s.replace("|", "/").replace("\n", " ")[:160]


def gate_table(out: Path, meta: dict) -> list[str]:
    """The gated methods side by side, per split: how many prompts fired, and how many of the facts
    vanilla knows still leak."""
    forget = meta["forget_splits"]
    splits = [*forget, "retain_test"]
    lines = ["| gate | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for method in meta["gated"]:
        cells = []
        for split in splits:
            van, got = load_outputs(out, meta["reference"][method], split), load_outputs(out, method, split)
            cell = f"fired {sum(map(fired, got))}/{len(got)}"
            if split in forget:
                knew = [i for i, r in enumerate(van) if gives_answer(r)]
                cell += f", leaks {sum(gives_answer(got[i]) for i in knew)}/{len(knew)}"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def markdown(out: Path, report: dict) -> list[str]:
    meta, table = report["meta"], report["methods"]
    cols = [f"{s}.leak_rate" for s in meta["forget_splits"]] + list(COLUMNS)
    engines = meta.get("engines", {})
    text = "" if meta.get("text_threshold") is None else f", text gate threshold {meta['text_threshold']:.3f}"
    lines = [
        f"# guardit evaluation: `{meta['pack']}`",
        "",
        (f"Model `{meta['model']}`. " if meta.get("model") else "")
        + f"Gate kind: {meta.get('gate_kind', 'probe')}; probe at layer {meta['gate_layer']}, threshold "
        f"{meta['threshold']:.3f}{text} at α = {meta['alpha']}; steered layers {meta['layers']}; greedy, "
        f"{meta['max_tokens']} new tokens.",
        "",
        COLUMN_NOTE,
        "",
        "| method | engine | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for m in meta["methods"]:
        lines.append(f"| {m} | {engines.get(m, 'hf')} | " + " | ".join(_fmt(table[m].get(c)) for c in cols) + " |")
    lines.append("")
    for m in meta["methods"]:
        about = meta["about"][m]
        if m in meta.get("paper_baseline", {}):
            cfg = meta["paper_baseline"][m]
            about += (f" ({cfg['clusters']} clusters, T = {cfg['threshold']}; edit at layer {cfg['layer']}, "
                      f"strength {cfg['strength']})")  # fmt: skip
        lines.append(f"- `{m}`: {about}.")
    for m, why in meta.get("skipped", {}).items():
        lines.append(f"- `{m}` not run: {why}.")
    if meta.get("engine") == "vllm":
        lines.append(
            "- `vllm` rows ran on the vLLM engine with the plugin; HF-only rows are compared with `vanilla_hf`."
        )
    lines += ["", "## Gates side by side", "", *gate_table(out, meta), ""]
    lines += ["![leakage](leakage.png)", "", "![gate](gate.png)", "", "## Examples (vanilla | guardit)", ""]
    for split in meta["splits"]:
        van, got = load_outputs(out, "vanilla", split), load_outputs(out, "guardit", split)
        lines += [f"### {split}", "| prompt | vanilla | guardit |", "|---|---|---|"]
        for a, b in list(zip(van, got))[:4]:
            lines.append(f"| {_clean(a['prompt'])} | {_clean(a['output'])} | {_clean(b['output'])} |")
        lines.append("")
    return lines
