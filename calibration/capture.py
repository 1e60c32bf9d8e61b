"""Activation capture with plain HF forward passes and a small hook of our own.

For every prompt (chat template applied, as at serving time) we record the residual stream after
each decoder layer, i.e. the layer's output, at every token. Pooled features (mean over tokens,
last token) are derived from that.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import TypeAdapter, ValidationError
from tqdm.auto import tqdm

from steering.errors import GuarditError
from steering.files import write_atomic
from steering.modules import decoder_layers
from steering.rotation import AngleMode, rotate


def chat_format(tokenizer, prompt: str | Sequence[Mapping[str, str]]) -> str:
    """The prompt (a user message, or a conversation's messages) as the model sees it when served:
    the chat template with a generation prompt."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if len(messages) > 1:
        raise GuarditError("this tokenizer has no chat template, so a conversation cannot be written for it")
    return messages[0]["content"]


def turn_header(tokenizer) -> list[int]:
    """The token ids that open a user turn in the chat template: the longest common tail of what
    precedes the user's text in a first turn (the template head) and in a later turn. Empty
    without a chat template (the prompt is the user's text after the head). What a pack records
    so that its served probe leaves a conversation's earlier user turns out
    (:func:`steering.runtime.earlier_turns`)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    earlier = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi! How can I help?"}]

    def before_ask(messages: list[dict[str, str]]) -> list[int]:
        # The ids two asks share: everything before the user's text.
        a, b = encode_chat(tokenizer, [[*messages, {"role": "user", "content": t}] for t in ("Apples?", "Rivers?")])
        return a[: common_prefix_length([a, b])]

    first, later = before_ask([]), before_ask(earlier)
    n = 0
    while n < min(len(first), len(later)) and first[-1 - n] == later[-1 - n]:
        n += 1
    return first[len(first) - n :]


def encode_chat(tokenizer, prompts: Sequence[str | Sequence[Mapping[str, str]]]) -> list[list[int]]:
    """Token ids of each chat-formatted prompt or conversation (no extra special tokens: the
    template has them)."""
    texts = [chat_format(tokenizer, p) for p in prompts]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    return [tokenizer(t, add_special_tokens=not has_template)["input_ids"] for t in texts]


def pad_batch(ids: list[list[int]], pad_id: int, left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id lists padded to one width; left padding for
    generation, right padding (``left=False``) for plain forward passes."""
    width = max(len(x) for x in ids)
    inp = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        cols = slice(width - len(x), width) if left else slice(0, len(x))
        inp[r, cols] = torch.tensor(x, dtype=torch.long)
        mask[r, cols] = 1
    return inp, mask


@torch.no_grad()
def generate_batch(model, ids: list[list[int]], max_tokens: int, pad_id: int, eos_id: int | None) -> list[list[int]]:
    """Greedy generation for one batch of prompts (left-padded): each row's new tokens, cut at
    the first end-of-sequence or padding token."""
    inp, mask = pad_batch(ids, pad_id)
    out = model.generate(
        input_ids=inp, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id
    )
    stop = {eos_id, pad_id}
    rows = []
    for new in out[:, inp.shape[1] :].tolist():
        cut = next((i for i, t in enumerate(new) if t in stop), len(new))
        rows.append(new[:cut])
    return rows


def length_batches(ids: list[list[int]], batch_size: int) -> list[list[int]]:
    """Row indices of ``ids`` in batches of ``batch_size``, shortest first: batched by length, short
    prompts are not padded to a long one's width."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    return [order[s : s + batch_size] for s in range(0, len(ids), batch_size)]


def greedy_answer_ids(model, tokenizer, ids: list[list[int]], max_tokens: int, batch_size: int, desc: str,
                     progress: bool = True) -> list[list[int]]:  # fmt: skip
    """The model's greedy answer (new token ids, at most ``max_tokens``) to each prompt, in order
    (prompts batched by length: :func:`length_batches`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[list[int]] = [[] for _ in ids]
    for rows in tqdm(length_batches(ids, batch_size), desc=desc, disable=not progress, unit="batch"):
        for i, new in zip(rows, generate_batch(model, [ids[i] for i in rows], max_tokens, pad, tokenizer.eos_token_id)):
            out[i] = new
    return out


def greedy_answers(model, tokenizer, ids: list[list[int]], max_tokens: int, batch_size: int, desc: str,
                   progress: bool = True) -> list[str]:  # fmt: skip
    """:func:`greedy_answer_ids`, decoded."""
    new = greedy_answer_ids(model, tokenizer, ids, max_tokens, batch_size, desc, progress)
    return [tokenizer.decode(x, skip_special_tokens=True) for x in new]


_ANSWERS = TypeAdapter(list[str])
# The code the answers come from, for cached_greedy_answers' key: editing it makes every kept answer a miss.
_GENERATION_CODE = hashlib.sha256(
    "".join(
        inspect.getsource(f) for f in (pad_batch, length_batches, generate_batch, greedy_answer_ids, greedy_answers)
    ).encode()
).hexdigest()


def weights_digest(model) -> str | None:
    """SHA-256 of every tensor of the model's state (names, dtypes, shapes and bytes): what tells
    two models apart for a cache kept on disk (any change to any weight changes it). None for a
    model holding quantized tensors, which have no plain bytes to hash."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor) or t.is_quantized:
            return None
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cached_greedy_answers(model, tokenizer, ids: list[list[int]], max_tokens: int, batch_size: int, desc: str,
                          progress: bool, cache: Path | None) -> list[str]:  # fmt: skip
    """:func:`greedy_answers`, kept in the folder ``cache`` between processes (None: not kept).

    The file is named by a hash of everything the answers follow from: every weight of the model
    (:func:`weights_digest`), the tokenizer's vocabulary and special ids, the prompts' ids, the
    length and batch size, the generation code itself and the torch and transformers versions; so a
    changed input is a miss, never a stale answer. A file that does not read back as one answer per
    prompt is generated again and replaced; a folder that cannot be written warns and keeps nothing.
    Without a digest (a quantized model) nothing is kept."""
    if cache is None or (digest := weights_digest(model)) is None:
        return greedy_answers(model, tokenizer, ids, max_tokens, batch_size, desc, progress)
    import transformers

    key = {
        "weights": digest,
        "vocab": hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest(),
        "special": [tokenizer.pad_token_id, tokenizer.eos_token_id],
        "ids": ids,
        "max_tokens": max_tokens,
        "batch_size": batch_size,
        "code": _GENERATION_CODE,
        "versions": [torch.__version__, transformers.__version__],
    }
    path = Path(cache) / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()}.json"
    try:
        found = _ANSWERS.validate_json(path.read_bytes())
        if len(found) == len(ids):
            return found
    except (OSError, ValidationError):
        pass
    answers = greedy_answers(model, tokenizer, ids, max_tokens, batch_size, desc, progress)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, _ANSWERS.dump_json(answers))
    except OSError as e:
        warnings.warn(f"could not keep the answers in {cache}: {e}", stacklevel=2)
    return answers


@torch.no_grad()
def answer_nll(
    model: torch.nn.Module,
    ids: list[list[int]],
    answers: list[list[int]],
    pad_id: int,
    rotations: dict[int, torch.Tensor] | None = None,
    angle: float = 0.0,
    mode: AngleMode = "absolute",
    head: int = 1,
    batch_size: int = 16,
) -> tuple[float, int]:
    """(total negative log-likelihood in nats, number of tokens) of each prompt's ``answers``
    (teacher-forced; empty answers are skipped), with the residual stream optionally rotated at
    ``rotations`` {layer: plane (2, d)} by ``angle`` (radians) on every token after the first
    ``head`` ones: what a forced pack does to a request (the template head stays unrotated, as
    when serving). ``batch_size`` 1 runs each prompt unpadded, exactly as a single request."""
    rows = [(p, a) for p, a in zip(ids, answers) if a]
    layers = decoder_layers(model)
    handles = []

    def hook(plane: torch.Tensor):
        def fn(_module, _args, output):
            h = output[0] if isinstance(output, tuple) else output
            h[:, head:] = rotate(h[:, head:], plane, angle, mode)
            return output

        return fn

    for layer, plane in (rotations or {}).items():
        handles.append(layers[layer].register_forward_hook(hook(plane)))
    total, count = 0.0, 0
    try:
        for s in range(0, len(rows), batch_size):
            batch = rows[s : s + batch_size]
            inp, mask = pad_batch([p + a for p, a in batch], pad_id, left=False)
            # Logits only from the first position that predicts an answer token on: the vocabulary
            # projection of every prompt token would be most of the work on a large vocabulary.
            first = min(len(p) for p, _ in batch) - 1
            logits = model(input_ids=inp, attention_mask=mask, logits_to_keep=inp.shape[1] - first).logits.float()
            for r, (p, a) in enumerate(batch):
                pred = logits[r, len(p) - 1 - first : len(p) + len(a) - 1 - first]
                total += float(torch.nn.functional.cross_entropy(pred, torch.tensor(a), reduction="sum"))
                count += len(a)
    finally:
        for h in handles:
            h.remove()
    return total, count


@dataclass
class Activations:
    """Per prompt, the residual stream after every decoder layer: tokens[i] is (T_i, L, d) float32."""

    tokens: list[torch.Tensor]

    def mean(self, skip: int = 0) -> torch.Tensor:
        """(N, L, d): mean over each prompt's tokens, after the first ``skip`` (a shared prefix)."""
        return torch.stack([t[skip:].mean(0) if t.shape[0] > skip else t[-1] for t in self.tokens])

    def last(self) -> torch.Tensor:
        """(N, L, d): each prompt's last token."""
        return torch.stack([t[-1] for t in self.tokens])


@torch.no_grad()
def capture(
    model: torch.nn.Module,
    ids: list[list[int]],
    batch_size: int = 16,
    desc: str = "capturing activations",
    pad_id: int = 0,
    progress: bool = True,
) -> Activations:
    """Run the model on each token sequence (right-padded batches by length: :func:`length_batches`)
    and keep every layer's output, in the order of ``ids``."""
    layers = decoder_layers(model)
    store: dict[int, torch.Tensor] = {}

    def hook(i: int):
        def fn(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            store[i] = h.detach().to(torch.float32)

        return fn

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    result: list[torch.Tensor] = [torch.empty(0)] * len(ids)
    try:
        for rows in tqdm(length_batches(ids, batch_size), desc=desc, disable=not progress, unit="batch"):
            inp, mask = pad_batch([ids[i] for i in rows], pad_id, left=False)
            # The hooks keep the layers' outputs; the logits are not needed (one position's is computed).
            model(input_ids=inp.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
            stacked = torch.stack([store[i] for i in range(len(layers))], dim=2).cpu()  # (B, T, L, d)
            for r, i in enumerate(rows):
                result[i] = stacked[r, : len(ids[i])].clone()
    finally:
        for h in handles:
            h.remove()
    return Activations(result)


def common_prefix_length(ids: list[list[int]]) -> int:
    """Length of the token prefix shared by all sequences (the chat template's fixed head).

    Under causal attention those positions have identical activations in every prompt, so they
    carry no information about the concept; pooled features skip them."""
    n = min(len(x) for x in ids)
    k = 0
    while k < n and all(x[k] == ids[0][k] for x in ids):
        k += 1
    return min(k, n - 1)
