"""Gated steering for HF transformers models: ``with steer(model, packs) as session: ...``.

Forward hooks on the decoder layers read and (for fired rows only) rotate the residual stream.
A pre-hook on the model sees every forward call: a call without a filled KV cache starts new
sequences (gate state reset; its tokens are prompt tokens); calls with a cache continue them
(``generate`` decoding), so the gate state lives for the whole generation. Padding positions
(attention mask 0, left padding included) never feed the gate and are never rotated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from steering.conformal import check_alpha
from steering.errors import PolicyError
from steering.modules import decoder_layers
from steering.pack import ConceptPack
from steering.rotation import check_angle
from steering.runtime import GateStats, PackUse, RowSettings, RowSpec, SteeringBank, TokenMap, gated_packs, row_levels
from steering.text_gate import request_text


@dataclass
class GateReading:
    score: float  # the in-model probe's pooled value
    fired: bool
    text_score: float | None = None  # the text gate's score, for packs that have one


class SteerSession:
    """Per-row gate state of one steered model; created by :func:`steer`."""

    def __init__(
        self,
        model: torch.nn.Module,
        bank: SteeringBank,
        rows: Sequence[RowSpec] | None,
        default: RowSpec,
        tokenizer=None,
    ):
        self.model = model
        self.bank = bank
        self.tokenizer = tokenizer
        self.text_score: torch.Tensor | None = None
        self._rows_spec = list(rows) if rows is not None else None
        self._default = dict(default)
        self.stats: GateStats | None = None
        self.settings: RowSettings | None = None
        self._tokens: TokenMap | None = None
        self._is_prompt = True
        self._used: set[str] = set()  # pack ids applied to some row of the current batch
        self._layers: frozenset[int] = frozenset()  # layers whose hooks have work in this forward
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def set_rows(self, rows: Sequence[RowSpec] | None) -> None:
        """Per-row pack settings for the next batch (None: every pack on every row, gated)."""
        self._rows_spec = list(rows) if rows is not None else None

    # -- hooks ---------------------------------------------------------------------------------
    def _pre_forward(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise RuntimeError("guardit: forward called without input_ids or inputs_embeds")
        bsz, step = ref.shape[0], ref.shape[1]
        past = kwargs.get("past_key_values")
        cached = 0
        if past is not None and hasattr(past, "get_seq_length"):
            cached = int(past.get_seq_length())
        device = ref.device
        starting = cached == 0 or self.stats is None or self.stats.total.shape[0] != bsz
        if starting:
            if cached and self.stats is not None and self.stats.total.shape[0] != bsz:
                raise RuntimeError("guardit: the batch size changed in the middle of a generation")
        elif self._is_prompt:  # first decode step: only scope-"all" gates and rotations still matter
            self._is_prompt = False
            assert self.settings is not None
            # Empty when nothing fired on any row and no gate can still open (vLLM settles such
            # requests with the same rule).
            fired = bool((self.stats.fired | self.settings.force).any())
            self._layers = self.bank.layers_after_prompt(self._used, fired)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            valid = mask[:, -step:].to(torch.bool)
        else:
            valid = torch.ones(bsz, step, dtype=torch.bool, device=device)
        steerable = valid.clone()
        # What turn-pooling probes count (steering.runtime.earlier_turns), built only when a pack
        # has a turn header; without input_ids (inputs_embeds) no turn can be found and every token
        # is counted, as before turn headers.
        pooled = valid.clone() if self.bank.turn_header is not None else None
        prompts: list[list[int]] = []
        heads: list[int] = []
        if (starting or self._is_prompt) and ids is not None:
            # Leave each row's template head (and at least its first token, the sink) unrotated, and
            # its earlier user turns out of turn-pooling probes.
            for r in range(bsz):
                pos = valid[r].nonzero().squeeze(-1)
                prompts.append(ids[r, pos].tolist())
                heads.append(self.bank.head_length(prompts[-1]) if pos.numel() else 0)
                if pos.numel():
                    steerable[r, pos[: heads[-1]]] = False
                    if pooled is not None:
                        first, last = self.bank.earlier_turns(prompts[-1])
                        pooled[r, pos[first:last]] = False
        if starting:
            self._start(bsz, device, prompts, heads)
        counted = valid.reshape(-1)
        self._tokens = TokenMap(
            row=torch.arange(bsz, device=device).repeat_interleave(step),
            counted=counted,
            steerable=steerable.reshape(-1),
            is_prompt=torch.full_like(counted, self._is_prompt),
            pooled=pooled.reshape(-1) if pooled is not None else None,
        )
        return None

    def _start(self, bsz: int, device: torch.device, prompts: list[list[int]], heads: list[int]) -> None:
        specs = self._rows_spec if self._rows_spec is not None else [self._default] * bsz
        if len(specs) != bsz:
            raise PolicyError(f"rows: {len(specs)} row settings given for a batch of {bsz}")
        self.bank_device(device)
        text_fired, self.text_score = self._text_gates(specs, prompts, heads)
        self.settings = self.bank.settings(specs, text_fired)
        self.stats = GateStats.empty(bsz, self.bank.num_packs, device)
        self._is_prompt = True
        self._used = {pid for s in specs for pid in s}
        self._layers = self.bank.layers_needed(self._used, prompt_pending=True)

    def _text_gates(self, specs, prompts: list[list[int]], heads: list[int]):
        """The text gates' decisions for a new batch, before its forward (None when no pack has one)."""
        used = [gated_packs(s) for s in specs]
        if not any(self.bank.uses_text_gate(u) for u in used):
            return None, None
        if self.tokenizer is None:
            self.tokenizer = _model_tokenizer(self.model)
        if len(prompts) != len(specs):
            raise PolicyError("a pack has a text gate: the forward needs input_ids, not inputs_embeds")
        texts = [request_text(self.tokenizer, p, h) for p, h in zip(prompts, heads)]
        return self.bank.text_gates(texts, [list(u) for u in used], row_levels(specs))

    def bank_device(self, device: torch.device) -> None:
        if self.bank.device != device:
            self.bank = SteeringBank(self.bank.packs, device=device)

    def _layer_hook(self, index: int):
        def hook(_module, _args, output):
            if index not in self._layers:
                return output
            h = output[0] if isinstance(output, tuple) else output
            assert self.stats is not None and self.settings is not None and self._tokens is not None
            flat = h.view(-1, h.shape[-1])
            self.bank.update_gates(index, flat, self._tokens, self.stats, self.settings)
            self.bank.steer_(index, flat, self._tokens, self.stats, self.settings)
            return output

        return hook

    def attach(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        layers = decoder_layers(self.model)
        for i in self.bank.layers:
            if i >= len(layers):
                raise PolicyError(f"pack layer {i} does not exist in a {len(layers)}-layer model")
            self._handles.append(layers[i].register_forward_hook(self._layer_hook(i)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- results ---------------------------------------------------------------------------------
    def gates(self) -> list[dict[str, GateReading]]:
        """Per row of the last batch, per pack it applies to: pooled gate score and whether it fired."""
        if self.stats is None or self.settings is None:
            return []
        value, fired = self.bank.readout(self.stats, self.settings)
        active = (self.settings.active | self.settings.force).cpu()
        out = []
        text = self.text_score
        for r in range(value.shape[0]):
            row = {}
            for p, pack in enumerate(self.bank.packs):
                if active[r, p] or (text is not None and math.isfinite(float(text[r, p]))):
                    v = float(value[r, p])
                    t = float(text[r, p]) if text is not None and math.isfinite(float(text[r, p])) else None
                    row[pack.id] = GateReading(v if math.isfinite(v) else float("-inf"), bool(fired[r, p]), t)
            out.append(row)
        return out


def _model_tokenizer(model: torch.nn.Module):
    """The tokenizer saved with the model (its folder), for packs with a text gate."""
    from transformers import AutoTokenizer

    path = getattr(getattr(model, "config", None), "_name_or_path", "")
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise PolicyError(
            f"a pack has a text gate and the model's tokenizer cannot be loaded from {path!r} ({e}); "
            "pass it: steer(model, packs, tokenizer=tok)"
        ) from None


@contextmanager
def steer(
    model: torch.nn.Module,
    packs: Sequence[ConceptPack],
    *,
    angles: Mapping[str, float] | None = None,
    force: bool = False,
    rows: Sequence[RowSpec] | None = None,
    tokenizer=None,
) -> Iterator[SteerSession]:
    """Steer ``model`` with ``packs`` inside the block; the hooks are removed on exit.

    By default every pack applies to every row, gated, at its calibrated angle. ``angles`` overrides
    angles (degrees) by pack id; ``force`` rotates without the gate (for evaluation); ``rows`` gives
    per-row settings {pack_id: PackUse(angle_deg or None, force, alpha or None)} for the next batch (``alpha``:
    the gate's level, its thresholds placed there from the pack's out-of-fold scores; for every row,
    pass ``pack.at_alpha(alpha)`` instead). Packs with a text
    gate decode each row's prompt for the encoder with ``tokenizer`` (default: the one saved in
    the model's folder).
    """
    bank = SteeringBank(list(packs))
    angles = dict(angles or {})
    unknown = set(angles) - set(bank.index)
    if unknown:
        raise PolicyError(f"angles: unknown concept id(s) {sorted(unknown)}")
    default = {
        p.id: (check_angle(angles[p.id], f"angles.{p.id}") if p.id in angles else None, force) for p in bank.packs
    }
    if rows is not None:
        for i, row in enumerate(rows):
            bad = set(row) - set(bank.index)
            if bad:
                raise PolicyError(f"rows[{i}]: unknown concept id(s) {sorted(bad)}")
            for pid, use in row.items():
                alpha = PackUse(*use).alpha
                if alpha is not None:
                    bank.packs[bank.index[pid]].meta.check_alpha(check_alpha(alpha, f"rows[{i}].{pid}.alpha"))
    session = SteerSession(model, bank, rows, default, tokenizer)
    session.attach()
    try:
        yield session
    finally:
        session.detach()
