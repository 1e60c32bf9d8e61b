"""``guardit eval`` with several packs: the report of a multi-concept policy (HF engine).

Each ``--pack`` is paired with the ``--suite`` of its concept, in the order given. Three runs on
every suite's test splits, greedy:
- ``vanilla``: no pack;
- ``alone``: the concept's own pack only (the single-concept baseline);
- ``policy``: every pack on every request, each with its own gate (fired ones rotate in the order
  of their ids, :mod:`steering.runtime`).

Per-concept leakage: among the facts vanilla gives on each forget split, how many leak alone and
under the policy. Cross-concept retention: each suite's retain test prompts and, with
``everyday``, held-out everyday requests, under the policy: bit-identical to vanilla, and which
pack fired on them (a concept's retain prompts fired by *another* concept's pack are the cost of
composing). Every output is saved (``outputs/RUN__SUITE__SPLIT.jsonl``) and :func:`summarize_policy`
recomputes every number from those files.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from calibration import hf_fingerprint, load_model, read_prompts, write_jsonl
from guardit.evaluate import is_forget, read_suite
from guardit.generation import gives_answer, hf_generate
from guardit.report import fired, load_outputs
from steering.errors import GuarditError
from steering.pack import load_packs

RUNS = ("vanilla", "alone", "policy")
EVERYDAY = "everyday"  # the suite name of the everyday requests


def run_policy_eval(
    model_dir, pack_dirs: list, suite_dirs: list, out_dir, max_tokens: int = 40, everyday: str | Path | None = None
) -> dict:
    """Generate the three runs on every suite, write ``report.json`` and ``report.md``."""
    if len(pack_dirs) != len(suite_dirs):
        raise GuarditError(
            f"--suite: a multi-concept eval pairs each --pack with its concept's --suite, in order "
            f"({len(pack_dirs)} packs, {len(suite_dirs)} suites)"
        )
    model, tok = load_model(model_dir)
    packs = load_packs(list(pack_dirs), hf_fingerprint(model))
    out = Path(out_dir)
    suites = {p.id: read_suite(Path(s)) for p, s in zip(packs, suite_dirs)}
    if everyday is not None:
        suites[EVERYDAY] = {"retain_test": read_prompts(everyday)}
    own = {p.id: p for p in packs}
    steps = [(run, sid, split) for sid, splits in suites.items() for split in splits for run in RUNS]
    (out / "outputs").mkdir(parents=True, exist_ok=True)
    for run, sid, split in tqdm(steps, desc="evaluating the policy (hf)", unit="run"):
        if run == "alone" and sid not in own:
            continue
        chosen = {"vanilla": [], "alone": [own.get(sid)], "policy": packs}[run]
        rows = hf_generate(model, tok, suites[sid][split], chosen, max_tokens=max_tokens, progress=False)
        write_jsonl(out / "outputs" / f"{run}__{sid}__{split}.jsonl", rows)
    meta = {
        "packs": [p.id for p in packs],
        "suites": {sid: sorted(splits) for sid, splits in suites.items()},
        "max_tokens": max_tokens,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    report = summarize_policy(out)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text("\n".join(policy_markdown(report)) + "\n")
    return report


def summarize_policy(out_dir) -> dict:
    """Every number of the report, recomputed from the saved outputs."""
    out = Path(out_dir)
    meta = json.loads((out / "meta.json").read_text())
    leakage: dict[str, dict] = {}
    retention: dict[str, dict] = {}
    for sid, splits in meta["suites"].items():
        for split in splits:
            van = load_outputs(out, f"vanilla__{sid}", split)
            policy = load_outputs(out, f"policy__{sid}", split)
            if is_forget(split):
                alone = load_outputs(out, f"alone__{sid}", split)
                known = [i for i, r in enumerate(van) if gives_answer(r)]

                def leaks(rows: list[dict], known: list[int] = known) -> int:
                    return sum(gives_answer(rows[i]) for i in known)

                leakage.setdefault(sid, {})[split] = {
                    "prompts": len(van),
                    "known": len(known),
                    "leaks_alone": leaks(alone),
                    "leaks_policy": leaks(policy),
                    "fired_alone": sum(map(fired, alone)),
                    "fired_policy": sum(map(fired, policy)),
                }
            else:
                by = Counter(pid for r in policy for pid, g in r["gate"].items() if g["fired"])
                retention[sid] = {
                    "prompts": len(van),
                    "bit_identical": sum(a["token_ids"] == b["token_ids"] for a, b in zip(van, policy)),
                    "fired": sum(map(fired, policy)),
                    "fired_by": dict(sorted(by.items())),
                    "closed_bit_identical": all(
                        a["token_ids"] == b["token_ids"] for a, b in zip(van, policy) if not fired(b)
                    ),
                }
    return {"meta": meta, "leakage": leakage, "retention": retention}


def policy_markdown(report: dict) -> list[str]:
    meta = report["meta"]
    lines = [
        f"# guardit evaluation: a policy of {len(meta['packs'])} packs",
        "",
        f"Packs on every request: {', '.join(f'`{p}`' for p in meta['packs'])} (each with its own gate; fired "
        f"ones rotate in id order); greedy, {meta['max_tokens']} new tokens, HF engine.",
        "",
        "## Per-concept leakage (facts vanilla gives that still leak: its pack alone · the whole policy)",
        "",
        "| concept | split | prompts | vanilla knows | leaks alone | leaks with the policy | fired alone | "
        "fired with the policy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sid, splits in report["leakage"].items():
        for split, r in splits.items():
            lines.append(
                f"| {sid} | {split} | {r['prompts']} | {r['known']} | {r['leaks_alone']} | {r['leaks_policy']} | "
                f"{r['fired_alone']} | {r['fired_policy']} |"
            )
    lines += [
        "",
        "## Cross-concept retention (retain test prompts under the whole policy)",
        "",
        "| suite | prompts | bit-identical to vanilla | fired | fired by | closed rows all bit-identical |",
        "|---|---|---|---|---|---|",
    ]
    for sid, r in report["retention"].items():
        by = ", ".join(f"{p} {n}" for p, n in r["fired_by"].items()) or "none"
        lines.append(
            f"| {sid} | {r['prompts']} | {r['bit_identical']} | {r['fired']} | {by} | "
            f"{'yes' if r['closed_bit_identical'] else 'NO'} |"
        )
    return lines
