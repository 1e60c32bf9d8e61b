import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import FP, toy_pack
from steering.errors import PackError
from steering.pack import ConceptPack, load_packs


def test_roundtrip(tmp_path):
    pack = toy_pack()
    pack.save_pretrained(tmp_path / "p")
    back = ConceptPack.from_pretrained(tmp_path / "p", FP)
    assert back.meta == pack.meta
    assert torch.equal(back.planes, pack.planes)
    assert torch.equal(back.gate_weight, pack.gate_weight)
    assert back.gate_bias == pack.gate_bias


def test_wrong_model_is_refused(tmp_path):
    toy_pack().save_pretrained(tmp_path / "p")
    other = FP.model_copy(update={"weights_sha256": "1" * 64, "name": "other"})
    with pytest.raises(PackError, match="calibrated on model 'toy', not on 'other'.*weights_sha256"):
        ConceptPack.from_pretrained(tmp_path / "p", other)


def test_nan_in_tensors_is_refused(tmp_path):
    toy_pack().save_pretrained(tmp_path / "p")
    t = load_file(str(tmp_path / "p" / "pack.safetensors"))
    t["gate_weight"][3] = float("nan")
    save_file(t, str(tmp_path / "p" / "pack.safetensors"))
    with pytest.raises(PackError, match="'gate_weight' contains NaN"):
        ConceptPack.from_pretrained(tmp_path / "p")


def test_wrong_shape_is_refused(tmp_path):
    toy_pack().save_pretrained(tmp_path / "p")
    t = load_file(str(tmp_path / "p" / "pack.safetensors"))
    t["planes"] = t["planes"][:1]
    save_file(t, str(tmp_path / "p" / "pack.safetensors"))
    with pytest.raises(PackError, match="'planes' has shape"):
        ConceptPack.from_pretrained(tmp_path / "p")


def test_non_orthonormal_planes_are_refused(tmp_path):
    toy_pack().save_pretrained(tmp_path / "p")
    t = load_file(str(tmp_path / "p" / "pack.safetensors"))
    t["planes"] = t["planes"] * 2
    save_file(t, str(tmp_path / "p" / "pack.safetensors"))
    with pytest.raises(PackError, match="orthonormal"):
        ConceptPack.from_pretrained(tmp_path / "p")


@pytest.mark.parametrize("field,value,msg", [
    ("angle_deg", "NaN", "angle_deg"),
    ("layers", [4, 3], "layers"),
    ("concept_id", "bad id!", "concept_id"),
    ("gate", {"layer": 5, "threshold": 0.0, "alpha": 0.1}, "gate.layer"),
])
def test_bad_metadata_names_the_field(tmp_path, field, value, msg):
    toy_pack().save_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "pack.json").read_text())
    meta[field] = value
    (tmp_path / "p" / "pack.json").write_text(json.dumps(meta).replace('"NaN"', "NaN"))
    with pytest.raises(PackError, match=msg):
        ConceptPack.from_pretrained(tmp_path / "p")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(PackError, match="not found"):
        ConceptPack.from_pretrained(tmp_path / "nope")
    toy_pack().save_pretrained(tmp_path / "p")
    (tmp_path / "p" / "pack.safetensors").write_bytes(b"garbage")
    with pytest.raises(PackError, match="cannot read"):
        ConceptPack.from_pretrained(tmp_path / "p")
    (tmp_path / "p" / "pack.json").unlink()
    with pytest.raises(PackError, match="missing pack.json"):
        ConceptPack.from_pretrained(tmp_path / "p")


def test_duplicate_concepts_are_refused(tmp_path):
    toy_pack().save_pretrained(tmp_path / "a")
    toy_pack().save_pretrained(tmp_path / "b")
    with pytest.raises(PackError, match="loaded twice"):
        load_packs([tmp_path / "a", tmp_path / "b"])
