"""Printing calibration reports for people."""

from __future__ import annotations

import sys

_SHOW = 6  # missed forget prompts printed; the report holds all of them
# What helped a weak gate (FINDINGS.md, "The measurements behind the README's summary").
_ADVICE = (
    "add forget prompts of the kinds it missed (e.g. who made it, who is in it), or more retain "
    "prompts of the same kinds (the threshold is one of their highest scores)"
)


def _ordinal(rank: int) -> str:
    if rank == 1:
        return "highest"
    suffix = "th" if 10 <= rank % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(rank % 10, "th")
    return f"{rank}{suffix}-highest"


def weak_gate_warning(r: dict) -> str | None:
    """One line for people when the gate is likely to miss many prompts about the concept."""
    # Imported here, not at the top: every CLI command imports this module, and calibration
    # pulls in transformers and scikit-learn (4 s).
    from calibration.gate import WEAK_RECALL

    g = r["gate"]
    tpr = g.get("kinds", {}).get(g.get("kind", "probe"), g)["oof_tpr_forget"]
    if tpr >= WEAK_RECALL:
        return None
    late = "" if r.get("late_gate") else "; or calibrate with --late-gate (higher recall, less fluent answers)"
    return (
        f"weak gate: it caught {tpr:.0%} of the forget prompts out of fold at alpha={r['alpha']} "
        f"(below {WEAK_RECALL:.0%}: in our measurements such gates stayed closed on about half of the held-out "
        f"prompts about the concept); {_ADVICE}{late}"
    )


def print_report(r: dict) -> None:
    g = r["gate"]
    print(
        f"concept '{r['concept_id']}': {r['n_forget']} forget / {r['n_retain']} retain prompts "
        f"(+{r['n_neutral']} built-in neutral), {r['seconds']} s"
    )
    diag = r.get("diagnostics") or {}
    if r.get("name"):
        shown = ", ".join(map(repr, r["name"]))
        print(f"      the concept's name: {shown} (--name to give another, --no-name for none)")
        named = diag.get("retain_answers_named", []) + diag.get("neutral_answers_named", [])
        if r.get("n_retain_answers_named") is not None:
            line = (
                f"      the answer check also fires on answers whose first sentence names it, as the answers to "
                f"{r['n_retain_answers_named']} retain and {r['n_neutral_answers_named']} built-in neutral prompts do"
            )
            print(line + (", e.g. " + ", ".join(map(repr, named[:3])) if named else ""))
    left_out = diag.get("neutral_left_out")
    if left_out:
        shown = ", ".join(map(repr, left_out[:3])) + (", ..." if len(left_out) > 3 else "")
        print(f"      {len(left_out)} built-in neutral prompt(s) name the concept, so are no negatives: {shown}")
    kinds = g.get("kinds", {})
    if len(kinds) > 1:
        enc = f"sentence encoder {r['encoder']}; " if r.get("encoder") else ""
        folds = "every kind below is fitted on the same folds"
        print(f"gate: {g['kind']} ({enc}out of fold at alpha={r['alpha']}; {folds})")
        for name, k in kinds.items():
            mark = "*" if name == g["kind"] else " "
            print(
                f"    {mark} {name:<8} TPR on forget {k['oof_tpr_forget']:.1%}, "
                f"FPR on retain {k['oof_fpr_retain']:.1%}, FPR on neutral {k['oof_fpr_neutral']:.1%}"
            )
        print(
            "      (calibration forget prompts name the concept, so these rates cannot show which kind catches "
            "indirect, other-language or wrapped asks: see README)"
        )
    print(f"probe: layer {g['layer']} ({g['pooling']}-pooled), threshold {g['threshold']:.4f} at alpha={r['alpha']}")
    print(
        f"      out-of-fold TPR on forget {g['oof_tpr_forget']:.1%}, FPR on retain {g['oof_fpr_retain']:.1%}, "
        f"FPR on neutral {g['oof_fpr_neutral']:.1%}, AUROC {g['oof_auroc']:.3f} "
        f"({r['folds']} folds, seed {r['seed']}; the layer chosen on {r.get('layer_folds', r['folds'])})"
    )
    if g.get("n_without_name"):
        words = ", ".join((r.get("diagnostics") or {}).get("name_words", []))
        print(
            f"      on {g['n_without_name']} forget prompts with the name ({words}) removed: out-of-fold TPR "
            f"{g['oof_tpr_forget_without_name']:.1%} (the layer is chosen by both recalls)"
        )
    diag = r.get("diagnostics")
    if diag:
        lv = ", ".join(f"alpha={d['alpha']:g}: {d['oof_tpr_forget']:.0%}" for d in diag["alpha_levels"])
        print(f"      out-of-fold TPR of this probe at other levels: {lv}")
        near = ", ".join(f"{d['prompt']!r} ({d['set']}, {d['score']:.2f})" for d in diag["highest_negatives"])
        print(f"      highest-scoring negatives (out of fold; they set the threshold): {near}")
        b = diag.get("threshold_from")
        if b:
            line = f"      the threshold is the {_ordinal(b['rank'])} of the {b['n']} out-of-fold {b['set']} scores"
            if b["set"] == "retain":
                line += f"; with {b['n_for_next_rank']} retain prompts it would be the {_ordinal(b['rank'] + 1)}"
            print(line)
        missed = diag["missed_forget"]
        if missed:
            shown = ", ".join(f"{d['prompt']!r} ({d['score']:.2f})" for d in missed[:_SHOW])
            more = f" and {len(missed) - _SHOW} more" if len(missed) > _SHOW else ""
            print(f"      forget prompts the gate missed out of fold: {shown}{more}")
            print(f"      (to raise recall: {_ADVICE})")
    print(f"steered layers: {r['steer_layers']} (target: {r['target']})")
    before = [l for l in r["steer_layers"] if l <= g["layer"]]
    if before:
        print(
            f"      the gate (layer {g['layer']}) decides after {before}: there they rotate only the tokens "
            "generated once it fired"
        )
    if r.get("steer_topped_up"):
        print(
            f"      {r['steer_topped_up']} added to reach {r['min_steer_layers']}: too few layers after layer "
            f"{r.get('steer_after', g['layer'])} had opposite signs; these are the nearest to opposite signs"
        )
    drops = r.get("steer_answer_drop") or []
    if drops:
        line = ", ".join(f"{d['layers']} layers {d['nats']:.2f}" for d in drops)
        print(f"      forced on the forget prompts, their answers become less likely by (nats/token): {line}")
    if r.get("steer_grown"):
        print(
            f"      {r['steer_grown']} added until the rotation makes those answers at least "
            f"{r['min_answer_drop']} nats/token less likely"
        )
    print("layer  forget_proj  retain_proj  auroc  selected")
    for s in r["layers"]:
        mark = "*" if s["layer"] in r["steer_layers"] else ("." if s["selected"] else "")
        print(f"{s['layer']:>5}  {s['forget_proj']:>11.4f}  {s['retain_proj']:>11.4f}  {s['auroc']:>5.3f}  {mark}")
    warning = weak_gate_warning(r)
    if warning:
        print(f"guardit: warning: {warning}", file=sys.stderr)
