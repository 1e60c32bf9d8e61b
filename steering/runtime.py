"""The per-forward-pass logic shared by the HF and vLLM integrations.

A :class:`SteeringBank` holds the loaded packs, grouped by layer. For one forward pass over a
flattened batch of tokens (T, d) belonging to R rows (sequences/requests), the integration calls

1. :meth:`SteeringBank.update_gates` at each gate layer: per-token probe scores s = w·h + b update
   each row's running statistics (sum, count, max over every token it has processed; for a pack
   with a turn header, every token but the earlier user turns of a conversation,
   :func:`earlier_turns`, so that they do not dilute the ask); a row's gate fires once its
   pooled value (mean or max, per pack) exceeds the pack's threshold (placed at the row's level α
   when the request sets one, :meth:`SteeringBank.gate`), and stays fired.
2. :meth:`SteeringBank.steer_` at each steered layer: rotates, in place, only the tokens of rows
   whose gate fired for a pack with a plane at this layer. Other tokens are neither read back
   nor written, so rows whose gates stay closed are bit-identical to the unhooked model.

At a layer that is both a gate layer and a steered layer, gates are updated first, on the
layer's own output. Packs are applied in the order of their ids.

Packs with a text gate (:mod:`steering.text_gate`) decide from the request text before the
forward: :meth:`SteeringBank.text_gates` scores each new request once, and
:meth:`SteeringBank.settings` turns a fired text gate into a rotation from the first token (like
``force``); an "encoder"-kind pack whose text gate stays closed does not apply to the row, a
"hybrid" one still gates in the forward pass with its probe. After a generation,
:meth:`SteeringBank.recheck` is the answer check: which rows to generate again, forced.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from steering.names import names_answered
from steering.pack import ConceptPack, GateMeta
from steering.policy import RequestSpec, parse_request
from steering.rotation import rotate_rows_

MAX_LEVELS = 256  # (pack, level) gates kept placed per bank


class PackUse(NamedTuple):
    """How one row uses one pack: the angle in degrees (None: the pack's calibrated angle),
    whether the rotation is forced (applied without consulting the gate), and the gate's level α
    (None: the pack's calibrated level; otherwise its thresholds are placed there,
    :meth:`ConceptPack.at_alpha`)."""

    angle: float | None = None
    force: bool = False
    alpha: float | None = None


RowSpec = Mapping[str, PackUse | tuple]  # pack id -> how the row uses it: a PackUse or its fields
# A row's gate level for the text gates and the answer check: one α for all its packs, or α by
# pack id (None, or a pack left out: as calibrated).
RowLevel = float | None | Mapping[str, float | None]


def row_levels(rows: Sequence[RowSpec | RequestSpec | None]) -> list[RowLevel]:
    """The gate levels of rows given as pack uses or request specs (:meth:`SteeringBank.settings`'
    rows), for :meth:`SteeringBank.text_gates`."""
    out: list[RowLevel] = []
    for row in rows:
        if row is None or isinstance(row, RequestSpec):
            out.append(None if row is None else row.alpha)
        else:
            out.append({pid: PackUse(*use).alpha for pid, use in row.items()})
    return out


def row_spec(spec: RequestSpec | None) -> dict[str, PackUse]:
    """A request's spec as its row's pack uses (no packs for None)."""
    return {} if spec is None else {pid: PackUse(spec.angle, spec.force, spec.alpha) for pid in spec.packs}


def gated_packs(row: RowSpec | RequestSpec | None) -> set[str]:
    """The packs of a row whose gates decide: not the forced ones, which rotate whatever a gate
    says (so no encoder pass is spent on them)."""
    uses = row_spec(row) if row is None or isinstance(row, RequestSpec) else row
    return {pid for pid, use in uses.items() if not PackUse(*use).force}


@dataclass
class GateStats:
    """Running gate statistics of R rows for P packs (float32 on the bank's device). One row of it,
    kept between forward passes (vLLM: per request), is a GateStats with R = 1."""

    total: torch.Tensor  # (R, P) sum of token scores
    count: torch.Tensor  # (R, P) number of scored tokens
    peak: torch.Tensor  # (R, P) max token score (-inf before any token)
    fired: torch.Tensor  # (R, P) bool

    @classmethod
    def empty(cls, rows: int, packs: int, device: torch.device | str = "cpu") -> GateStats:
        z = torch.zeros(rows, packs, dtype=torch.float32, device=device)
        return cls(
            z.clone(),
            z.clone(),
            torch.full_like(z, -math.inf),
            torch.zeros(rows, packs, dtype=torch.bool, device=device),
        )

    @classmethod
    def stack(cls, rows: Sequence[GateStats], device: torch.device | str = "cpu") -> GateStats:
        """The rows' statistics as one batch, in order, on ``device``."""
        return cls(*(torch.cat([getattr(r, f) for r in rows]).to(device) for f in ("total", "count", "peak", "fired")))

    def row(self, i: int) -> GateStats:
        """Row ``i``'s statistics (a copy on the CPU), to keep until the row's next forward."""
        return GateStats(*(getattr(self, f)[i : i + 1].cpu() for f in ("total", "count", "peak", "fired")))

    def value(self, max_pool: torch.Tensor) -> torch.Tensor:
        """Pooled gate value per row and pack: the mean or the max of the token scores so far."""
        mean = self.total / self.count.clamp_min(1.0)
        mean = torch.where(self.count > 0, mean, torch.full_like(mean, -math.inf))
        return torch.where(max_pool, self.peak, mean)


@dataclass
class TokenMap:
    """The flattened tokens (T) of one forward pass over R rows: each token's row, and what guardit
    may do with it (None: every token)."""

    row: torch.Tensor  # (T,) long
    counted: torch.Tensor | None = None  # (T,) tokens the gates count (not padding, not counted before)
    steerable: torch.Tensor | None = None  # (T,) tokens a rotation may touch (not padding, not the template head)
    is_prompt: torch.Tensor | None = None  # (T,) prompt tokens: the only ones prompt-scope gates and rotations use
    ready: torch.Tensor | None = None  # (R,) rows whose whole prompt has been seen after this pass
    # (T,) tokens the probes of packs with a turn header count: all but the row's earlier user turns
    # (:func:`earlier_turns`), generated tokens included (None: every token; what the integrations
    # pass when no pack has a turn header)
    pooled: torch.Tensor | None = None


def earlier_turns(prompt_ids: Sequence[int], header: Sequence[int]) -> tuple[int, int]:
    """The span [start, end) of the prompt's earlier user turns: from just after the first
    occurrence of ``header`` (the token ids that open a user turn in the chat template) to just
    after its last one, where the last user turn begins; (0, 0) when the header occurs at most once.
    A pack with a turn header leaves that span out of its probe's pool: a single prompt (template
    head or system prompt, then one turn) is pooled whole, what calibration fitted the probe on,
    and an ask late in a conversation is pooled as if asked alone, undiluted by what came before.
    Never the prompt's last token."""
    ids, mark, n = list(prompt_ids), list(header), len(header)
    hits = [i + n for i, t in enumerate(ids) if t == mark[0] and ids[i : i + n] == mark] if n else []
    if len(hits) < 2:
        return 0, 0
    return hits[0], min(hits[-1], len(ids) - 1)


@dataclass
class RowSettings:
    """Which packs act on each row, and how (R, P tensors)."""

    active: torch.Tensor  # bool: pack applies to this row (gated)
    force: torch.Tensor  # bool: rotate this row without consulting the gate
    angle: torch.Tensor  # float32 radians
    threshold: torch.Tensor  # float32: the probe's threshold at the row's level α


@dataclass
class _GateGroup:
    packs: torch.Tensor  # (Pl,) long, indices into the bank
    weight: torch.Tensor  # (Pl, d)
    bias: torch.Tensor  # (Pl,)


@dataclass
class SteeringBank:
    """Loaded packs arranged for the forward pass."""

    packs: list[ConceptPack]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        self.packs = sorted(self.packs, key=lambda p: p.id)
        ids = [p.id for p in self.packs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate concept ids in bank: {ids}")
        self.index = {p.id: i for i, p in enumerate(self.packs)}
        dev = self.device
        self.thresholds = torch.tensor([p.meta.gate.threshold for p in self.packs], dtype=torch.float32, device=dev)
        self.max_pool = torch.tensor([p.meta.gate.pooling == "max" for p in self.packs], dtype=torch.bool, device=dev)
        self.scope_all = torch.tensor([p.meta.gate.scope == "all" for p in self.packs], dtype=torch.bool, device=dev)
        self.default_angle = torch.tensor(
            [math.radians(p.meta.angle_deg) for p in self.packs], dtype=torch.float32, device=dev
        )
        self.gate_layers: dict[int, _GateGroup] = {}
        by_layer: dict[int, list[int]] = {}
        for i, p in enumerate(self.packs):
            by_layer.setdefault(p.meta.gate.layer, []).append(i)
        for layer, idx in by_layer.items():
            self.gate_layers[layer] = _GateGroup(
                torch.tensor(idx, dtype=torch.long, device=dev),
                torch.stack([self.packs[i].gate_weight for i in idx]).to(dev, torch.float32),
                torch.tensor([self.packs[i].gate_bias for i in idx], dtype=torch.float32, device=dev),
            )
        self.steer_layers: dict[int, list[tuple[int, torch.Tensor, str]]] = {}
        for i, p in enumerate(self.packs):
            for j, layer in enumerate(p.meta.layers):
                self.steer_layers.setdefault(layer, []).append(
                    (i, p.planes[j].to(dev, torch.float32), p.meta.angle_mode)
                )
        self.layers = sorted(set(self.gate_layers) | set(self.steer_layers))
        self._needed: dict[tuple[frozenset[str], bool, bool], frozenset[int]] = {}
        self._gates: dict[tuple[int, float], GateMeta] = {}
        self._identities: dict[int, bytes] = {}
        self.steer_cols = {
            layer: torch.tensor([p for p, _, _ in entries], dtype=torch.long, device=dev)
            for layer, entries in self.steer_layers.items()
        }
        self.steer_all = [p.meta.steer_scope == "all" for p in self.packs]
        self.text_packs = [i for i, p in enumerate(self.packs) if p.meta.gate.text is not None]
        self.encoder_only = torch.tensor([p.meta.gate.kind == "encoder" for p in self.packs], dtype=torch.bool)
        self.turn_pool = torch.tensor(
            [p.meta.gate.turn_header is not None for p in self.packs], dtype=torch.bool, device=dev
        )
        turn_headers = {tuple(p.meta.gate.turn_header) for p in self.packs if p.meta.gate.turn_header is not None}
        if len(turn_headers) > 1:
            raise ValueError(
                f"packs open a user turn with different token ids {sorted(turn_headers)}: calibrated "
                "with different chat templates, they cannot serve one model together"
            )
        self.turn_header: list[int] | None = list(turn_headers.pop()) if turn_headers else None
        heads = [p.meta.skip_head for p in self.packs]
        self.skip_head: list[int] = []
        if heads:
            for i in range(min(len(h) for h in heads)):
                if any(h[i] != heads[0][i] for h in heads):
                    break
                self.skip_head.append(heads[0][i])

    def head_length(self, prompt_ids: list[int]) -> int:
        """How many leading prompt tokens are never rotated: the part matching the template head,
        and at least the first token (the attention sink, whose huge norm rotations would wreck)."""
        n = 0
        for a, b in zip(prompt_ids, self.skip_head):
            if a != b:
                break
            n += 1
        return max(1, min(n, len(prompt_ids) - 1))

    def earlier_turns(self, prompt_ids: list[int]) -> tuple[int, int]:
        """The span of earlier user turns that turn-pooling probes leave out (:func:`earlier_turns`);
        (0, 0) when no pack has a turn header."""
        if self.turn_header is None:
            return 0, 0
        return earlier_turns(prompt_ids, self.turn_header)

    @property
    def num_packs(self) -> int:
        return len(self.packs)

    def gate(self, j: int, alpha: float | None = None) -> GateMeta:
        """Pack ``j``'s gate with its thresholds at level ``alpha`` (None: as calibrated), placed
        once per level (:meth:`ConceptPack.at_alpha`); raises :class:`PolicyError` for a level the
        pack cannot serve (requests are checked against it when they arrive)."""
        if alpha is None:
            return self.packs[j].meta.gate
        key = (j, alpha)
        if key not in self._gates:
            if len(self._gates) >= MAX_LEVELS:  # clients choose levels: the oldest placed one goes
                self._gates.pop(next(iter(self._gates)))
            self._gates[key] = self.packs[j].at_alpha(alpha).meta.gate
        return self._gates[key]

    def settings(
        self,
        rows: Sequence[RowSpec | RequestSpec | None],
        text_fired: torch.Tensor | None = None,
    ) -> RowSettings:
        """Per-row settings, the one path for both engines: each row is given as its pack uses
        ({pack_id: (angle_deg or None, force)}) or as its request's spec (None: no pack), with the
        rows' text-gate decisions ``text_fired`` (R, P) bool from :meth:`text_gates`: a fired text
        gate rotates the row from its first token; an "encoder" pack whose text gate did not fire
        does not apply to the row (its probe never decides)."""
        r, p = len(rows), self.num_packs
        active = torch.zeros(r, p, dtype=torch.bool)
        force = torch.zeros(r, p, dtype=torch.bool)
        angle = self.default_angle.cpu().expand(r, p).clone()
        threshold = self.thresholds.cpu().expand(r, p).clone()
        for i, row in enumerate(rows):
            uses = row_spec(row) if row is None or isinstance(row, RequestSpec) else row
            for pid, use in uses.items():
                deg, forced, alpha = PackUse(*use)
                j = self.index[pid]
                active[i, j] = True
                force[i, j] = forced
                if deg is not None:
                    angle[i, j] = math.radians(deg)
                if alpha is not None:
                    threshold[i, j] = self.gate(j, alpha).threshold
        if text_fired is not None:
            text_fired = text_fired.cpu() & active
            force |= text_fired
            active &= ~self.encoder_only | text_fired
        dev = self.device
        return RowSettings(active.to(dev), force.to(dev), angle.to(dev), threshold.to(dev))

    def request_spec(self, extra_args: Mapping[str, Any] | None) -> RequestSpec | None:
        """A request's spec read from its ``extra_args`` against the packs of this bank (a request
        cannot name more packs than are loaded), its gate level checked against each pack. Raises
        :class:`steering.errors.PolicyError` (a ValueError) naming the field."""
        spec = parse_request(dict(extra_args) if extra_args else None, frozenset(self.index), self.num_packs)
        if spec is not None:
            spec.check_levels({p.id: p.meta for p in self.packs})
        return spec

    def fixed_rotation(self, spec: RequestSpec | None, text_fired: torch.Tensor | None) -> tuple[bool, str | None]:
        """Is a request's rotation fixed before its forward pass, and which is it? ``text_fired``:
        its text gates' decision (P,) bool (None: the bank has no text gate). Fixed when every pack
        of the request is forced, fired by its text gate, or an "encoder" pack whose text gate
        stayed closed (it does not apply): no probe decides in the forward pass. Returns (fixed,
        key): ``key`` names exactly what rotates the request's tokens (the rotating packs' planes,
        layers, scopes and angles, and the template head left alone), None when nothing does (its
        KV is vanilla's); (False, None) when a probe still decides. Equal keys mean equal rotations
        of every prompt token, which is what lets two requests share cached prefix blocks."""
        if self.deciding(spec, text_fired):
            return False, None
        _, force, angle = self._row(spec, text_fired)
        rotating = force.nonzero().flatten().tolist()
        if not rotating:
            return True, None
        return True, self._key(rotating, angle, [])

    def deferred_key(self, spec: RequestSpec | None, text_fired: torch.Tensor | None) -> str | None:
        """For a request whose probes still decide in the forward pass (:meth:`fixed_rotation` not
        fixed): can their decision wait for the whole prompt, with nothing rotated on their account
        meanwhile, and under which key? Only when every such gate has scope "prompt" (it decides on
        the prompt alone); None otherwise. The key names what the request's prompt KV and its probe
        scores depend on: the rotation fixed before its forward (forced or text-fired packs, as in
        :meth:`fixed_rotation`) and the deciding packs (their gates, turn header, template head).
        Requests with equal keys compute the same KV and the same per-token probe scores for the
        same tokens, so one may read the other's cached blocks and their kept scores."""
        deciding = self.deciding(spec, text_fired)
        _, force, angle = self._row(spec, text_fired)
        if not deciding or any(self.packs[j].meta.gate.scope != "prompt" for j in deciding):
            return None
        return self._key(force.nonzero().flatten().tolist(), angle, deciding)

    def deciding(self, spec: RequestSpec | None, text_fired: torch.Tensor | None) -> list[int]:
        """The packs (bank indices) whose probe still decides for a request in the forward pass:
        those that apply to it and are neither forced nor fired by their text gate."""
        active, force, _ = self._row(spec, text_fired)
        return (active & ~force).nonzero().flatten().tolist()

    def _row(self, spec: RequestSpec | None, text_fired: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """One request's settings (active, force, angle; (P,) each, on the CPU)."""
        s = self.settings([spec], None if text_fired is None else text_fired.unsqueeze(0))
        return s.active[0].cpu(), s.force[0].cpu(), s.angle[0].cpu()

    def _key(self, rotating: list[int], angle: torch.Tensor, deciding: list[int]) -> str:
        h = hashlib.sha256(repr((self.skip_head, self.turn_header)).encode())  # the head no rotation touches
        for j in rotating:
            h.update(self._identity(j))
            h.update(repr(float(angle[j])).encode())
        if deciding:
            h.update(b"|deciding")
            for j in deciding:
                h.update(self._identity(j))
        return h.hexdigest()[:32]

    def _identity(self, j: int) -> bytes:
        """Pack ``j``'s rotation, as bytes: its metadata (layers, scopes, angle mode, template head)
        and its planes."""
        found = self._identities.get(j)
        if found is None:
            p = self.packs[j]
            found = self._identities[j] = hashlib.sha256(
                p.meta.model_dump_json().encode() + p.planes.detach().cpu().contiguous().numpy().tobytes()
            ).digest()
        return found

    def readout(self, stats: GateStats, settings: RowSettings) -> tuple[torch.Tensor, torch.Tensor]:
        """What the gates say, on the CPU: (the pooled probe value (R, P), fired (R, P) bool, a
        forced pack counting as fired)."""
        return stats.value(self.max_pool).cpu(), (stats.fired | settings.force).cpu()

    def uses_text_gate(self, pack_ids: Iterable[str]) -> bool:
        """Does a row using these packs need a text-gate decision before its forward?"""
        ids = set(pack_ids)
        return any(self.packs[j].id in ids for j in self.text_packs)

    def text_gates(
        self, texts: list[str], pack_ids: list[Iterable[str]], alphas: Sequence[RowLevel] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text-gate decisions before the forward: ``texts[i]`` is row i's request text
        (:func:`steering.text_gate.request_text`), ``pack_ids[i]`` the packs it uses, ``alphas[i]``
        its gates' level (:data:`RowLevel`; None: as calibrated). Returns (fired (R, P) bool, score (R, P) float32,
        -inf where no text gate was scored). Each row's text is embedded once (one encoder batch
        for all rows), whatever the number of packs."""
        return self._head_gates("text", texts, pack_ids, alphas)

    def answer_gates(
        self, texts: list[str], pack_ids: list[Iterable[str]], alphas: Sequence[RowLevel] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Answer-check decisions after a generation: ``texts[i]`` is row i's request text followed
        by its answer (:func:`steering.text_gate.answer_text`), ``pack_ids[i]`` the packs to check
        (those that applied to the row and did not fire). Same arguments and returns as
        :meth:`text_gates`; packs without an answer check are never scored."""
        return self._head_gates("answer", texts, pack_ids, alphas)

    def has_answer_check(self) -> bool:
        return any(p.meta.gate.text is not None and p.meta.gate.text.answer is not None for p in self.packs)

    def answer_texts(self, tokenizer, prompt_ids: Sequence[Sequence[int]], answers: Sequence[str]) -> list[str]:
        """What the answer check reads for each row: its request text (the prompt after the
        template head, as the text gate reads it) and its answer (:func:`steering.text_gate.answer_text`)."""
        from steering.text_gate import answer_text, request_text

        return [
            answer_text(request_text(tokenizer, list(p), self.head_length(list(p))), a)
            for p, a in zip(prompt_ids, answers)
        ]

    def recheck(
        self,
        texts: list[str],
        answers: Sequence[str],
        applied: Sequence[Iterable[str]],
        fired: Sequence[Iterable[str]],
        alphas: Sequence[RowLevel] | None = None,
    ) -> tuple[list[frozenset[str]], torch.Tensor]:
        """The answer check of finished generations, one rule for both engines. ``texts[i]``: row
        i's request text and answer (:func:`steering.text_gate.answer_text`), ``answers[i]`` its
        answer alone; ``applied[i]``, ``fired[i]``: the packs that applied to it and those whose
        gate fired. A pack's check fires when its answer head scores the text above its threshold
        or the answer's first sentence names the concept (the pack's ``names``,
        :func:`steering.names.names_answered`: whatever the level, an answer that gives the
        forgotten concept is not kept). Returns, per row, the packs to force when generating it
        again (empty: keep the answer): the packs whose answer check fired, with the packs that had
        fired, so the new answer is rotated for all of them; and the answer scores (R, P), -inf
        where not scored. ``alphas[i]``: row i's gate level (:data:`RowLevel`; None: as
        calibrated)."""
        fired_sets = [set(f) for f in fired]
        check = [set(a) - f for a, f in zip(applied, fired_sets)]
        hit, score = self.answer_gates(texts, check, alphas)
        redo = []
        for i, f in enumerate(fired_sets):
            new = {self.packs[j].id for j in hit[i].nonzero().flatten().tolist()}
            new |= {pid for pid in check[i] if names_answered(answers[i], self._answer_names(pid))}
            redo.append(frozenset(new | f) if new else frozenset())
        return redo, score

    def _answer_names(self, pack_id: str) -> list[str]:
        """The names pack ``pack_id``'s answer check fires on (none without an answer check)."""
        text = self.packs[self.index[pack_id]].meta.gate.text
        return [] if text is None or text.answer is None else text.answer.names

    def _head_gates(
        self, head: str, texts: list[str], pack_ids: list[Iterable[str]], alphas: Sequence[RowLevel] | None
    ):
        from steering.text_gate import check_encoder

        r, p = len(texts), self.num_packs
        levels = list(alphas) if alphas is not None else [None] * r

        def level(i: int, j: int) -> float | None:
            a = levels[i]
            return a.get(self.packs[j].id) if isinstance(a, Mapping) else a

        fired = torch.zeros(r, p, dtype=torch.bool)
        score = torch.full((r, p), -math.inf)
        uses = [set(ids) for ids in pack_ids]
        by_encoder: dict[tuple[str, str], list[int]] = {}
        for j in self.text_packs:
            tg = self.packs[j].meta.gate.text
            assert tg is not None
            if head == "answer" and tg.answer is None:
                continue
            by_encoder.setdefault((tg.encoder, tg.encoder_sha256), []).append(j)
        for (name, sha), cols in by_encoder.items():
            rows = [i for i in range(r) if any(self.packs[j].id in uses[i] for j in cols)]
            if not rows:
                continue
            enc = check_encoder(self.packs[cols[0]].id, name, sha)
            embs = enc.window_embeddings([texts[i] for i in rows])
            weight = torch.stack([getattr(self.packs[j], f"{head}_weight") for j in cols])
            bias = torch.tensor([getattr(self.packs[j], f"{head}_bias") for j in cols])
            s = torch.stack([(e @ weight.t() + bias).max(0).values for e in embs])  # (rows, cols)
            thr = torch.tensor([[_head_threshold(self.gate(j, level(i, j)), head) for j in cols] for i in rows])
            use = torch.tensor([[self.packs[j].id in uses[i] for j in cols] for i in rows], dtype=torch.bool)
            idx, col_idx = torch.tensor(rows), torch.tensor(cols)
            score[idx.unsqueeze(1), col_idx] = torch.where(use, s, torch.full_like(s, -math.inf))
            fired[idx.unsqueeze(1), col_idx] = use & (s > thr)
        return fired, score

    def update_gates(
        self, layer: int, h: torch.Tensor, tokens: TokenMap, stats: GateStats, settings: RowSettings
    ) -> torch.Tensor | None:
        """Score the counted tokens of ``h`` (T, d) at a gate layer and update ``stats`` in place.
        Returns every token's scores (T, Pl) for the layer's packs (``gate_layers[layer].packs``),
        None at a layer without gates.

        A pack with gate scope "prompt" (the default) looks at prompt tokens only, and decides only
        on a row whose whole prompt has been seen (``tokens.ready``), so that its decision does not
        depend on how the prompt was split into prefill chunks.
        """
        group = self.gate_layers.get(layer)
        if group is None:
            return None
        scores = torch.addmm(group.bias, h.to(torch.float32), group.weight.t())  # (T, Pl)
        self._pool(group.packs, scores, tokens, stats)
        self._open(group.packs, tokens, stats, settings)
        return scores

    def decide_prompt(self, scores: torch.Tensor, pooled: torch.Tensor | None, settings: RowSettings) -> GateStats:
        """One row's gates decided on its whole prompt at once, from every prompt token's probe
        scores ``scores`` (N, P), NaN for a pack not scored, and the tokens that packs with a turn
        header pool (``pooled`` (N,), None: all), with its settings (one row): the statistics and
        decisions that :meth:`update_gates` reaches over the prompt's forward passes. Used where
        a request's scores come partly from the prefix cache (vLLM: scores kept per cached block)."""
        n, p = scores.shape
        dev = self.device
        tokens = TokenMap(
            row=torch.zeros(n, dtype=torch.long, device=dev),
            ready=torch.ones(1, dtype=torch.bool, device=dev),
            pooled=None if pooled is None else pooled.to(dev),
        )
        stats = GateStats.empty(1, p, dev)
        cols = torch.arange(p, device=dev)
        self._pool(cols, scores.to(dev, torch.float32), tokens, stats)
        self._open(cols, tokens, stats, settings)
        return stats

    def _pool(self, cols: torch.Tensor, scores: torch.Tensor, tokens: TokenMap, stats: GateStats) -> None:
        """Add the tokens' scores (T, len(cols)) for packs ``cols`` to their rows' running statistics:
        only the tokens each pack counts (counted, prompt tokens for prompt-scope gates, not a
        conversation's earlier turns for packs with a turn header)."""
        keep = torch.ones_like(scores, dtype=torch.bool)
        if tokens.counted is not None:
            keep &= tokens.counted.unsqueeze(-1)
        if tokens.is_prompt is not None:
            keep &= tokens.is_prompt.unsqueeze(-1) | self.scope_all[cols].unsqueeze(0)
        if tokens.pooled is not None:
            keep &= tokens.pooled.unsqueeze(-1) | ~self.turn_pool[cols].unsqueeze(0)
        s_sum = torch.where(keep, scores, torch.zeros_like(scores))
        s_max = torch.where(keep, scores, torch.full_like(scores, -math.inf))
        ones = keep.to(torch.float32)
        rows = stats.total.shape[0]
        pl = cols.numel()
        dev = scores.device
        idx = tokens.row.unsqueeze(-1).expand(-1, pl)
        add_sum = torch.zeros(rows, pl, dtype=torch.float32, device=dev).scatter_add_(0, idx, s_sum)
        add_cnt = torch.zeros(rows, pl, dtype=torch.float32, device=dev).scatter_add_(0, idx, ones)
        new_max = torch.full((rows, pl), -math.inf, dtype=torch.float32, device=dev).scatter_reduce_(
            0, idx, s_max, reduce="amax", include_self=True
        )
        stats.total[:, cols] += add_sum
        stats.count[:, cols] += add_cnt
        stats.peak[:, cols] = torch.maximum(stats.peak[:, cols], new_max)

    def _open(self, cols: torch.Tensor, tokens: TokenMap, stats: GateStats, settings: RowSettings) -> None:
        """The gates of packs ``cols`` open where the pooled value exceeds the row's threshold (a
        prompt-scope gate only once the row's whole prompt has been seen); forced packs count as open."""
        value = stats.value(self.max_pool)[:, cols]
        opened = (value > settings.threshold[:, cols]) & settings.active[:, cols]
        if tokens.ready is not None:
            opened &= tokens.ready.unsqueeze(-1) | self.scope_all[cols].unsqueeze(0)
        stats.fired[:, cols] |= opened | settings.force[:, cols]

    def steer_(
        self, layer: int, h: torch.Tensor, tokens: TokenMap, stats: GateStats, settings: RowSettings
    ) -> torch.Tensor | None:
        """Rotate, in place, the steerable tokens of ``h`` (T, d) whose row fired (packs with steer
        scope "prompt", the default: prompt tokens only). Returns the indices of the rotated tokens
        (None when none was).
        """
        entries = self.steer_layers.get(layer)
        if not entries:
            return None
        changed: list[torch.Tensor] = []
        fired = stats.fired | settings.force
        for p, basis, mode in entries:
            rows = fired[:, p]
            if not bool(rows.any()):
                continue
            tok = rows[tokens.row]
            if tokens.steerable is not None:
                tok = tok & tokens.steerable
            if tokens.is_prompt is not None and not self.steer_all[p]:
                tok = tok & tokens.is_prompt
            idx = tok.nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            angles = settings.angle[tokens.row[idx], p]
            rotate_rows_(h, idx, basis, angles, mode)  # type: ignore[arg-type]
            changed.append(idx)
        if not changed:
            return None
        return changed[0] if len(changed) == 1 else torch.unique(torch.cat(changed))

    def layers_needed(self, pack_ids: Iterable[str], prompt_pending: bool, compensate: bool = False) -> frozenset[int]:
        """The layers whose hooks can do anything for a request using ``pack_ids``. While its prompt
        is being read: every gate and steered layer. After it: only gates with scope "all", and
        steered layers of packs with steer scope "all" (or all of them when ``compensate``: a
        prompt whose first chunks went unrotated), since prompt-scope gates never change their
        decision and prompt-scope rotations touch prompt tokens only."""
        key = (frozenset(pack_ids), prompt_pending, compensate)
        found = self._needed.get(key)
        if found is None:
            layers: set[int] = set()
            for pid in key[0]:
                meta = self.packs[self.index[pid]].meta
                if prompt_pending or compensate or meta.steer_scope == "all":
                    layers.update(meta.layers)
                if prompt_pending or meta.gate.scope == "all":
                    layers.add(meta.gate.layer)
            found = self._needed[key] = frozenset(layers)
        return found

    def may_fire_later(self, pack_ids: Iterable[str]) -> bool:
        """Can a gate of these packs still open after the prompt (gate scope "all")?"""
        return any(self.packs[self.index[p]].meta.gate.scope == "all" for p in pack_ids)

    def layers_after_prompt(self, pack_ids: Iterable[str], fired: bool, compensate: bool = False) -> frozenset[int]:
        """The layers whose hooks can still do anything for a request once its prompt is read:
        none when no pack fired (or was forced) and no gate can still open, else
        ``layers_needed`` after the prompt. Empty means the request is settled."""
        if not (fired or self.may_fire_later(pack_ids)):
            return frozenset()
        return self.layers_needed(pack_ids, prompt_pending=False, compensate=compensate)

    def needs_steer(self, layer: int, stats: GateStats, settings: RowSettings) -> bool:
        """Cheap check: does any row have a fired (or forced) pack with a plane at this layer?"""
        cols = self.steer_cols.get(layer)
        if cols is None:
            return False
        return bool((stats.fired[:, cols] | settings.force[:, cols]).any())


def _head_threshold(gate: GateMeta, head: str) -> float:
    text = gate.text
    assert text is not None
    if head == "answer":
        assert text.answer is not None
        return text.answer.threshold
    return text.threshold
