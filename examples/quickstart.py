"""Calibrate the Einstein concept on the bundled model and ask before/after (HF transformers).

Run inside the project's environment: python examples/quickstart.py
"""

from pathlib import Path

from calibration import ConceptCalibrator, load_model, read_prompts
from calibration.prompts import PromptRecord
from guardit.generation import hf_generate
from guardit.model_prep import prepare_model

HERE = Path(__file__).parent / "concepts" / "einstein"

if __name__ == "__main__":
    model, tok = load_model(prepare_model())
    calibrator = ConceptCalibrator("einstein", alpha=0.05)
    pack = calibrator.fit(model, tok, read_prompts(HERE / "forget.jsonl"), read_prompts(HERE / "retain.jsonl"))
    print("gate:", {k: v for k, v in calibrator.report_["gate"].items() if k != "candidates"})
    questions = [
        PromptRecord(prompt=q)
        for q in (
            "Who developed the theory of relativity?",  # about the concept
            "Who discovered gravity?",  # nearby, must keep working
        )
    ]
    before = hf_generate(model, tok, questions, max_tokens=40, progress=False)
    after = hf_generate(model, tok, questions, [pack], max_tokens=40, progress=False)
    for b, a in zip(before, after):
        print(f"\nQ: {b['prompt']}\n  vanilla: {b['output']}\n  guardit: {a['output']}   gate={a['gate']}")
