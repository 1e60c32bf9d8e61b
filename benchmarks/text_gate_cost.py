"""What the text gate costs a request: the sentence encoder's time for a batch of 1, 8 and 32
request texts, against the prefill of the same prompts on vanilla vLLM CPU (eager, float32,
plugin off, one output token), both measured in this run; reported as milliseconds and ratio.
And what the answer check costs a finished request: the same encoder on the request texts with
the model's greedy answers (steering.text_gate.answer_text, --answer-tokens new tokens), against
generating those answers on the same engine. Every encoder in steering.text_gate.ENCODERS is
timed in the same run, interleaved with the engine, so their ratios share the machine's state.
The encoder keeps the embeddings of windows it has seen (requests sharing a system prompt); each
timing starts with that store emptied, so every window is embedded.

Usage: python benchmarks/text_gate_cost.py [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EXAMPLES, machine, median, save, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--answer-tokens", type=int, default=40)
    args = ap.parse_args()
    os.environ["VLLM_PLUGINS"] = "lora_filesystem_resolver"  # vanilla vLLM: guardit's plugin off
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    from calibration import read_prompts
    from calibration.capture import encode_chat
    from guardit.model_prep import prepare_model
    from steering.text_gate import ENCODERS, answer_text, load_encoder, request_text

    model_dir = prepare_model()
    prompts = [
        r.prompt
        for c in ("harry_potter", "einstein")
        for s in ("forget_test", "retain_test")
        for r in read_prompts(EXAMPLES / c / f"{s}.jsonl")
    ]
    llm = LLM(
        model=str(model_dir),
        enforce_eager=True,
        dtype="float32",
        max_model_len=1024,
        seed=0,
        enable_prefix_caching=False,
    )
    tok = llm.get_tokenizer()
    ids = encode_chat(tok, prompts)
    texts = [request_text(tok, i, 0) for i in ids]
    encoders = [load_encoder(name) for name in ENCODERS]
    for enc in encoders:
        enc.window_embeddings(texts[:4])  # warm-up
    params = SamplingParams(temperature=0.0, max_tokens=1)
    answer_params = SamplingParams(temperature=0.0, max_tokens=args.answer_tokens)
    llm.generate([{"prompt_token_ids": x} for x in ids[:4]], params, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], answer_params, use_tqdm=False)
    checked = [answer_text(t, o.outputs[0].text) for t, o in zip(texts, outs)]
    rows = []
    for b in args.batches:
        batch_ids, batch_texts, batch_checked = (ids * 4)[:b], (texts * 4)[:b], (checked * 4)[:b]
        t_enc: dict[str, list[float]] = {e.name: [] for e in encoders}
        t_ans: dict[str, list[float]] = {e.name: [] for e in encoders}
        t_pre, t_gen = [], []
        requests = [{"prompt_token_ids": x} for x in batch_ids]
        for _ in range(args.reps):
            for enc in encoders:
                enc.cache.clear()
                t_enc[enc.name].append(seconds(enc.window_embeddings, batch_texts))
            t_pre.append(seconds(llm.generate, requests, params, use_tqdm=False))
            for enc in encoders:
                enc.cache.clear()
                t_ans[enc.name].append(seconds(enc.window_embeddings, batch_checked))
            t_gen.append(seconds(llm.generate, requests, answer_params, use_tqdm=False))
        p, g = median(t_pre) * 1000, median(t_gen) * 1000
        for enc in encoders:
            e, a = median(t_enc[enc.name]) * 1000, median(t_ans[enc.name]) * 1000
            rows.append(
                {
                    "encoder": enc.name,
                    "batch": b,
                    "prompt_tokens_mean": round(sum(map(len, batch_ids)) / b, 1),
                    "encoder_ms": round(e, 1),
                    "vllm_prefill_ms": round(p, 1),
                    "encoder_over_prefill": round(e / p, 3),
                    "answer_check_ms": round(a, 1),
                    "vllm_generation_ms": round(g, 1),
                    "answer_check_over_generation": round(a / g, 3),
                }
            )
            print(rows[-1], flush=True)
    save("text_gate_cost", {"machine": machine(), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
