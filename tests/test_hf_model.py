"""HF integration on the real bundled model: bit-identity when closed, per-row gates, forgetting."""

from __future__ import annotations

import pytest
import torch
from conftest import EXAMPLES

from calibration import hf_fingerprint, load_model, read_prompts
from calibration.capture import encode_chat, pad_batch
from calibration.prompts import PromptRecord
from guardit.evaluate import perplexity
from guardit.generation import hf_generate, leaked
from integrations.hf import steer
from steering.errors import PackError
from steering.names import names_answered
from steering.pack import ConceptPack, load_packs

pytestmark = pytest.mark.model

RETAIN = ["Who wrote The Lord of the Rings?", "What is the capital of France?", "Who is Sherlock Holmes's friend?"]
FORGET = ["What is the name of Harry Potter's school?"]
# Two benign exchanges that a conversation's late ask follows.
BENIGN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 is 4."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]


def _batch(tok, prompts):
    return pad_batch(encode_chat(tok, prompts), tok.pad_token_id)


@pytest.fixture(scope="module")
def hp(packs_dir, hf_model):
    return ConceptPack.from_pretrained(packs_dir / "harry-potter", hf_fingerprint(hf_model[0]))


@torch.no_grad()
def test_closed_rows_bit_identical_logits_in_mixed_batch(hf_model, hp):
    model, tok = hf_model
    inp, mask = _batch(tok, RETAIN + FORGET)
    ref = model(input_ids=inp, attention_mask=mask).logits
    with steer(model, [hp]) as s:
        got = model(input_ids=inp, attention_mask=mask).logits
        gates = s.gates()
    fired = [g["harry-potter"].fired for g in gates]
    assert fired == [False, False, False, True]
    closed = torch.tensor([not f for f in fired])
    assert torch.equal(got[closed], ref[closed])  # bit for bit
    assert not torch.equal(got[~closed], ref[~closed])
    # the hooks are gone after the block
    assert torch.equal(model(input_ids=inp, attention_mask=mask).logits, ref)


@torch.no_grad()
def test_gate_ignores_left_padding(hf_model, hp):
    model, tok = hf_model
    prompts = RETAIN + FORGET
    inp, mask = _batch(tok, prompts)
    with steer(model, [hp]) as s:
        model(input_ids=inp, attention_mask=mask)
        batched = [g["harry-potter"].score for g in s.gates()]
        alone = []
        for p in prompts:
            i, m = _batch(tok, [p])
            model(input_ids=i, attention_mask=m)
            alone.append(s.gates()[0]["harry-potter"].score)
    assert batched == pytest.approx(alone, abs=1e-3)


@torch.no_grad()
def test_gate_state_persists_through_generate_and_rows_are_independent(hf_model, hp):
    model, tok = hf_model
    from calibration.prompts import PromptRecord

    recs = [PromptRecord(prompt=p) for p in RETAIN + FORGET]
    van = hf_generate(model, tok, recs, max_tokens=24, progress=False)
    st = hf_generate(model, tok, recs, [hp], max_tokens=24, progress=False)
    for v, s in zip(van[:3], st[:3]):
        assert s["token_ids"] == v["token_ids"] and not s["gate"]["harry-potter"]["fired"]
    assert st[3]["gate"]["harry-potter"]["fired"] and st[3]["token_ids"] != van[3]["token_ids"]
    assert "hogwarts" in van[3]["output"].lower() and "hogwarts" not in st[3]["output"].lower()


@torch.no_grad()
def test_steer_scope_all_pack_runs_no_hook_while_decoding_a_closed_prompt(hf_model, packs_dir):
    """A pack that also rotates generated tokens (Lord of the Rings with --late-gate) has nothing
    left to do once its prompt-scope gate stayed closed on every row: no hook runs while decoding."""
    model, tok = hf_model
    lotr = ConceptPack.from_pretrained(packs_dir / "lord-of-the-rings", hf_fingerprint(model))
    assert lotr.meta.steer_scope == "all" and lotr.meta.gate.scope == "prompt"
    for prompt, fires in (
        ("What is the capital of France?", False),
        ("Who is the dark lord in The Lord of the Rings?", True),
    ):
        inp, mask = _batch(tok, [prompt])
        with steer(model, [lotr]) as s:
            model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=3, do_sample=False)
            assert s.gates()[0]["lord-of-the-rings"].fired is fires
            assert s._layers == (frozenset(lotr.meta.layers) if fires else frozenset())


def test_per_row_settings_and_validation(hf_model, hp):
    model, tok = hf_model
    from steering.errors import PolicyError

    with pytest.raises(PolicyError, match="unknown concept"):
        with steer(model, [hp], angles={"nope": 10}):
            pass
    with pytest.raises(PolicyError, match="angles.harry-potter"):
        with steer(model, [hp], angles={"harry-potter": float("nan")}):
            pass
    inp, mask = _batch(tok, FORGET * 2)
    with torch.no_grad(), steer(model, [hp], rows=[{"harry-potter": (None, False)}, {}]) as s:
        out = model(input_ids=inp, attention_mask=mask).logits
        assert s.gates()[0]["harry-potter"].fired and s.gates()[1] == {}
    assert not torch.equal(out[0], out[1])


@pytest.mark.parametrize("concept", ["harry_potter", "einstein"])
def test_forgetting_on_the_example_test_splits(hf_model, packs_dir, concept):
    model, tok = hf_model
    packs = load_packs([packs_dir / concept.replace("_", "-")], hf_fingerprint(model))
    forget = read_prompts(EXAMPLES / concept / "forget_test.jsonl")
    retain = read_prompts(EXAMPLES / concept / "retain_test.jsonl")
    van_f = hf_generate(model, tok, forget, max_tokens=40, progress=False)
    st_f = hf_generate(model, tok, forget, packs, max_tokens=40, progress=False)
    van_r = hf_generate(model, tok, retain, max_tokens=40, progress=False)
    st_r = hf_generate(model, tok, retain, packs, max_tokens=40, progress=False)
    knew = [i for i, r in enumerate(van_f) if leaked(r["output"], r["answers"])]
    assert len(knew) >= 0.75 * len(forget), "the vanilla model should know most test facts"
    leaks = sum(leaked(st_f[i]["output"], st_f[i]["answers"]) for i in knew)
    assert leaks <= 0.10 * len(knew), [st_f[i]["output"] for i in knew]
    identical = sum(a["token_ids"] == b["token_ids"] for a, b in zip(van_r, st_r))
    assert identical >= 0.90 * len(retain)

    # fluent, not gibberish: perplexity of steered answers under the vanilla model stays close
    def ppl(rows: list[dict]) -> float:
        return perplexity(model, tok, [r["prompt"] for r in rows], [r["token_ids"] for r in rows])

    assert ppl(st_f) <= 2.5 * ppl(van_f)


@torch.no_grad()
def test_text_gate_decides_before_the_forward_in_hf(hf_model, hp, text_variants):
    """A fired text gate rotates the prompt from its first token, exactly as force does; a closed
    encoder-only gate leaves the row bit-identical to the unhooked model. Texts come from the
    model's own tokenizer (loaded from its folder when steer() is given none)."""
    model, tok = hf_model
    assert hp.meta.gate.kind == "hybrid"  # the CLI's default
    opened = ConceptPack.from_pretrained(text_variants / "hp-text-open")
    closed = ConceptPack.from_pretrained(text_variants / "hp-text-closed")
    inp, mask = _batch(tok, RETAIN)
    ref = model(input_ids=inp, attention_mask=mask).logits
    with steer(model, [hp], force=True) as s:
        forced = model(input_ids=inp, attention_mask=mask).logits
    with steer(model, [opened]) as s:
        got = model(input_ids=inp, attention_mask=mask).logits
        gates = s.gates()
    assert torch.equal(got, forced) and not torch.equal(got, ref)
    assert all(g["hp-text-open"].fired and g["hp-text-open"].text_score is not None for g in gates)
    with steer(model, [closed], tokenizer=tok) as s:
        got = model(input_ids=inp, attention_mask=mask).logits
        gates = s.gates()
    assert torch.equal(got, ref)
    assert not any(g["hp-text-closed"].fired for g in gates)


def test_a_fired_answer_check_generates_the_row_again_rotated_in_hf(hf_model, hp, text_variants):
    """The answer check runs after the generation: a row whose check fires is generated again with
    the pack forced (the same tokens as forcing the pack), and reads fired "by": "answer"; a row
    whose gates and check stay closed keeps its vanilla tokens. A row whose answer names the
    concept in its first sentence is checked so, whatever its answer head scores."""
    model, tok = hf_model
    assert hp.meta.gate.text.answer is not None  # the CLI's default calibrates it
    recs = [PromptRecord(prompt=p) for p in RETAIN[:3]]
    answer = ConceptPack.from_pretrained(text_variants / "hp-answer-open")
    closed = ConceptPack.from_pretrained(text_variants / "hp-text-closed")
    forced = hf_generate(model, tok, recs, [hp], max_tokens=12, force=True, progress=False)
    vanilla = hf_generate(model, tok, recs, [], max_tokens=12, progress=False)
    got = hf_generate(model, tok, recs, [answer], max_tokens=12, progress=False)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in forced] != [r["token_ids"] for r in vanilla]
    assert all(r["gate"]["hp-answer-open"]["fired"] and r["gate"]["hp-answer-open"]["by"] == "answer" for r in got)
    kept = hf_generate(model, tok, recs, [closed], max_tokens=12, progress=False)
    assert [r["token_ids"] for r in kept] == [r["token_ids"] for r in vanilla]
    assert all("answer_score" in r["gate"]["hp-text-closed"] and not r["gate"]["hp-text-closed"]["fired"] for r in kept)
    # An answer that names the concept fires the check whatever its score (the pack's `names`).
    recs += [PromptRecord(prompt=p) for p in ("Who is Harry Potter's best friend?", "Who wrote the Hogwarts books?")]
    named = ConceptPack.from_pretrained(text_variants / "hp-named")
    assert named.meta.gate.text.answer.names == ["harry potter"]
    vanilla = hf_generate(model, tok, recs, [], max_tokens=12, progress=False)
    forced = hf_generate(model, tok, recs, [hp], max_tokens=12, force=True, progress=False)
    says = [names_answered(r["output"], ["harry potter"]) != [] for r in vanilla]
    assert any(says) and not all(says)
    got = hf_generate(model, tok, recs, [named], max_tokens=12, progress=False)
    for r, v, f, s in zip(got, vanilla, forced, says):
        assert r["token_ids"] == (f["token_ids"] if s else v["token_ids"]) and r["gate"]["hp-named"]["fired"] == s


@torch.no_grad()
def test_late_turn_of_a_conversation_still_fires_the_hybrid_gate(hf_model, hp):
    """The forgotten fact asked after two benign turns: the probe's mean over the whole
    conversation is diluted, the text gate's windows are not, so the hybrid gate still fires and
    the answer does not leak; the same conversation without the question stays closed."""
    model, tok = hf_model
    rows = []
    for last in ("Who is Harry Potter's best friend?", "What is the capital of Italy?"):
        text = tok.apply_chat_template(
            BENIGN + [{"role": "user", "content": last}], tokenize=False, add_generation_prompt=True
        )
        inp = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with steer(model, [hp]) as s:
            out = model.generate(
                input_ids=inp,
                attention_mask=torch.ones_like(inp),
                max_new_tokens=24,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
            rows.append((s.gates()[0]["harry-potter"], tok.decode(out[0, inp.shape[1] :], skip_special_tokens=True)))
    (hp_gate, hp_out), (other_gate, _) = rows
    assert hp_gate.fired and hp_gate.text_score is not None and "ron" not in hp_out.lower(), hp_out
    assert not other_gate.fired


@torch.no_grad()
def test_the_served_probe_leaves_a_conversations_earlier_turns_out(hf_model, hp):
    """The pack records the ids that open a user turn. Served, its probe's value is the mean of the
    token scores over every token but the earlier user turns: a single prompt, with the template
    head or a system prompt before it, is pooled whole, what calibration fitted the probe on; the
    same ask after two benign exchanges is pooled as if asked alone, so they do not dilute it.
    One left-padded batch."""
    from calibration.capture import capture, turn_header
    from steering.runtime import earlier_turns

    model, tok = hf_model
    header = turn_header(tok)
    assert hp.meta.gate.turn_header == header and tok.decode(header) == "<|im_end|>\n<|im_start|>user\n"
    ask = {"role": "user", "content": "Who is Harry Potter's best friend?"}
    system = {"role": "system", "content": "You answer in French."}
    convs = [[ask], [*BENIGN, ask], [system, ask], [system, *BENIGN[:2], ask]]
    ids = encode_chat(tok, convs)
    spans = [earlier_turns(x, header) for x in ids]
    assert spans[0] == spans[2] == (0, 0) and all(0 < a < b for a, b in (spans[1], spans[3]))
    last_turn = ask["content"] + "<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids[1][spans[1][1] :]) == tok.decode(ids[3][spans[3][1] :]) == last_turn
    assert ids[1][: spans[1][0]] == ids[0][: spans[1][0]]  # what is kept before the last turn: the head
    layer, w, b = hp.meta.gate.layer, hp.gate_weight.double(), hp.gate_bias
    acts = capture(model, ids, pad_id=tok.pad_token_id, progress=False)
    expected = [
        float(torch.cat([x[:s, layer], x[e:, layer]]).double().mean(0) @ w + b) for x, (s, e) in zip(acts.tokens, spans)
    ]
    every_token = [float(x[:, layer].double().mean(0) @ w + b) for x in acts.tokens]
    inp, mask = pad_batch(ids, tok.pad_token_id)
    with steer(model, [hp.with_gate_kind("probe")]) as s:
        model(input_ids=inp, attention_mask=mask)
        served = [g["harry-potter"].score for g in s.gates()]
    assert served == pytest.approx(expected, abs=1e-4)
    assert [served[0], served[2]] == pytest.approx([every_token[0], every_token[2]], abs=1e-4)
    assert served[1] > every_token[1] + 0.5 and served[3] > every_token[3] + 0.5  # what one mean lost


def test_generate_cli_takes_conversations_and_keeps_every_field(tmp_path, packs_dir, model_dir, hf_model):
    """`guardit generate` on a prompt file with conversations (``messages``) and fields of the
    user's own: the late ask fires and does not leak (vanilla gives it), a benign conversation with
    a system message is generated exactly as without the pack, and every row carries its record's
    conversation and fields back."""
    import json

    from guardit.cli import main

    records = [
        {"messages": [*BENIGN, {"role": "user", "content": "Who is Harry Potter's best friend?"}],
         "answers": ["Ron"], "kind": "late turn"},
        {"messages": [{"role": "system", "content": "You answer in one sentence."}, *BENIGN,
                      {"role": "user", "content": "What is the capital of Italy?"}], "kind": "benign", "id": 7},
        {"prompt": "Who is Harry Potter's best friend?", "kind": "direct"},
    ]  # fmt: skip
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    base = ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--max-tokens", "24", "--token-ids"]
    assert main([*base, "--out", str(tmp_path / "v.jsonl")]) == 0
    assert main([*base, "--out", str(tmp_path / "g.jsonl"), "--pack", str(packs_dir / "harry-potter")]) == 0
    vanilla, got = ([json.loads(x) for x in (tmp_path / f).read_text().splitlines()] for f in ("v.jsonl", "g.jsonl"))
    for rec, row in zip(records, got):
        assert {k: row[k] for k in rec if k != "answers"} == {k: v for k, v in rec.items() if k != "answers"}
        assert row["prompt"] == (rec["messages"][-1]["content"] if "messages" in rec else rec["prompt"])
    late, kept, direct = got
    assert "messages" not in direct and direct["kind"] == "direct"
    assert leaked(vanilla[0]["output"], ["Ron"]), vanilla[0]["output"]
    assert late["gate"]["harry-potter"]["fired"] and not leaked(late["output"], ["Ron"]), late["output"]
    assert not kept["gate"]["harry-potter"]["fired"] and kept["token_ids"] == vanilla[1]["token_ids"]
    # The conversation reached the model whole: its answer differs from the last turn asked alone.
    model, tok = hf_model
    alone = hf_generate(
        model, tok, [PromptRecord(prompt="What is the capital of Italy?")], max_tokens=24, progress=False
    )
    assert alone[0]["token_ids"] != kept["token_ids"]


@pytest.mark.parametrize("concept", ["harry_potter", "lord_of_the_rings"])
def test_the_rotation_check_is_what_the_served_forced_rotation_does(hf_model, packs_dir, concept):
    """Calibration checks the rotation's strength (calibration.capture.answer_nll with its own
    hooks): forced on the forget prompts, the model's own answers must lose MIN_ANSWER_DROP nats
    per token, else layers are added. The recorded drop must be what the serving hooks do to the
    same answers when the pack is forced, and the rule must have stopped where it says."""
    from calibration.calibrator import ANSWER_TOKENS, MAX_GROWN_STEER_LAYERS, MIN_ANSWER_DROP
    from calibration.capture import answer_nll, greedy_answer_ids

    model, tok = hf_model
    pack = ConceptPack.from_pretrained(packs_dir / concept.replace("_", "-"))
    tried = pack.meta.stats["steer_answer_drop"]
    assert [t["layers"] for t in tried] == list(range(tried[0]["layers"], tried[-1]["layers"] + 1))
    assert all(t["nats"] < MIN_ANSWER_DROP for t in tried[:-1])
    assert tried[-1]["nats"] >= MIN_ANSWER_DROP or len(pack.meta.layers) == MAX_GROWN_STEER_LAYERS
    assert len(pack.meta.layers) == tried[-1]["layers"]

    ids = encode_chat(tok, [r.prompt for r in read_prompts(EXAMPLES / concept / "forget.jsonl")])
    answers = greedy_answer_ids(model, tok, ids, ANSWER_TOKENS, 32, "", progress=False)
    total, count = answer_nll(model, ids, answers, tok.pad_token_id)
    base = total / count
    with steer(model, [pack], force=True, tokenizer=tok):
        total, count = answer_nll(model, ids, answers, tok.pad_token_id)
    served = total / count
    assert served - base == pytest.approx(tried[-1]["nats"], abs=2e-3)


@torch.no_grad()
def test_a_stricter_level_fires_more_and_closed_rows_stay_vanilla(hf_model, hp):
    """The calibrated Harry Potter pack keeps its out-of-fold scores, and serving's rule places
    every kind's thresholds from them exactly where calibration did. At stricter levels it fires
    on a growing set of the retain test prompts (each set inside the next, as lower thresholds
    must give) and on the forget test prompts at least as often; rows still closed at a level
    are bit-identical to the unhooked model."""
    from steering.pack import KIND_HEADS

    model, tok = hf_model
    g = hp.meta.gate
    assert g.negatives is not None and hp.meta.false_fire_bounds() == {"retain": 1 / 33, "everyday": 2 / 203}
    for kind, t in g.kinds.items():
        heads = tuple(h for h in KIND_HEADS[kind] if getattr(t, h) is not None)
        assert g.negatives.thresholds(kind, heads, g.alpha) == t
    d = EXAMPLES / "harry_potter"
    retain = [r.prompt for r in read_prompts(d / "retain_test.jsonl")]
    prompts, n_retain = retain + [r.prompt for r in read_prompts(d / "forget_test.jsonl")], len(retain)
    inp, mask = _batch(tok, prompts)
    ref = model(input_ids=inp, attention_mask=mask).logits
    fired = {}
    for alpha in (g.alpha, 0.2, 0.5):
        with steer(model, [hp.at_alpha(alpha)], tokenizer=tok) as s:
            got = model(input_ids=inp, attention_mask=mask).logits
            fired[alpha] = [r[hp.id].fired for r in s.gates()]
        closed = [i for i, f in enumerate(fired[alpha]) if not f]
        assert torch.equal(got[closed], ref[closed])
    lo, mid, hi = (set(i for i, f in enumerate(fired[a]) if f) for a in (g.alpha, 0.2, 0.5))
    assert lo <= mid <= hi
    assert len([i for i in hi if i < n_retain]) > len([i for i in lo if i < n_retain])


def test_several_packs_on_one_request_forget_each_concept_as_well_as_alone(hf_model, packs_dir):
    """One request with the Harry Potter, Einstein and Lord of the Rings packs (each with its own
    gate; fired ones rotate in id order): on each concept's forget test prompts it leaks no more
    known facts than that concept's pack alone, and each concept's retain prompts whose gates all
    stay closed are vanilla, bit for bit."""
    model, tok = hf_model
    names = ("harry-potter", "einstein", "lord-of-the-rings")
    packs = load_packs([packs_dir / n for n in names], hf_fingerprint(model))
    for name, pack in zip(names, packs):
        d = EXAMPLES / name.replace("-", "_")
        forget, retain = read_prompts(d / "forget_test.jsonl"), read_prompts(d / "retain_test.jsonl")
        van = hf_generate(model, tok, forget + retain, [], max_tokens=24, progress=False)
        alone = hf_generate(model, tok, forget, [pack], max_tokens=24, progress=False)
        together = hf_generate(model, tok, forget + retain, packs, max_tokens=24, progress=False)
        known = [i for i, r in enumerate(van[: len(forget)]) if leaked(r["output"], r["answers"])]
        assert known, name

        def leaks(rows, known=known):
            return sum(leaked(rows[i]["output"], rows[i]["answers"]) for i in known)

        assert leaks(together) <= leaks(alone), name
        kept = together[len(forget) :]
        closed = [i for i, r in enumerate(kept) if not any(g["fired"] for g in r["gate"].values())]
        assert len(closed) >= 0.8 * len(retain), name
        assert all(kept[i]["token_ids"] == van[len(forget) + i]["token_ids"] for i in closed), name


@pytest.mark.parametrize("precision", ["bfloat16", "int8-dynamic"])
def test_a_float32_pack_on_a_lower_precision_copy(model_dir, packs_dir, hf_model, precision):
    """The Harry Potter pack (calibrated in float32) on a bf16 copy of its model and on an int8
    dynamic-quantized one: the copy's fingerprint is the same model at another precision, so the
    pack is refused unless that is allowed; allowed, the copy forgets the facts of the forget test
    prompts that it knows, and retain prompts whose gate stays closed are bit-identical to the
    copy's own vanilla output. Forget and retain prompts go in separate batches: int8 dynamic
    quantization takes one activation scale per batch, so a fired row changes its batch-mates'
    numbers (README, Limits)."""
    model, tok = load_model(model_dir, precision)
    fp = hf_fingerprint(model)
    assert fp.precision == precision and fp.mismatch(hf_fingerprint(hf_model[0])) == []
    with pytest.raises(PackError, match=f"in float32; this copy of it runs in {precision}"):
        ConceptPack.from_pretrained(packs_dir / "harry-potter", fp)
    pack = ConceptPack.from_pretrained(packs_dir / "harry-potter", fp, allow_precision_change=True)
    d = EXAMPLES / "harry_potter"
    forget, retain = read_prompts(d / "forget_test.jsonl"), read_prompts(d / "retain_test.jsonl")[:12]
    van = hf_generate(model, tok, forget, [], max_tokens=24, progress=False)
    out = hf_generate(model, tok, forget, [pack], max_tokens=24, progress=False)
    known = [i for i, r in enumerate(van) if leaked(r["output"], r["answers"])]
    # the copy still knows some of the concept (int8 dynamic quantization costs this small model
    # most of its facts: 3 of these 20 against 18 in float32)
    assert len(known) >= (10 if precision == "bfloat16" else 2)
    assert [i for i in known if leaked(out[i]["output"], out[i]["answers"])] == []
    van = hf_generate(model, tok, retain, [], max_tokens=24, progress=False)
    out = hf_generate(model, tok, retain, [pack], max_tokens=24, progress=False)
    assert not any(g["fired"] for r in out for g in r["gate"].values())
    assert [r["token_ids"] for r in out] == [r["token_ids"] for r in van]
