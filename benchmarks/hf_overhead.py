"""HF transformers generate: vanilla vs ``integrations.hf.steer``, measured in one process.

Modes (same prompts, interleaved per repetition): ``vanilla``; ``closed`` (the Harry Potter pack,
retain-side prompts: the gate stays closed); ``open`` (the pack forced on: every row rotated);
``closed-100`` / ``open-100`` (the pack plus 99 synthetic packs, all 100 gates scored on every row;
in ``open-100`` the Harry Potter pack is forced on). Prefill = a 1-token generation; decode = the
rest of a T-token generation.

Two measures: tokens/s ratios (end to end, noisy on a shared CPU), and the time spent inside
guardit's hooks as a share of the rest of the generate call (``overhead``), from timers around the
hooks in the same runs.

Usage: python benchmarks/hf_overhead.py [--reps 3] [--batches 1 8 32] [--tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import bench_prompts, calibrated_pack, machine, median, save, synthetic_packs

MODES = ("vanilla", "closed", "open", "closed-100", "open-100")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()

    from calibration import load_model
    from calibration.capture import encode_chat, pad_batch
    from guardit.model_prep import prepare_model
    from integrations.hf import steer
    from steering.pack import load_packs

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_dir = Path(args.model) if args.model else prepare_model()
    hp = calibrated_pack(model_dir)
    model, tok = load_model(model_dir)
    one = load_packs([hp])
    hundred = load_packs([hp, *synthetic_packs(hp, 99)])
    ids = encode_chat(tok, bench_prompts(max(args.batches)))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    from integrations.hf.session import SteerSession

    spent = [0.0, 0.0]  # seconds in hooks during the current run; overhead of the last run

    def timed(fn):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    SteerSession._pre_forward = timed(SteerSession._pre_forward)
    original_hook = SteerSession._layer_hook
    SteerSession._layer_hook = lambda self, index: timed(original_hook(self, index))

    def ctx(mode: str, b: int):
        if mode == "vanilla":
            return nullcontext()
        if mode.endswith("-100"):
            rows = [{p.id: (None, mode.startswith("open") and p.id == "harry-potter") for p in hundred}] * b
            return steer(model, hundred, rows=rows)
        return steer(model, one, force=mode.startswith("open"))

    @torch.no_grad()
    def run(mode: str, b: int, t: int) -> float:
        inp, mask = pad_batch(ids[:b], pad)
        spent[0] = 0.0
        start = time.perf_counter()
        with ctx(mode, b):
            model.generate(
                input_ids=inp,
                attention_mask=mask,
                max_new_tokens=t,
                min_new_tokens=t,
                do_sample=False,
                pad_token_id=pad,
            )
        total = time.perf_counter() - start
        spent[1] = spent[0] / max(total - spent[0], 1e-9)  # hook time over the rest
        return total

    for mode in MODES:
        run(mode, 2, 2)  # warm-up
    samples: dict[str, list[dict]] = {f"{m}@{b}": [] for m in MODES for b in args.batches}
    for rep in range(args.reps):
        print(f"[rep {rep + 1}/{args.reps}]", file=sys.stderr, flush=True)
        for b in args.batches:
            n_prompt = sum(len(x) for x in ids[:b])
            for mode in MODES:
                t1 = run(mode, b, 1)
                tt = run(mode, b, args.tokens)
                samples[f"{mode}@{b}"].append(
                    {
                        "prefill_tps": n_prompt / t1,
                        "decode_tps": b * (args.tokens - 1) / max(tt - t1, 1e-9),
                        "overhead": spent[1],
                    }
                )
    rows = []
    for b in args.batches:
        for what in ("prefill_tps", "decode_tps"):
            med = {m: median([s[what] for s in samples[f"{m}@{b}"]]) for m in MODES}
            row = {"batch": b, "metric": what, "vanilla": round(med["vanilla"], 1)}
            for m in MODES[1:]:
                row[f"{m}/vanilla"] = round(med[m] / med["vanilla"], 3)
            rows.append(row)
        over = {m: median([s["overhead"] for s in samples[f"{m}@{b}"]]) for m in MODES[1:]}
        rows.append(
            {
                "batch": b,
                "metric": "hook time / rest of generate",
                "vanilla": "—",
                **{f"{m}/vanilla": f"{over[m]:.2%}" for m in MODES[1:]},
            }
        )
    save("hf_overhead", {"machine": machine(), "settings": vars(args), "rows": rows, "samples": samples})


if __name__ == "__main__":
    main()
