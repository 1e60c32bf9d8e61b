"""All of guardit's changes to vLLM, in one place (vLLM 0.32, V1 engine).

1. ``GPUModelRunner._model_forward`` (the CPU runner inherits it): before each forward, build the
   per-token request map of the flattened batch (``input_batch.req_ids`` + ``query_start_loc``),
   each request's spec (parsed once from ``sampling_params.extra_args``) and gate state. At
   start-up every decoder layer gets a forward hook that passes its output through guardit's
   custom op (:mod:`integrations.vllm.op`), whose implementation, :meth:`EngineState.layer`,
   updates the gates and rotates fired requests' tokens. The hook is traced into vLLM's
   torch.compile graph as one call of the op, so eager and compiled engines run the same code.
   vLLM's layers return ``(hidden_states, residual)`` with the residual add fused into the next
   RMSNorm; the residual stream is their sum. For a rotated token we write ``hidden = h'`` and
   ``residual = 0``; other tokens are not touched at all (bit-identical).
2. ``InputProcessor.process_inputs``: a request that names packs gets a unique ``cache_salt``, so
   KV computed under a rotation is never reused by another request and the gate always sees the
   whole prompt (prefix caching stays on for everything else). The scheduler
   (``Scheduler.add_request`` / ``schedule``) then hands the requests that arrived since its last
   step to :class:`integrations.vllm.admission.Admission` before scheduling them: their text gates
   are decided there, in one batch, and a request whose rotation that fixes (none, or a known one)
   gets the salt of that rotation instead, so it shares cached prefixes with requests computed the
   same way; a request whose probes decide in the forward pass waits for its whole prompt to
   decide them (deferred: they score the prompt and rotate nothing meanwhile) and gets the salt of
   its packs, and the workers keep the probe scores of every block it computes, so a request that
   reads the block from the cache still scores every prompt token. A deferred probe that fires is
   reported with the step's output (``execute_model`` / ``sample_tokens``), and the scheduler's
   ``update_from_output`` recomputes that request under a unique salt before it reads the output.
   ``KVCacheCoordinator.cache_blocks`` caches only the prompt blocks of a rotated or deferred
   one, and nothing of one that keeps the unique salt.
3. Fail closed in every engine mode. ``EngineArgs.create_engine_config``, whenever packs are
   configured: no CUDA graphs (a replay would skip the op's host code; torch.compile stays on),
   guardit's mark in ``additional_config`` (vLLM's compile cache is keyed by the config's hash, so
   graphs with and without the op never mix), and a platform whose model runner is not the GPU/CPU
   one patched here is refused. The runner's ``load_model`` then refuses an engine that would
   still capture graphs or that splits the model into pipeline stages, and every forward checks
   that each steered layer's op ran (one that did not stops the engine instead of serving
   unsteered).

Gate results are appended as JSON lines to ``$GUARDIT_RUN_DIR/events.jsonl``.

Tensor parallelism: every worker runs this code on the whole residual stream (each layer's output
is all-reduced), so every worker loads the packs and applies the same gates and rotations. The
text gates are decided once, in the engine core, and reach every worker with the request. Rank 0
alone writes events and the fingerprint, and supplies the fingerprint's embedding rows (its
vocabulary slice is the one that starts at row 0).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from integrations.vllm import config, op
from integrations.vllm.admission import (
    RESTART,
    SALT_MARK,
    Admission,
    cacheable_tokens,
    check_client_salt,
    read_deferral,
    read_text_decision,
    score_group,
)
from steering.files import write_atomic
from steering.modules import decoder_layers
from steering.pack import FINGERPRINT_ROWS, ModelFingerprint, fingerprint, load_packs
from steering.policy import RequestSpec, names_packs
from steering.runtime import GateStats, RowSettings, SteeringBank, TokenMap

log = logging.getLogger("guardit.vllm")
_installed = False
_lock = threading.Lock()


@dataclass
class _Request:
    """One live request: its spec and its gate state, kept between steps."""

    spec: RequestSpec | None
    gate: GateStats  # R = 1: the probe's running statistics and decisions (P packs)
    text_fired: torch.Tensor  # (P,) bool: the text gates' decision, made before its prefill
    text_score: torch.Tensor  # (P,) float, -inf where no text gate applies
    # Its rotation was fixed before its forward (forced packs, text gates): no probe decides, so
    # tokens served from the prefix cache skip nothing (admission salted it by that rotation).
    fixed: bool = False
    # Its probes' decision waits for the whole prompt (admission deferred it): they score the
    # prompt, the scores are kept per cache block, and nothing rotates on their account until
    # they have decided; a fired one makes the request start again (``pinned``).
    deferred: bool = False
    deciding: tuple[int, ...] = ()  # the deferred probes (bank indices)
    pinned: frozenset[str] = frozenset()  # packs whose deferred gate fired: open once its prompt is read again
    head: int = 1  # leading prompt tokens never rotated (template head, attention sink)
    earlier: tuple[int, int] = (0, 0)  # its earlier user turns, left out of turn-pooling probes
    seen: int = 0  # prompt+output positions already scored by the gate
    reported: set[str] = field(default_factory=set)
    evaluated: bool = False
    # The prompt was split into prefill chunks and the gate decided after the first one: those
    # chunks' tokens were not rotated, so this request's generated tokens are rotated as well.
    compensate: bool = False
    # The gates decided on the whole prompt and no later token will be rotated (prompt-scope
    # rotations and no compensation, or prompt-scope gates that all stayed closed): from now on the
    # request costs nothing, like one without packs.
    settled: bool = False

    @property
    def active(self) -> bool:
        return self.spec is not None and not self.settled


@dataclass
class _Step:
    """One forward pass: its requests in batch order, where their tokens are, their gates and settings."""

    req_ids: list[str]
    requests: list[_Request]
    tokens: TokenMap
    split: set[int]  # rows whose prompt came in several chunks and is complete now
    stats: GateStats
    settings: RowSettings
    layers: frozenset[int]  # layers whose hooks have work this step (the others return at once)
    # Deferred rows' prompt tokens, whose probe scores are kept: their indices in the flattened
    # batch, and per row (row, its block ids, first position, number of tokens, prompt length, its
    # deferred probes).
    record: torch.Tensor | None = None
    kept_rows: list[tuple[int, list[int], int, int, int, tuple[int, ...]]] = field(default_factory=list)
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # gate layer -> (recorded tokens, Pl) on the CPU


class EngineState:
    """Per-worker state: the bank of packs and every live request's gate state."""

    def __init__(self) -> None:
        self.bank: SteeringBank | None = None
        self.loaded = False
        self.version = 0  # the policy store's version whose packs are loaded (0: no store)
        self.requests: dict[str, _Request] = {}
        self.step: _Step | None = None
        self.batch: tuple[list[str], list[_Request]] = ([], [])  # the last step's request ids and records
        self.batch_active = False  # does any of them still need guardit?
        self.hooked: set[int] = set()  # id() of the models whose decoder layers call guardit's op
        self.called: set[int] = set()  # layers whose hook ran in the current forward
        self.fingerprint: ModelFingerprint | None = None  # the served model's, taken at start-up
        # Probe scores of the prompt tokens deferred requests computed, by KV block: block id ->
        # (the writer's deferred probes (bank indices), their scores (block size, probes), NaN
        # where not written). A request that reads a block from the prefix cache gets its scores
        # too: the block's tokens and every token before them are what its hash covers, and only
        # deferred requests with the same key (the same KV, the same probes) can hit it, so the
        # last request that filled it wrote what it holds. A block's first write (at offset 0:
        # cache hits end on a block boundary) replaces what an earlier owner left.
        self.kept: dict[int, tuple[tuple[int, ...], torch.Tensor]] = {}
        self.blocks: tuple[int, int] | None = None  # (KV-cache group the block ids come from, its block size)
        self.restarts: dict[str, list[str]] = {}  # req id -> packs whose deferred gate fired, for the scheduler

    # -- set-up ----------------------------------------------------------------------------------
    def ensure(self, runner) -> None:
        """Before each forward (and at load): the packs loaded (at start-up, and the new ones of a
        policy version installed since the last forward), their layers hooked."""
        store = config.store()
        version = store.version() if store is not None else 0
        if not self.loaded or version != self.version:
            if not self.loaded:
                self.fingerprint = _vllm_fingerprint(runner)
                _write_fingerprint(self.fingerprint)
            self.loaded, self.version = True, version
            self._add_packs(runner, config.pack_dirs())
        # Once per model (the hooks go on at start-up, before vLLM compiles it): configured() may
        # read every pack's metadata, which no forward pass should pay for.
        if id(runner.model) not in self.hooked and config.configured():
            self._hook_layers(runner)

    def _add_packs(self, runner, dirs) -> None:
        """Load the packs of ``dirs`` not loaded yet (all of them at start-up; a live policy change's
        new ones later) into a new bank holding the old packs too: requests admitted before a change
        still name the packs it dropped. Live requests' gate state moves to the new bank's columns."""
        old = self.bank
        new = {cid: d for cid, d in dirs.items() if old is None or cid not in old.index}
        if not new:
            return
        packs = load_packs(list(new.values()), self.fingerprint, config.allow_precision_change())
        for cid, pack in zip(new, packs):
            if pack.id != cid:
                raise ValueError(f"guardit: pack at {new[cid]} has id '{pack.id}', config names it '{cid}'")
        self.bank = SteeringBank([*(old.packs if old is not None else []), *packs], device=runner.device)
        if old is not None:
            self._widen(old)
        log.info("guardit: %d concept pack(s) loaded: %s", len(packs), [p.id for p in packs])

    def _widen(self, old: SteeringBank) -> None:
        """Move every live request's gate state from ``old``'s pack columns to the new bank's."""
        bank = self.bank
        assert bank is not None
        cols = torch.tensor([bank.index[p.id] for p in old.packs])
        p = bank.num_packs
        for st in self.requests.values():
            gate = GateStats.empty(1, p, st.gate.fired.device)
            for name in ("total", "count", "peak", "fired"):
                getattr(gate, name)[:, cols] = getattr(st.gate, name)
            text_fired, text_score = torch.zeros(p, dtype=torch.bool), torch.full((p,), -math.inf)
            text_fired[cols], text_score[cols] = st.text_fired, st.text_score
            st.gate, st.text_fired, st.text_score = gate, text_fired, text_score
            st.deciding = tuple(int(cols[j]) for j in st.deciding)
        self.kept = {b: (tuple(int(cols[j]) for j in probes), v) for b, (probes, v) in self.kept.items()}

    def _hook_layers(self, runner) -> None:
        """At start-up, before vLLM compiles or warms up the model: every decoder layer's output goes
        through guardit's op (the compiled graph then holds it whatever packs a live change adds
        later); the mode is checked first."""
        model = runner.model
        _check_mode(runner)
        op.serve(self.layer)
        for i, layer in enumerate(decoder_layers(model)):
            layer.register_forward_hook(_hook(i))
        self.hooked.add(id(model))

    def check_hooks_ran(self) -> None:
        """After a forward: every steered or gate layer's op must have run, or nothing was steered."""
        bank = self.bank
        assert bank is not None
        missing = sorted(set(bank.layers) - self.called)
        self.called = set()
        if missing:
            raise RuntimeError(
                f"guardit: the hooks of decoder layers {missing} did not run in this forward pass (guardit's "
                "op is missing from the code that ran, e.g. a captured graph or a graph compiled without "
                "it), so requests with packs would go unsteered; the engine stops instead. Fix: start it "
                "with enforce_eager=True / --enforce-eager"
            )

    # -- per step --------------------------------------------------------------------------------
    def begin(self, runner, num_tokens: int) -> None:
        """Before a forward: the step's requests (new ones parsed and text-gated), and, when any of
        them still needs guardit, the token map and the row settings."""
        self.step = None
        bank = self.bank
        assert bank is not None
        req_ids, requests = self._step_requests(runner)
        if not self.batch_active:
            return
        # The token map first: it may mark a request's gates fired (fail closed) before they are stacked.
        tokens, split, layers, record = self._token_map(runner, req_ids, requests, num_tokens)
        stats = GateStats.stack([st.gate for st in requests], runner.device)
        text_fired = torch.stack([st.text_fired for st in requests]) if bank.text_packs else None
        settings = bank.settings([st.spec if st.active else None for st in requests], text_fired)
        for i, st in enumerate(requests):
            if st.active and st.deferred:  # its probes score, but open nothing until the prompt is read
                settings.active[i, list(st.deciding)] = False
            if st.active and st.pinned:
                settings.threshold[i, [bank.index[pid] for pid in st.pinned]] = -math.inf
        self.step = _Step(req_ids, requests, tokens, split, stats, settings, layers, *record)

    def _step_requests(self, runner) -> tuple[list[str], list[_Request]]:
        """This step's request ids and records, in batch order: finished requests dropped, new ones
        added, preempted ones made to rotate again. A decode step with the same requests as the last
        step, in the same order, takes the last step's records as they are: none arrived or
        finished since, and none is recomputing its prompt (a preempted request would be), so
        decode steps' host work does not grow with the batch."""
        batch = runner.input_batch
        req_ids = list(batch.req_ids[: batch.num_reqs])
        pending = prompt_pending(batch)
        if req_ids == self.batch[0] and not pending.any():
            return self.batch
        live = runner.requests
        for rid in [r for r in self.requests if r not in live]:
            del self.requests[rid]
        for rid in req_ids:
            if rid not in self.requests:
                self._new_request(rid, live[rid])
        requests = [self.requests[rid] for rid in req_ids]
        for st, in_prompt in zip(requests, pending):
            if st.settled and st.reported and in_prompt:
                st.settled = False  # preempted and recomputed from scratch: rotate its prompt again
        self.batch = (req_ids, requests)
        self.batch_active = any(st.active for st in requests)
        return self.batch

    def _token_map(
        self, runner, req_ids: list[str], requests: list[_Request], num_tokens: int
    ) -> tuple[TokenMap, set[int], frozenset[int], tuple]:
        """Each token's row and role in this step's flattened batch (``query_start_loc``), on the
        runner's device; the rows whose prompt came in several chunks and is complete now; the
        layers whose hooks have work this step; and the deferred rows' prompt tokens whose scores
        are kept (:class:`_Step`'s ``record`` and ``kept_rows``). Advances each active request
        through its prompt."""
        bank = self.bank
        assert bank is not None
        n = len(req_ids)
        qsl = runner.query_start_loc.np[: n + 1].astype(np.int64)
        row = np.zeros(num_tokens, dtype=np.int64)
        counted, steerable, is_prompt = (np.zeros(num_tokens, dtype=bool) for _ in range(3))
        # Built only when a pack leaves earlier user turns out (SteeringBank.earlier_turns).
        pooled = np.zeros(num_tokens, dtype=bool) if bank.turn_header is not None else None
        ready = np.zeros(n, dtype=bool)
        split: set[int] = set()
        layers: frozenset[int] = frozenset()
        recorded: list[np.ndarray] = []
        kept_rows: list[tuple[int, list[int], int, int, int, tuple[int, ...]]] = []
        row[: qsl[n]] = np.repeat(np.arange(n), np.diff(qsl))
        for i, (rid, st) in enumerate(zip(req_ids, requests)):
            if not st.active:
                continue
            assert st.spec is not None
            cached = runner.requests[rid]
            start = int(cached.num_computed_tokens)
            a, b = int(qsl[i]), int(qsl[i + 1])
            if start > st.seen and not st.fixed and not st.deferred:
                # Tokens we never scored (a cache hit we did not expect): fail closed.
                log.warning("guardit: request %s skipped %d unscored tokens; steering it", rid, start - st.seen)
                st.gate.fired[:] = True
            pos = np.arange(start, start + (b - a))
            num_prompt = int(cached.num_prompt_tokens)
            counted[a:b] = pos >= st.seen
            steerable[a:b] = pos >= st.head
            if pooled is not None:
                pooled[a:b] = (pos < st.earlier[0]) | (pos >= st.earlier[1])
            is_prompt[a:b] = (pos < num_prompt) | st.compensate
            ready[i] = start + (b - a) >= num_prompt
            if ready[i] and not st.evaluated and start > st.head:
                split.add(i)
            st.seen = max(st.seen, start + (b - a))
            layers |= bank.layers_needed(st.spec.packs, start < num_prompt or not st.evaluated, st.compensate)
            if st.deferred and start < num_prompt:
                m = min(b - a, num_prompt - start)
                recorded.append(np.arange(a, a + m))
                kept_rows.append((i, self._block_ids(runner, cached), start, m, num_prompt, st.deciding))

        def t(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(x).to(runner.device)

        kept = None if pooled is None else t(pooled)
        record = (t(np.concatenate(recorded)), kept_rows) if recorded else (None, [])
        return TokenMap(t(row), t(counted), t(steerable), t(is_prompt), t(ready), kept), split, layers, record

    def end(self) -> None:
        """After a forward: keep each request's gate state (and the deferred rows' probe scores),
        write one event per decision, settle the requests guardit has nothing left to do for, and
        decide the deferred requests whose prompt is complete (a fired one is reported for a
        restart)."""
        step, self.step = self.step, None
        if step is None:
            return
        bank = self.bank
        assert bank is not None
        if step.kept_rows:
            self._keep_scores(step)
        forced = step.settings.force.cpu()
        value, fired_all = bank.readout(step.stats, step.settings)
        ready = step.tokens.ready.cpu()  # type: ignore[union-attr]
        events = []
        for i, (rid, st) in enumerate(zip(step.req_ids, step.requests)):
            if not st.active:
                continue
            assert st.spec is not None
            if st.deferred:
                if not ready[i]:
                    continue
                entry = next(((blocks, n) for j, blocks, _s, _m, n, _d in step.kept_rows if j == i), None)
                decided = self._decide_deferred(rid, st, entry)
                if decided is None:  # restarted: its next pass decides and reports as without deferral
                    continue
                st.gate, row_value, row_fired = decided
                st.deferred = False  # decided, closed: from now on an ordinary request
            else:
                st.gate, row_value, row_fired = step.stats.row(i), value[i], fired_all[i]
            fired = {pid for pid in st.spec.packs if row_fired[bank.index[pid]]}
            # Only a gate that opened in the forward pass left earlier prompt chunks unrotated; a pack
            # forced or fired by its text gate was rotated from the first chunk.
            if i in step.split and any(not forced[i, bank.index[pid]] for pid in fired):
                st.compensate = True
            # One event when the whole prompt has been seen (the score is the prompt's), then one per
            # pack that opens later.
            if (ready[i] and not st.evaluated) or (st.evaluated and fired - st.reported):
                st.evaluated = True
                st.reported |= fired
                events.append(
                    {
                        "req_id": rid,
                        "rid": st.spec.rid,
                        "tenant": st.spec.tenant,
                        "evaluated": list(st.spec.packs),
                        "fired": sorted(fired),
                        "scores": {pid: round(float(row_value[bank.index[pid]]), 5) for pid in st.spec.packs},
                        **_text_scores(st, bank),
                    }
                )
            if st.evaluated and not bank.layers_after_prompt(st.spec.packs, bool(fired), st.compensate):
                st.settled = True
        self.batch_active = any(st.active for st in step.requests)
        if events:
            _write_events(events)

    # -- deferred decisions ------------------------------------------------------------------------
    def _block_ids(self, runner, cached) -> list[int]:
        """A request's KV block ids in the group kept scores are keyed by (:func:`admission.score_group`)."""
        if self.blocks is None:
            g = score_group(getattr(runner, "kv_cache_config", None))
            assert g is not None, "deferred requests need a full-attention KV-cache group"
            self.blocks = (g, int(runner.kv_cache_config.kv_cache_groups[g].kv_cache_spec.block_size))
        return cached.block_ids[self.blocks[0]]

    def _keep_scores(self, step: _Step) -> None:
        """Write the probe scores of the deferred rows' prompt tokens of this step into ``kept``,
        by block and position within it."""
        bank = self.bank
        assert bank is not None and step.record is not None and self.blocks is not None
        size = self.blocks[1]
        scores = torch.full((step.record.shape[0], bank.num_packs), math.nan)
        for layer, s in step.scores.items():
            scores[:, bank.gate_layers[layer].packs.cpu()] = s
        at = 0
        for _i, blocks, start, m, _n, probes in step.kept_rows:
            mine = scores[at : at + m, list(probes)]
            pos = start
            while pos < start + m:  # one slice per block
                block, offset = blocks[pos // size], pos % size
                k = min(size - offset, start + m - pos)
                entry = self.kept.get(block)
                if entry is None or offset == 0 or entry[0] != probes:
                    entry = self.kept[block] = (probes, torch.full((size, len(probes)), math.nan))
                entry[1][offset : offset + k] = mine[pos - start : pos - start + k]
                pos += k
            at += m

    def _decide_deferred(
        self, rid: str, st: _Request, entry: tuple[list[int], int] | None
    ) -> tuple[GateStats, torch.Tensor, torch.Tensor] | None:
        """The deferred probes' decision on a request's whole prompt, from the kept scores of its
        blocks (those it computed and those it read from the prefix cache). Closed: its statistics,
        pooled value and fired packs (forced ones count), to go on as a settled request. Fired (or
        a score missing: fail closed): the request is reported for a restart and None returned."""
        bank = self.bank
        assert bank is not None and st.spec is not None and self.blocks is not None
        settings = bank.settings([st.spec], st.text_fired.unsqueeze(0) if bank.text_packs else None)
        deciding = torch.zeros(bank.num_packs, dtype=torch.bool)
        deciding[list(st.deciding)] = True
        size = self.blocks[1]
        scores = torch.full((1, bank.num_packs), math.nan)
        if entry is not None:  # its last prompt token is computed in this step, so it has an entry
            blocks, n = entry
            scores = torch.full((-(-n // size) * size, bank.num_packs), math.nan)
            for q, block in enumerate(blocks[: -(-n // size)]):
                kept = self.kept.get(block)
                if kept is not None and kept[0] == st.deciding:
                    scores[q * size : (q + 1) * size, list(st.deciding)] = kept[1]
            scores = scores[:n]
        if bool(torch.isnan(scores[:, deciding]).any()):
            log.warning("guardit: request %s: probe scores of cached prompt tokens are missing; steering it", rid)
            self._restart(rid, st, {bank.packs[j].id for j in deciding.nonzero().flatten().tolist()})
            return None
        pooled = None
        if bank.turn_header is not None:
            pos = torch.arange(scores.shape[0])
            pooled = (pos < st.earlier[0]) | (pos >= st.earlier[1])
        stats = bank.decide_prompt(scores, pooled, settings)
        value, fired = bank.readout(stats, settings)
        opened = {bank.packs[j].id for j in (fired[0] & deciding).nonzero().flatten().tolist()}
        if opened:
            self._restart(rid, st, opened)
            return None
        return stats.row(0), value[0], fired[0]

    def _restart(self, rid: str, st: _Request, packs: set[str]) -> None:
        """Report a deferred request whose probes of ``packs`` fired: the scheduler recomputes it
        from its first token under a unique salt (:meth:`Admission.restart`), and this worker then
        runs its probes in the forward pass, as without deferral, with ``packs`` pinned open (they
        open once its prompt is read, whatever their score in the new pass)."""
        self.restarts[rid] = sorted(packs)
        again = _Request(st.spec, GateStats.empty(1, st.gate.total.shape[1]), st.text_fired, st.text_score)
        again.head, again.earlier, again.pinned = st.head, st.earlier, frozenset(packs)
        self.requests[rid] = again
        self.batch = ([], [])  # the next step takes the full path and finds the new record

    def take_restarts(self, output) -> None:
        """After a step: put the restarts this worker decided on the step's ``ModelRunnerOutput``
        (the object vLLM returns to the scheduler, through its message queue under tensor
        parallelism), where the scheduler's :meth:`Admission.restart` reads them."""
        if not self.restarts or output is None:
            return
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        target = getattr(output, "_model_runner_output", output)  # async scheduling wraps it
        if isinstance(target, ModelRunnerOutput) and target is not EMPTY_MODEL_RUNNER_OUTPUT:
            setattr(target, RESTART, self.restarts)
            self.restarts = {}

    def _new_request(self, rid: str, cached) -> _Request:
        bank = self.bank
        assert bank is not None
        extra_args = getattr(getattr(cached, "sampling_params", None), "extra_args", None)
        try:
            spec = bank.request_spec(extra_args)  # validated at admission already
        except ValueError as e:  # never let one request break a batch
            log.error("guardit: request %s has an invalid spec (%s); steering all its packs", rid, e)
            spec = RequestSpec(packs=tuple(bank.index), force=True)
        p = bank.num_packs
        st = _Request(spec, GateStats.empty(1, p), torch.zeros(p, dtype=torch.bool), torch.full((p,), -math.inf))
        if spec is not None:
            prompt_ids = list(cached.prompt_token_ids or [])
            st.head, st.earlier = bank.head_length(prompt_ids), bank.earlier_turns(prompt_ids)
            if bank.text_packs:
                st.text_fired, st.text_score = read_text_decision(rid, spec, extra_args, bank)
            st.fixed = bank.fixed_rotation(spec, st.text_fired if bank.text_packs else None)[0]
            deferred, st.pinned = read_deferral(extra_args)
            st.deferred = deferred and not st.fixed and not st.pinned
            if st.deferred:
                st.deciding = tuple(bank.deciding(spec, st.text_fired if bank.text_packs else None))
        self.requests[rid] = st
        return st

    def layer(self, hidden: torch.Tensor, residual: torch.Tensor, index: int) -> None:
        """Decoder layer ``index``'s step (what guardit's op does): update the gates that read this
        layer, then rotate, in place, the tokens of the rows whose gates fired for a pack steering
        here. Tokens of every other row are neither read back nor written."""
        self.called.add(index)
        step = self.step
        if step is None or index not in step.layers:
            return
        bank = self.bank
        n = step.tokens.row.shape[0]
        full = None  # the residual stream, computed at most once per layer
        if index in bank.gate_layers:
            full = hidden[:n] + residual[:n]
            scores = bank.update_gates(index, full, step.tokens, step.stats, step.settings)
            if step.record is not None and scores is not None:  # deferred rows' prompt tokens: kept
                step.scores[index] = scores.index_select(0, step.record).cpu()
        if bank.needs_steer(index, step.stats, step.settings):
            if full is None:
                full = hidden[:n] + residual[:n]
            idx = bank.steer_(index, full, step.tokens, step.stats, step.settings)
            if idx is not None:
                hidden[idx] = full[idx]
                residual[idx] = 0


STATE = EngineState()


def prompt_pending(batch) -> np.ndarray:
    """Per row of a runner's input batch: is its request still reading its prompt (new, chunked, or
    preempted and recomputing it)? A step where no row is, is a decode step."""
    n = batch.num_reqs
    return batch.num_computed_tokens_cpu[:n] < batch.num_prompt_tokens[:n]


def _hook(index: int):
    """A forward hook passing decoder layer ``index``'s output through guardit's op. The hook holds
    no state and no branch, so torch.compile traces it into the graph as one call of the op."""

    def hook(_module, _args, output):
        hidden, residual = output
        torch.ops.guardit.steer_layer(hidden, residual, index)

    return hook


def _text_scores(st: _Request, bank: SteeringBank) -> dict:
    if st.spec is None:
        return {}
    out = {
        pid: round(float(st.text_score[bank.index[pid]]), 5)
        for pid in st.spec.packs
        if math.isfinite(float(st.text_score[bank.index[pid]]))
    }
    return {"text_scores": out} if out else {}


def _tp_group():
    """vLLM's tensor-parallel group when the model is split over several workers, else None. Each
    worker holds the whole residual stream (the layers all-reduce their output), so every worker
    runs the same gates and rotations; only rank 0 writes events."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    return group if group.world_size > 1 else None


def _leads(tp) -> bool:
    """Is this worker the one that writes files (rank 0, or the only one)?"""
    return tp is None or tp.rank_in_group == 0


def _write_events(events: list[dict]) -> None:
    path = config.events_path()
    if path is None or not _leads(_tp_group()):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock, path.open("a") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events))


def _write_fingerprint(fp: ModelFingerprint) -> None:
    """The served model's fingerprint, as the engine sees it (precision included), for the
    middleware to check live-installed packs against before they reach the engine."""
    path = config.fingerprint_path()
    if path is not None and _leads(_tp_group()):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, fp.model_dump_json().encode())


def _vllm_fingerprint(runner) -> ModelFingerprint:
    from pathlib import Path

    model = runner.model
    mc = runner.model_config
    hf = mc.hf_config
    text = getattr(hf, "text_config", None) or hf
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.model.embed_tokens
    rows = getattr(embed, "weight", embed)[:FINGERPRINT_ROWS].detach().to("cpu", torch.float32)
    tp = _tp_group()
    if tp is not None:
        # Under tensor parallelism each worker holds a slice of the vocabulary; rank 0's starts at row 0.
        rows = tp.broadcast_object(rows if _leads(tp) else None, src=0)
    return fingerprint(
        name=Path(str(mc.model)).name,
        model_type=str(text.model_type),
        num_layers=len(decoder_layers(model)),
        hidden_size=int(text.hidden_size),
        vocab_size=int(text.vocab_size),
        embed_weight=rows,
        precision=str(mc.quantization or mc.dtype).removeprefix("torch."),
    )


def _check_mode(runner) -> None:
    """Refuse an engine that captures CUDA graphs (the op's implementation is host code that a
    graph replay would skip) or splits its layers into pipeline stages (a gate decided in one stage
    cannot reach the rotations of the next). torch.compile is fine: the compiled graph calls the op.
    Tensor parallelism is fine too: every worker holds the whole stream."""
    from vllm.config import CUDAGraphMode

    stages = runner.vllm_config.parallel_config.pipeline_parallel_size
    if stages > 1:
        raise RuntimeError(
            f"guardit: concept packs are loaded but the model is split into {stages} pipeline stages, "
            "whose gates and rotations guardit cannot join; refusing to start. Fix: tensor parallelism "
            "(--tensor-parallel-size) instead of --pipeline-parallel-size"
        )
    cc = runner.vllm_config.compilation_config
    if cc.cudagraph_mode != CUDAGraphMode.NONE:
        raise RuntimeError(
            f"guardit: concept packs are loaded but the engine captures CUDA graphs (mode "
            f"{cc.cudagraph_mode.name}), whose replays skip guardit's steering step; refusing to start. "
            "Fix: compilation_config={'cudagraph_mode': 'NONE'} (LLM) or -cc.cudagraph_mode=NONE (vllm serve)"
        )


_RUNNER_DEVICES = ("cpu", "cuda")  # platforms whose model runner is GPUModelRunner or its CPU subclass


def _configure_engine(original):
    """Wrap ``EngineArgs.create_engine_config``: with packs configured, the engine captures no CUDA
    graphs, its compile cache is kept apart from vanilla engines' (graphs with guardit's op), and its
    scheduler is vLLM's (whose admission of requests guardit patches)."""

    def create_engine_config(self, *args, **kwargs):
        from vllm.config import CUDAGraphMode

        packs = config.configured()
        if packs:
            cc = self.compilation_config
            if cc.cudagraph_mode not in (None, CUDAGraphMode.NONE):
                log.warning(
                    "guardit: concept packs are configured and a CUDA graph replay would skip guardit's "
                    "steering step; setting cudagraph_mode=NONE (torch.compile stays on)"
                )
            cc.cudagraph_mode = CUDAGraphMode.NONE
            # vLLM keys its compile cache by its config's hash, which covers additional_config: a
            # graph compiled with guardit's op is never loaded by a vanilla engine, nor the reverse.
            self.additional_config = {**(self.additional_config or {}), "guardit": op.NAME}
        vllm_config = original(self, *args, **kwargs)
        device = vllm_config.device_config.device_type
        if packs and device not in _RUNNER_DEVICES:
            raise RuntimeError(
                f"guardit: concept packs are configured but the '{device}' platform's model "
                f"runner is not one guardit can hook (supported: {list(_RUNNER_DEVICES)})"
            )
        if packs:
            from vllm.v1.core.sched.scheduler import Scheduler

            cls = vllm_config.scheduler_config.get_scheduler_cls()
            if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
                raise RuntimeError(
                    f"guardit: concept packs are configured but the scheduler {cls!r} is not vLLM's, "
                    "where guardit decides text gates and cache salts before prefill; use the default scheduler"
                )
        return vllm_config

    return create_engine_config


def _load_then_ensure(original):
    """Wrap a runner's ``load_model``: packs load, the mode is checked and hooks go on at start-up."""

    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        STATE.ensure(self)
        return out

    return load_model


def install() -> None:
    """Patch vLLM (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    config.carry_over_to_ray_workers()
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    EngineArgs.create_engine_config = _configure_engine(EngineArgs.create_engine_config)
    for cls in (GPUModelRunner, CPUModelRunner):
        if "load_model" in vars(cls):
            cls.load_model = _load_then_ensure(cls.load_model)
    original_forward = GPUModelRunner._model_forward

    def _model_forward(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kw):
        STATE.ensure(self)
        if STATE.bank is None:
            return original_forward(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kw)
        ref = input_ids if input_ids is not None else inputs_embeds
        STATE.begin(self, int(ref.shape[0]))
        STATE.called = set()
        try:
            out = original_forward(self, input_ids, positions, intermediate_tensors, inputs_embeds, **kw)
        finally:
            STATE.end()
        STATE.check_hooks_ran()
        return out

    GPUModelRunner._model_forward = _model_forward
    for name in ("execute_model", "sample_tokens"):  # whichever returns the step's output carries the restarts
        setattr(GPUModelRunner, name, _reporting(getattr(GPUModelRunner, name)))
    _patch_scheduler()

    original_process = InputProcessor.process_inputs

    def process_inputs(self, request_id, prompt, params, *args, **kwargs):
        request = original_process(self, request_id, prompt, params, *args, **kwargs)
        check_client_salt(request.cache_salt)
        if names_packs(getattr(getattr(request, "sampling_params", None), "extra_args", None)):
            request.cache_salt = f"{request.cache_salt or ''}{SALT_MARK}{uuid.uuid4().hex}"
        return request

    InputProcessor.process_inputs = process_inputs


def _reporting(original):
    """Wrap a runner method that may return a step's ``ModelRunnerOutput``: the restarts decided in
    the step go with it to the scheduler (:meth:`EngineState.take_restarts`)."""

    def method(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        STATE.take_restarts(out)
        return out

    return method


def _patch_scheduler() -> None:
    """The engine core's admission of requests (:mod:`integrations.vllm.admission`): requests that
    arrive are kept until the scheduler's next step, which decides them in one batch before it looks
    any of them up in the prefix cache; a rotated request caches its prompt's blocks only."""
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    from vllm.v1.core.sched.scheduler import Scheduler

    original_init, original_add, original_schedule = Scheduler.__init__, Scheduler.add_request, Scheduler.schedule

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.guardit = Admission(self.vllm_config, self.kv_cache_config) if config.configured() else None
        self.guardit_arrived = []

    def add_request(self, request) -> None:
        if self.guardit is not None and request.request_id not in self.requests:
            self.guardit_arrived.append(request)
        original_add(self, request)

    def schedule(self, *args, **kwargs):
        if self.guardit_arrived:
            arrived, self.guardit_arrived = self.guardit_arrived, []
            self.guardit.admit([r for r in arrived if not r.is_finished()])
        return original_schedule(self, *args, **kwargs)

    original_update = Scheduler.update_from_output

    def update_from_output(self, scheduler_output, model_runner_output):
        restarts = getattr(model_runner_output, RESTART, None)
        if restarts and self.guardit is not None:
            self.guardit.restart(self, restarts)
        return original_update(self, scheduler_output, model_runner_output)

    Scheduler.__init__, Scheduler.add_request, Scheduler.schedule = __init__, add_request, schedule
    Scheduler.update_from_output = update_from_output

    original_cache = KVCacheCoordinator.cache_blocks

    def cache_blocks(self, request, num_computed_tokens: int) -> None:
        return original_cache(self, request, cacheable_tokens(request, num_computed_tokens))

    KVCacheCoordinator.cache_blocks = cache_blocks
