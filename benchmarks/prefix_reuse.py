"""Prefix reuse for requests that name packs (#21 item 3): prefill on a long shared system prompt,
with prefix caching on.

One engine with the Harry Potter pack (its default "hybrid" gate) and the same pack serving its
"encoder" gate, prefix caching on. Every request carries the same system prompt of about
``--system-tokens`` tokens and its own short question (retain-side questions: the gates stay
closed). Before the timed rounds one request with the system prompt fills the cache. Then, in
alternating rounds, one batch per mode generates one token per request (prefill only):

- no packs (vanilla);
- the hybrid pack: its text gate stays closed and its probe's decision is deferred to the end of
  the prompt, so the request shares blocks with requests naming the same pack (the first of them
  fills the cache before the timed rounds);
- the encoder pack: its gate closes before prefill (in the scheduler), so the request reads
  vanilla's cached blocks;
- the pack forced: its rotation is fixed before prefill, so requests rotated the same way share
  blocks (the first of them fills the cache: it runs before the timed rounds too);
- the pack's probe alone (``probe`` gate kind) with its threshold at -1e6, on asks about the
  concept: the deferred probe reads the cached system prompt, fires on every request, and the
  request is recomputed from its first token under a unique salt (what a fired in-forward gate
  costs; at its calibrated threshold the probe alone does not fire behind a system prompt this
  long, FINDINGS "Prefix reuse for the default hybrid pack").

Reported per mode: prompt tokens per second, the share of prompt tokens vLLM served from its
cache (``RequestOutput.num_cached_tokens``; a recomputed request reports its first pass's), and
the share of requests whose gate fired (from the engine's events).

Usage: python benchmarks/prefix_reuse.py [--system-tokens 600] [--batch 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EXAMPLES, bench_prompts, calibrated_pack, gate_kind_pack, machine, median, save

SYSTEM = (
    "You are the support assistant of a public library. Answer politely and briefly, cite the "
    "library's rules when they apply, never invent opening hours, and send questions about "
    "accounts, fines or personal data to the front desk. "
)


def open_probe(probe_dir: Path) -> Path:
    """The probe-gated pack with its threshold at -1e6 (it fires on every prompt), saved (cached)
    under the id ``<id>-open``."""
    from dataclasses import replace

    from common import CACHE

    from steering.pack import ConceptPack

    base = ConceptPack.from_pretrained(probe_dir)
    out = CACHE / "packs" / f"{base.id}-open"
    if not (out / "pack.json").is_file():
        gate = base.meta.gate.model_copy(update={"threshold": -1e6})
        meta = base.meta.model_copy(update={"concept_id": f"{base.id}-open", "gate": gate})
        replace(base, meta=meta).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--system-tokens", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from guardit.model_prep import prepare_model

    model_dir = Path(args.model) if args.model else prepare_model()
    hp = calibrated_pack(model_dir)
    encoder = gate_kind_pack(hp, "encoder")
    probe = open_probe(gate_kind_pack(hp, "probe"))

    from vllm import SamplingParams

    from guardit.vllm_generation import make_llm, shutdown
    from integrations.vllm import config as vcfg

    llm = make_llm(model_dir, [hp, encoder, probe], enable_prefix_caching=True, max_model_len=2048)
    tok = llm.get_tokenizer()
    unit = len(tok(SYSTEM)["input_ids"])
    system = SYSTEM * max(1, round(args.system_tokens / unit))

    def ids(question: str) -> list[int]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    hybrid, fired = "hybrid pack, closed (probe decision deferred)", "probe pack on asks (fired: recomputed)"
    forced = "pack forced (rotation fixed before prefill)"
    extra = {
        "vanilla": None,
        hybrid: {"guardit_packs": "harry-potter"},
        "encoder pack (gate closed before prefill)": {"guardit_packs": "harry-potter-encoder"},
        forced: {"guardit_packs": "harry-potter", "guardit_force": True},
        fired: {"guardit_packs": "harry-potter-probe-open"},
    }
    # Distinct, so that no two requests share more than the system prompt.
    questions = bench_prompts(3 + args.rounds * len(extra) * args.batch)
    asks = [
        json.loads(line)["prompt"]
        for f in ("forget.jsonl", "forget_test.jsonl")
        for line in (EXAMPLES / "harry_potter" / f).read_text().splitlines()
        if line.strip()
    ]
    events = vcfg.events_path()

    def run(mode: str, qs: list[str]) -> tuple[float, int, int, int]:
        sp = SamplingParams(temperature=0.0, max_tokens=1, extra_args=extra[mode])
        prompts = [{"prompt_token_ids": ids(q)} for q in qs]
        offset = events.stat().st_size if events is not None and events.is_file() else 0
        start = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        took = time.perf_counter() - start
        logged = vcfg.read_events(events, offset)[0] if events is not None else []
        opened = sum(bool(e["fired"]) for e in logged)
        return (
            took,
            sum(len(p["prompt_token_ids"]) for p in prompts),
            sum(o.num_cached_tokens or 0 for o in outs),
            opened,
        )

    run("vanilla", questions[:1])  # the system prompt's blocks enter the cache
    run(forced, questions[1:2])  # and under the forced rotation
    run(hybrid, questions[2:3])  # and under the hybrid pack's deferred probe
    times: dict[str, list[tuple[float, int, int, int]]] = {m: [] for m in extra}
    k, a = 3, 0
    for _ in range(args.rounds):
        for mode in extra:
            if mode == fired:  # distinct asks (numbered, as the questions are)
                qs = [f"Request {a + i}: {asks[(a + i) % len(asks)]}" for i in range(args.batch)]
                a += args.batch
            else:
                qs = questions[k : k + args.batch]
                k += args.batch
            times[mode].append(run(mode, qs))
    shutdown(llm)
    rows = []
    for mode, rs in times.items():
        rows.append(
            {
                "mode": mode,
                "batch": args.batch,
                "prompt_tokens_per_request": round(sum(r[1] for r in rs) / (len(rs) * args.batch)),
                "prefill_tokens_per_s": round(median([r[1] / r[0] for r in rs]), 1),
                "cached_share": round(sum(r[2] for r in rs) / sum(r[1] for r in rs), 3),
                "seconds_per_batch": round(median([r[0] for r in rs]), 3),
                "fired_share": round(sum(r[3] for r in rs) / (len(rs) * args.batch), 3),
            }
        )
        print(rows[-1], flush=True)
    save("prefix_reuse", {"machine": machine(), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
