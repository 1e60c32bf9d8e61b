"""Concept packs: the calibrated artifact for one concept on one model.

A pack is a directory with two files:

- ``pack.safetensors``: ``planes`` (L, 2, d) float32, one orthonormal basis (b1 = concept
  direction, b2 = target direction) per steered layer; ``gate_weight`` (d,) and ``gate_bias``
  (1,) for the linear gate probe s = w·h + b on the gate layer's residual stream; with a text
  gate (``gate.kind`` "encoder" or "hybrid"), ``text_weight`` (e,) and ``text_bias`` (1,) for
  the head on the sentence encoder's embedding (:mod:`steering.text_gate`); with an answer
  check, ``answer_weight`` (e,) and ``answer_bias`` (1,) for the head on the embedding of the
  request text followed by the model's answer.
- ``pack.json``: metadata validated by :class:`PackMeta` (layers, gate thresholds and level α,
  the calibration negatives' out-of-fold scores that place the thresholds at another level
  (:meth:`ConceptPack.at_alpha`), angle, model fingerprint, calibration statistics).

Loading reads ``pack.safetensors`` into process memory in one piece (never memory-mapped, so a
file changed or truncated on disk cannot touch a running server), checks it against the SHA-256
that ``pack.json`` records, then shapes, finiteness, orthonormality and, when a fingerprint is
given, that the pack was made for that model. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from steering.conformal import check_alpha, conformal_rank, false_fire_bounds, gate_threshold, union_threshold
from steering.errors import PackError, PolicyError
from steering.names import normal_name
from steering.rotation import ANGLE_MODES, DEFAULT_ANGLE_DEG, check_angle

FORMAT_VERSION = 1
TENSORS_FILE = "pack.safetensors"
META_FILE = "pack.json"
PACK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ModelFingerprint(BaseModel):
    """Identifies the model a pack was calibrated on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    model_type: str
    num_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    weights_sha256: str = Field(min_length=16, description="hash of the first embedding rows, cast to bf16")
    precision: str | None = Field(
        default=None,
        min_length=1,
        description="how the weights are held: float32, bfloat16, float16, int8-dynamic or a quantization "
        "method (None: not recorded, as in packs from before it was, or a model folder not yet loaded)",
    )

    def mismatch(self, other: ModelFingerprint) -> list[str]:
        """Fields (other than the display name and the precision) that differ between two
        fingerprints: a difference here is another model."""
        fields = ["model_type", "num_layers", "hidden_size", "vocab_size", "weights_sha256"]
        return [f for f in fields if getattr(self, f) != getattr(other, f)]

    def precision_changed(self, other: ModelFingerprint) -> bool:
        """Whether the same weights are held at another precision (only when both record one)."""
        return None not in (self.precision, other.precision) and self.precision != other.precision


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError("threshold must be finite")
    return v


Threshold = Annotated[float, AfterValidator(_finite)]


def _names(v: list[str]) -> list[str]:
    bad = [n for n in v if n != normal_name(n) or not n]
    if bad:
        raise ValueError(f"a name is lower-case words without accents joined by single spaces, got {bad[0]!r}")
    return v


class AnswerCheckMeta(BaseModel):
    """The answer check: a head on the same encoder's embedding of the request text followed by the
    model's answer (:func:`steering.text_gate.answer_text`). A request whose gates stayed closed
    and whose answer scores above ``threshold``, or whose answer's first sentence names the concept
    (``names``, :func:`steering.names.names_answered`), is generated again with the pack forced."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: Threshold
    max_tokens: int = Field(gt=0, description="length of the calibration answers (greedy, new tokens)")
    names: Annotated[list[str], AfterValidator(_names)] = Field(
        default_factory=list, description="phrases that name the concept: an answer that opens with one is forgotten"
    )


class TextGateMeta(BaseModel):
    """The text gate: a head on a sentence encoder's embedding of the request text (max over
    windows); fires when its score is above ``threshold``. ``answer``: the answer check, when
    calibrated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    encoder: str = Field(description="name of the sentence encoder (steering.text_gate.ENCODERS)")
    encoder_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hash of the encoder's weights")
    threshold: Threshold
    answer: AnswerCheckMeta | None = None


GateKind = Literal["probe", "encoder", "hybrid"]
GATE_KINDS: tuple[str, ...] = ("probe", "encoder", "hybrid")
Head = Literal["probe", "text", "answer"]
# The scores each kind decides with, in the order calibration combines them.
KIND_HEADS: dict[str, tuple[Head, ...]] = {"probe": ("probe",), "encoder": ("text", "answer"),
                                           "hybrid": ("probe", "text", "answer")}  # fmt: skip


def _finite_list(v: list[float]) -> list[float]:
    if not all(math.isfinite(x) for x in v):
        raise ValueError("scores must be finite")
    return v


Scores = Annotated[list[float], AfterValidator(_finite_list)]


class OofNegatives(BaseModel):
    """The calibration negatives' out-of-fold scores, per score ("head"): what places the gate's
    thresholds at any level α without recalibrating (:meth:`ConceptPack.at_alpha`). ``retain``:
    the concept's neighbours; ``neutral``: the built-in everyday requests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retain: dict[Head, Scores]
    neutral: dict[Head, Scores]

    @model_validator(mode="after")
    def _same_heads(self) -> OofNegatives:
        if set(self.retain) != set(self.neutral) or not self.retain:
            raise ValueError("retain and neutral need scores for the same heads")
        for name, by_head in (("retain", self.retain), ("neutral", self.neutral)):
            if len({len(v) for v in by_head.values()}) != 1:
                raise ValueError(f"{name}: every head needs one score per {name} prompt")
        return self

    @property
    def counts(self) -> tuple[int, int]:
        """(retain prompts, everyday prompts)."""
        return len(next(iter(self.retain.values()))), len(next(iter(self.neutral.values())))

    def thresholds(self, kind: str, heads: tuple[Head, ...], alpha: float) -> KindThresholds:
        """The thresholds of gate ``kind`` at level α, as calibration places them
        (:mod:`steering.conformal`): the probe alone by its own scores, a text kind as the union of
        its ``heads``."""
        missing = [h for h in heads if h not in self.retain]
        if missing:
            raise PackError(f"no out-of-fold scores for {missing}")
        if kind == "probe":
            values = (gate_threshold(np.array(self.retain["probe"]), np.array(self.neutral["probe"]), alpha),)
        else:
            pairs = [(np.array(self.retain[h]), np.array(self.neutral[h])) for h in heads]
            values = union_threshold(pairs, alpha).thresholds
        return KindThresholds(**dict(zip(heads, values)))


class KindThresholds(BaseModel):
    """The thresholds one gate kind decides with: the probe's, the text gate's and the answer
    check's (None where that kind does not use the score)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    probe: Threshold | None = None
    text: Threshold | None = None
    answer: Threshold | None = None


class GateMeta(BaseModel):
    """How a request's gate decides. ``kind``: "probe" (the in-forward probe on ``layer``),
    "encoder" (the text gate alone, before the forward), "hybrid" (either; the two thresholds
    come from one conformal threshold on the max of their standardised scores). ``kinds``: the
    thresholds of every kind calibrated with the same guarantee, the served one included, so that
    another can be compared or served (:meth:`ConceptPack.with_gate_kind`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: int = Field(ge=0)
    threshold: Threshold
    alpha: float = Field(gt=0.0, lt=1.0)
    pooling: Literal["mean", "max"] = "mean"
    scope: Literal["prompt", "all"] = "prompt"
    kind: GateKind = "probe"
    text: TextGateMeta | None = None
    kinds: dict[GateKind, KindThresholds] = Field(default_factory=dict)
    negatives: OofNegatives | None = Field(
        default=None, description="out-of-fold negative scores, to place the thresholds at another alpha"
    )
    turn_header: list[int] | None = Field(
        default=None,
        description="token ids that open a user turn in the chat template: served, the probe leaves "
        "out the earlier user turns (from after their first occurrence to after their last), so a "
        "single prompt is pooled whole, as calibrated, and an ask late in a conversation as if asked "
        "alone. None (packs calibrated before it existed): every prompt token",
    )

    @model_validator(mode="after")
    def _text(self) -> GateMeta:
        if (self.kind == "probe") != (self.text is None):
            raise ValueError(f"gate kind '{self.kind}' {'needs' if self.text is None else 'takes no'} a text gate")
        text_kinds = [k for k in self.kinds if k != "probe"]
        if text_kinds and self.text is None:
            raise ValueError(f"kinds {text_kinds} need a text gate, and this gate has none")
        for k, t in self.kinds.items():
            if (t.probe is None) != (k == "encoder") or (t.text is None) != (k == "probe"):
                raise ValueError(f"kinds.{k}: a '{k}' gate needs exactly the thresholds it decides with")
            if t.answer is not None and (self.text is None or self.text.answer is None):
                raise ValueError(f"kinds.{k}: an answer threshold needs the text gate's answer check")
        return self


class PackMeta(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: Literal[1] = FORMAT_VERSION
    concept_id: str
    description: str = ""
    model: ModelFingerprint
    layers: list[int] = Field(min_length=1)
    gate: GateMeta
    angle_deg: float = DEFAULT_ANGLE_DEG
    angle_mode: Literal["absolute", "relative"] = "absolute"
    target: str = "idk"
    steer_scope: Literal["prompt", "all"] = "prompt"
    skip_head: list[int] = Field(
        default_factory=list,
        description="token ids of the chat template's fixed head; a request's tokens that match it "
        "(and always its first token, the attention sink) are never rotated",
    )
    stats: dict[str, Any] = Field(default_factory=dict)
    library_version: str = "0.1.0"
    tensors_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of pack.safetensors, written by save_pretrained and checked at load "
        "(packs saved before it existed have none and load unchecked)",
    )

    def check_alpha(self, alpha: float, field: str = "alpha") -> None:
        """Can the gate's thresholds be placed at level α? Only from kept out-of-fold scores, and
        only where the retain prompts are enough for the level (α ≥ 1/(n+1)). Raises
        :class:`PolicyError` naming ``field``."""
        if alpha == self.gate.alpha:
            return
        if self.gate.negatives is None:
            raise PolicyError(
                f"{field}: pack '{self.concept_id}' keeps no out-of-fold scores (an older calibration), so it "
                f"serves only its calibrated level {self.gate.alpha}; recalibrate it to serve other levels"
            )
        n = self.gate.negatives.counts[0]
        if conformal_rank(n, alpha) == 0:
            raise PolicyError(
                f"{field}: {alpha} is below the least level pack '{self.concept_id}' supports with its {n} "
                f"retain prompts (1/{n + 1} = {1 / (n + 1):.4f})"
            )

    def false_fire_bounds(self, alpha: float | None = None) -> dict[str, float]:
        """The false-fire bounds the gate's thresholds achieve at level ``alpha`` (None: the
        calibrated one), on the concept's neighbours ("retain") and on everyday requests
        ("everyday") (:func:`steering.conformal.false_fire_bounds`); empty for a pack that keeps no
        out-of-fold scores."""
        g = self.gate
        return {} if g.negatives is None else false_fire_bounds(*g.negatives.counts, alpha or g.alpha)

    @field_validator("concept_id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not PACK_ID_RE.match(v):
            raise ValueError(
                "concept_id must be 1-64 characters of letters, digits, '_', '-', '.', starting "
                f"with a letter or digit; got {v!r}"
            )
        return v

    @field_validator("angle_deg")
    @classmethod
    def _angle(cls, v: float) -> float:
        return check_angle(v, "angle_deg")

    @model_validator(mode="after")
    def _layers(self) -> PackMeta:
        if sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"layers must be strictly increasing without duplicates, got {self.layers}")
        if self.layers[-1] >= self.model.num_layers:
            raise ValueError(f"layer {self.layers[-1]} is out of range for a {self.model.num_layers}-layer model")
        if self.gate.layer >= self.layers[0] and self.steer_scope != "all":
            # A prompt's layers before the gate are past when it decides: only the generated
            # tokens can be rotated there, which steer scope "all" does.
            raise ValueError(
                f"gate.layer ({self.gate.layer}) must come before the first steered layer ({self.layers[0]}) "
                "unless steer_scope is 'all'"
            )
        return self


@dataclass(frozen=True)
class ConceptPack:
    """One calibrated concept: metadata plus float32 tensors (kept on CPU)."""

    meta: PackMeta
    planes: torch.Tensor  # (L, 2, d)
    gate_weight: torch.Tensor  # (d,)
    gate_bias: float
    text_weight: torch.Tensor | None = None  # (e,) with a text gate
    text_bias: float | None = None
    answer_weight: torch.Tensor | None = None  # (e,) with an answer check
    answer_bias: float | None = None

    def __post_init__(self) -> None:
        _check_tensors(self.meta, self.planes, self.gate_weight, self.gate_bias, where=self.meta.concept_id)
        has_text = self.meta.gate.text is not None
        if has_text != (self.text_weight is not None and self.text_bias is not None):
            raise PackError(
                f"pack '{self.id}': gate kind '{self.meta.gate.kind}' "
                f"{'needs' if has_text else 'takes no'} tensors 'text_weight' and 'text_bias'"
            )
        text = self.meta.gate.text
        has_answer = text is not None and text.answer is not None
        if has_answer != (self.answer_weight is not None and self.answer_bias is not None):
            raise PackError(
                f"pack '{self.id}': a gate {'with' if has_answer else 'without'} an answer check "
                f"{'needs' if has_answer else 'takes no'} tensors 'answer_weight' and 'answer_bias'"
            )
        heads = (("text", self.text_weight, self.text_bias), ("answer", self.answer_weight, self.answer_bias))
        for name, w, b in heads:
            if w is None:
                continue
            if w.ndim != 1 or not torch.isfinite(w).all():
                raise PackError(f"pack '{self.id}': tensor '{name}_weight' must be 1-D and finite")
            if not math.isfinite(float(b)):  # type: ignore[arg-type]
                raise PackError(f"pack '{self.id}': {name}_bias is NaN or inf")
            if self.text_weight is not None and w.shape != self.text_weight.shape:
                raise PackError(f"pack '{self.id}': tensor '{name}_weight' has another size than 'text_weight'")

    @property
    def id(self) -> str:
        return self.meta.concept_id

    def with_gate_kind(self, kind: str) -> ConceptPack:
        """The same pack deciding with another calibrated gate kind (``meta.gate.kinds``): for
        comparing kinds (``guardit eval``) or serving one. The pack's own kind returns the pack."""
        g = self.meta.gate
        if kind == g.kind:
            return self
        if kind not in g.kinds:
            raise PackError(f"pack '{self.id}' has no calibrated '{kind}' gate (it has {sorted(g.kinds) or [g.kind]})")
        t = g.kinds[kind]
        text = None
        if t.text is not None and g.text is not None:
            answer = (
                None
                if t.answer is None or g.text.answer is None
                else g.text.answer.model_copy(update={"threshold": t.answer})
            )
            text = g.text.model_copy(update={"threshold": t.text, "answer": answer})
        keep_text = text is not None
        keep_answer = keep_text and text.answer is not None  # type: ignore[union-attr]
        gate = GateMeta.model_validate(
            {
                **g.model_dump(),
                "kind": kind,
                "threshold": g.threshold if t.probe is None else t.probe,
                "text": text.model_dump() if keep_text else None,
                "kinds": {
                    k: {**v.model_dump(), **({} if keep_answer else {"answer": None})}
                    for k, v in g.kinds.items()
                    if keep_text or k == "probe"
                },
            }  # fmt: skip
        )
        meta = self.meta.model_copy(update={"gate": gate})
        return ConceptPack(meta, self.planes, self.gate_weight, self.gate_bias,
                           self.text_weight if keep_text else None, self.text_bias if keep_text else None,
                           self.answer_weight if keep_answer else None,
                           self.answer_bias if keep_answer else None)  # fmt: skip

    def at_alpha(self, alpha: float) -> ConceptPack:
        """The same pack with every calibrated kind's thresholds placed at level α (stricter
        forgetting above the calibrated level: fires more, with more false fires; laxer below),
        from the out-of-fold negative scores it keeps, by the rule calibration used
        (:mod:`steering.conformal`). At the calibrated level the thresholds are the pack's own."""
        g = self.meta.gate
        self.meta.check_alpha(check_alpha(alpha, "alpha"))
        if alpha == g.alpha:
            return self
        assert g.negatives is not None
        kinds = {k: g.negatives.thresholds(k, _kind_heads(k, t), alpha) for k, t in (g.kinds or {g.kind: None}).items()}
        served = kinds[g.kind]
        text = g.text
        if text is not None:
            answer = None if text.answer is None else text.answer.model_copy(update={"threshold": served.answer})
            text = text.model_copy(update={"threshold": served.text, "answer": answer})
        threshold = g.threshold if served.probe is None else served.probe
        gate = g.model_copy(update={"alpha": alpha, "threshold": threshold, "text": text,
                                    "kinds": kinds if g.kinds else {}})  # fmt: skip
        # Only finite thresholds changed (KindThresholds checked them): the kept scores are shared.
        return replace(self, meta=self.meta.model_copy(update={"gate": gate}))

    def save_pretrained(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            "planes": self.planes.contiguous().to(torch.float32),
            "gate_weight": self.gate_weight.contiguous().to(torch.float32),
            "gate_bias": torch.tensor([self.gate_bias], dtype=torch.float32),
        }
        if self.text_weight is not None:
            tensors["text_weight"] = self.text_weight.contiguous().to(torch.float32)
            tensors["text_bias"] = torch.tensor([self.text_bias], dtype=torch.float32)
        if self.answer_weight is not None:
            tensors["answer_weight"] = self.answer_weight.contiguous().to(torch.float32)
            tensors["answer_bias"] = torch.tensor([self.answer_bias], dtype=torch.float32)
        save_file(
            tensors,
            str(out / TENSORS_FILE),
            metadata={"format": "guardit-pack", "concept_id": self.id},
        )
        digest = hashlib.sha256((out / TENSORS_FILE).read_bytes()).hexdigest()
        meta = self.meta.model_copy(update={"tensors_sha256": digest})
        (out / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, fingerprint: ModelFingerprint | None = None, allow_precision_change: bool = False
    ) -> ConceptPack:
        """Load and validate a pack; with ``fingerprint``, refuse a pack made for another model, and
        one made for another precision of it unless ``allow_precision_change`` (:meth:`check_model`)."""
        d = Path(directory)
        meta_path, tensor_path = d / META_FILE, d / TENSORS_FILE
        if not d.is_dir():
            raise PackError(f"concept pack directory not found: {d}")
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise PackError(f"concept pack {d} is missing {p.name}")
        try:
            meta = PackMeta.model_validate_json(meta_path.read_text())
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"]) or "(root)"
            raise PackError(f"invalid {meta_path}: field '{loc}': {first['msg']}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PackError(f"cannot read {meta_path}: {e}") from None
        try:
            data = tensor_path.read_bytes()
        except OSError as e:
            raise PackError(f"cannot read {tensor_path}: {e}") from None
        if meta.tensors_sha256 is not None and hashlib.sha256(data).hexdigest() != meta.tensors_sha256:
            raise PackError(f"{tensor_path} does not match the tensors_sha256 in {meta_path} (changed or corrupt)")
        try:
            tensors = load(data)
        except (SafetensorError, OSError, ValueError) as e:
            raise PackError(f"cannot read {tensor_path}: {e}") from None
        missing = {"planes", "gate_weight", "gate_bias"} - tensors.keys()
        if missing:
            raise PackError(f"{tensor_path} lacks tensor(s) {sorted(missing)}")
        bias = tensors["gate_bias"]
        if bias.numel() != 1:
            raise PackError(f"{tensor_path}: gate_bias must hold one value, has shape {tuple(bias.shape)}")

        def head(name: str) -> tuple[torch.Tensor | None, float | None]:
            w, b = tensors.get(f"{name}_weight"), tensors.get(f"{name}_bias")
            return (None if w is None else w.float()), (None if b is None or b.numel() != 1 else float(b.item()))

        try:
            pack = cls(meta, tensors["planes"].float(), tensors["gate_weight"].float(), float(bias.item()),
                       *head("text"), *head("answer"))  # fmt: skip
        except PackError as e:
            raise PackError(f"{d}: {e}") from None
        if fingerprint is not None:
            pack.check_model(fingerprint, allow_precision_change)
        return pack

    def check_model(self, fingerprint: ModelFingerprint, allow_precision_change: bool = False) -> None:
        """Refuse another model (shape or weights differ), always; refuse the same weights held at
        another precision (a bf16 or int8 copy of the float32 model the pack was calibrated on)
        unless ``allow_precision_change``: the gate's thresholds and the rotation were fitted at the
        pack's precision, so serving another one is a choice to make knowingly."""
        diff = self.meta.model.mismatch(fingerprint)
        if diff:
            details = ", ".join(
                f"{f}: pack {getattr(self.meta.model, f)!r} vs model {getattr(fingerprint, f)!r}" for f in diff
            )
            raise PackError(
                f"concept pack '{self.id}' was calibrated on model '{self.meta.model.name}', not on "
                f"'{fingerprint.name}' ({details})"
            )
        if self.meta.model.precision_changed(fingerprint) and not allow_precision_change:
            raise PackError(
                f"concept pack '{self.id}' was calibrated on '{self.meta.model.name}' in "
                f"{self.meta.model.precision}; this copy of it runs in {fingerprint.precision}. Accept it "
                f"knowingly with {PRECISION_FLAG} (allow_precision_change=True in Python)"
            )


def _kind_heads(kind: str, calibrated: KindThresholds | None) -> tuple[Head, ...]:
    """The heads a kind decides with: those its calibrated thresholds name (an encoder kind has
    an answer threshold only with an answer check)."""
    heads = KIND_HEADS[kind]
    return heads if calibrated is None else tuple(h for h in heads if getattr(calibrated, h) is not None)


def _check_tensors(meta: PackMeta, planes: torch.Tensor, w: torch.Tensor, b: float, where: str) -> None:
    d = meta.model.hidden_size
    n = len(meta.layers)
    if tuple(planes.shape) != (n, 2, d):
        raise PackError(f"pack '{where}': tensor 'planes' has shape {tuple(planes.shape)}, expected {(n, 2, d)}")
    if tuple(w.shape) != (d,):
        raise PackError(f"pack '{where}': tensor 'gate_weight' has shape {tuple(w.shape)}, expected {(d,)}")
    for name, t in (("planes", planes), ("gate_weight", w)):
        if not torch.isfinite(t).all():
            raise PackError(f"pack '{where}': tensor '{name}' contains NaN or inf")
    if not math.isfinite(b):
        raise PackError(f"pack '{where}': gate_bias is NaN or inf")
    gram = planes.double() @ planes.double().transpose(1, 2)
    eye = torch.eye(2, dtype=torch.float64).expand_as(gram)
    err = (gram - eye).abs().max().item()
    if err > 1e-4:
        raise PackError(f"pack '{where}': 'planes' are not orthonormal bases (max error {err:.2e})")
    if meta.angle_mode not in ANGLE_MODES:  # pragma: no cover - pydantic already checks
        raise PackError(f"pack '{where}': bad angle_mode {meta.angle_mode!r}")


def load_packs(
    paths: list[str | Path], fingerprint: ModelFingerprint | None = None, allow_precision_change: bool = False
) -> list[ConceptPack]:
    """Load several packs; refuse duplicates by concept id."""
    packs: list[ConceptPack] = []
    seen: dict[str, Path] = {}
    for p in paths:
        pack = ConceptPack.from_pretrained(p, fingerprint, allow_precision_change)
        if pack.id in seen:
            raise PackError(f"concept '{pack.id}' is loaded twice (from {seen[pack.id]} and {p})")
        seen[pack.id] = Path(p)
        packs.append(pack)
    return packs


FINGERPRINT_ROWS = 64  # embedding rows hashed into a model's fingerprint
PRECISION_FLAG = "--allow-precision-change"  # the CLI's flag (guardit generate, eval, serve)


def fingerprint(
    name: str,
    model_type: str,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    embed_weight: torch.Tensor,
    precision: str | None = None,
) -> ModelFingerprint:
    """Fingerprint a model from its shape and its first FINGERPRINT_ROWS embedding rows (cast to
    bf16 and hashed, so the same weights loaded in float32 or bf16, or with int8 linear layers, by
    transformers or by vLLM, hash the same), plus the precision the weights are held in (which
    :meth:`ConceptPack.check_model` compares separately). ``embed_weight`` may hold just those rows."""
    rows = embed_weight[:FINGERPRINT_ROWS].detach().to("cpu", torch.float32).to(torch.bfloat16).contiguous()
    digest = hashlib.sha256(rows.view(torch.int16).numpy().tobytes()).hexdigest()
    return ModelFingerprint(
        name=name,
        model_type=model_type,
        num_layers=num_layers,
        hidden_size=hidden_size,
        vocab_size=vocab_size,
        weights_sha256=digest,
        precision=precision,
    )
