"""Time spent inside guardit's vLLM code, as a share of the model forward time, in one process.

End-to-end tokens/s ratios on a shared 2-core CPU move by ±15 % between identical runs, which
hides a few-percent overhead. This benchmark measures the overhead directly: the engine runs in
this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and every piece of guardit code that runs per
step (the request map before the forward, the gate and rotation hooks, the bookkeeping after it)
is wrapped with a timer. overhead = guardit time / (forward time − guardit time), i.e. the slowdown
of the forward pass; tokens/s with the plugin ≈ 1 / (1 + overhead) of vanilla at most. The text
gate's encoder pass (once per new request, in the scheduler before its prefill,
:mod:`integrations.vllm.admission`) is reported apart as ``text_gate``.

The engine admits ``max(--batches)`` requests at once (``max_num_seqs``), so ``--batches 1 8 32 256``
measures the per-step host work up to vLLM's default batch of 256 sequences.

Usage: python benchmarks/plugin_overhead.py [--batches 1 8 32 256] [--tokens 32] [--packs 1 100] [--compiled]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_prompts, calibrated_pack, machine, save, synthetic_packs


class Timer:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.parts = {"begin": 0.0, "text_gate": 0.0, "hooks": 0.0, "end": 0.0}
        self.forward = 0.0
        self.steps = 0
        self.decode_host = 0.0  # begin and end of the decode steps (every request past its prompt)
        self.decode_steps = 0
        self.decoding = False

    @property
    def guardit(self) -> float:
        return sum(self.parts.values())

    def wrap(self, fn, part: str | None):
        def timed(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                took = time.perf_counter() - start
                if part is None:
                    self.forward += took
                else:
                    self.parts[part] += took
                if part in ("begin", "end") and self.decoding:
                    self.decode_host += took

        return timed

    def wrap_begin(self, fn):
        """``begin``, timed, noting whether the step decodes only (host work per decode step)."""
        from integrations.vllm.patch import prompt_pending

        timed = self.wrap(fn, "begin")

        def begin(runner, *a, **kw):
            self.decoding = not prompt_pending(runner.input_batch).any()
            self.decode_steps += self.decoding
            return timed(runner, *a, **kw)

        return begin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--packs", type=int, default=1, help="packs loaded (1 or more; extra ones are synthetic)")
    ap.add_argument("--compiled", action="store_true", help="vLLM's compiled mode instead of eager")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

    from guardit.model_prep import prepare_model

    model_dir = Path(args.model) if args.model else prepare_model()
    hp = calibrated_pack(model_dir)
    dirs = [hp, *synthetic_packs(hp, args.packs - 1)] if args.packs > 1 else [hp]

    from integrations.vllm import patch

    timer = Timer()
    state = patch.STATE
    state.begin = timer.wrap_begin(state.begin)
    state.end = timer.wrap(state.end, "end")
    state.layer = timer.wrap(state.layer, "hooks")  # the op's implementation, per layer
    from integrations.vllm.admission import Admission

    Admission.admit = timer.wrap(Admission.admit, "text_gate")  # the encoder, in the scheduler

    from vllm import SamplingParams

    from calibration.capture import encode_chat
    from guardit.vllm_generation import make_llm
    from steering.pack import load_packs
    from steering.text_gate import load_encoder

    llm = make_llm(
        model_dir,
        dirs,
        enforce_eager=not args.compiled,
        enable_prefix_caching=False,
        max_num_seqs=max(args.batches),
    )
    runner_cls = __import__("vllm.v1.worker.gpu_model_runner", fromlist=["GPUModelRunner"]).GPUModelRunner
    patched_forward = runner_cls._model_forward

    def counted_forward(self, *a, **kw):
        timer.steps += 1
        return patched_forward(self, *a, **kw)

    runner_cls._model_forward = timer.wrap(counted_forward, None)
    ids = encode_chat(llm.get_tokenizer(), bench_prompts(max(args.batches)))
    text = load_packs([hp])[0].meta.gate.text
    assert text is not None
    encoder = load_encoder(text.encoder)  # the one the engine's scheduler loaded (one per process)
    rows = []
    for b in args.batches:
        for mode in ("no_policy", "closed", "open"):
            extra = (
                None
                if mode == "no_policy"
                else {"guardit_packs": "harry-potter", **({"guardit_force": True} if mode == "open" else {})}
            )
            sp = SamplingParams(
                temperature=0.0, max_tokens=args.tokens, min_tokens=args.tokens, ignore_eos=True, extra_args=extra
            )
            llm.generate([{"prompt_token_ids": x} for x in ids[:b]], sp, use_tqdm=False)  # warm-up
            encoder.cache.clear()  # the text gate on texts it has not seen, as most requests are
            timer.reset()
            llm.generate([{"prompt_token_ids": x} for x in ids[:b]], sp, use_tqdm=False)
            base = timer.forward - (timer.guardit - timer.parts["text_gate"])  # the scheduler's part is outside
            rows.append(
                {
                    "packs_loaded": args.packs,
                    "batch": b,
                    "mode": mode,
                    "steps": timer.steps,
                    "forward_ms_per_step": round(1e3 * timer.forward / timer.steps, 2),
                    "guardit_ms_per_step": round(1e3 * timer.guardit / timer.steps, 3),
                    **{f"{k}_ms": round(1e3 * v / timer.steps, 3) for k, v in timer.parts.items()},
                    "decode_host_ms": round(1e3 * timer.decode_host / max(timer.decode_steps, 1), 3),
                    "overhead": round(timer.guardit / base, 4),
                    # the scheduler's encoder pass runs before the step's forward, on the same cores
                    "est_throughput_ratio": round(base / (timer.forward + timer.parts["text_gate"]), 4),
                }
            )
            print(rows[-1], flush=True)
    name = f"plugin_overhead_{args.packs}" + ("_compiled" if args.compiled else "")
    save(name, {"machine": machine(), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
