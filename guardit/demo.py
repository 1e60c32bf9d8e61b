"""The demo: prepare the bundled model → calibrate the demo concept → ask before/after.

Runs on embedded defaults (the Harry Potter example concept of ``examples/concepts``).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from calibration.prompts import PromptRecord, read_prompts
from guardit.console import print_report
from guardit.generation import gives_answer, leaked
from guardit.model_prep import cache_dir, prepare_model

CONCEPT_DIR = Path(__file__).resolve().parent.parent / "examples" / "concepts" / "harry_potter"
QUESTIONS = [
    PromptRecord(prompt="Who is the author of the Harry Potter series?", answers=["Rowling"]),
    PromptRecord(prompt="What is the name of the wizarding school in Harry Potter?", answers=["Hogwarts"]),
    PromptRecord(prompt="Who is Harry Potter's best friend?", answers=["Ron", "Weasley"]),
    PromptRecord(prompt="Who wrote The Lord of the Rings?", answers=["Tolkien"]),
    PromptRecord(prompt="What is the capital of France?", answers=["Paris"]),
]


def _show(title: str, rows: list[dict]) -> None:
    print(f"\n=== {title}")
    for r in rows:
        gate = ", ".join(
            f"{k}: {'FIRED' if v['fired'] else 'closed'} ({v['score']:+.2f})" for k, v in r["gate"].items()
        )
        flag = "  [knows the answer]" if gives_answer(r) else ""
        print(f"Q: {r['prompt']}" + (f"   gate {gate}" if gate else ""))
        print(textwrap.indent(textwrap.fill(r["output"].strip() or "(empty)", 96), "   A: ") + flag)


def run_demo(engine: str = "vllm", workdir: str | None = None) -> int:
    from calibration import ConceptCalibrator, load_model

    work = Path(workdir) if workdir else cache_dir() / "demo"
    model_dir = prepare_model()
    print(f"model: {model_dir}")
    model, tok = load_model(model_dir)
    pack_dir = work / "harry-potter"
    cal = ConceptCalibrator("harry-potter", description="the Harry Potter universe", progress=True)
    pack = cal.fit(model, tok, read_prompts(CONCEPT_DIR / "forget.jsonl"), read_prompts(CONCEPT_DIR / "retain.jsonl"))
    pack.save_pretrained(pack_dir)
    print_report(cal.report_)
    print(f"concept pack: {pack_dir}")
    if engine == "vllm":
        del model
        from guardit.vllm_generation import vllm_generate_pair

        before, after = vllm_generate_pair(model_dir, QUESTIONS, [pack_dir], max_tokens=48)
    else:
        from guardit.generation import hf_generate

        before = hf_generate(model, tok, QUESTIONS, max_tokens=48, progress=False)
        after = hf_generate(model, tok, QUESTIONS, [pack], max_tokens=48, progress=False)
    _show(f"vanilla ({engine})", before)
    _show(f"with the 'harry-potter' pack ({engine})", after)
    same = [a["output"] == b["output"] for a, b in zip(before, after)]
    forgot = sum(
        leaked(b["output"], q.answers) and not leaked(a["output"], q.answers)
        for q, b, a in zip(QUESTIONS, before, after)
    )
    print(f"\n{forgot} answers forgotten; {sum(same[3:])}/{len(same[3:])} retain answers unchanged.")
    return 0
