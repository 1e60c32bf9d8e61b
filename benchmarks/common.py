"""Shared pieces of the benchmarks: machine description, the benchmark pack, synthetic packs,
prompts, and the result file. Benchmarks print ratios measured in the same run; they are not tests."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "concepts"
RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path(os.environ.get("GUARDIT_CACHE", Path.home() / ".cache" / "guardit")) / "bench"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def seconds(fn: Callable[..., object], *args, **kwargs) -> float:
    """Wall time of one call ``fn(*args, **kwargs)``."""
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def calibrate_command(model_dir: Path, concept: str, out: Path) -> list[str]:
    """``guardit calibrate`` of an example concept with the CLI defaults, as a command line."""
    d = EXAMPLES / concept
    files = ["--forget", str(d / "forget.jsonl"), "--retain", str(d / "retain.jsonl")]
    return [sys.executable, "-m", "guardit.cli", "calibrate", "--model", str(model_dir), *files, "--out", str(out),
            "--quiet"]  # fmt: skip


def calibrated_pack(model_dir: Path, concept: str = "harry_potter") -> Path:
    """The example concept's pack, calibrated once with the CLI and cached."""
    out = CACHE / "packs" / concept.replace("_", "-")
    if not (out / "pack.json").is_file():
        subprocess.run(calibrate_command(model_dir, concept, out), check=True)
    return out


def gate_kind_pack(base_dir: Path, kind: str) -> Path:
    """The pack of ``base_dir`` serving another of its calibrated gate kinds
    (:meth:`ConceptPack.with_gate_kind`), saved (cached) under the id ``<id>-<kind>``."""
    from dataclasses import replace

    from steering.pack import ConceptPack

    base = ConceptPack.from_pretrained(base_dir)
    out = CACHE / "packs" / f"{base.id}-{kind}"
    if not (out / "pack.json").is_file():
        pack = base.with_gate_kind(kind)
        replace(pack, meta=pack.meta.model_copy(update={"concept_id": f"{base.id}-{kind}"})).save_pretrained(out)
    return out


def synthetic_packs(base_dir: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` packs for the same model with random planes, random steered layers (4–8 of the upper
    layers) and random gate layers, whose gates never fire: they stand for loaded packs that a
    request does not use. Returns their directories (cached)."""
    from steering.pack import ConceptPack, GateMeta
    from steering.rotation import make_plane

    base = ConceptPack.from_pretrained(base_dir)
    out = CACHE / f"synthetic-{n}-{seed}"
    dirs = [out / f"synthetic-{k:03d}" for k in range(n)]
    if all((d / "pack.json").is_file() for d in dirs):
        return dirs
    g = torch.Generator().manual_seed(seed)
    num_layers, dim = base.meta.model.num_layers, base.planes.shape[-1]
    for k, d in enumerate(dirs):
        count = int(torch.randint(4, 9, (1,), generator=g))
        gate_layer = int(torch.randint(2, 9, (1,), generator=g))
        choices = torch.randperm(num_layers - gate_layer - 1, generator=g)[:count] + gate_layer + 1
        layers = sorted(int(x) for x in choices)
        planes = torch.stack(
            [make_plane(torch.randn(dim, generator=g), torch.randn(dim, generator=g)).float() for _ in layers]
        )
        meta = base.meta.model_copy(
            update={
                "concept_id": f"synthetic-{k:03d}",
                "description": "benchmark filler",
                "layers": layers,
                "gate": GateMeta(layer=gate_layer, threshold=1e9, alpha=base.meta.gate.alpha),
                "stats": {},
            }
        )
        ConceptPack(meta, planes, base.gate_weight[torch.randperm(dim, generator=g)], 0.0).save_pretrained(d)
    return dirs


def bench_prompts(n: int) -> list[str]:
    """``n`` distinct retain-side prompts of ~40–60 tokens (a request number and two example retain
    questions each: no two requests share a text, so the text gate's window cache saves nothing
    that real traffic would not); the same prompts serve every mode, so prefill work is identical
    across modes."""
    qs = [
        json.loads(l)["prompt"]
        for f in ("retain.jsonl", "retain_test.jsonl")
        for l in (EXAMPLES / "harry_potter" / f).read_text().splitlines()
        if l.strip()
    ]
    return [f"Request {i}: " + " ".join(qs[(2 * i + j) % len(qs)] for j in range(2)) for i in range(n)]


def save(name: str, data: dict) -> Path:
    """Write ``data`` (with ``rows``) to results/NAME.json, print its rows as a table, return the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    rows = data.get("rows") or []
    if rows:
        cols = list(rows[0])
        print(" | ".join(cols))
        for row in rows:
            print(" | ".join(str(row.get(c, "")) for c in cols))
    print(f"saved {path}")
    return path
