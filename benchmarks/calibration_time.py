"""Calibration wall time for one concept: ``guardit calibrate`` end to end (process start, model
load, capture, gate, pack written), and the ``ConceptCalibrator.fit`` step alone, per example concept.

The CLI keeps the model's answers to the built-in prompts (the same for every concept) in its cache
between processes: ``cli_cold_seconds`` is a calibration that has to generate them (an empty answer
cache), ``cli_seconds`` one that finds them there. ``fit_seconds`` is in one process, whose first
fit generates them and later fits reuse them.

Usage: python benchmarks/calibration_time.py [--concepts harry_potter einstein lord_of_the_rings] [--reps 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EXAMPLES, calibrate_command, machine, median, save, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--concepts", nargs="+", default=["harry_potter", "einstein", "lord_of_the_rings"])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()

    from calibration import ConceptCalibrator, load_model, read_prompts
    from guardit.model_prep import prepare_model

    model_dir = Path(args.model) if args.model else prepare_model()
    model, tok = load_model(model_dir)
    rows = []
    for concept in args.concepts:
        d = EXAMPLES / concept
        forget, retain = read_prompts(d / "forget.jsonl"), read_prompts(d / "retain.jsonl")
        cli, cold, fit = [], [], []
        for _ in range(args.reps):
            with tempfile.TemporaryDirectory() as tmp:
                command = calibrate_command(model_dir, concept, Path(tmp) / "pack")
                # A cache of its own: empty for the first run, holding what the first kept for the second.
                env = {**os.environ, "GUARDIT_CACHE": str(Path(tmp) / "cache")}
                cold.append(seconds(subprocess.run, command, check=True, capture_output=True, env=env))
                cli.append(seconds(subprocess.run, command, check=True, capture_output=True, env=env))
            calibrator = ConceptCalibrator(concept.replace("_", "-"), progress=False)
            fit.append(seconds(calibrator.fit, model, tok, forget, retain))
        rows.append(
            {
                "concept": concept,
                "forget": len(forget),
                "retain": len(retain),
                "cli_cold_seconds": round(median(cold), 1),
                "cli_seconds": round(median(cli), 1),
                "fit_seconds": round(median(fit), 1),
            }
        )
        print(rows[-1], flush=True)
    save("calibration_time", {"machine": machine(), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
