"""vLLM throughput: vanilla vs the guardit plugin, measured in one run.

Engines (each in its own process, one at a time; their order alternates between rounds):
- ``vanilla``: guardit's plugin disabled (``VLLM_PLUGINS`` allow-list without it);
- ``plugin-1``: the plugin with the Harry Potter pack loaded;
- ``plugin-100``: the same pack plus 99 synthetic packs (random planes and layers, gates that never fire).

Modes (same prompts in every mode, prefix caching off so every run does the same work):
- ``vanilla`` (vanilla engine), ``no_policy`` (plugin, requests name no pack),
- ``closed`` (requests name the pack; retain prompts, the gate stays closed),
- ``open`` (requests name the pack with ``guardit_force``: every token rotated at every steered layer).

For each batch size: prefill tokens/s = prompt tokens / time of a 1-token generation; decode tokens/s
= B·(T−1) / (time of a T-token generation − time of a 1-token generation), EOS ignored.
Ratios against vanilla: per round (the same round's vanilla engine), then their median and range.

``--compiled``: every engine runs in vLLM's default compiled mode, and a fourth engine,
``vanilla-eager`` (plugin off, enforce_eager), shows what eager mode itself costs.

Usage: python benchmarks/vllm_throughput.py [--rounds 3] [--reps 1] [--batches 1 8 32] [--tokens 32] [--compiled]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_prompts, calibrated_pack, machine, median, save, synthetic_packs

ENGINE_ARGS = dict(
    enforce_eager=True,
    dtype="float32",
    gpu_memory_utilization=0.5,
    max_model_len=1024,
    seed=0,
    enable_prefix_caching=False,
)
MODES = {
    "vanilla": ["vanilla"],
    "plugin-1": ["no_policy", "closed", "open"],
    "plugin-100": ["closed", "open"],
    "vanilla-eager": ["vanilla"],  # --compiled only
}


def worker(
    engine: str, model_dir: str, pack_dirs: list[str], batches: list[int], tokens: int, reps: int, compiled: bool
) -> dict:
    from vllm import SamplingParams

    from calibration.capture import encode_chat

    args = {**ENGINE_ARGS, "enforce_eager": engine == "vanilla-eager" or not compiled}
    if engine.startswith("vanilla"):
        os.environ["VLLM_PLUGINS"] = "lora_filesystem_resolver"  # an allow-list without guardit
        from vllm import LLM

        llm = LLM(model=model_dir, **args)
    else:
        from guardit.vllm_generation import make_llm

        llm = make_llm(model_dir, pack_dirs, **args)
    tok = llm.get_tokenizer()
    prompts = bench_prompts(max(batches))
    ids = encode_chat(tok, prompts)

    def extra(mode: str):
        if mode == "closed":
            return {"guardit_packs": "harry-potter"}
        if mode == "open":
            return {"guardit_packs": "harry-potter", "guardit_force": True}
        return None

    def run(mode: str, b: int, t: int) -> tuple[float, int]:
        sp = SamplingParams(temperature=0.0, max_tokens=t, min_tokens=t, ignore_eos=True, extra_args=extra(mode))
        batch = [{"prompt_token_ids": x} for x in ids[:b]]
        start = time.perf_counter()
        outs = llm.generate(batch, sp, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == t for o in outs)
        return elapsed, sum(len(x) for x in ids[:b])

    modes = MODES[engine]
    for mode in modes:  # warm-up
        run(mode, max(batches), 2)
    samples: dict[str, list[dict]] = {f"{m}@{b}": [] for m in modes for b in batches}
    for _ in range(reps):
        for b in batches:
            for mode in modes:  # interleaved, so drift hits every mode alike
                t1, n_prompt = run(mode, b, 1)
                tt, _ = run(mode, b, tokens)
                samples[f"{mode}@{b}"].append(
                    {"prefill_tps": n_prompt / t1, "decode_tps": b * (tokens - 1) / max(tt - t1, 1e-9)}
                )
    return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--compiled", action="store_true", help="compiled engines, against compiled vanilla")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--packs", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = worker(args.worker, args.model, args.packs, args.batches, args.tokens, args.reps, args.compiled)
        print("RESULT " + json.dumps(res), flush=True)
        return

    from guardit.model_prep import prepare_model

    model_dir = Path(args.model) if args.model else prepare_model()
    hp = calibrated_pack(model_dir)
    packs = {"vanilla": [], "plugin-1": [hp], "plugin-100": [hp, *synthetic_packs(hp, 99)], "vanilla-eager": []}
    samples: dict[str, list[dict]] = {}
    order = [e for e in MODES if args.compiled or e != "vanilla-eager"]
    for r in range(args.rounds):
        for engine in order if r % 2 == 0 else order[::-1]:
            print(f"[round {r + 1}/{args.rounds}] {engine} ...", file=sys.stderr, flush=True)
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                engine,
                "--model",
                str(model_dir),
                "--reps",
                str(args.reps),
                "--tokens",
                str(args.tokens),
                "--batches",
                *map(str, args.batches),
                "--packs",
                *map(str, packs[engine]),
                *(["--compiled"] if args.compiled else []),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
                raise SystemExit(f"worker {engine} failed (exit {proc.returncode})")
            for key, vals in json.loads(line[7:]).items():
                samples.setdefault(f"{engine}:{key}", []).extend(vals)

    def ratio(a: tuple[str, str], b: tuple[str, str], batch: int, what: str) -> str:
        """median [min–max] over rounds of a's value / b's value in the same round"""
        xs = [s[what] for s in samples[f"{a[0]}:{a[1]}@{batch}"]]
        ys = [s[what] for s in samples[f"{b[0]}:{b[1]}@{batch}"]]
        rs = [x / y for x, y in zip(xs, ys)]
        return f"{median(rs):.3f} [{min(rs):.2f}–{max(rs):.2f}]"

    van = ("vanilla", "vanilla")
    rows = []
    for b in args.batches:
        for what in ("prefill_tps", "decode_tps"):
            tps = median([s[what] for s in samples[f"vanilla:vanilla@{b}"]])
            row = {"batch": b, "metric": what, "vanilla": round(tps, 1)}
            if args.compiled:
                row["vanilla eager/vanilla"] = ratio(("vanilla-eager", "vanilla"), van, b, what)
            for mode in ("no_policy", "closed", "open"):
                row[f"{mode}/vanilla"] = ratio(("plugin-1", mode), van, b, what)
            for mode in ("closed", "open"):
                row[f"{mode} 100 packs/vanilla"] = ratio(("plugin-100", mode), van, b, what)
            rows.append(row)
    result = {
        "machine": machine(),
        "settings": {**vars(args), "engine_args": ENGINE_ARGS},
        "rows": rows,
        "samples": samples,
    }
    save("vllm_throughput_compiled" if args.compiled else "vllm_throughput", result)


if __name__ == "__main__":
    main()
