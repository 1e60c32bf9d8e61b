"""`guardit eval` end to end on a small suite; the report's numbers are recomputed from the saved outputs."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import EXAMPLES

pytestmark = pytest.mark.model


def test_eval_report_is_recomputable(tmp_path, packs_dir, model_dir):
    from guardit.evaluate import run_eval, summarize

    suite = tmp_path / "suite"
    suite.mkdir()
    src = EXAMPLES / "harry_potter"
    for name in ("forget_test", "retain_test"):
        lines = (src / f"{name}.jsonl").read_text().splitlines()[:6]
        (suite / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(src / "forget.jsonl", suite / "forget.jsonl")
    shutil.copy(src / "retain.jsonl", suite / "retain.jsonl")
    out = tmp_path / "report"
    report = run_eval(model_dir, packs_dir / "harry-potter", suite, out, max_tokens=16)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(summarize(out)))
    assert (out / "leakage.png").stat().st_size > 1000 and (out / "gate.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "| guardit |" in md and "| ablation |" in md and "| actadd |" in md
    g, v = report["methods"]["guardit"], report["methods"]["vanilla"]
    assert v["retain.bit_identical"] == 1.0
    assert g["retain.bit_identical"] >= 5 / 6
    assert g["forget_test.leak_rate"] <= v["forget_test.leak_rate"]
    # with the gate closed, the pack changes nothing on neutral text
    npp = report["neutral_perplexity"]
    assert npp["pack_loaded_gate_closed"] == npp["vanilla"]
