"""The shared forward-pass logic: gates per row, chunk invariance, rotation only of fired rows."""

import math

import pytest
import torch
from helpers import toy_pack

from steering.runtime import GateStats, PackUse, SteeringBank, TokenMap, earlier_turns


def _bank(**kw):
    return SteeringBank([toy_pack("b", seed=1, **kw), toy_pack("a", seed=2, **kw)])


def test_packs_are_ordered_by_id_and_grouped_by_layer():
    bank = _bank()
    assert [p.id for p in bank.packs] == ["a", "b"]
    assert set(bank.gate_layers) == {1}
    assert set(bank.steer_layers) == {3, 4}


def test_gate_update_is_invariant_to_chunking():
    bank = _bank()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(10, 16, generator=g)
    rows = torch.tensor([0] * 6 + [1] * 4)
    settings = bank.settings([{"a": (None, False), "b": (None, False)}] * 2)
    one = GateStats.empty(2, 2)
    bank.update_gates(1, h, TokenMap(rows), one, settings)
    two = GateStats.empty(2, 2)
    parts = (slice(0, 3), slice(3, 7), slice(7, 10))
    ready = [torch.tensor([False, False]), torch.tensor([True, False]), torch.tensor([True, True])]
    for part, r in zip(parts, ready):
        bank.update_gates(1, h[part], TokenMap(rows[part], ready=r), two, settings)
    assert torch.allclose(one.value(bank.max_pool), two.value(bank.max_pool), atol=1e-5)
    assert torch.equal(one.fired, two.fired)
    # the pooled value is the mean of the per-token probe scores
    w, b = bank.packs[0].gate_weight, bank.packs[0].gate_bias
    assert math.isclose(float(one.value(bank.max_pool)[0, 0]), float((h[:6] @ w + b).mean()), rel_tol=1e-5)


def test_max_pooling_and_fired_stays_fired():
    bank = SteeringBank([toy_pack("a", pooling="max", threshold=1.0)])
    settings = bank.settings([{"a": (None, False)}])
    stats = GateStats.empty(1, 1)
    w = bank.packs[0].gate_weight
    hi = (2.0 / w.dot(w)) * w  # token score 2.0 > 1.0
    bank.update_gates(1, hi.unsqueeze(0), TokenMap(torch.tensor([0])), stats, settings)
    assert stats.fired.all()
    bank.update_gates(1, -10 * hi.unsqueeze(0), TokenMap(torch.tensor([0])), stats, settings)
    assert stats.fired.all() and math.isclose(float(stats.value(bank.max_pool)), 2.0, rel_tol=1e-6)


def test_inactive_rows_never_fire_and_pads_are_ignored():
    bank = SteeringBank([toy_pack("a", threshold=-1e9)])  # fires on anything
    settings = bank.settings([{"a": (None, False)}, {}])
    stats = GateStats.empty(2, 1)
    h = torch.randn(4, 16)
    valid = torch.tensor([False, True, True, True])
    bank.update_gates(1, h, TokenMap(torch.tensor([0, 0, 1, 1]), counted=valid), stats, settings)
    assert stats.fired.tolist() == [[True], [False]]
    assert stats.count.tolist() == [[1.0], [2.0]]


def test_steer_rotates_only_fired_rows_bit_exactly():
    bank = SteeringBank([toy_pack("a")])
    settings = bank.settings([{"a": (None, False)}] * 3)
    stats = GateStats.empty(3, 1)
    stats.fired[1, 0] = True
    h = torch.randn(9, 16, dtype=torch.bfloat16)
    before = h.clone()
    rows = torch.arange(3).repeat_interleave(3)
    assert bank.steer_(3, h, TokenMap(rows), stats, settings).tolist() == [3, 4, 5]
    assert torch.equal(h[rows != 1].view(torch.int16), before[rows != 1].view(torch.int16))
    assert not torch.equal(h[rows == 1], before[rows == 1])
    assert torch.allclose(h[rows == 1].float().norm(dim=-1), before[rows == 1].float().norm(dim=-1), rtol=1e-2)
    assert bank.steer_(2, h, TokenMap(rows), stats, settings) is None  # no plane at layer 2


def test_prompt_scope_and_force_and_per_row_angles():
    bank = SteeringBank([toy_pack("a", threshold=1e9)])  # never fires by itself
    settings = bank.settings([{"a": (30.0, True)}, {"a": (None, False)}])
    stats = GateStats.empty(2, 1)
    h = torch.randn(4, 16)
    before = h.clone()
    rows = torch.tensor([0, 0, 1, 1])
    prompt = torch.tensor([True, False, True, False])
    bank.steer_(3, h, TokenMap(rows, is_prompt=prompt), stats, settings)
    assert not torch.equal(h[0], before[0])  # forced, prompt token
    assert torch.equal(h[1:], before[1:])  # decode token (prompt scope) and the closed row
    b = bank.packs[0].planes[0]
    assert math.isclose(math.degrees(math.atan2(float(h[0] @ b[1]), float(h[0] @ b[0]))), 30.0, abs_tol=1e-3)


def test_earlier_turns_span_from_the_first_user_turn_to_the_last():
    header = [7, 8]  # what opens a user turn; a template head ends with it, as chat templates do
    assert earlier_turns([5, 6, 7, 8, 20, 21, 9], header) == (0, 0)  # one turn: nothing left out
    assert earlier_turns([5, 6, 7, 8, 20, 9, 30, 7, 8, 22, 9], header) == (4, 9)  # one earlier turn
    assert earlier_turns([5, 6, 7, 8, 20, 7, 8, 22, 7, 8, 23, 9], header) == (4, 10)  # several
    assert earlier_turns([5, 40, 41, 7, 8, 20, 7, 8, 23, 9], header) == (5, 8)  # after a system prompt
    assert earlier_turns([1, 2, 20, 21, 9], header) == (0, 0)  # no header (a raw prompt)
    assert earlier_turns([5, 6, 7, 8, 20, 7, 8], []) == (0, 0)  # no chat template
    assert earlier_turns([5, 6, 7, 8, 20, 7, 8], header) == (4, 6)  # never the last token


def test_turn_pooled_probe_leaves_the_earlier_turns_out_and_older_packs_count_every_token():
    """One request: a template head of 4 tokens, an earlier turn (4-6), the last user turn from
    token 7 on. A pack with a turn header pools tokens 0-3 and 7-8; a pack without a header
    (calibrated before headers existed) pools all."""
    bank = SteeringBank([toy_pack("new", seed=1, turn_header=[7, 8]), toy_pack("old", seed=1)])
    assert bank.turn_header == [7, 8] and bank.turn_pool.tolist() == [True, False]
    assert bank.earlier_turns([5, 6, 7, 8, 20, 7, 8, 22, 9]) == (4, 7)
    assert SteeringBank([toy_pack("old")]).earlier_turns([5, 6, 7, 8, 20, 7, 8, 22, 9]) == (0, 0)
    h = torch.randn(9, 16, generator=torch.Generator().manual_seed(3))
    pooled = (torch.arange(9) < 4) | (torch.arange(9) >= 7)
    stats = GateStats.empty(1, 2)
    bank.update_gates(1, h, TokenMap(torch.zeros(9, dtype=torch.long), pooled=pooled), stats,
                      bank.settings([{"new": (None, False), "old": (None, False)}]))  # fmt: skip
    w, b = bank.packs[0].gate_weight, bank.packs[0].gate_bias
    value = stats.value(bank.max_pool)[0]
    assert math.isclose(float(value[bank.index["new"]]), float((h[pooled] @ w + b).mean()), rel_tol=1e-5)
    assert math.isclose(float(value[bank.index["old"]]), float((h @ w + b).mean()), rel_tol=1e-5)


def test_a_prompt_decided_at_once_from_its_scores_as_over_its_chunks():
    """decide_prompt (vLLM: a deferred request, its scores partly from cached blocks) reaches the
    statistics and decisions that update_gates reaches over the prompt's chunks, for mean and max
    pools, a turn-pooling pack and a level's threshold; the scores it takes are those
    update_gates returns; a forced pack counts as fired, an unscored one (NaN) never fires."""
    packs = [
        toy_pack("mean", seed=1, turn_header=[7, 8], threshold=-0.2),
        toy_pack("max", seed=2, pooling="max", threshold=0.5),
        toy_pack("forced", seed=3),
    ]
    bank = SteeringBank(packs)
    row = {"mean": (None, False), "max": (None, False), "forced": (None, True)}
    settings = bank.settings([row])
    h = torch.randn(12, 16, generator=torch.Generator().manual_seed(4))
    pooled = (torch.arange(12) < 4) | (torch.arange(12) >= 7)
    stats, scores = GateStats.empty(1, 3), []
    for a, b in ((0, 5), (5, 9), (9, 12)):  # three prefill chunks, the last completes the prompt
        tokens = TokenMap(torch.zeros(b - a, dtype=torch.long), ready=torch.tensor([b == 12]), pooled=pooled[a:b])
        out = bank.update_gates(1, h[a:b], tokens, stats, settings)
        scores.append(out[:, torch.argsort(bank.gate_layers[1].packs)])  # back to bank order
    at_once = bank.decide_prompt(torch.cat(scores), pooled, settings)
    assert torch.allclose(at_once.value(bank.max_pool), stats.value(bank.max_pool), atol=1e-6)
    assert at_once.fired.tolist() == stats.fired.tolist() and at_once.fired[0, bank.index["forced"]]
    unscored = torch.cat(scores).clone()
    unscored[:, bank.index["max"]] = math.nan
    assert not bank.decide_prompt(unscored, pooled, bank.settings([{"max": (None, False)}])).fired.any()


def test_packs_for_different_chat_templates_cannot_share_a_bank():
    with pytest.raises(ValueError, match="different chat templates"):
        SteeringBank([toy_pack("a", turn_header=[7, 8]), toy_pack("b", turn_header=[9])])


def test_head_length():
    bank = SteeringBank([toy_pack("a", skip_head=[5, 6, 7])])
    assert bank.head_length([5, 6, 7, 8, 9]) == 3
    assert bank.head_length([5, 9, 9]) == 1
    assert bank.head_length([9, 9, 9]) == 1  # the first token (attention sink) always


def test_layers_needed_after_the_prompt_only_where_work_remains():
    from steering.pack import ConceptPack

    a = toy_pack("a", layers=(3, 4), gate_layer=1)
    b = toy_pack("b", layers=(4, 5), gate_layer=2, seed=3)
    c = toy_pack("c", layers=(3,), gate_layer=2, seed=4, steer_scope="all")
    d0 = toy_pack("d", layers=(5,), gate_layer=1, seed=5)
    d = ConceptPack(
        d0.meta.model_copy(update={"gate": d0.meta.gate.model_copy(update={"scope": "all"})}),
        d0.planes,
        d0.gate_weight,
        d0.gate_bias,
    )
    bank = SteeringBank([a, b, c, d])
    assert bank.layers_needed(["a", "b"], prompt_pending=True) == {1, 2, 3, 4, 5}
    assert bank.layers_needed(["a"], prompt_pending=True) == {1, 3, 4}
    # prompt-scope gates and rotations have nothing left to do once the prompt is read
    assert bank.layers_needed(["a", "b"], prompt_pending=False) == frozenset()
    assert bank.layers_needed(["a"], prompt_pending=False, compensate=True) == {3, 4}
    # a steer-scope "all" pack keeps rotating generated tokens; a gate-scope "all" pack keeps scoring
    assert bank.layers_needed(["a", "c"], prompt_pending=False) == {3}
    assert bank.layers_needed(["d"], prompt_pending=False) == {1}


def test_late_gate_rotates_earlier_layers_only_for_tokens_after_it_fired():
    """A gate after a steered layer (steer scope "all"): in the forward that fires it, the earlier
    layer is left alone and the later one rotates; from the next token on, both rotate."""
    import pytest

    with pytest.raises(ValueError, match="gate.layer"):
        toy_pack("late", layers=(3, 5), gate_layer=4)  # prompt scope cannot rotate before its gate
    bank = SteeringBank([toy_pack("late", layers=(3, 5), gate_layer=4, threshold=-1e9, steer_scope="all")])
    settings = bank.settings([{"late": (None, False)}])
    stats = GateStats.empty(1, 1)
    rows = torch.zeros(4, dtype=torch.long)
    prompt = torch.ones(4, dtype=torch.bool)
    h = torch.randn(4, 16)
    assert bank.steer_(3, h.clone(), TokenMap(rows, is_prompt=prompt), stats, settings) is None  # gate not decided yet
    bank.update_gates(4, h, TokenMap(rows, is_prompt=prompt, ready=torch.tensor([True])), stats, settings)
    assert stats.fired.all()
    assert bank.steer_(5, h.clone(), TokenMap(rows, is_prompt=prompt), stats, settings).tolist() == [0, 1, 2, 3]
    new = torch.randn(1, 16)
    assert bank.layers_needed(["late"], prompt_pending=False) == {3, 5}
    assert bank.steer_(3, new, TokenMap(rows[:1], is_prompt=torch.tensor([False])), stats, settings).tolist() == [0]


def test_eight_packs_on_one_request_each_gate_decides_alone_in_any_naming_order():
    """Eight packs on every row, planes at shared layers (random planes in d = 16 overlap): each
    pack's gate decides exactly as it does loaded alone; the fired packs rotate one after another in
    id order, so any naming or loading order gives bit-identical output; norms are kept; a row
    whose eight gates all stay closed is bit-identical."""
    from steering.rotation import rotate

    ids = ["h", "c", "f", "a", "g", "b", "e", "d"]
    packs = [toy_pack(pid, layers=(2, 3) if i % 2 else (3, 4), threshold=0.5, seed=10 + i) for i, pid in enumerate(ids)]
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(4).repeat_interleave(3)
    h_gate = torch.randn(12, 16, generator=g)
    h_gate[rows == 3] = 0.0  # scores 0 < 0.5: all closed
    h = torch.randn(12, 16, generator=g)

    def run(order):
        bank = SteeringBank(order)
        settings = bank.settings([{p.id: PackUse() for p in order}] * 4)
        stats = GateStats.empty(4, len(order))
        bank.update_gates(1, h_gate, TokenMap(rows), stats, settings)
        x = h.clone()
        bank.steer_(3, x, TokenMap(rows), stats, settings)
        return {p.id: stats.fired[:, bank.index[p.id]].tolist() for p in order}, x

    fired, out = run(packs)
    for p in packs:  # each gate alone
        assert run([p])[0][p.id] == fired[p.id]
    per_row = [sum(fired[pid][r] for pid in ids) for r in range(4)]
    assert max(per_row) >= 3 and per_row[3] == 0  # the case is what it claims to be
    shuffled = torch.Generator().manual_seed(1)
    for _ in range(3):
        order = [packs[i] for i in torch.randperm(8, generator=shuffled).tolist()]
        assert torch.equal(run(order)[1], out)
    angle = torch.full((3,), math.radians(90.0))
    for r in range(4):
        expected = h[rows == r]
        for p in sorted(packs, key=lambda p: p.id):
            if fired[p.id][r] and 3 in p.meta.layers:
                expected = rotate(expected, p.planes[p.meta.layers.index(3)], angle)
        assert torch.allclose(out[rows == r], expected, atol=1e-5)
        assert torch.allclose(out[rows == r].norm(dim=-1), h[rows == r].norm(dim=-1), rtol=1e-6)
    assert torch.equal(out[rows == 3], h[rows == 3])


def test_several_fired_packs_rotate_one_after_another_in_id_order():
    """The composition rule: fired packs with a plane at the same layer rotate the token one after
    another in the order of their concept ids (whatever order they were named or loaded in), each
    rotation exact and norm-preserving, so the composition is too; a row where only one fired gets
    that pack's rotation alone."""
    from steering.rotation import rotate

    packs = [toy_pack(name, seed=s) for name, s in (("c", 1), ("a", 2), ("b", 3))]
    h = torch.randn(6, 16, dtype=torch.float64).float()
    rows = torch.tensor([0, 0, 1, 1, 2, 2])
    outs = []
    for order in (packs, packs[::-1], packs[1:] + packs[:1]):
        bank = SteeringBank(order)
        settings = bank.settings([{p.id: (None, True) for p in packs}, {"b": (None, True)}, {}])
        x = h.clone()
        bank.steer_(3, x, TokenMap(rows), GateStats.empty(3, 3), settings)
        outs.append(x)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    by_id = {p.id: p for p in packs}
    angle = torch.full((2,), math.radians(90.0))  # float32 radians, as the bank keeps them
    expected = h[:2]
    for pid in ("a", "b", "c"):
        expected = rotate(expected, by_id[pid].planes[0], angle)
    assert torch.allclose(outs[0][:2], expected, atol=1e-6)  # (batched with other rows: float rounding)
    assert torch.allclose(outs[0][:2].norm(dim=-1), h[:2].norm(dim=-1), rtol=1e-6)
    assert torch.allclose(outs[0][2:4], rotate(h[2:4], by_id["b"].planes[0], angle), atol=1e-6)
    assert torch.equal(outs[0][4:], h[4:])
