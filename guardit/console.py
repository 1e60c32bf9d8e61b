"""Printing calibration reports for people."""

from __future__ import annotations


def print_report(r: dict) -> None:
    g = r["gate"]
    print(f"concept '{r['concept_id']}': {r['n_forget']} forget / {r['n_retain']} retain prompts "
          f"(+{r['n_neutral']} built-in neutral), {r['seconds']} s")
    print(f"gate: layer {g['layer']} ({g['pooling']}-pooled), threshold {g['threshold']:.4f} at alpha={r['alpha']}")
    print(f"      out-of-fold TPR on forget {g['oof_tpr_forget']:.1%}, FPR on retain {g['oof_fpr_retain']:.1%}, "
          f"FPR on neutral {g['oof_fpr_neutral']:.1%}, AUROC {g['oof_auroc']:.3f}")
    print(f"steered layers: {r['steer_layers']} (target: {r['target']})")
    if r.get("steer_topped_up"):
        print(f"      {r['steer_topped_up']} added to reach {r['min_steer_layers']}: too few layers after the gate "
              "had opposite signs; these are the nearest to opposite signs")
    print("layer  forget_proj  retain_proj  auroc  selected")
    for s in r["layers"]:
        mark = "*" if s["layer"] in r["steer_layers"] else ("." if s["selected"] else "")
        print(f"{s['layer']:>5}  {s['forget_proj']:>11.4f}  {s['retain_proj']:>11.4f}  {s['auroc']:>5.3f}  {mark}")
