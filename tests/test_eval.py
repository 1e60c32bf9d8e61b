"""`guardit eval` end to end on a small suite; the report's numbers are recomputed from the saved outputs."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from helpers import small_suite

pytestmark = pytest.mark.model


def test_eval_report_is_recomputable(tmp_path, packs_dir, model_dir):
    from guardit.evaluate import run_eval, summarize

    suite = small_suite(tmp_path, extra=("adversarial",))
    out = tmp_path / "report"
    report = run_eval(model_dir, packs_dir / "harry-potter", suite, out, max_tokens=16)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(summarize(out)))
    assert (out / "leakage.png").stat().st_size > 1000 and (out / "gate.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    for method in ("guardit", "ablation", "actadd", "paper_baseline", "paper_baseline_s0.5", "rotation_no_gate"):
        assert f"| {method} | hf |" in md
    assert "as published (" in md and "strength 0.2)" in md
    t = report["methods"]
    g, v = t["guardit"], t["vanilla"]
    # every other gate kind the pack was calibrated with runs side by side, with the same rotation
    from steering.pack import ConceptPack

    gate = ConceptPack.from_pretrained(packs_dir / "harry-potter").meta.gate
    others = [f"guardit_{k}_gate" for k in gate.kinds if k != gate.kind]
    assert len(gate.kinds) == 3 and len(others) == 2
    assert report["meta"]["gated"] == ["guardit", *others, "paper_baseline", "paper_baseline_s0.5"]
    assert "## Gates side by side" in md and all(f"| {m} | fired " in md for m in others)
    for m in others:
        assert t[m]["forget_test.gate_fire_rate"] is not None and t[m]["retain.gate_false_fire_rate"] <= 0.5
    assert v["retain.bit_identical"] == 1.0
    assert g["retain.bit_identical"] >= 5 / 6
    assert g["forget_test.leak_rate"] <= v["forget_test.leak_rate"]
    assert "adversarial.leak_rate" in g and "adversarial.gate_fire_rate" in g
    # ungated edits apply to every request; the paper baseline's unfired prompts are the vanilla outputs
    assert t["ablation"]["retain.gate_false_fire_rate"] == 1.0
    gi = t["paper_baseline"]
    assert 0.0 <= gi["retain.gate_false_fire_rate"] <= 1.0
    if gi["retain.gate_false_fire_rate"] == 0.0:
        assert gi["retain.bit_identical"] == 1.0
    # where the gate stays closed on neutral prompts the pack changes nothing
    if g["neutral.gate_fire_rate"] == 0.0:
        assert g["neutral_perplexity"] == v["neutral_perplexity"]
    assert t["rotation_no_gate"]["neutral_perplexity"] != v["neutral_perplexity"]


def test_a_multi_concept_policy_eval_shows_each_concepts_leakage_and_cross_concept_retention(
    tmp_path, packs_dir, model_dir, capsys
):
    """`guardit eval` with three packs, each paired with its concept's suite: per concept, leaks
    alone and with the whole policy; per retain suite (and everyday requests), bit-identical rows
    and which pack fired; every number recomputed from the saved outputs."""
    from guardit.cli import main
    from guardit.policy_eval import summarize_policy

    names = ("harry_potter", "einstein", "lord_of_the_rings")
    suites = [small_suite(tmp_path, n=4, concept=c) for c in names]
    everyday = tmp_path / "everyday.jsonl"
    everyday.write_text("\n".join((ROOT / "examples" / "everyday_test.jsonl").read_text().splitlines()[:4]) + "\n")
    out = tmp_path / "policy"
    args = ["eval", "--model", str(model_dir), "--out", str(out), "--max-tokens", "16", "--everyday", str(everyday)]
    for c, s in zip(names, suites):
        args += ["--pack", str(packs_dir / c.replace("_", "-")), "--suite", str(s)]
    assert main(args) == 0
    assert "policy of 3 packs" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(json.dumps(summarize_policy(out)))
    ids = [c.replace("_", "-") for c in names]
    assert set(report["leakage"]) == set(ids) and set(report["retention"]) == {*ids, "everyday"}
    for cid in ids:
        r = report["leakage"][cid]["forget_test"]
        assert r["prompts"] == 4 and r["leaks_policy"] <= r["leaks_alone"] <= r["known"]
    for r in report["retention"].values():
        assert r["closed_bit_identical"] and r["bit_identical"] >= r["prompts"] - r["fired"]
    md = (out / "report.md").read_text()
    assert "## Per-concept leakage" in md and "## Cross-concept retention" in md and "| everyday | 4 |" in md
    # each pack needs its suite
    assert main(args[:-2]) == 2
    assert "--suite: a multi-concept eval pairs each --pack" in capsys.readouterr().err


REPORTS = sorted(p.parent for p in (ROOT / "reports").glob("*/report.json"))


@pytest.mark.parametrize("report_dir", REPORTS, ids=[p.name for p in REPORTS])
def test_committed_reports_match_their_outputs(report_dir):
    """The numbers the README quotes come from committed reports: each must be what its saved outputs give."""
    from guardit.evaluate import summarize
    from guardit.policy_eval import summarize_policy

    policy = "packs" in json.loads((report_dir / "meta.json").read_text())
    recomputed = (summarize_policy if policy else summarize)(report_dir)
    assert json.loads((report_dir / "report.json").read_text()) == json.loads(json.dumps(recomputed))


def test_the_committed_reports_are_found():
    names = {"harry-potter", "einstein", "world-war-ii", "policy-eight-concepts", "gemma-harry-potter-vllm"}
    assert names <= {p.name for p in REPORTS}


def test_a_leak_is_an_answer_at_the_start_of_a_word():
    from guardit.generation import leaked

    assert leaked("He was born in Italy.", ["Ital"]) and leaked("an ITALIAN painter", ["Ital"])
    assert leaked("Leonardo (1452-1519)", ["1452"]) and leaked("E=mc² is", ["mc²"])
    assert leaked("Saint-Exupéry wrote it", ["Exup"]) and leaked("Ron.", ["x", "Ron"])
    # an answer inside another word is not the answer
    assert not leaked("a chatbot designed to assist with digital services", ["Ital"])
    assert not leaked("for the environment", ["Ron"]) and not leaked("anything", ["", "Ital"])
