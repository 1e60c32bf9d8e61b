import json

import pytest
import torch
from helpers import FP, edit_tensors, toy_pack
from pydantic import ValidationError

from steering.errors import PackError
from steering.pack import ConceptPack, ModelFingerprint, load_packs


def test_roundtrip(tmp_path):
    pack = toy_pack()
    pack.save_pretrained(tmp_path / "p")
    back = ConceptPack.from_pretrained(tmp_path / "p", FP)
    assert back.meta.tensors_sha256 is not None
    assert back.meta.model_copy(update={"tensors_sha256": None}) == pack.meta
    assert torch.equal(back.planes, pack.planes)
    assert torch.equal(back.gate_weight, pack.gate_weight)
    assert back.gate_bias == pack.gate_bias


def test_wrong_model_is_refused(tmp_path):
    toy_pack().save_pretrained(tmp_path / "p")
    other = FP.model_copy(update={"weights_sha256": "1" * 64, "name": "other"})
    with pytest.raises(PackError, match="calibrated on model 'toy', not on 'other'.*weights_sha256"):
        ConceptPack.from_pretrained(tmp_path / "p", other)


def test_another_precision_is_accepted_only_knowingly(tmp_path):
    """The same weights at another precision (same shape and embedding hash) are refused unless the
    caller allows it; another model is refused even then; a fingerprint that records no precision
    (an older pack, or a model folder not loaded yet) is not compared on it."""
    fp32 = FP.model_copy(update={"precision": "float32"})
    toy_pack(fp=fp32).save_pretrained(tmp_path / "p")
    bf16 = fp32.model_copy(update={"precision": "bfloat16"})
    with pytest.raises(PackError, match="in float32; this copy of it runs in bfloat16.*--allow-precision-change"):
        ConceptPack.from_pretrained(tmp_path / "p", bf16)
    with pytest.raises(PackError, match="runs in int8-dynamic"):
        load_packs([tmp_path / "p"], fp32.model_copy(update={"precision": "int8-dynamic"}))
    assert ConceptPack.from_pretrained(tmp_path / "p", bf16, allow_precision_change=True).id == "toy"
    other = bf16.model_copy(update={"weights_sha256": "1" * 64})
    with pytest.raises(PackError, match="weights_sha256"):
        ConceptPack.from_pretrained(tmp_path / "p", other, allow_precision_change=True)
    ConceptPack.from_pretrained(tmp_path / "p", FP)  # no precision recorded on the model side
    toy_pack().save_pretrained(tmp_path / "old")  # none recorded on the pack's side
    ConceptPack.from_pretrained(tmp_path / "old", bf16)
    with pytest.raises(ValidationError, match="precision"):
        ModelFingerprint.model_validate(FP.model_dump() | {"precision": ""})


def test_nan_in_tensors_is_refused(tmp_path):
    toy_pack().save_pretrained(tmp_path / "p")
    edit_tensors(tmp_path / "p", lambda t: t["gate_weight"].__setitem__(3, float("nan")))
    with pytest.raises(PackError, match="'gate_weight' contains NaN"):
        ConceptPack.from_pretrained(tmp_path / "p")


def test_wrong_shape_is_refused(tmp_path):
    toy_pack().save_pretrained(tmp_path / "p")
    edit_tensors(tmp_path / "p", lambda t: t.update(planes=t["planes"][:1]))
    with pytest.raises(PackError, match="'planes' has shape"):
        ConceptPack.from_pretrained(tmp_path / "p")


def test_non_orthonormal_planes_are_refused(tmp_path):
    toy_pack().save_pretrained(tmp_path / "p")
    edit_tensors(tmp_path / "p", lambda t: t.update(planes=t["planes"] * 2))
    with pytest.raises(PackError, match="orthonormal"):
        ConceptPack.from_pretrained(tmp_path / "p")


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("angle_deg", "NaN", "angle_deg"),
        ("layers", [4, 3], "layers"),
        ("concept_id", "bad id!", "concept_id"),
        ("gate", {"layer": 5, "threshold": 0.0, "alpha": 0.1}, "gate.layer"),
    ],
)
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
    with pytest.raises(PackError, match="does not match the tensors_sha256"):
        ConceptPack.from_pretrained(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "pack.json").read_text())
    del meta["tensors_sha256"]  # a pack saved before the checksum existed: the parse still fails cleanly
    (tmp_path / "p" / "pack.json").write_text(json.dumps(meta))
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


def test_pack_is_held_in_memory_and_checked_against_its_checksum(tmp_path):
    """A loaded pack does not share memory with its file: truncating the file or copying another
    pack over it changes nothing in the loaded tensors, and loading the changed file again is
    refused by the checksum."""
    toy_pack(seed=0).save_pretrained(tmp_path / "p")
    toy_pack(seed=1).save_pretrained(tmp_path / "other")
    pack = ConceptPack.from_pretrained(tmp_path / "p", FP)
    planes = pack.planes.clone()
    f = tmp_path / "p" / "pack.safetensors"
    f.write_bytes((tmp_path / "other" / "pack.safetensors").read_bytes())  # in place, same size
    assert torch.equal(pack.planes, planes)
    with pytest.raises(PackError, match="does not match the tensors_sha256"):
        ConceptPack.from_pretrained(tmp_path / "p", FP)
    with open(f, "r+b") as fh:
        fh.truncate(10)
    assert torch.equal(pack.planes, planes) and torch.isfinite(pack.gate_weight).all()
