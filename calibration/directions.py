"""Per-layer concept directions, discriminative layer selection and target directions."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


def mean_difference(forget: torch.Tensor, retain: torch.Tensor) -> torch.Tensor:
    """(L, d) unit directions normalize(μ_forget − μ_retain) from pooled (N, L, d) features."""
    diff = forget.mean(0) - retain.mean(0)
    return diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@dataclass(frozen=True)
class LayerStat:
    layer: int
    forget_proj: float  # mean projection of unit-normalised forget activations on the direction
    retain_proj: float
    auroc: float
    selected: bool

    @property
    def sign_margin(self) -> float:
        """|p_f + p_r| / |p_f − p_r|: below 1 exactly when the two mean projections have opposite
        signs; how far a layer is from being selected."""
        return abs(self.forget_proj + self.retain_proj) / max(abs(self.forget_proj - self.retain_proj), 1e-12)

    def as_dict(self) -> dict:
        return {
            "layer": self.layer,
            "forget_proj": round(self.forget_proj, 4),
            "retain_proj": round(self.retain_proj, 4),
            "auroc": round(self.auroc, 4),
            "selected": self.selected,
        }


def layer_stats(forget: torch.Tensor, retain: torch.Tensor, directions: torch.Tensor) -> list[LayerStat]:
    """Discriminative layer selection (Selective Steering): keep layer ℓ when the mean projections
    of the unit-normalised forget and retain activations on d_ℓ have opposite signs."""
    stats = []
    for layer in range(directions.shape[0]):
        d = directions[layer]
        f = forget[:, layer] / forget[:, layer].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        r = retain[:, layer] / retain[:, layer].norm(dim=-1, keepdim=True).clamp_min(1e-12)
        pf, pr = (f @ d), (r @ d)
        y = np.r_[np.ones(len(pf)), np.zeros(len(pr))]
        auc = float(roc_auc_score(y, np.r_[pf.numpy(), pr.numpy()]))
        mf, mr = float(pf.mean()), float(pr.mean())
        stats.append(LayerStat(layer, mf, mr, auc, mf * mr < 0))
    return stats


def steer_layer_order(stats: list[LayerStat], after: int) -> list[int]:
    """The layers after ``after`` (the gate layer) in the order they are taken for steering: the
    selected (opposite-sign) ones, then the others nearest to opposite signs first (smallest
    :attr:`LayerStat.sign_margin`), not the most separable ones: nearly every layer separates
    the classes, and on the untuned example concept the late layers that the top AUROCs pick did
    not stop recall even with the rotation forced on."""
    opposite = [s.layer for s in stats if s.selected and s.layer > after]
    rest = sorted((s for s in stats if s.layer > after and s.layer not in opposite), key=lambda s: s.sign_margin)
    return opposite + [s.layer for s in rest]


def choose_steer_layers(
    stats: list[LayerStat], after: int, min_layers: int, max_layers: int | None = None
) -> tuple[list[int], list[int]]:
    """(steered layers, those of them added by the top-up). Keeps the selected (opposite-sign)
    layers after ``after``; when fewer than ``min_layers``, tops up in :func:`steer_layer_order`.
    ``max_layers`` keeps the most separating ones."""
    order = steer_layer_order(stats, after)
    opposite = [s.layer for s in stats if s.selected and s.layer > after]
    steer = sorted(order[: max(len(opposite), min_layers)])
    if max_layers is not None and len(steer) > max_layers:
        steer = sorted(sorted(steer, key=lambda l: -stats[l].auroc)[:max_layers])
    return steer, [l for l in steer if l not in opposite]


def orthogonal_target(target: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """(L, d) target vectors with their component along each layer's concept direction removed."""
    t = target - (target * directions).sum(-1, keepdim=True) * directions
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)
