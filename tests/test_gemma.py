"""The second architecture, Gemma 3 270M, end to end: prepared from PyPI, calibrated through the
CLI, applied on HF and on vLLM, and on vLLM split over two tensor-parallel workers (its 4 query
heads divide by 2; SmolLM2's 9 do not), where every gate decision and every token must equal the
single-worker engine's. Its pack's text gate uses the multilingual encoder (conftest's
gemma_launched), so that encoder is served end to end on both engines too."""

from __future__ import annotations

import json

import pytest
from conftest import EXAMPLES
from transformers import AutoConfig, AutoTokenizer

from calibration import hf_fingerprint, load_model, read_prompts
from calibration.capture import chat_format, encode_chat
from guardit.generation import gives_answer, hf_generate
from steering.errors import PackError
from steering.pack import load_packs
from steering.text_gate import USE_MULTILINGUAL

HP = EXAMPLES / "harry_potter"
N = 8  # prompts of each split: enough to see forgetting and retention, cheap enough for CI


def _records():
    return read_prompts(HP / "forget_test.jsonl")[:N] + read_prompts(HP / "retain_test.jsonl")[:N]


def _fired(row: dict) -> bool:
    return any(g["fired"] for g in row["gate"].values())


def _check_forgets_and_retains(vanilla: list[dict], steered: list[dict]) -> None:
    """Forget rows: the model knows most facts and gives none of them with the pack; retain rows:
    the gate stays closed and the tokens are vanilla's, bit for bit."""
    forget, retain = range(N), range(N, 2 * N)
    knew = [i for i in forget if gives_answer(vanilla[i])]
    assert len(knew) >= N // 2, [vanilla[i]["output"] for i in forget]
    assert not [steered[i]["output"] for i in knew if gives_answer(steered[i])]
    assert all(_fired(steered[i]) for i in forget)
    closed = [i for i in retain if not _fired(steered[i])]
    assert len(closed) >= N - 1
    assert all(steered[i]["token_ids"] == vanilla[i]["token_ids"] for i in closed)


def test_prepared_gemma_folder_has_what_differs_from_llama(gemma_dir):
    """A Gemma 3 text model with its own layout; a pretrained model, so its chat template is the
    question/answer form it follows, with the <bos> Gemma needs (its GGUF tokenizer adds none)."""
    config = AutoConfig.from_pretrained(gemma_dir)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("gemma3_text", 18, 640)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 1)
    tok = AutoTokenizer.from_pretrained(gemma_dir)
    assert chat_format(tok, "Who painted the Mona Lisa?") == "<bos>Question: Who painted the Mona Lisa?\nAnswer:"
    ids = encode_chat(tok, ["Hi"])[0]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    turns = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert text == "<bos>Question: What is 2+2?\nAnswer: 4\nQuestion: And 3+3?\nAnswer:"


def test_gemma_pack_forgets_on_hf_and_is_bound_to_gemma(gemma_dir, gemma_pack, hf_model):
    model, tok = load_model(gemma_dir)
    fp = hf_fingerprint(model)
    (pack,) = load_packs([gemma_pack], fp)
    assert pack.meta.model.model_type == "gemma3_text" and pack.meta.model.num_layers == 18
    assert all(0 <= layer < 18 for layer in pack.meta.layers)
    assert pack.meta.gate.text.encoder == USE_MULTILINGUAL  # the multilingual encoder, served on HF here
    with pytest.raises(PackError, match="was calibrated on model 'gemma-3-270m'"):
        pack.check_model(hf_fingerprint(hf_model[0]))  # the bundled SmolLM2
    records = _records()
    vanilla = hf_generate(model, tok, records, max_tokens=40, progress=False)
    steered = hf_generate(model, tok, records, [pack], max_tokens=40, progress=False)
    _check_forgets_and_retains(vanilla, steered)


@pytest.fixture(scope="module")
def gemma_tp_runs(gemma_dir, gemma_pack, tmp_path_factory) -> dict[int, dict]:
    """Vanilla and steered outputs of a vLLM engine with one worker and with two tensor-parallel
    workers (vLLM's own multiprocessing executor), and the gate events each engine wrote."""
    from guardit.vllm_generation import engine_generate, make_llm, shutdown

    runs = {}
    for tp in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"gemma-tp{tp}")
        # A fixed 1 GiB KV cache per worker, whatever else holds memory (the session's SmolLM2
        # engine may still be up), instead of a fraction of the machine.
        llm = make_llm(gemma_dir, [gemma_pack], run_dir=run_dir, tensor_parallel_size=tp, kv_cache_memory_bytes=1 << 30)
        try:
            vanilla = engine_generate(llm, _records(), (), max_tokens=40)
            steered = engine_generate(llm, _records(), ["harry-potter"], max_tokens=40)
        finally:
            shutdown(llm)
        events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
        runs[tp] = {"vanilla": vanilla, "steered": steered, "events": events}
    return runs


def test_gemma_on_vllm_forgets_and_tensor_parallel_equals_one_worker(gemma_tp_runs):
    one, two = gemma_tp_runs[1], gemma_tp_runs[2]
    _check_forgets_and_retains(one["vanilla"], one["steered"])
    for kind in ("vanilla", "steered"):
        assert [r["token_ids"] for r in two[kind]] == [r["token_ids"] for r in one[kind]], kind
    # The same decisions, and scores equal to the events' rounding: both workers steered (a worker
    # without the packs would have left its half of every layer unrotated and changed the tokens).
    for a, b in zip(one["steered"], two["steered"]):
        assert {p: g["fired"] for p, g in a["gate"].items()} == {p: g["fired"] for p, g in b["gate"].items()}
        for p, g in a["gate"].items():
            assert b["gate"][p]["score"] == pytest.approx(g["score"], abs=1e-4)
    # The event log has the same decisions, once each: written by rank 0 only.
    assert one["events"] and _decisions(two["events"]) == _decisions(one["events"])


def _decisions(events: list[dict]) -> list[tuple]:
    """(prompt index, fired packs) of each event; a request id is "<random tag>-<index>"."""
    return sorted((e["rid"].split("-", 1)[1], tuple(e["fired"])) for e in events)
