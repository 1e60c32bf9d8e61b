"""Gate fitting: a linear probe on one early layer, thresholded by conformal calibration.

At serving time every token t of a request gets a score s_t = w·h_t + b at the gate layer, and
the request's gate value is the mean (``pooling="mean"``) or the max (``"max"``) of its token
scores so far, a conversation's earlier user turns left out
(:func:`steering.runtime.earlier_turns`; a calibration prompt has none, so it is pooled whole
here as served). For "mean" the probe is trained on mean-pooled prompt activations (a linear
probe on the mean equals the mean of the per-token scores, so training and serving agree
exactly). For "max" the probe is fitted on mean-pooled forget prompts against every token of the
retain and neutral prompts (after the shared template head) as separate negatives: a forget
prompt is a bag of tokens of which a few carry the concept (a name, a title), a negative prompt
a bag of which none does, so no single negative token may score like a forget prompt's average.
Max pooling is not the default (FINDINGS.md, "Max pooling": it did not beat mean pooling on
held-out prompts); ``--gate-pooling best`` picks whichever has the higher out-of-fold recall.

Threshold: K-fold cross-conformal. Each retain (and neutral) prompt is scored by the probe fitted
without its fold; τ is the ⌈(n+1)(1−α)⌉-th smallest of those out-of-fold scores. The served probe
averages the K fold probes (an average of linear probes is a linear probe). K is DEFAULT_FOLDS
unless asked (``folds``), never more than the smaller labelled set: with 32 retain prompts at
α = 0.05, τ is the single highest out-of-fold retain score. With 5 folds that score depends on
which near neighbours are held out together, so the fold seed could move τ a lot; one forget and
one retain prompt per fold takes τ off the fold draw (FINDINGS.md, "One retain prompt per fold").
The layer and pooling are a model choice made before that, always on SELECTION_FOLDS folds
(:func:`fit_gate`, then :func:`refit_gate` at K): chosen on K folds, the winning layer moved with
K and a later one lost the early layer's margins. They are chosen by the out-of-fold recall at τ on
the forget prompts and on copies of them with the concept's name removed
(:attr:`GateFit.generalisation`); both are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from calibration.capture import common_prefix_length
from steering.conformal import gate_threshold, rank_among, union_threshold

# Out-of-fold recall below which a gate counts as weak: calibration then also tries later gate
# layers (with --late-gate), and the CLI warns. Why 0.75: FINDINGS.md, "The weak-gate level".
WEAK_RECALL = 0.75

# Cross-conformal folds for the thresholds unless asked (``--folds``): as many as the smaller prompt
# set allows, one forget and one retain prompt per fold with 32 + 32 (FINDINGS.md, "One retain
# prompt per fold").
DEFAULT_FOLDS = 32
# Folds the gate layer and pooling are chosen with, whatever ``folds`` is (module docstring).
SELECTION_FOLDS = 5


@dataclass
class GateFit:
    layer: int
    pooling: str
    weight: torch.Tensor  # (d,) float32, in raw activation space
    bias: float
    threshold: float
    alpha: float
    oof_forget: np.ndarray  # out-of-fold pooled gate values of forget prompts
    oof_retain: np.ndarray
    oof_neutral: np.ndarray
    candidates: list[dict] = field(default_factory=list)
    oof_masked: np.ndarray = field(default_factory=lambda: np.empty(0))  # forget prompts without their name

    @property
    def tpr(self) -> float:
        return float(np.mean(self.oof_forget > self.threshold))

    @property
    def tpr_masked(self) -> float | None:
        """Out-of-fold recall on the forget prompts with the concept's name removed (None without
        such copies): how far the probe recognises the concept past its name."""
        return float(np.mean(self.oof_masked > self.threshold)) if len(self.oof_masked) else None

    @property
    def generalisation(self) -> tuple[float, float]:
        """What the layer and pooling are chosen by: the mean of the out-of-fold recalls on the
        forget prompts and on their name-removed copies (the recall alone without copies), then
        the AUROC. With every forget prompt naming the concept, the earliest layers separate the
        forget prompts perfectly by the name and miss the concept asked any other way."""
        masked = self.tpr_masked
        return (self.tpr if masked is None else (self.tpr + masked) / 2, self.auroc)

    @property
    def fpr(self) -> float:
        return float(np.mean(self.oof_retain > self.threshold))

    @property
    def auroc(self) -> float:
        y = np.r_[np.ones(len(self.oof_forget)), np.zeros(len(self.oof_retain))]
        return float(roc_auc_score(y, np.r_[self.oof_forget, self.oof_retain]))

    def summary(self) -> dict:
        """The candidate's line in the calibration report."""
        masked = self.tpr_masked
        return {"layer": self.layer, "pooling": self.pooling, "tpr": round(self.tpr, 4), "fpr": round(self.fpr, 4),
                "auroc": round(self.auroc, 4), "tpr_masked": None if masked is None else round(masked, 4)}  # fmt: skip


def _fit_probe(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> tuple[np.ndarray, float]:
    """Standardise + logistic regression, folded back into raw space: returns (w, b)."""
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed)
    clf.fit(scaler.transform(x), y)
    w = clf.coef_[0] / scaler.scale_
    b = float(clf.intercept_[0] - (clf.coef_[0] * scaler.mean_ / scaler.scale_).sum())
    return w, b


def _fit_token_probe(pos: list[np.ndarray], neg: list[np.ndarray], c: float, seed: int) -> tuple[np.ndarray, float]:
    """Token probe for max pooling: mean-pooled positive bags against every negative token."""
    pos_x, neg_x = np.stack([p.mean(0) for p in pos]), np.concatenate(neg)
    y = np.r_[np.ones(len(pos_x)), np.zeros(len(neg_x))]
    return _fit_probe(np.concatenate([pos_x, neg_x]), y, c, seed)


def _pooled_scores(tokens: list[np.ndarray], w: np.ndarray, b: float, pooling: str) -> np.ndarray:
    out = np.empty(len(tokens))
    for i, t in enumerate(tokens):
        s = t @ w + b
        out[i] = s.max() if pooling == "max" else s.mean()
    return out


def fold_count(nf: int, nr: int, folds: int = DEFAULT_FOLDS) -> int:
    """How many cross-conformal folds ``nf`` forget and ``nr`` retain prompts get when ``folds`` are
    asked for: at least 2, at most as many as the smaller labelled set."""
    return max(2, min(folds, nf, nr))


def _fold_splits(nf: int, nr: int, nn: int, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The cross-conformal folds over forget, retain and neutral prompts (in that order), each set
    stratified across the folds (:func:`fold_count` of them)."""
    group = np.r_[np.zeros(nf), np.ones(nr), np.full(nn, 2)]
    skf = StratifiedKFold(n_splits=fold_count(nf, nr, folds), shuffle=True, random_state=seed)
    return list(skf.split(np.zeros((len(group), 1)), group))


def _with_copies(
    splits: list[tuple[np.ndarray, np.ndarray]], copy_of: list[int], first: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The folds with copy k (prompt ``first + k``) in the same part as its original ``copy_of[k]``,
    so that no probe is scored on a copy of a prompt it was trained on, or the reverse."""
    out = []
    for train, test in splits:
        held = set(test.tolist())
        extra_test = [first + k for k, i in enumerate(copy_of) if i in held]
        extra_train = [first + k for k, i in enumerate(copy_of) if i not in held]
        out.append((np.r_[train, extra_train].astype(int), np.r_[test, extra_test].astype(int)))
    return out


def _cross_fit(
    splits: list[tuple[np.ndarray, np.ndarray]],
    n: int,
    fit_fold: Callable[[np.ndarray], tuple[np.ndarray, float]],
    score_fold: Callable[[np.ndarray, np.ndarray, float], np.ndarray],
) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit on each fold's training part and score its held-out part. Returns the out-of-fold
    scores of all ``n`` prompts and the served linear head: the mean of the fold heads."""
    oof = np.empty(n)
    ws, bs = [], []
    for train, test in splits:
        w, b = fit_fold(train)
        oof[test] = score_fold(test, w, b)
        ws.append(w)
        bs.append(b)
    return oof, np.mean(ws, axis=0), float(np.mean(bs))


def _layer_probe(
    per_prompt: list[np.ndarray],
    y: np.ndarray,
    splits: list[tuple[np.ndarray, np.ndarray]],
    prefix: int,
    pooling: str,
    c: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    """One layer's probe for one pooling, cross-fitted: (out-of-fold pooled scores, w, b).
    ``per_prompt[i]`` is prompt i's (T_i, d) activations at the layer."""
    if pooling == "mean":
        means = np.stack([t.mean(0) for t in per_prompt])

        def fit_fold(train: np.ndarray) -> tuple[np.ndarray, float]:
            return _fit_probe(means[train], y[train], c, seed)

    else:  # a token-level probe, trained on the tokens after the template head
        content = [t[prefix:] if len(t) > prefix else t[-1:] for t in per_prompt]

        def fit_fold(train: np.ndarray) -> tuple[np.ndarray, float]:
            pos, neg = [content[i] for i in train if y[i]], [content[i] for i in train if not y[i]]
            return _fit_token_probe(pos, neg, c, seed)

    def score(test: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
        return _pooled_scores([per_prompt[i] for i in test], w, b, pooling)

    return _cross_fit(splits, len(per_prompt), fit_fold, score)


def fit_gate(
    forget_tokens: list[torch.Tensor],
    retain_tokens: list[torch.Tensor],
    neutral_tokens: list[torch.Tensor],
    ids: list[list[int]],
    layers: list[int],
    alpha: float,
    poolings: tuple[str, ...] = ("mean", "max"),
    folds: int = SELECTION_FOLDS,
    c: float = 0.5,
    seed: int = 0,
    masked_tokens: list[torch.Tensor] | None = None,
    masked_of: list[int] | None = None,
) -> GateFit:
    """Fit a gate on each candidate layer and pooling, keep the one that generalises best
    (:attr:`GateFit.generalisation`). ``*_tokens[i]`` is (T_i, L, d); ``ids`` are the token ids of
    the forget, retain and neutral prompts, used to skip the shared template prefix when training
    token-level probes. ``masked_tokens[k]`` is a copy of forget prompt ``masked_of[k]`` with the
    concept's name removed: an extra positive in training, and the held-out test of how far the
    probe recognises the concept past its name (each copy sits in its original's fold)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    masked_tokens, masked_of = list(masked_tokens or []), list(masked_of or [])
    if len(masked_tokens) != len(masked_of):
        raise ValueError("masked_tokens and masked_of must have the same length")
    prefix = common_prefix_length(ids)
    base = forget_tokens + retain_tokens + neutral_tokens
    all_tokens = base + masked_tokens
    nf, nr, n = len(forget_tokens), len(retain_tokens), len(base)
    y = np.r_[np.ones(nf), np.zeros(n - nf), np.ones(len(masked_tokens))].astype(int)
    splits = _with_copies(_fold_splits(nf, nr, len(neutral_tokens), folds, seed), masked_of, n)
    best: GateFit | None = None
    candidates = []
    for layer in layers:
        per_prompt = [t[:, layer].numpy().astype(np.float64) for t in all_tokens]
        for pooling in poolings:
            oof, w, b = _layer_probe(per_prompt, y, splits, prefix, pooling, c, seed)
            of, orr, on, om = oof[:nf], oof[nf : nf + nr], oof[nf + nr : n], oof[n:]
            tau = gate_threshold(orr, on, alpha)
            fit = GateFit(layer, pooling, torch.tensor(w, dtype=torch.float32), b, tau, alpha, of, orr, on, [], om)
            candidates.append(fit.summary())
            if best is None or fit.generalisation > best.generalisation:
                best = fit
    assert best is not None
    best.candidates = candidates
    return best


def refit_gate(
    chosen: GateFit,
    forget_tokens: list[torch.Tensor],
    retain_tokens: list[torch.Tensor],
    neutral_tokens: list[torch.Tensor],
    ids: list[list[int]],
    folds: int,
    c: float = 0.5,
    seed: int = 0,
    masked_tokens: list[torch.Tensor] | None = None,
    masked_of: list[int] | None = None,
) -> GateFit:
    """The gate ``chosen`` by :func:`fit_gate` (its layer and pooling) fitted again on ``folds``
    folds: the served head, its out-of-fold scores and threshold. ``candidates`` stay the choice's."""
    if fold_count(len(forget_tokens), len(retain_tokens), folds) == fold_count(
        len(forget_tokens), len(retain_tokens), SELECTION_FOLDS
    ):
        return chosen
    fit = fit_gate(forget_tokens, retain_tokens, neutral_tokens, ids, [chosen.layer], chosen.alpha,
                   (chosen.pooling,), folds, c, seed, masked_tokens, masked_of)  # fmt: skip
    fit.candidates = chosen.candidates
    return fit


@dataclass
class TextGateFit:
    """A linear head on sentence-encoder embeddings, cross-fitted like the probe."""

    weight: torch.Tensor  # (e,) float32
    bias: float
    threshold: float
    oof_forget: np.ndarray  # out-of-fold max-over-windows scores
    oof_retain: np.ndarray
    oof_neutral: np.ndarray

    @property
    def tpr(self) -> float:
        return float(np.mean(self.oof_forget > self.threshold))


def fit_text_gate(
    forget: list[torch.Tensor],
    retain: list[torch.Tensor],
    neutral: list[torch.Tensor],
    alpha: float,
    folds: int = DEFAULT_FOLDS,
    c: float = 1.0,
    seed: int = 0,
) -> TextGateFit:
    """Fit the text gate's head. ``forget[i]`` is prompt i's (W, e) window embeddings; each prompt
    trains on the mean of its windows and is scored, as in serving, by the max over its windows of
    w·e + b. Folds, threshold rule and averaging of fold heads are the probe's (:func:`fit_gate`)."""
    all_w = [w.numpy().astype(np.float64) for w in forget + retain + neutral]
    nf, nr = len(forget), len(retain)
    x = np.stack([w.mean(0) for w in all_w])
    y = np.r_[np.ones(nf), np.zeros(len(all_w) - nf)].astype(int)

    def score(test: np.ndarray, w: np.ndarray, b: float) -> np.ndarray:
        return np.array([float((all_w[i] @ w + b).max()) for i in test])

    splits = _fold_splits(nf, nr, len(neutral), folds, seed)
    oof, w, b = _cross_fit(splits, len(all_w), lambda train: _fit_probe(x[train], y[train], c, seed), score)
    of, orr, on = oof[:nf], oof[nf : nf + nr], oof[nf + nr :]
    return TextGateFit(torch.tensor(w, dtype=torch.float32), b, gate_threshold(orr, on, alpha), of, orr, on)


@dataclass
class UnionGate:
    """Several gates, one decision: fire when max_i r_i > τ, where each r_i is gate i's score rank
    among its own out-of-fold negative scores (how many of them lie below it), and τ is the
    conformal threshold of the combined out-of-fold negatives (so the false-fire bound holds for
    the union). Ranks put the scores on one scale whatever their distributions: with scores
    standardised by mean and standard deviation instead, the score whose negatives have the
    heavier tail took the whole false-fire budget and the other could hardly fire (FINDINGS.md).
    Served as one threshold per gate (``thresholds``, in the order the gates were given)."""

    thresholds: tuple[float, ...]
    oof_forget: np.ndarray  # combined rank
    oof_retain: np.ndarray
    oof_neutral: np.ndarray
    threshold: float  # τ on the combined rank

    @property
    def tpr(self) -> float:
        return float(np.mean(self.oof_forget > self.threshold))


def combine_gates(fits: Sequence[GateFit | TextGateFit], alpha: float) -> UnionGate:
    """The union of ``fits`` (fitted on the same prompts, in the same folds) under one conformal
    threshold (:class:`UnionGate`)."""
    u = union_threshold([(f.oof_retain, f.oof_neutral) for f in fits], alpha)
    cf = np.max([rank_among(neg, f.oof_forget) for neg, f in zip(u.negatives, fits)], axis=0)
    return UnionGate(u.thresholds, cf, u.retain_ranks, u.neutral_ranks, u.tau)
