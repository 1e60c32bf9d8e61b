"""Small builders shared by tests (no model needed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from conftest import EXAMPLES

from steering.pack import ConceptPack, GateMeta, ModelFingerprint, PackMeta
from steering.rotation import make_plane

FP = ModelFingerprint(
    name="toy", model_type="llama", num_layers=6, hidden_size=16, vocab_size=100, weights_sha256="0" * 64
)


def toy_pack(
    concept_id: str = "toy",
    layers=(3, 4),
    gate_layer: int = 1,
    threshold: float = 0.0,
    seed: int = 0,
    pooling: str = "mean",
    angle: float = 90.0,
    fp: ModelFingerprint = FP,
    turn_header: list[int] | None = None,
    **meta,
) -> ConceptPack:
    g = torch.Generator().manual_seed(seed)
    d = fp.hidden_size
    planes = torch.stack([make_plane(torch.randn(d, generator=g), torch.randn(d, generator=g)) for _ in layers])
    m = PackMeta(
        concept_id=concept_id,
        model=fp,
        layers=list(layers),
        gate=GateMeta(layer=gate_layer, threshold=threshold, alpha=0.1, pooling=pooling, turn_header=turn_header),  # type: ignore[arg-type]
        angle_deg=angle,
        **meta,
    )
    return ConceptPack(m, planes, torch.randn(d, generator=g), 0.0)


def edit_tensors(pack_dir, edit) -> None:
    """Rewrite a saved pack's tensors with ``edit(tensors)`` and record the new file's SHA-256 in
    pack.json, as a crafted pack would (so the checks after the checksum are what is tested)."""
    import hashlib
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    d = Path(pack_dir)
    t = load_file(str(d / "pack.safetensors"))
    edit(t)
    save_file(t, str(d / "pack.safetensors"))
    meta = json.loads((d / "pack.json").read_text())
    meta["tensors_sha256"] = hashlib.sha256((d / "pack.safetensors").read_bytes()).hexdigest()
    (d / "pack.json").write_text(json.dumps(meta))


def variant_pack(src, dst, concept_id: str, **gate) -> None:
    """A copy of a saved pack under another concept id, with some gate fields changed (pack.json
    only, so the tensors and their checksum stay valid): e.g. a text gate that always fires."""
    import json
    import shutil
    from pathlib import Path

    shutil.copytree(src, dst)
    meta_path = Path(dst) / "pack.json"
    meta = json.loads(meta_path.read_text())
    meta["concept_id"] = concept_id
    text = gate.pop("text", {})
    meta["gate"].update(gate)
    meta["gate"]["text"].update(text)
    meta_path.write_text(json.dumps(meta))


def small_suite(tmp_path, n: int = 6, extra: tuple[str, ...] = (), concept: str = "harry_potter") -> Path:
    """A `guardit eval` suite of an example concept's first ``n`` test prompts per split, its
    calibration sets, and ``n`` built-in neutral prompts."""
    suite = tmp_path / ("suite" if concept == "harry_potter" else concept)
    suite.mkdir()
    src = EXAMPLES / concept
    for name in ("forget_test", "retain_test", *extra):
        lines = (src / f"{name}.jsonl").read_text().splitlines()[:n]
        (suite / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(src / "forget.jsonl", suite / "forget.jsonl")
    shutil.copy(src / "retain.jsonl", suite / "retain.jsonl")
    # n built-in neutral prompts as the suite's own neutral.txt (16 otherwise): every method
    # generates and scores them, and fewer keep the test short
    from calibration.calibrator import builtin_prompts

    (suite / "neutral.txt").write_text("".join(r.prompt + "\n" for r in builtin_prompts("neutral")[:n]))
    return suite
