"""Render the measured tables of BENCHMARKS.md from benchmarks/results/*.json (no hand-copied numbers).

Usage: python benchmarks/report.py > benchmarks/results/tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _table(rows: list[dict]) -> list[str]:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return out


def main() -> None:
    lines: list[str] = []
    for name, title in (
        ("plugin_overhead_1", "vLLM: time in guardit code per engine step, 1 pack loaded"),
        ("plugin_overhead_100", "vLLM: time in guardit code per engine step, 100 packs loaded"),
        ("plugin_overhead_1_compiled", "vLLM compiled: time in guardit code per engine step, 1 pack loaded"),
        ("plugin_overhead_100_compiled", "vLLM compiled: time in guardit code per engine step, 100 packs loaded"),
        ("vllm_throughput", "vLLM end-to-end tokens/s, eager (ratios to eager vanilla vLLM, same run)"),
        (
            "vllm_throughput_compiled",
            "vLLM end-to-end tokens/s, compiled (ratios to compiled vanilla vLLM, same round: median [min–max] of 3)",
        ),
        ("prefix_reuse", "vLLM prefix caching on a shared system prompt: vanilla against requests naming a pack"),
        ("hf_overhead", "HF generate (ratios to vanilla HF, same process)"),
        ("calibration_time", "Calibration wall time"),
    ):
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        m = data["machine"]
        settings = {k: v for k, v in data["settings"].items() if k not in ("worker", "packs", "model")}
        lines += [
            f"### {title}",
            "",
            f"{m['date']} · {m['cpu']} · {m['cores']} cores · GPU: {m['gpu'] or 'none'} · torch {m['torch']} · "
            f"settings: `{json.dumps(settings)}`",
            "",
            *_table(data["rows"]),
            "",
        ]
    sys.stdout.write("\n".join(lines))


if __name__ == "__main__":
    main()
