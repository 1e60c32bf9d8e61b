"""The engine core's side of guardit: each request's text gates, decided once before its prefill,
and the prefix-cache key that follows from them.

vLLM's scheduler looks a request up in the prefix cache by block hashes seeded with its
``cache_salt``, before the request's first forward. The front end gives every request that names
packs a unique salt (:func:`integrations.vllm.patch.install`: fail closed, nothing shared). Here,
when the scheduler takes the requests that arrived since its last step, :meth:`Admission.admit`

1. decides their text gates in one encoder batch (:meth:`SteeringBank.text_gates`, the rule the
   HF session uses too) and writes the decision into the request's ``extra_args``
   (``guardit_text``), where the workers read it: one decision per request, made once, whatever
   the number of tensor-parallel workers; the client's value of that key is overwritten;
2. replaces the unique salt where the request's rotation is fixed before its forward
   (:meth:`SteeringBank.fixed_rotation`): no rotation (its packs' gates closed before prefill) →
   the client's own salt, so it shares vanilla's cache; a rotation → the client's salt plus the
   rotation's key, so it shares blocks only with requests rotated exactly the same way;
3. defers the decision of a request whose probes still decide in the forward pass, where that
   decision can wait for the whole prompt (:meth:`SteeringBank.deferred_key`): its probes score
   the prompt but rotate nothing, so its prompt KV depends only on what is fixed before its
   forward, and it gets the client's salt plus that key; the workers keep every scored block's
   probe scores, so a cache hit skips no score, and decide when the prompt is complete. When a
   probe fires there, the worker reports it with the step's output and :meth:`Admission.restart`
   (before vLLM reads that output) drops the step's token and recomputes the request from its
   first token under a unique salt, where its probes decide in the forward pass as without
   deferral, the fired packs pinned open: a fired request gives the tokens it gives with prefix
   caching off, and its rotated KV is never shared. Other requests that name packs keep the
   unique salt: their prompt's KV depends on a decision that comes after vLLM has registered
   their blocks.

What a request may enter in the prefix cache (:func:`cacheable_tokens`, set here as
``request.guardit_cache``): a rotated or deferred request its prompt's blocks only (the workers
keep probe scores for prompt tokens only) (under prompt-scope steering
its generated tokens are not rotated, while the same tokens inside a later prompt, the next chat
turn, would be, so a block of them must not be shared); a request that keeps the unique salt
nothing: no other request can ever read those blocks, and vLLM keeps blocks that have a hash in
its cache, evicting the least recently used first, so they would push the blocks that requests do
share (a long system prompt) out of the cache. Without a hash, vLLM reuses a freed block first.
"""

from __future__ import annotations

import logging
import math
import time
import uuid

import torch

from integrations.vllm import config
from steering.pack import load_packs
from steering.policy import KEY_TEXT, RequestSpec
from steering.runtime import SteeringBank, gated_packs, row_levels
from steering.text_gate import check_encoder, request_text

log = logging.getLogger("guardit.vllm")
SALT_MARK = "|guardit:"  # what the front end appends to a request's cache_salt
PROMPT, NOTHING = "prompt", "nothing"  # request.guardit_cache: what it may put in the prefix cache
RESTART = "guardit_restart"  # the workers' report on a step's ModelRunnerOutput: {req_id: [pack ids fired]}


def check_client_salt(salt: object) -> None:
    """A client's own cache_salt may not contain guardit's mark: salts with it name guardit's cache
    namespaces (a rotation's key), and vanilla KV sent under one would be read by rotated requests."""
    if isinstance(salt, str) and SALT_MARK in salt:
        raise ValueError(f"cache_salt: '{SALT_MARK}' is reserved for guardit's own salts")


def client_salt(salt: str | None) -> str | None:
    """A request's cache_salt without guardit's part (None when the client set none)."""
    if salt is None:
        return None
    base = salt.split(SALT_MARK, 1)[0]
    return base or None


class Admission:
    """The engine core's packs (every one ever configured in this engine, as the workers keep them)
    and the model's tokenizer, loaded at start-up and on a policy change."""

    def __init__(self, vllm_config, kv_cache_config) -> None:
        self.model_config = vllm_config.model_config
        # Decisions are deferred only where the workers can keep scores per block (:func:`score_group`).
        self.defers = score_group(kv_cache_config) is not None
        self.dirs: dict = {}
        self.version: int | None = None
        self.bank: SteeringBank | None = None
        self.tokenizer = None
        self.ensure()

    def ensure(self) -> None:
        """Load the packs configured since the last call (with a policy store, after a live change)."""
        store = config.store()
        version = store.version() if store is not None else 0
        if version == self.version:
            return
        self.version = version
        new = {cid: d for cid, d in config.pack_dirs().items() if cid not in self.dirs}
        if not new:
            return
        self.dirs.update(new)
        self.bank = SteeringBank(load_packs(list(self.dirs.values()), None, config.allow_precision_change()))
        for j in self.bank.text_packs:  # a pack whose encoder is missing or different stops the engine here
            tg = self.bank.packs[j].meta.gate.text
            assert tg is not None
            check_encoder(self.bank.packs[j].id, tg.encoder, tg.encoder_sha256)
        if self.bank.text_packs and self.tokenizer is None:
            from transformers import AutoTokenizer

            mc = self.model_config
            self.tokenizer = AutoTokenizer.from_pretrained(
                mc.tokenizer, revision=mc.tokenizer_revision, trust_remote_code=mc.trust_remote_code
            )

    def admit(self, requests: list) -> None:
        """Decide the text gates of vLLM ``Request`` objects that have not been scheduled yet (one
        encoder batch), write each decision into its ``extra_args`` and set its cache salt."""
        self.ensure()
        bank = self.bank
        if bank is None:
            return
        specs = [_spec(r, bank) for r in requests]
        gated = [gated_packs(spec) for spec in specs]
        fired = torch.zeros(len(requests), bank.num_packs, dtype=torch.bool)
        score = torch.full((len(requests), bank.num_packs), -math.inf)
        use = [i for i, spec in enumerate(specs) if spec is not None and bank.uses_text_gate(gated[i])]
        if use:
            texts = []
            for i in use:
                ids = list(requests[i].prompt_token_ids or [])
                texts.append(request_text(self.tokenizer, ids, bank.head_length(ids)))
            f, s = bank.text_gates(texts, [list(gated[i]) for i in use], row_levels([specs[i] for i in use]))
            fired[use], score[use] = f, s
        for i, (request, spec) in enumerate(zip(requests, specs)):
            if spec is None:
                if SALT_MARK in (request.cache_salt or ""):
                    request.guardit_cache = NOTHING
                continue
            text = fired[i] if bank.text_packs else None
            fixed, key = bank.fixed_rotation(spec, text)
            deferred = None if fixed or not self.defers else bank.deferred_key(spec, text)
            _write_decision(request, spec, bank, fired[i], score[i], deferred is not None)
            base = client_salt(request.cache_salt)
            if fixed:
                _resalt(request, base if key is None else f"{base or ''}{SALT_MARK}{key}")
                request.guardit_cache = PROMPT if key is not None else None
            elif deferred is not None:
                _resalt(request, f"{base or ''}{SALT_MARK}deferred-{deferred}")
                request.guardit_cache = PROMPT
            else:
                request.guardit_cache = NOTHING  # the front end's unique salt stays

    def restart(self, scheduler, restarts: dict[str, list[str]]) -> None:
        """Before vLLM reads a step's output: recompute each request whose deferred probes fired in
        that step (``restarts``: req id → the packs fired) from its first token. vLLM's own
        preemption frees its blocks, puts it first in the waiting queue and drops the step's output
        for it (``drop_stale_output``, what vLLM does when it resets its prefix cache under running
        requests); it gets a new unique salt, shares nothing, and the workers, which made the
        decision, run its probes in the forward pass with the fired packs pinned open."""
        from vllm.v1.request import RequestStatus

        now = time.monotonic()
        for rid, packs in restarts.items():
            request = scheduler.requests.get(rid)
            if request is None or request.is_finished() or request.status != RequestStatus.RUNNING:
                continue
            scheduler.running.remove(request)
            scheduler._preempt_request(request, now, drop_stale_output=True)
            scheduler.prev_step_scheduled_req_ids.discard(rid)
            sp = request.sampling_params
            decision = dict((sp.extra_args or {}).get(KEY_TEXT) or {})
            sp.extra_args = {**(sp.extra_args or {}), KEY_TEXT: {**decision, "defer": False, "pinned": sorted(packs)}}
            _resalt(request, f"{client_salt(request.cache_salt) or ''}{SALT_MARK}{uuid.uuid4().hex}")
            request.guardit_cache = NOTHING
            log.info("guardit: request %s: deferred gates of %s fired; recomputing it steered", rid, sorted(packs))


def score_group(kv_cache_config) -> int | None:
    """The KV-cache group whose block table the workers key kept probe scores by: the first
    full-attention one (its blocks hold every position; a sliding-window group's early blocks
    are dropped), None when there is none (then no decision is deferred)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    for g, group in enumerate(groups):
        if isinstance(group.kv_cache_spec, FullAttentionSpec):
            return g
    return None


def cacheable_tokens(request, num_tokens: int) -> int:
    """How many of a request's first ``num_tokens`` tokens vLLM may enter in its prefix cache."""
    kept = getattr(request, "guardit_cache", None)
    if kept == NOTHING:
        return 0
    if kept == PROMPT:
        return min(num_tokens, request.num_prompt_tokens)
    return num_tokens


def _spec(request, bank: SteeringBank) -> RequestSpec | None:
    """The request's spec, or None (no packs; or a spec the workers will refuse and steer with every
    pack, which keeps the unique salt)."""
    try:
        return bank.request_spec(getattr(request.sampling_params, "extra_args", None))
    except ValueError:
        return None


def _write_decision(
    request, spec: RequestSpec, bank: SteeringBank, fired: torch.Tensor, score: torch.Tensor, defer: bool
) -> None:
    """The engine core's decision, for the workers: the packs fired by their text gates, every
    scored pack's score, and whether the probes' decision is deferred. A new dict on the
    request's own SamplingParams (the client's dict may be shared by several requests)."""
    sp = request.sampling_params
    decision = {
        "fired": sorted(pid for pid in spec.packs if fired[bank.index[pid]]),
        "scores": {
            pid: float(score[bank.index[pid]]) for pid in spec.packs if math.isfinite(float(score[bank.index[pid]]))
        },
        "defer": defer,
    }
    sp.extra_args = {**(sp.extra_args or {}), KEY_TEXT: decision}


def read_text_decision(
    rid: str, spec: RequestSpec, extra_args, bank: SteeringBank
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a worker: a request's text-gate decision, as :class:`Admission` wrote it into its
    ``extra_args`` before its prefill: (fired (P,) bool, score (P,) float, -inf where not scored).
    A request that needs one and carries none is rotated by every such pack (fail closed)."""
    fired, score = torch.zeros(bank.num_packs, dtype=torch.bool), torch.full((bank.num_packs,), -math.inf)
    decision = (extra_args or {}).get(KEY_TEXT)
    if not isinstance(decision, dict):
        needed = bank.uses_text_gate(gated_packs(spec))
        if needed:
            log.error("guardit: request %s has no text-gate decision; rotating it with its text-gated packs", rid)
            for j in bank.text_packs:
                fired[j] = bank.packs[j].id in spec.packs
        return fired, score
    for pid in decision.get("fired", ()):
        fired[bank.index[pid]] = True
    for pid, value in decision.get("scores", {}).items():
        score[bank.index[pid]] = float(value)
    return fired, score


def read_deferral(extra_args) -> tuple[bool, frozenset[str]]:
    """For a worker: is the request's probe decision deferred (:meth:`Admission.admit`), and which
    packs fired when it was (pinned open while it is recomputed, :meth:`Admission.restart`)?"""
    decision = (extra_args or {}).get(KEY_TEXT)
    if not isinstance(decision, dict):
        return False, frozenset()
    return decision.get("defer") is True, frozenset(decision.get("pinned", ()))


def _resalt(request, salt: str | None) -> None:
    """Give a request that holds no blocks (not scheduled yet, or preempted) another cache salt:
    its block hashes again."""
    if salt == request.cache_salt:
        return
    request.cache_salt = salt
    request.block_hashes = []
    request.update_block_hashes()
