"""Preemption on the real vLLM engine: a request whose KV blocks vLLM takes back mid-answer is
recomputed from its prompt, and guardit must rotate it again exactly as before."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.model]
MAX_TOKENS = 80  # with a ~52-token prompt, every answer needs a second 128-token block


@pytest.fixture(scope="module")
def small_kv_engine(packs_dir, model_dir, text_variants, tmp_path_factory):
    """An eager engine with room for five 128-token KV blocks: five requests that each grow into a
    second block cannot all keep theirs, so vLLM preempts the latest ones (own module: it never
    runs beside test_vllm_engine's engine)."""
    from helpers import variant_pack

    from guardit.vllm_generation import make_llm, shutdown

    # The hybrid pack with a text gate and answer check that never fire and a probe that always does:
    # its rotation is decided inside the forward pass.
    probe = tmp_path_factory.mktemp("variants") / "hp-probe-open"
    never = {"threshold": 1e6, "answer": {"threshold": 1e6, "max_tokens": 40}}
    variant_pack(packs_dir / "harry-potter", probe, "hp-probe-open", threshold=-1e6, text=never)
    llm = make_llm(
        model_dir,
        [packs_dir / "harry-potter", text_variants / "hp-text-open", probe],
        run_dir=tmp_path_factory.mktemp("run"),
        num_gpu_blocks_override=5,
        max_model_len=256,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        enable_chunked_prefill=True,
        disable_log_stats=False,  # vLLM's metrics count the preemptions
    )
    yield llm
    shutdown(llm)


def test_a_preempted_request_is_rotated_again_when_recomputed(small_kv_engine):
    """Vanilla, a closed hybrid gate, and three rotations (forced, text gate fired before prefill, the
    hybrid's probe fired in the forward pass) in one batch that does not fit: vLLM preempts the last
    arrivals (the rotated ones) and recomputes them later. Every request gives exactly the tokens it
    gives alone, where nothing is preempted."""
    from vllm import SamplingParams

    llm = small_kv_engine
    assert llm.llm_engine.vllm_config.cache_config.block_size == 128
    tok = llm.get_tokenizer()
    tail = " Tell me everything you know about it in detail, please, with every name involved."
    rows = [
        ("Who wrote Pride and Prejudice?", None),
        ("What is the capital of France?", {"guardit_packs": "harry-potter"}),  # probe and text closed
        ("Who is Harry Potter's best friend?", {"guardit_packs": "harry-potter", "guardit_force": True}),
        ("What house is Hermione Granger in?", {"guardit_packs": "hp-text-open"}),
        ("Who is the headmaster of Hogwarts?", {"guardit_packs": "hp-probe-open"}),  # fires in the forward
    ]
    ids = []
    for question, _ in rows:
        text = tok.apply_chat_template([{"role": "user", "content": question + tail}], add_generation_prompt=True,
                                       tokenize=False)  # fmt: skip
        ids.append(tok(text, add_special_tokens=False)["input_ids"])
    assert all(len(i) < 128 < len(i) + MAX_TOKENS for i in ids)
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=e) for _, e in rows]

    def preemptions() -> int:
        return int(sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"))

    alone = []
    for i, p in zip(ids, params):
        (out,) = llm.generate([{"prompt_token_ids": i}], [p], use_tqdm=False)
        alone.append(list(out.outputs[0].token_ids))
    before = preemptions()
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], params, use_tqdm=False)
    assert preemptions() - before >= 2
    together = [list(o.outputs[0].token_ids) for o in outs]
    assert together == alone
    # The rotated answers are refusals, not the vanilla facts (so equality above means rotated twice).
    answers = [tok.decode(t).lower() for t in together]
    assert not any(name in a for a in answers[2:] for name in ("ron", "gryffindor", "dumbledore")), answers
