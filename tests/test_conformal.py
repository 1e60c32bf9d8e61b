import math

import numpy as np
import pytest

from steering.conformal import conformal_threshold


def test_threshold_is_the_right_order_statistic():
    scores = np.arange(1, 20, dtype=float)  # n = 19
    # ceil(20 * 0.95) = 19 -> the largest
    assert conformal_threshold(scores, 0.05) == 19.0
    # ceil(20 * 0.9) = 18
    assert conformal_threshold(scores, 0.1) == 18.0


def test_rank_of_the_threshold_and_negatives_needed_for_the_next():
    from steering.conformal import conformal_rank, negatives_for_rank

    for alpha in (0.05, 0.1, 0.2):
        for n in range(1, 120):
            r = conformal_rank(n, alpha)
            tau = conformal_threshold(np.arange(n, dtype=float), alpha)
            assert (tau == math.inf) if r == 0 else tau == n - r  # the r-th highest of 0..n-1
    assert [negatives_for_rank(r, 0.05) for r in (1, 2, 3)] == [19, 39, 59]
    assert negatives_for_rank(2, 0.1) == 19


def test_order_statistics_in_words():
    from guardit.console import _ordinal

    assert [_ordinal(r) for r in (1, 2, 3, 4, 11, 12, 21, 22)] == [
        "highest",
        "2nd-highest",
        "3rd-highest",
        "4th-highest",
        "11th-highest",
        "12th-highest",
        "21st-highest",
        "22nd-highest",
    ]


def test_too_few_negatives_gives_inf():
    assert conformal_threshold(np.arange(10.0), 0.05) == math.inf


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_false_fire_rate_is_bounded(alpha):
    rng = np.random.default_rng(0)
    fires = []
    for _ in range(3000):
        cal = rng.normal(size=39)
        tau = conformal_threshold(cal, alpha)
        fires.append(rng.normal() > tau)
    rate = float(np.mean(fires))
    assert rate <= alpha + 0.015  # guarantee ≤ α, plus Monte-Carlo slack
    assert rate >= alpha - 0.05  # and not vacuously conservative


def test_gate_diagnostics_name_what_bounds_the_gate():
    import torch

    from calibration.calibrator import gate_diagnostics
    from calibration.gate import GateFit

    retain = np.array([0.1, 2.5, -1.0, 1.4] + [-2.0] * 28)  # 32 retain: at α = 0.05 τ is their max
    neutral = np.full(202, -3.0)  # the built-in everyday negatives: at α = 0.01 τ is their 2nd-highest
    forget = np.array([3.0, 2.4, 1.5, -0.5])
    tau = max(conformal_threshold(retain, 0.05), conformal_threshold(neutral, 0.01))
    gate = GateFit(0, "mean", torch.zeros(2), 0.0, tau, 0.05, forget, retain, neutral)

    def names(prefix: str, n: int) -> list[str]:
        return [f"{prefix} {i}" for i in range(n)]

    d = gate_diagnostics(gate, names("f", 4), names("r", 32), names("n", 202))
    assert [x["prompt"] for x in d["highest_negatives"]] == ["r 1", "r 3", "r 0"]
    assert d["highest_negatives"][0] == {"prompt": "r 1", "set": "retain", "score": 2.5}
    assert [x["prompt"] for x in d["missed_forget"]] == ["f 1", "f 2", "f 3"]
    assert d["threshold_from"] == {"set": "retain", "rank": 1, "n": 32, "n_for_next_rank": 39}
    by_alpha = {x["alpha"]: x for x in d["alpha_levels"]}
    assert by_alpha[0.05]["threshold"] == 2.5 and by_alpha[0.05]["oof_tpr_forget"] == 0.25
    assert by_alpha[0.1]["threshold"] == 0.1 and by_alpha[0.1]["oof_tpr_forget"] == 0.75


def test_pack_metadata_holds_no_calibration_prompt(packs_dir):
    import json

    from conftest import EXAMPLES

    from calibration.prompts import read_prompts

    examples = EXAMPLES / "harry_potter"
    meta = (packs_dir / "harry-potter" / "pack.json").read_text()
    assert "diagnostics" not in json.loads(meta)["stats"]
    for split in ("forget", "retain"):
        assert not [r.prompt for r in read_prompts(examples / f"{split}.jsonl") if json.dumps(r.prompt) in meta]


def test_calibration_warns_when_the_gate_misses_many_forget_prompts():
    from calibration.gate import WEAK_RECALL
    from guardit.console import weak_gate_warning

    weak = weak_gate_warning({"alpha": 0.05, "gate": {"oof_tpr_forget": 0.5625}})
    assert weak is not None and "56%" in weak and "alpha=0.05" in weak and "missed" in weak
    assert "--late-gate" in weak  # the lever not yet pulled
    assert "more retain prompts" in weak  # the measured levers: not retain prompts farther from the concept
    late = weak_gate_warning({"alpha": 0.05, "late_gate": True, "gate": {"oof_tpr_forget": 0.72}})
    assert late is not None and "72%" in late and "--late-gate" not in late
    assert weak_gate_warning({"alpha": 0.05, "gate": {"oof_tpr_forget": 0.8125}}) is None
    assert weak_gate_warning({"alpha": 0.1, "gate": {"oof_tpr_forget": WEAK_RECALL}}) is None


def test_late_gate_help_states_the_weak_recall_level(capsys):
    """The CLI writes the level as text (importing calibration at start-up costs 4 s): keep it true."""
    from calibration.gate import WEAK_RECALL
    from guardit.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["calibrate", "--help"])
    assert f"reaches {WEAK_RECALL:.0%} out-of-fold" in " ".join(capsys.readouterr().out.split())


def test_weak_early_gate_gives_way_to_a_later_layer(packs_dir):
    """Lord of the Rings (untuned, calibrated with --late-gate): no gate before the middle layer
    reaches the weak-gate recall, so calibration also fits the later layers and keeps the better
    one; the steered layers stay those chosen after the best early gate, and the pack rotates
    generated tokens too (steer scope all). The example concepts (defaults) keep early gates."""
    import json

    from calibration.gate import WEAK_RECALL

    def stats(name):
        return json.loads((packs_dir / name / "pack.json").read_text())

    lotr = stats("lord-of-the-rings")
    half = lotr["model"]["num_layers"] // 2  # the calibrator's early gate layers are those below it
    g = lotr["stats"]["gate"]
    early = [c for c in g["candidates"] if c["layer"] < half]
    best_early = max(early, key=lambda c: (c["tpr"], c["auroc"]))
    assert best_early["tpr"] < WEAK_RECALL
    assert lotr["gate"]["layer"] >= half and g["oof_tpr_forget"] > best_early["tpr"]
    assert lotr["gate"]["layer"] > lotr["layers"][0] and lotr["steer_scope"] == "all"
    assert all(l > best_early["layer"] for l in lotr["layers"])
    for name in ("harry-potter", "einstein"):
        m = stats(name)
        assert m["gate"]["layer"] < half and m["stats"]["gate"]["oof_tpr_forget"] >= WEAK_RECALL
        assert m["steer_scope"] == "prompt" and all(c["layer"] < half for c in m["stats"]["gate"]["candidates"])


def test_late_gate_with_fixed_gate_layers_is_refused():
    """--late-gate widens the default candidate layers; with gate_layers fixed by the caller it
    would have nothing to do, so the calibrator says so instead of ignoring it."""
    from calibration import ConceptCalibrator
    from steering.errors import GuarditError

    cal = ConceptCalibrator(concept_id="x", gate_layers=[4, 6], late_gate=True, progress=False)
    with pytest.raises(GuarditError, match=r"late_gate and gate_layers cannot be combined.*\[4, 6\]"):
        cal.fit(None, None, [f"q{i}?" for i in range(8)], [f"r{i}?" for i in range(32)])


def test_fold_seed_moves_the_cross_conformal_folds():
    """The seed picks the fold split: the same seed gives the same gate, another seed other
    out-of-fold scores (and so, for a weak gate, another threshold: see README)."""
    import torch

    from calibration.gate import fit_gate

    g = torch.Generator().manual_seed(0)

    def bags(n: int, shift: float) -> list[torch.Tensor]:
        return [torch.randn(5, 1, 8, generator=g) + shift for _ in range(n)]

    forget, retain, neutral = bags(20, 0.7), bags(20, 0.0), bags(20, -0.3)
    ids = [[1, 2, 3, 4, 5]] * 60

    def fit(seed: int):
        return fit_gate(forget, retain, neutral, ids, [0], 0.05, seed=seed)

    a, b, c = fit(0), fit(0), fit(1)
    assert np.array_equal(a.oof_retain, b.oof_retain) and a.threshold == b.threshold
    assert not np.allclose(a.oof_retain, c.oof_retain)


def test_32_folds_hold_out_one_forget_and_one_retain_prompt_each():
    """``folds=32`` with 32 + 32 prompts: each fold holds out exactly one forget and one retain
    prompt, and the everyday negatives are spread over them; fewer prompts than folds cap the
    count at the smaller labelled set, and the default is DEFAULT_FOLDS."""
    from calibration.gate import DEFAULT_FOLDS, _fold_splits, fold_count

    splits = _fold_splits(32, 32, 250, 32, 0)
    assert len(splits) == 32
    assert {(int((t < 32).sum()), int(((t >= 32) & (t < 64)).sum())) for _, t in splits} == {(1, 1)}
    assert sorted(np.concatenate([t for _, t in splits]).tolist()) == list(range(314))
    assert fold_count(12, 40, 32) == 12 and fold_count(1, 40, 32) == 2 and fold_count(32, 32) == DEFAULT_FOLDS
    assert len(_fold_splits(32, 32, 250, DEFAULT_FOLDS, 0)) == DEFAULT_FOLDS


def test_folds_is_checked_before_any_model_work_and_the_cli_default_is_the_library_one():
    from calibration import ConceptCalibrator
    from calibration.gate import DEFAULT_FOLDS
    from guardit.cli import build_parser
    from steering.errors import GuarditError

    for bad in (1, 0, 2.5, True):
        cal = ConceptCalibrator(concept_id="x", folds=bad, progress=False)
        with pytest.raises(GuarditError, match=r"folds must be an integer of at least 2, got"):
            cal.fit(None, None, [f"q{i}?" for i in range(8)], [f"r{i}?" for i in range(32)])
    args = ["calibrate", "--model", "m", "--forget", "f", "--retain", "r", "--out", "o"]
    assert build_parser().parse_args(args).folds == DEFAULT_FOLDS


def test_one_retain_prompt_per_fold_keeps_the_threshold_off_the_fold_draw():
    """Six retain prompts sit near the concept. With 5 folds, how many of them are held out
    together (the fold seed) decides how high their out-of-fold scores go, and τ is the highest;
    with one retain prompt per fold each is scored by a probe that saw the five others, so the
    seed hardly moves τ."""
    import torch

    from calibration.gate import fit_gate

    g = torch.Generator().manual_seed(0)

    def bags(n: int, shift: float) -> list[torch.Tensor]:
        out = []
        for _ in range(n):
            t = torch.randn(5, 1, 16, generator=g)
            t[..., 0] += shift
            out.append(t)
        return out

    forget, retain, neutral = bags(32, 2.0), bags(26, 0.0) + bags(6, 1.4), bags(60, -0.3)
    ids = [[1, 2, 3, 4, 5]] * 124

    def spread(folds: int) -> float:
        fits = [fit_gate(forget, retain, neutral, ids, [0], 0.05, ("mean",), folds, seed=s) for s in range(6)]
        return float(np.ptp([f.threshold for f in fits]))

    assert spread(32) < spread(5) / 2


def test_the_gate_layer_is_chosen_on_selection_folds_and_its_threshold_set_on_all_folds():
    """Two candidate layers whose out-of-fold recalls swap order between 5 and 32 folds: the layer
    and pooling stay the 5-fold choice, and the served head, out-of-fold scores and threshold are
    that layer's on 32 folds (what the calibrator serves)."""
    import torch

    from calibration.gate import SELECTION_FOLDS, fit_gate, refit_gate

    g = torch.Generator().manual_seed(8)

    def bags(n: int, shift: float) -> list[torch.Tensor]:
        out = []
        for _ in range(n):
            t = torch.randn(5, 2, 16, generator=g)
            t[:, :, 0] += shift
            out.append(t)
        return out

    forget, retain, neutral = bags(32, 1.2), bags(26, 0.0) + bags(6, 0.8), bags(40, -0.3)
    ids = [[1, 2, 3, 4, 5]] * 110
    sets = (forget, retain, neutral, ids)
    chosen = fit_gate(*sets, [0, 1], 0.05, ("mean",), SELECTION_FOLDS, seed=0)
    assert chosen.layer != fit_gate(*sets, [0, 1], 0.05, ("mean",), 32, seed=0).layer
    served = refit_gate(chosen, *sets, 32, seed=0)
    alone = fit_gate(*sets, [chosen.layer], 0.05, ("mean",), 32, seed=0)
    assert (served.layer, served.pooling, served.candidates) == (chosen.layer, chosen.pooling, chosen.candidates)
    assert served.threshold == alone.threshold and torch.equal(served.weight, alone.weight)
    assert np.array_equal(served.oof_retain, alone.oof_retain) and served.threshold != chosen.threshold
    assert refit_gate(chosen, *sets, SELECTION_FOLDS, seed=0) is chosen


@pytest.mark.model
def test_calibrate_seed_and_folds_reach_the_pack_and_the_report(tmp_path, capsys, model_dir):
    import json

    from guardit.cli import main

    forget, retain = tmp_path / "f.jsonl", tmp_path / "r.jsonl"
    forget.write_text(
        "".join(json.dumps({"prompt": f"Tell me about the wizard Gandalf, part {i}."}) + "\n" for i in range(8))
    )
    retain.write_text("".join(json.dumps({"prompt": f"Give me a bread recipe, number {i}."}) + "\n" for i in range(20)))
    out = tmp_path / "p"
    rc = main(
        [
            "calibrate",
            "--model",
            str(model_dir),
            "--forget",
            str(forget),
            "--retain",
            str(retain),
            "--out",
            str(out),
            "--seed",
            "7",
            "--folds",
            "32",
            "--quiet",
        ]
    )
    assert rc == 0
    assert "(8 folds, seed 7; the layer chosen on 5)" in capsys.readouterr().out
    stats = json.loads((out / "pack.json").read_text())["stats"]
    assert stats["seed"] == 7 and stats["folds"] == 8  # --folds 32, capped at the 8 forget prompts
    assert stats["layer_folds"] == 5


def test_everyday_negatives_bind_at_their_own_tighter_level():
    """τ is the higher of the retain set's threshold at α and the everyday set's at min(α, 0.01):
    one everyday prompt scoring above every retain prompt no longer hides under α = 0.05."""
    from steering.conformal import EVERYDAY_ALPHA, binding_negatives, gate_threshold

    retain = np.linspace(-3, 0, 32)
    everyday = np.r_[np.full(200, -5.0), 1.0, 2.0]  # two outliers among 202
    assert EVERYDAY_ALPHA == 0.01
    kind, _, level = binding_negatives(retain, everyday, 0.05)
    assert (kind, level) == ("neutral", 0.01)
    assert gate_threshold(retain, everyday, 0.05) == 1.0  # the 2nd-highest: at most 1 % fire above it
    assert conformal_threshold(everyday, 0.05) == -5.0  # at α = 0.05 both outliers would fire
    few = everyday[-48:]  # too few for 1 %: held to α, never a gate that cannot fire
    assert binding_negatives(retain, few, 0.05)[2] == 0.05 and math.isfinite(gate_threshold(retain, few, 0.05))


def test_the_hybrid_threshold_is_shared_by_rank_and_served_exactly():
    """One conformal threshold on the max of the two scores' ranks among their negatives: the
    served pair of thresholds gives the same decisions as the combined rank on every calibration
    score; the false-fire bound holds for the union on the negatives; and one score's extreme
    negative does not push the other score's threshold up (as mean/sd standardisation did)."""
    import torch

    from calibration.gate import GateFit, TextGateFit, combine_gates
    from steering.conformal import gate_threshold

    rng = np.random.default_rng(0)
    # the probe's negatives spread far below (a large sd), the text score's are compact
    pr, pn, pf = rng.normal(0, 1, 32), np.r_[rng.normal(0, 1, 150), rng.normal(-30, 1, 50)], rng.normal(4, 1, 32)
    tr, tn, tf = rng.normal(0, 1, 32), rng.normal(0, 1, 200), rng.normal(1, 1, 32)
    probe = GateFit(0, "mean", torch.zeros(2), 0.0, gate_threshold(pr, pn, 0.05), 0.05, pf, pr, pn)
    text = TextGateFit(torch.zeros(2), 0.0, gate_threshold(tr, tn, 0.05), tf, tr, tn)
    ar, an, af = rng.normal(0, 2, 32), rng.normal(-1, 1, 200), rng.normal(3, 2, 32)  # a third score (the answer)
    answer = TextGateFit(torch.zeros(2), 0.0, gate_threshold(ar, an, 0.05), af, ar, an)
    for fits, scores in (
        ([probe, text], ((pf, tf), (pr, tr), (pn, tn))),
        ([probe, text, answer], ((pf, tf, af), (pr, tr, ar), (pn, tn, an))),
    ):
        h = combine_gates(fits, 0.05)
        assert len(h.thresholds) == len(fits)

        def fires(xs, h=h):
            return np.any([x > t for x, t in zip(xs, h.thresholds)], axis=0)

        for xs, combined in zip(scores, (h.oof_forget, h.oof_retain, h.oof_neutral)):
            assert np.array_equal(fires(xs), combined > h.threshold)
        assert fires(scores[1]).mean() <= 0.05
        assert fires(scores[2]).mean() <= 0.01
        assert h.thresholds[0] < 4 and h.tpr > 0.5  # the probe still fires on forget prompts
