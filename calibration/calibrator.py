"""ConceptCalibrator: contrastive prompts → ConceptPack (scikit-learn style ``fit``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from calibration.capture import (
    Activations,
    answer_nll,
    cached_greedy_answers,
    capture,
    common_prefix_length,
    decoder_layers,
    encode_chat,
    greedy_answer_ids,
    turn_header,
)
from calibration.directions import (
    choose_steer_layers,
    layer_stats,
    mean_difference,
    orthogonal_target,
    steer_layer_order,
)
from calibration.gate import (
    DEFAULT_FOLDS,
    SELECTION_FOLDS,
    WEAK_RECALL,
    GateFit,
    TextGateFit,
    combine_gates,
    fit_gate,
    fit_text_gate,
    fold_count,
    refit_gate,
)
from calibration.hf_model import hf_fingerprint
from calibration.prompts import (
    PromptRecord,
    concept_name,
    concept_words,
    read_prompts,
    single_prompts,
    without_words,
)
from steering.conformal import binding_negatives, conformal_rank, gate_threshold, negatives_for_rank
from steering.errors import GuarditError
from steering.names import names_answered, names_in, normal_name
from steering.pack import (
    AnswerCheckMeta,
    ConceptPack,
    GateMeta,
    KindThresholds,
    OofNegatives,
    PackMeta,
    TextGateMeta,
)
from steering.rotation import DEFAULT_ANGLE_DEG, make_plane
from steering.runtime import earlier_turns
from steering.text_gate import DEFAULT_ENCODER, answer_text, load_encoder, request_text


def builtin_prompts(name: str) -> list[PromptRecord]:
    """A built-in prompt set: ``neutral`` and ``everyday`` (everyday requests: the gate's negatives
    besides the retain set; see calibration/data/README.md) or ``idk`` ("I don't know" answers)."""
    path = resources.files("calibration").joinpath("data", f"{name}.jsonl")
    return read_prompts(str(path))


def everyday_negatives(name: list[str]) -> tuple[list[str], list[str]]:
    """The built-in everyday prompts (``neutral`` then ``everyday``) that are negatives for a
    concept of this name (:func:`calibration.prompts.concept_name`), and those left out because
    they name it (a user who forgets photosynthesis, or Python, wants "What is photosynthesis?"
    caught, not held to the everyday false-fire level)."""
    prompts = [r.prompt for name in ("neutral", "everyday") for r in builtin_prompts(name)]
    about = [bool(names_in(p, name)) for p in prompts]
    return [p for p, a in zip(prompts, about) if not a], [p for p, a in zip(prompts, about) if a]


def _turn_header(tokenizer, ids: list[list[int]]) -> list[int] | None:
    """What the pack records as opening a user turn (:class:`GateMeta` ``turn_header``): the chat
    template's header, when no calibration prompt has an earlier turn by that rule (so the served
    pool is every token of each, what the probe is fitted on); None otherwise (no chat template,
    or one this rule does not fit): every token is pooled."""
    header = turn_header(tokenizer)
    if not header or any(earlier_turns(x, header) != (0, 0) for x in ids):
        return None
    return header


def min_negatives(alpha: float) -> int:
    """Smallest number of negatives for which the conformal threshold at level α is finite."""
    return math.ceil(1 / alpha - 1)


def gate_diagnostics(gate: GateFit, forget: list[str], retain: list[str], neutral: list[str], top: int = 3) -> dict:
    """What bounds the gate: the negatives with the highest out-of-fold scores (the conformal
    threshold is one of them), the forget prompts whose out-of-fold score stayed at or below the
    threshold, which order statistic of which set the threshold is (and how many prompts of that
    set would make it the next lower one), and the threshold and recall the same probe would have
    at other levels α."""
    negatives = [(float(s), "retain", p) for s, p in zip(gate.oof_retain, retain)]
    negatives += [(float(s), "neutral", p) for s, p in zip(gate.oof_neutral, neutral)]
    negatives.sort(key=lambda x: -x[0])
    missed = sorted(
        ((float(s), p) for s, p in zip(gate.oof_forget, forget) if s <= gate.threshold), key=lambda x: -x[0]
    )
    levels = []
    for a in (0.05, 0.1, 0.2):
        tau = gate_threshold(gate.oof_retain, gate.oof_neutral, a)
        levels.append(
            {"alpha": a, "threshold": round(tau, 4), "oof_tpr_forget": round(float(np.mean(gate.oof_forget > tau)), 4)}
        )
    kind, scores, level = binding_negatives(gate.oof_retain, gate.oof_neutral, gate.alpha)
    rank = conformal_rank(len(scores), level)
    bound = {"set": kind, "rank": rank, "n": len(scores), "n_for_next_rank": negatives_for_rank(rank + 1, level)}
    return {
        "threshold_from": bound,
        "alpha_levels": levels,
        "highest_negatives": [{"prompt": p, "set": kind, "score": round(s, 4)} for s, kind, p in negatives[:top]],
        "missed_forget": [{"prompt": p, "score": round(s, 4)} for s, p in missed],
    }


# ``--gate auto``: the kinds in order of preference when their out-of-fold recalls are within
# AUTO_MARGIN of the best. Both text kinds come first: the forget prompts all name the concept, so
# out-of-fold recall on them cannot show that the text gate catches indirect asks that the probe
# misses (FINDINGS.md), and the hybrid keeps the probe's evidence as well.
AUTO_PREFERENCE = ("hybrid", "encoder", "probe")
AUTO_MARGIN = 0.05

# Length of the answers the answer check is calibrated on (greedy, new tokens): long enough for
# the answer to name what it is about, short enough to generate for every calibration prompt.
ANSWER_TOKENS = 40
_NEUTRAL_ANSWERS: dict[tuple, list[str]] = {}  # (fingerprint, precision, prompt ids, tokens) -> answers

# The rotation's own check: forced on the forget prompts, it must make the model's own answers to
# them at least this much less likely (mean nats per answer token, teacher-forced); until it does,
# steered layers are added in calibration.directions.steer_layer_order, up to MAX_GROWN_STEER_LAYERS
# (or max_steer_layers). A few late layers can leave the answer intact even forced (FINDINGS.md).
MIN_ANSWER_DROP = 1.0
MAX_GROWN_STEER_LAYERS = 12


def choose_gate_kind(report: dict[str, dict]) -> str:
    """The gate kind ``--gate auto`` serves, from the per-kind out-of-fold rates."""
    best = max(r["oof_tpr_forget"] for r in report.values())
    return next(k for k in AUTO_PREFERENCE if k in report and report[k]["oof_tpr_forget"] >= best - AUTO_MARGIN)


@dataclass
class _GateKinds:
    """The gate kinds compared at calibration, and the one served."""

    report: dict[str, dict]  # kind -> out-of-fold recall and false-fire rates
    thresholds: dict[str, KindThresholds]  # the kinds the pack records (the served one included)
    chosen: str
    text: TextGateMeta | None  # the text gate (encoder identity, the chosen kind's threshold)
    text_fit: TextGateFit | None
    answer_fit: TextGateFit | None = None

    def probe_threshold(self, probe: GateFit) -> float:
        """The probe's served threshold: the chosen kind's (the probe's own for "encoder", whose
        probe never decides)."""
        t = self.thresholds[self.chosen].probe
        return probe.threshold if t is None else t

    def negatives(self, probe: GateFit) -> OofNegatives:
        """The out-of-fold negative scores of every head the pack keeps, so that serving can place
        its thresholds at another level α (:meth:`ConceptPack.at_alpha`)."""
        fits = {"probe": probe, "text": self.text_fit, "answer": self.answer_fit}
        kept = {h: f for h, f in fits.items() if f is not None and (h == "probe" or self.text is not None)}
        return OofNegatives(
            retain={h: f.oof_retain.tolist() for h, f in kept.items()},  # type: ignore[misc]
            neutral={h: f.oof_neutral.tolist() for h, f in kept.items()},  # type: ignore[misc]
        )


def _gate_report(gate: GateFit, kinds: _GateKinds, n_masked: int) -> dict:
    """The gate's part of the calibration report: the probe's out-of-fold rates, the candidates
    it was chosen from, and the kinds compared."""
    fpr_neutral = float(np.mean(gate.oof_neutral > gate.threshold)) if len(gate.oof_neutral) else 0.0
    return {
        "layer": gate.layer,
        "pooling": gate.pooling,
        "threshold": gate.threshold,
        "oof_tpr_forget": round(gate.tpr, 4),
        "oof_fpr_retain": round(gate.fpr, 4),
        "oof_fpr_neutral": round(fpr_neutral, 4),
        "oof_auroc": round(gate.auroc, 4),
        "oof_tpr_forget_without_name": None if gate.tpr_masked is None else round(gate.tpr_masked, 4),
        "n_without_name": n_masked,
        "candidates": gate.candidates,
        "kind": kinds.chosen,
        "kinds": kinds.report,
    }


@dataclass
class _Captured:
    """The calibration prompts as the model saw them: forget, retain, neutral, in that order."""

    neutral: list[str]
    ids: list[list[list[int]]]  # token ids per set
    acts: list[Activations]  # captured activations per set
    pad: int
    skip: int  # length of the chat template head that every prompt shares
    num_layers: int
    name: list[str]  # the phrases that name the concept (ConceptCalibrator.name)
    name_words: list[str]  # the words removed from the name copies (calibration.prompts.concept_words)
    neutral_left_out: list[str]  # built-in everyday prompts that name the concept (everyday_negatives)
    masked_of: list[int]  # forget prompts that have a copy without those words, in copy order
    masked: Activations | None  # the copies' activations
    turn_header: list[int] | None  # what opens a user turn (GateMeta.turn_header), None without one

    @property
    def all_ids(self) -> list[list[int]]:
        return self.ids[0] + self.ids[1] + self.ids[2]

    def pooled(self, how: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The forget and retain prompts' (N, L, d) features for the concept directions."""
        f, r = self.acts[0], self.acts[1]
        return (f.mean(self.skip), r.mean(self.skip)) if how == "mean" else (f.last(), r.last())


@dataclass
class ConceptCalibrator:
    """Calibrate one concept on one HF model.

    Parameters mirror the pack: ``alpha`` bounds the gate's false-fire rate on retain prompts;
    ``angle_deg``/``angle_mode`` is the default rotation; ``target`` names the direction the
    concept component is rotated towards ("idk": the model answering "I don't know / can't
    help", from a built-in answer set; "retain": the mean retain activation).
    """

    concept_id: str
    alpha: float = 0.05
    angle_deg: float = DEFAULT_ANGLE_DEG
    angle_mode: Literal["absolute", "relative"] = "absolute"
    target: Literal["idk", "retain"] = "idk"
    direction_pooling: Literal["mean", "last"] = "mean"
    gate_layers: list[int] | None = None
    gate_poolings: tuple[str, ...] = ("mean",)
    late_gate: bool = False  # when the best early gate is weak, let a later layer gate
    # Copies of the forget prompts without the words that name the concept, as extra positives and
    # in the layer rule (GateFit.generalisation). Off by default: measured, they made the probe fire
    # on near neighbours (FINDINGS.md).
    name_copies: bool = False
    gate_kind: Literal["auto", "probe", "encoder", "hybrid"] = "hybrid"
    encoder: str = DEFAULT_ENCODER
    # With a text gate, also fit the answer check (steering.text_gate.answer_text) on the model's
    # own greedy answers to the calibration prompts, in the union of the text kinds.
    answer_check: bool = True
    # The phrases that name the concept: the answer check also fires on an answer whose first
    # sentence names it, and built-in everyday prompts that name it are no negatives. None: found in
    # the forget prompts (calibration.prompts.concept_name); []: none.
    name: list[str] | None = None
    # A folder where the model's answers to the built-in prompts (the same for every concept) are
    # kept between processes; None: generated once per process. The CLI keeps them in its cache.
    answer_cache: Path | None = None
    max_steer_layers: int | None = None
    min_steer_layers: int = 4
    batch_size: int = 16
    description: str = ""
    progress: bool = True
    seed: int = 0
    folds: int = DEFAULT_FOLDS  # cross-conformal folds of the thresholds (at most the smaller prompt set)
    report_: dict[str, Any] = field(default_factory=dict, init=False)

    def fit(
        self,
        model: torch.nn.Module,
        tokenizer,
        forget: list[PromptRecord] | list[str],
        retain: list[PromptRecord] | list[str],
        target_set: list[PromptRecord] | None = None,
    ) -> ConceptPack:
        """Calibrate: validate the sets, capture activations, fit the probe gate, choose the steered
        layers and their planes, fit the text gate, then build the pack and ``report_``."""
        t0 = time.perf_counter()
        fp, rp = single_prompts(forget, "forget"), single_prompts(retain, "retain")
        self._validate(fp, rp)
        data = self._capture(model, tokenizer, fp, rp)
        pooled_f, pooled_r = data.pooled(self.direction_pooling)
        directions = mean_difference(pooled_f, pooled_r)
        stats = layer_stats(pooled_f, pooled_r, directions)
        gate, anchor = self._fit_probe(data)
        steer, topped_up = choose_steer_layers(stats, anchor, self.min_steer_layers, self.max_steer_layers)
        targets = self._targets(model, tokenizer, target_set, pooled_r, data.pad)
        self.directions_ = directions
        t_orth = orthogonal_target(targets, directions)
        checked = self.answer_check and self.gate_kind != "probe"
        own = self._own_answers(model, tokenizer, data, everything=checked)
        order = steer_layer_order(stats, anchor)
        steer, drops = self._strong_enough(model, data, own[: len(fp)], steer, order, directions, t_orth)
        steer_scope = "all" if gate.layer >= steer[0] else "prompt"
        planes = torch.stack([make_plane(directions[l], t_orth[l]) for l in steer])
        texts = [request_text(tokenizer, ids, data.skip) for ids in data.all_ids]
        answers, named = None, {}
        if checked:
            decoded = [tokenizer.decode(a, skip_special_tokens=True) for a in own]
            both = decoded + self._neutral_answers(model, tokenizer, data)
            answers = [answer_text(t, a) for t, a in zip(texts, both)]
            # The negatives whose answers open by naming the concept: the answer check will change them.
            parts = {"retain": both[len(fp) : len(fp) + len(rp)], "neutral": both[len(fp) + len(rp) :]}
            named = {k: [i for i, a in enumerate(v) if names_answered(a, data.name)] for k, v in parts.items()}
        kinds = self._gate_kinds(gate, texts, len(fp), len(rp), answers, data.name)
        answer_check = kinds.text is not None and kinds.text.answer is not None
        report = {
            "concept_id": self.concept_id,
            "n_forget": len(fp),
            "n_retain": len(rp),
            "n_neutral": len(data.neutral),
            "n_neutral_left_out": len(data.neutral_left_out),
            "name": data.name,
            # None: the pack has no answer check.
            "n_retain_answers_named": len(named["retain"]) if answer_check else None,
            "n_neutral_answers_named": len(named["neutral"]) if answer_check else None,
            "encoder": None if self.gate_kind == "probe" else self.encoder,
            "alpha": self.alpha,
            "seed": self.seed,
            "folds": fold_count(len(fp), len(rp), self.folds),
            "layer_folds": fold_count(len(fp), len(rp), SELECTION_FOLDS),
            "gate": _gate_report(gate, kinds, len(data.masked_of)),
            "steer_layers": steer,
            "steer_topped_up": topped_up,
            "steer_grown": [l for l in steer if l not in drops[0][2]],
            "steer_answer_drop": [{"layers": n, "nats": round(d, 3)} for n, d, _ in drops],
            "min_answer_drop": MIN_ANSWER_DROP,
            "steer_scope": steer_scope,
            "steer_after": anchor,
            "late_gate": self.late_gate,
            "min_steer_layers": self.min_steer_layers,
            "layers": [s.as_dict() for s in stats],
            "target": self.target,
            "direction_pooling": self.direction_pooling,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        # Prompt texts stay out of the pack (its metadata travels to servers; a forget prompt may
        # itself be the private data): they are for the person running the calibration.
        diagnostics = {
            **gate_diagnostics(gate, fp, rp, data.neutral),
            "name_words": data.name_words,
            "neutral_left_out": data.neutral_left_out,
            "retain_answers_named": [rp[i] for i in named["retain"]] if answer_check else [],
            "neutral_answers_named": [data.neutral[i] for i in named["neutral"]] if answer_check else [],
        }
        self.report_ = {**report, "diagnostics": diagnostics}
        meta = PackMeta(
            concept_id=self.concept_id,
            description=self.description,
            model=hf_fingerprint(model),
            layers=steer,
            gate=GateMeta(
                layer=gate.layer,
                threshold=kinds.probe_threshold(gate),
                alpha=self.alpha,
                pooling=gate.pooling,  # type: ignore[arg-type]
                kind=kinds.chosen,  # type: ignore[arg-type]
                text=kinds.text,
                kinds=kinds.thresholds,  # type: ignore[arg-type]
                negatives=kinds.negatives(gate),
                turn_header=data.turn_header,
            ),
            angle_deg=self.angle_deg,
            angle_mode=self.angle_mode,
            target=self.target,
            steer_scope=steer_scope,
            skip_head=list(data.all_ids[0][: data.skip]),
            stats=dict(report),
        )
        heads = [(None, None) if f is None else (f.weight, f.bias) for f in (kinds.text_fit, kinds.answer_fit)]
        return ConceptPack(meta, planes, gate.weight, gate.bias, *heads[0], *heads[1])

    def _own_answers(self, model, tokenizer, data: _Captured, everything: bool) -> list[list[int]]:
        """The model's greedy answers (token ids) to the forget prompts, and with ``everything``
        to the retain prompts too."""
        n = len(data.ids[0]) + (len(data.ids[1]) if everything else 0)
        return greedy_answer_ids(model, tokenizer, data.all_ids[:n], ANSWER_TOKENS, 32, "answers", self.progress)

    def _neutral_answers(self, model, tokenizer, data: _Captured) -> list[str]:
        """The model's greedy answers to the built-in neutral prompts: the same for every concept,
        so generated once per process and model (keyed by the weights' fingerprint and precision),
        and kept in ``answer_cache`` between processes when it is set (:func:`cached_greedy_answers`)."""
        fp = hf_fingerprint(model)
        key = (fp.weights_sha256, fp.precision, tuple(map(tuple, data.ids[2])), ANSWER_TOKENS)
        if key not in _NEUTRAL_ANSWERS:
            _NEUTRAL_ANSWERS[key] = cached_greedy_answers(
                model,
                tokenizer,
                data.ids[2],
                ANSWER_TOKENS,
                32,
                "answers (built-in prompts)",
                self.progress,
                self.answer_cache,
            )
        return _NEUTRAL_ANSWERS[key]

    def _strong_enough(
        self,
        model,
        data: _Captured,
        answers: list[list[int]],
        steer: list[int],
        order: list[int],
        directions: torch.Tensor,
        t_orth: torch.Tensor,
    ) -> tuple[list[int], list[tuple[int, float, list[int]]]]:
        """Check the rotation on the forget prompts: forced at the calibrated angle, how much less
        likely it makes the model's own answers (nats per token, teacher-forced). Add steered
        layers in ``order`` until that reaches MIN_ANSWER_DROP or the cap. Returns the steered
        layers and every (count, drop, layers) tried."""
        cap = self.max_steer_layers if self.max_steer_layers is not None else MAX_GROWN_STEER_LAYERS
        head = max(1, data.skip)
        angle = math.radians(self.angle_deg)

        def nll(rotations: dict[int, torch.Tensor] | None) -> float:
            total, count = answer_nll(model, data.ids[0], answers, data.pad, rotations, angle, self.angle_mode,
                                      head, self.batch_size)  # fmt: skip
            return total / max(count, 1)

        base = nll(None)
        extra = [l for l in order if l not in steer]
        tried = []
        while True:
            drop = nll({l: make_plane(directions[l], t_orth[l]) for l in steer}) - base
            tried.append((len(steer), drop, list(steer)))
            if drop >= MIN_ANSWER_DROP or not extra or len(steer) >= cap:
                return steer, tried
            steer = sorted(steer + [extra.pop(0)])

    def _validate(self, fp: list[str], rp: list[str]) -> None:
        """The settings and the two prompt sets, before any model work."""
        if not 0.0 < self.alpha < 1.0:
            raise GuarditError(f"alpha must be in (0, 1), got {self.alpha}")
        if isinstance(self.folds, bool) or not isinstance(self.folds, int) or self.folds < 2:
            raise GuarditError(f"folds must be an integer of at least 2, got {self.folds!r}")
        bad = sorted(set(self.gate_poolings) - {"mean", "max"})
        if bad or not self.gate_poolings:
            raise GuarditError(f"gate_poolings must be a non-empty subset of ('mean', 'max'), got {self.gate_poolings}")
        if self.late_gate and self.gate_layers is not None:
            raise GuarditError(
                "late_gate and gate_layers cannot be combined: gate_layers fixes the candidate gate "
                f"layers ({self.gate_layers}); add the later layers to it instead"
            )
        if self.name is not None and not all(normal_name(n) for n in self.name):
            raise GuarditError(f"name: every name needs a word (a letter or digit), got {self.name!r}")
        both = sorted(set(fp) & set(rp))
        if both:
            raise GuarditError(f"{len(both)} prompt(s) in both the forget and the retain set, e.g. {both[0]!r}")
        if len(fp) < 4:
            raise GuarditError(f"the forget set needs at least 4 prompts, got {len(fp)}")
        need = min_negatives(self.alpha)
        if len(rp) < need:
            raise GuarditError(
                f"the retain set needs at least {need} prompts for alpha={self.alpha} "
                f"(conformal threshold), got {len(rp)}"
            )

    def _capture(self, model, tokenizer, fp: list[str], rp: list[str]) -> _Captured:
        """Chat-encode the forget, retain and built-in neutral prompts and capture every layer."""
        name = concept_name(fp, rp) if self.name is None else [normal_name(n) for n in self.name]
        neutral, about = everyday_negatives(name)
        pad = tokenizer.pad_token_id or 0
        ids = [encode_chat(tokenizer, prompts) for prompts in (fp, rp, neutral)]
        names = ("forget prompts", "retain prompts", "neutral prompts")
        acts = [capture(model, x, self.batch_size, name, pad, self.progress) for x, name in zip(ids, names)]
        # Copies of the forget prompts without the concept's name: what the probe must still
        # recognise (a prompt left with fewer than three words, or equal to a negative, is skipped).
        words = concept_words(fp, rp + neutral) if self.name_copies else []
        negatives = set(rp) | set(neutral)
        copies = [(i, without_words(p, words)) for i, p in enumerate(fp)]
        copies = [(i, c) for i, c in copies if c != fp[i] and len(c.split()) >= 3 and c not in negatives]
        masked = None
        if copies:
            masked_ids = encode_chat(tokenizer, [c for _, c in copies])
            masked = capture(model, masked_ids, self.batch_size, "forget prompts without the name", pad, self.progress)
        return _Captured(
            neutral=neutral,
            ids=ids,
            acts=acts,
            pad=pad,
            skip=common_prefix_length(ids[0] + ids[1] + ids[2]),
            num_layers=len(decoder_layers(model)),
            name=name,
            name_words=words,
            neutral_left_out=about,
            masked_of=[i for i, _ in copies],
            masked=masked,
            turn_header=_turn_header(tokenizer, ids[0] + ids[1] + ids[2]),
        )

    def _fit_probe(self, data: _Captured) -> tuple[GateFit, int]:
        """The probe gate over the candidate layers, and the layer the steered layers must follow
        (the best early gate's, which sees the prompt before any of them)."""
        n_layers = data.num_layers
        early = list(range(2, max(3, n_layers // 2), 2))
        candidates = self.gate_layers or early
        bad = [g for g in candidates if not 0 <= g < n_layers - 1]
        if bad:
            raise GuarditError(f"gate_layers {bad} out of range for a {n_layers}-layer model")
        tokens = tuple(a.tokens for a in data.acts)
        masked = data.masked.tokens if data.masked is not None else None

        def fit(layers: list[int]) -> GateFit:
            return fit_gate(*tokens, data.all_ids, layers, self.alpha, self.gate_poolings, SELECTION_FOLDS,
                            seed=self.seed, masked_tokens=masked, masked_of=data.masked_of)  # fmt: skip

        gate = fit(candidates)
        anchor, tried = gate.layer, list(gate.candidates)
        if self.gate_layers is None and self.late_gate and gate.tpr < WEAK_RECALL:
            # A weak early gate: try the later layers too. A late gate decides when the prompt has
            # passed the steered layers before it; those then rotate the generated tokens only.
            late = fit(list(range(early[-1] + 1, n_layers - 1)))
            tried += late.candidates
            if late.tpr > gate.tpr:
                gate = late
            gate.candidates = tried
        # The layer and pooling are chosen; the served head and its threshold take self.folds.
        gate = refit_gate(gate, *tokens, data.all_ids, self.folds, seed=self.seed, masked_tokens=masked,
                          masked_of=data.masked_of)  # fmt: skip
        if not math.isfinite(gate.threshold):
            raise GuarditError("gate threshold is not finite: add retain prompts or raise alpha")
        return gate, anchor

    def _gate_kinds(
        self,
        gate: GateFit,
        texts: list[str],
        nf: int,
        nr: int,
        answers: list[str] | None = None,
        name: list[str] | None = None,
    ) -> _GateKinds:
        """Fit the text gate on the request texts (forget, retain, neutral order) unless the kind
        is "probe", and the answer check on ``answers`` (each request text with the model's answer)
        when given, which also fires on an answer whose first sentence names the concept (``name``,
        :func:`steering.names.names_answered`); compare the kinds out of fold (each held to the
        same false-fire bound: a text kind is the union of its gates, the answer check included;
        the name rule is outside that bound) and pick the served one:
        ``gate_kind``, or with "auto" the highest out-of-fold recall, a kind within AUTO_MARGIN of
        it that comes first in AUTO_PREFERENCE winning."""

        def row(tpr, orr, on, thr) -> dict:
            return {
                "oof_tpr_forget": round(tpr, 4),
                "oof_fpr_retain": round(float(np.mean(orr > thr)), 4),
                "oof_fpr_neutral": round(float(np.mean(on > thr)) if len(on) else 0.0, 4),
            }

        report = {"probe": row(gate.tpr, gate.oof_retain, gate.oof_neutral, gate.threshold)}
        thresholds = {"probe": KindThresholds(probe=gate.threshold)}
        if self.gate_kind == "probe":
            return _GateKinds(report, thresholds, "probe", None, None)
        enc = load_encoder(self.encoder)

        def fit_head(strings: list[str]) -> TextGateFit:
            embs = enc.window_embeddings(strings)
            return fit_text_gate(embs[:nf], embs[nf : nf + nr], embs[nf + nr :], self.alpha, self.folds, seed=self.seed)

        text = fit_head(texts)
        answer = fit_head(answers) if answers is not None else None
        extra = [] if answer is None else [answer]
        encoder = combine_gates([text, *extra], self.alpha)
        hybrid = combine_gates([gate, text, *extra], self.alpha)
        if not all(math.isfinite(t) for t in (*encoder.thresholds, *hybrid.thresholds)):
            raise GuarditError("text gate threshold is not finite: add retain prompts or raise alpha")
        report["encoder"] = row(encoder.tpr, encoder.oof_retain, encoder.oof_neutral, encoder.threshold)
        report["hybrid"] = row(hybrid.tpr, hybrid.oof_retain, hybrid.oof_neutral, hybrid.threshold)
        # Each union's thresholds come in the order of its gates: [probe,] text[, answer].
        thresholds["encoder"] = KindThresholds(**dict(zip(("text", "answer"), encoder.thresholds)))
        thresholds["hybrid"] = KindThresholds(**dict(zip(("probe", "text", "answer"), hybrid.thresholds)))
        chosen = self.gate_kind if self.gate_kind != "auto" else choose_gate_kind(report)
        if chosen == "probe":
            return _GateKinds(report, {"probe": thresholds["probe"]}, "probe", None, None)
        t = thresholds[chosen]
        check = None
        if t.answer is not None:
            check = AnswerCheckMeta(threshold=t.answer, max_tokens=ANSWER_TOKENS, names=name or [])
        meta = TextGateMeta(encoder=enc.name, encoder_sha256=enc.sha256, threshold=t.text, answer=check)
        return _GateKinds(report, thresholds, chosen, meta, text, answer)

    def _targets(self, model, tokenizer, target_set, pooled_retain: torch.Tensor, pad: int) -> torch.Tensor:
        """(L, d) target vectors (not yet orthogonalised)."""
        if self.target == "retain":
            return pooled_retain.mean(0)
        records = target_set or builtin_prompts("idk")
        single_prompts(records, "target")
        if not all(r.answers for r in records):
            raise GuarditError("every record of the target set needs an 'answers' entry (the reply to steer towards)")
        # Activations over the answer tokens of "question → I don't know" conversations.
        convs, starts = [], []
        for r in records:
            prompt_ids = encode_chat(tokenizer, [r.prompt])[0]
            full = prompt_ids + tokenizer(r.answers[0], add_special_tokens=False)["input_ids"]
            convs.append(full)
            starts.append(len(prompt_ids))
        acts = capture(model, convs, self.batch_size, "target answers", pad, self.progress)
        answer_means = torch.stack([t[s:].mean(0) for t, s in zip(acts.tokens, starts)])
        return answer_means.mean(0) - pooled_retain.mean(0)
