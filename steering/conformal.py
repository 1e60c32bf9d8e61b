"""Conformal thresholds: the one rule by which a gate's threshold follows from out-of-fold negative
scores and a level α.

Calibration places a pack's thresholds with it; serving places them again at another level
(per-tenant strictness, :meth:`steering.pack.ConceptPack.at_alpha`) from the out-of-fold scores
the pack keeps, so the two can never disagree.

- :func:`conformal_threshold`: split-conformal, the ⌈(n+1)(1−α)⌉-th smallest negative score.
- :func:`gate_threshold`: the higher of the retain set's threshold at α and the everyday set's at
  min(α, :data:`EVERYDAY_ALPHA`).
- :func:`union_threshold`: several scores, one decision: each score is replaced by its rank among
  its own negatives, and one threshold is set on the highest rank.
- :func:`false_fire_bounds`: the bound a threshold achieves (≤ α; a finite set of negatives
  gives a coarser level than the one asked for).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from steering.errors import PolicyError, echo

# Level of the everyday ("neutral") negatives: a false fire there changes an ordinary user's output,
# and the built-in set (~200 prompts) is large enough for a tight level.
EVERYDAY_ALPHA = 0.01


def check_alpha(value: Any, field: str) -> float:
    """A false-fire level: a number strictly between 0 and 1 (a string of one too, as ``vllm_xargs``
    may carry it). Whether a pack's negatives support it is :meth:`steering.pack.PackMeta.check_alpha`'s."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise PolicyError(f"{field} must be a number between 0 and 1, got {type(value).__name__}")
    try:
        a = float(value)
    except ValueError:
        raise PolicyError(f"{field} must be a number between 0 and 1, got {echo(value)}") from None
    if not 0.0 < a < 1.0:
        raise PolicyError(f"{field} must be strictly between 0 and 1, got {echo(value)}")
    return a


def conformal_threshold(negative_scores: np.ndarray, alpha: float) -> float:
    """Split-conformal threshold: the ⌈(n+1)(1−α)⌉-th smallest negative score. Firing when a new
    score is strictly above it has probability ≤ α for an exchangeable new negative. Returns
    +inf when n is too small for the level (the gate would then never fire)."""
    s = np.sort(np.asarray(negative_scores, dtype=np.float64))
    n = len(s)
    k = math.ceil((n + 1) * (1 - alpha))
    if k > n:
        return math.inf
    return float(s[k - 1])


def conformal_rank(n: int, alpha: float) -> int:
    """Which score the conformal threshold of ``n`` negatives is, counted from the highest (1: the
    highest); 0 when ``n`` is too small for the level."""
    return max(0, n - math.ceil((n + 1) * (1 - alpha)) + 1)


def negatives_for_rank(rank: int, alpha: float) -> int:
    """The fewest negatives whose conformal threshold at level α is the ``rank``-th highest score."""
    n = 1
    while conformal_rank(n, alpha) < rank:
        n += 1
    return n


def everyday_level(n_neutral: int, alpha: float) -> float:
    """The level ``n_neutral`` everyday negatives are held to: min(α, EVERYDAY_ALPHA), or α when
    there are too few of them for that (fewer than 99: the threshold would be +inf, a gate that
    never fires)."""
    a_n = min(alpha, EVERYDAY_ALPHA)
    return a_n if conformal_rank(n_neutral, a_n) else alpha


def binding_negatives(oof_retain: np.ndarray, oof_neutral: np.ndarray, alpha: float) -> tuple[str, np.ndarray, float]:
    """The negative set ("retain" or "neutral"), its scores and its level, whose conformal
    threshold is the gate's τ: the retain set's at α, unless there are neutral scores and theirs,
    at :func:`everyday_level`, is higher."""
    a_n = everyday_level(len(oof_neutral), alpha)
    if len(oof_neutral) and conformal_threshold(oof_neutral, a_n) > conformal_threshold(oof_retain, alpha):
        return "neutral", oof_neutral, a_n
    return "retain", oof_retain, alpha


def gate_threshold(oof_retain: np.ndarray, oof_neutral: np.ndarray, alpha: float) -> float:
    """The gate's τ: the higher of the retain scores' conformal threshold at α and the neutral
    scores' at :func:`everyday_level`, so false fires stay ≤ α on the concept's neighbours and
    ≤ min(α, EVERYDAY_ALPHA) on everyday requests."""
    _, scores, level = binding_negatives(oof_retain, oof_neutral, alpha)
    return conformal_threshold(scores, level)


def false_fire_bounds(n_retain: int, n_neutral: int, alpha: float) -> dict[str, float]:
    """The false-fire bounds a threshold placed at level α achieves, on the concept's neighbours
    ("retain") and on everyday requests ("everyday"): rank/(n+1) for the conformal rank of each set
    (≤ its level; 0 where the set is too small for the level: the threshold is then +inf)."""
    out = {"retain": conformal_rank(n_retain, alpha) / (n_retain + 1)}
    if n_neutral:
        out["everyday"] = conformal_rank(n_neutral, everyday_level(n_neutral, alpha)) / (n_neutral + 1)
    return out


def rank_among(sorted_negatives: np.ndarray, x: np.ndarray) -> np.ndarray:
    """How many of the (sorted) negatives lie strictly below each score of ``x``."""
    return np.searchsorted(sorted_negatives, x, side="left").astype(np.float64)


class Union(NamedTuple):
    """Several scores under one conformal threshold (:func:`union_threshold`)."""

    thresholds: tuple[float, ...]  # per score: fire when it is above (one of them suffices)
    tau: float  # the threshold on the highest rank
    negatives: tuple[np.ndarray, ...]  # per score, its sorted negatives (what ranks are taken among)
    retain_ranks: np.ndarray  # the highest rank of each retain negative
    neutral_ranks: np.ndarray


def union_threshold(heads: Sequence[tuple[np.ndarray, np.ndarray]], alpha: float) -> Union:
    """One decision from several scores: fire when max_i r_i > τ, where r_i is score i's rank
    among its own out-of-fold negative scores (``heads[i]`` = (retain, neutral)), and τ is the
    :func:`gate_threshold` of the combined ranks, so the false-fire bound holds for the union.
    Ranks put the scores on one scale whatever their distributions. Served as one threshold per
    score (+inf where none is reachable)."""
    negatives = tuple(np.sort(np.r_[r, n]) for r, n in heads)
    cr = np.max([rank_among(neg, r) for neg, (r, _) in zip(negatives, heads)], axis=0)
    cn = np.max([rank_among(neg, n) for neg, (_, n) in zip(negatives, heads)], axis=0)
    tau = gate_threshold(cr, cn, alpha)
    return Union(tuple(_score_at_rank(neg, tau) for neg in negatives), tau, negatives, cr, cn)


def _score_at_rank(neg: np.ndarray, tau: float) -> float:
    """The score threshold t with: score > t exactly when its rank among ``neg`` is > τ."""
    if not math.isfinite(tau) or tau >= len(neg):
        return math.inf
    return float(neg[math.floor(tau)])
