"""Gate strictness: a pack's thresholds placed at another level α from the out-of-fold scores it
keeps, exactly as calibration places them; per-request levels in the runtime; tenant policies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import FP, toy_pack

from calibration.gate import GateFit, TextGateFit, combine_gates
from steering.conformal import false_fire_bounds, gate_threshold
from steering.errors import PolicyError, PolicyForbidden
from steering.pack import (
    AnswerCheckMeta,
    ConceptPack,
    GateMeta,
    KindThresholds,
    OofNegatives,
    TextGateMeta,
)
from steering.policy import PolicyConfig, parse_request
from steering.runtime import GateStats, PackUse, SteeringBank, TokenMap
from steering.text_gate import DEFAULT_ENCODER, load_encoder

A = 0.05  # the calibrated level


def _fits(seed: int = 0) -> tuple[GateFit, TextGateFit, TextGateFit]:
    """Out-of-fold scores of a probe, a text gate and an answer check, as calibration has them
    (32 retain, 202 everyday negatives), thresholded at A."""
    rng = np.random.default_rng(seed)
    pr, pn, pf = rng.normal(0, 1, 32), rng.normal(-1, 1, 202), rng.normal(3, 1, 32)
    tr, tn, tf = rng.normal(0, 2, 32), rng.normal(-2, 1, 202), rng.normal(2, 2, 32)
    ar, an, af = rng.normal(1, 1, 32), rng.normal(0, 1, 202), rng.normal(4, 1, 32)
    probe = GateFit(1, "mean", torch.zeros(2), 0.0, gate_threshold(pr, pn, A), A, pf, pr, pn)
    text = TextGateFit(torch.zeros(2), 0.0, gate_threshold(tr, tn, A), tf, tr, tn)
    answer = TextGateFit(torch.zeros(2), 0.0, gate_threshold(ar, an, A), af, ar, an)
    return probe, text, answer


def _kinds(fits, alpha: float) -> dict[str, KindThresholds]:
    """Every kind's thresholds at ``alpha``, by calibration's own functions."""
    probe, text, answer = fits
    enc, hyb = combine_gates([text, answer], alpha), combine_gates([probe, text, answer], alpha)
    return {
        "probe": KindThresholds(probe=gate_threshold(probe.oof_retain, probe.oof_neutral, alpha)),
        "encoder": KindThresholds(text=enc.thresholds[0], answer=enc.thresholds[1]),
        "hybrid": KindThresholds(probe=hyb.thresholds[0], text=hyb.thresholds[1], answer=hyb.thresholds[2]),
    }


def _pack(encoder, fits, concept_id: str = "strict", text_bias: float = 0.0, keep: bool = True) -> ConceptPack:
    kinds = _kinds(fits, A)
    h = kinds["hybrid"]
    heads = dict(zip(("probe", "text", "answer"), fits))
    negatives = OofNegatives(
        retain={k: f.oof_retain.tolist() for k, f in heads.items()},
        neutral={k: f.oof_neutral.tolist() for k, f in heads.items()},
    )
    text = TextGateMeta(
        encoder=encoder.name,
        encoder_sha256=encoder.sha256,
        threshold=h.text,
        answer=AnswerCheckMeta(threshold=h.answer, max_tokens=40),
    )
    kept = negatives if keep else None
    gate = GateMeta(layer=1, threshold=h.probe, alpha=A, kind="hybrid", text=text, kinds=kinds, negatives=kept)
    base = toy_pack(concept_id)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(encoder.dim, generator=g)
    meta = base.meta.model_copy(update={"gate": gate})
    return ConceptPack(meta, base.planes, base.gate_weight, base.gate_bias, w, text_bias, w.flip(0), 0.0)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(DEFAULT_ENCODER)


def test_thresholds_at_another_level_are_calibrations_own(encoder, tmp_path):
    """At any level every kind's thresholds are what calibration's functions give at that level on
    the same out-of-fold scores (after a save and load: the scores round-trip exactly); the served
    kind's are the pack's gate thresholds; the calibrated level returns the pack itself."""
    fits = _fits()
    pack = _pack(encoder, fits)
    pack.save_pretrained(tmp_path / "p")
    back = ConceptPack.from_pretrained(tmp_path / "p", FP)
    assert back.meta.gate.negatives == pack.meta.gate.negatives
    assert back.at_alpha(A) is back
    for alpha in (0.1, 0.2, 0.5):
        moved = back.at_alpha(alpha)
        g = moved.meta.gate
        assert g.alpha == alpha and g.kinds == _kinds(fits, alpha)
        assert (g.threshold, g.text.threshold, g.text.answer.threshold) == (  # type: ignore[union-attr]
            g.kinds["hybrid"].probe,
            g.kinds["hybrid"].text,
            g.kinds["hybrid"].answer,
        )
        assert torch.equal(moved.text_weight, back.text_weight) and moved.planes is back.planes
    # stricter fires more: each served threshold is lower at a higher level
    t = [back.at_alpha(a).meta.gate for a in (0.05, 0.1, 0.2)]
    assert t[0].threshold >= t[1].threshold >= t[2].threshold and t[0].threshold > t[2].threshold
    assert t[0].text.threshold >= t[1].text.threshold >= t[2].text.threshold  # type: ignore[union-attr]


def test_levels_a_pack_cannot_serve_are_refused_by_name(encoder, tmp_path):
    pack = _pack(encoder, _fits())
    with pytest.raises(PolicyError, match=r"guardit_alpha: 0.02 is below the least level .* 32 retain prompts \(1/33"):
        pack.meta.check_alpha(0.02, "guardit_alpha")
    with pytest.raises(PolicyError, match="alpha must be strictly between 0 and 1"):
        pack.at_alpha(1.5)
    old = _pack(encoder, _fits(), keep=False)
    assert old.at_alpha(A) is old  # its own level is always served
    with pytest.raises(PolicyError, match="keeps no out-of-fold scores .* recalibrate it"):
        old.at_alpha(0.1)
    # a pack.json whose scores do not fit together is refused at load, naming the field
    pack.save_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "pack.json").read_text())
    meta["gate"]["negatives"]["retain"]["text"] = meta["gate"]["negatives"]["retain"]["text"][:-1]
    (tmp_path / "p" / "pack.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="gate.negatives"):
        ConceptPack.from_pretrained(tmp_path / "p")


def test_false_fire_bounds_are_the_conformal_ranks():
    """32 retain prompts at α = 0.05: the highest of them is the threshold, so at most 1/33 fire;
    at 0.1 the third highest (3/33); everyday (202) at min(α, 1 %): the second highest (2/203)."""
    assert false_fire_bounds(32, 202, 0.05) == {"retain": 1 / 33, "everyday": 2 / 203}
    assert false_fire_bounds(32, 202, 0.1) == {"retain": 3 / 33, "everyday": 2 / 203}
    assert false_fire_bounds(32, 48, 0.1)["everyday"] == 4 / 49  # too few everyday for 1 %: held to α
    for a in (0.04, 0.05, 0.1, 0.2, 0.3):
        assert all(b <= a for b in false_fire_bounds(32, 202, a).values())


def test_each_row_is_gated_at_its_own_level(encoder):
    """Two rows, the same activations and text: the row at a stricter level fires where the row at
    the calibrated level does not, for the in-forward probe and for the text gate, in one batch."""
    fits = _fits()
    probe_pack = _pack(encoder, fits)
    lo, hi = probe_pack.meta.gate, probe_pack.at_alpha(0.2).meta.gate
    assert hi.threshold < lo.threshold and hi.text.threshold < lo.text.threshold  # type: ignore[union-attr]
    text = "Tell me about the concept."
    emb = encoder.window_embeddings([text])[0]
    raw = float((emb @ probe_pack.text_weight).max())
    mid = (lo.text.threshold + hi.text.threshold) / 2  # type: ignore[union-attr]
    pack = _pack(encoder, fits, text_bias=mid - raw)  # its text score sits between the two levels
    bank = SteeringBank([pack])
    fired, score = bank.text_gates([text, text], [["strict"], ["strict"]], [None, 0.2])
    assert fired[:, 0].tolist() == [False, True] and score[0, 0] == score[1, 0]
    settings = bank.settings([{"strict": PackUse()}, {"strict": PackUse(alpha=0.2)}])
    assert settings.threshold[:, 0].tolist() == pytest.approx([lo.threshold, hi.threshold])
    w = pack.gate_weight
    h = (((lo.threshold + hi.threshold) / 2) / float(w.dot(w))) * w  # probe score between the levels
    stats = GateStats.empty(2, 1)
    bank.update_gates(1, h.repeat(2, 1), TokenMap(torch.tensor([0, 1])), stats, settings)
    assert stats.fired[:, 0].tolist() == [False, True]


def _config(**tenant) -> PolicyConfig:
    return PolicyConfig.model_validate(
        {"packs": {"hp": "/x/hp", "ae": "/x/ae"}, "tenants": {"t": {"api_key_sha256": "0" * 64, **tenant}}}
    )


def test_tenant_and_client_levels():
    """A tenant's level applies to its requests; a client may set one only where the policy
    allows it, and never laxer than the tenant's while mandatory packs apply."""
    assert _config(packs=["hp"], alpha=0.1).resolve("t", {}).alpha == 0.1
    assert _config(packs=["hp"]).resolve("t", {}).alpha is None
    with pytest.raises(PolicyForbidden, match="guardit_alpha: tenant 't' may not set"):
        _config(packs=["hp"]).resolve("t", {"guardit_alpha": 0.2})
    assert _config(packs=["hp"], allow_client_alpha=True).resolve("t", {"guardit_alpha": "0.2"}).alpha == 0.2
    strict = _config(mandatory=["hp"], alpha=0.1, allow_client_alpha=True)
    assert strict.resolve("t", {"guardit_alpha": 0.2}).alpha == 0.2
    with pytest.raises(PolicyForbidden, match="guardit_alpha: cannot be set below 0.1 while mandatory"):
        strict.resolve("t", {"guardit_alpha": 0.06})
    with pytest.raises(PolicyForbidden, match="cannot be set while mandatory packs"):
        _config(mandatory=["hp"], allow_client_alpha=True).resolve("t", {"guardit_alpha": 0.2})
    for bad in (0, 1, "x", True, [0.1]):
        with pytest.raises(PolicyError, match="guardit_alpha must be"):
            parse_request({"guardit_packs": "hp", "guardit_alpha": bad}, {"hp"})
    with pytest.raises(Exception, match="alpha"):
        _config(packs=["hp"], alpha=1.2)


def test_a_tenant_level_its_packs_cannot_serve_is_refused_by_name(encoder):
    pack = _pack(encoder, _fits())
    cfg = PolicyConfig.model_validate(
        {"packs": {"strict": "/x"}, "tenants": {"t": {"api_key_sha256": "0" * 64, "packs": ["strict"], "alpha": 0.02}}}
    )
    with pytest.raises(PolicyError, match=r"tenants.t.alpha: 0.02 is below the least level pack 'strict'"):
        cfg.check_levels({"strict": pack.meta})


def test_the_example_policies_set_a_stricter_level_for_the_kids_app():
    from conftest import ROOT

    cfg = PolicyConfig.load(ROOT / "examples" / "serve" / "policies.yaml")
    assert cfg.tenants["kids-app"].alpha == 0.1 and cfg.resolve("kids-app", {}).alpha == 0.1
    with pytest.raises(PolicyForbidden, match="below 0.1"):
        cfg.resolve("kids-app", {"guardit_alpha": 0.05})
