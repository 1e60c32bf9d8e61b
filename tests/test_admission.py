"""The engine core's admission of requests (integrations/vllm/admission.py) on vLLM's own request and
KV-cache manager objects, without a model: which salt each request gets, and what it may put in the
prefix cache."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from helpers import FP, toy_pack

from integrations.vllm import config, patch
from integrations.vllm.admission import SALT_MARK, Admission

BLOCK = 16
PROMPT = list(range(100))  # 6 full blocks and 4 tokens


@pytest.fixture
def vllm_core(tmp_path, monkeypatch):
    """A vLLM KV-cache manager with prefix caching and guardit's patches on, two probe-gated toy
    packs: "toy" decides on the prompt (gate scope "prompt", the default), "toy-all" may open on
    generated tokens too (scope "all"). Returns the manager and its KV-cache config."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.kv_cache_utils import init_none_hash
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    pack = toy_pack("toy", fp=FP).save_pretrained(tmp_path / "toy")
    late = toy_pack("toy-all", fp=FP, seed=1)
    late = dataclasses.replace(
        late, meta=late.meta.model_copy(update={"gate": late.meta.gate.model_copy(update={"scope": "all"})})
    )
    late_dir = late.save_pretrained(tmp_path / "toy-all")
    monkeypatch.setenv(config.ENV_PACKS, os.pathsep.join([str(pack), str(late_dir)]))
    patch.install()
    init_none_hash(sha256)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=1, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    return KVCacheManager(kv, max_model_len=1024, scheduler_block_size=BLOCK, hash_block_size=BLOCK), kv


def _request(rid: str, extra_args: dict | None):
    """A request as vLLM's engine core gets it, salted by guardit's front end when it names packs."""
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher
    from vllm.v1.request import Request

    salt = f"{SALT_MARK}{rid}" if extra_args else None
    params = SamplingParams(max_tokens=32, extra_args=extra_args)
    hasher = get_request_block_hasher(BLOCK, sha256)
    return Request(rid, list(PROMPT), params, None, cache_salt=salt, block_hasher=hasher)


def _run(manager, request, generated: int):
    """Schedule the whole prompt, then ``generated`` tokens one by one; return the request's blocks."""
    blocks, hit, *_ = manager.get_computed_blocks(request)
    manager.allocate_slots(request, len(PROMPT) - hit, hit, blocks)
    request.num_computed_tokens = len(PROMPT)
    for t in range(generated):
        request.append_output_token_ids(1000 + t)
        manager.allocate_slots(request, 1)
        request.num_computed_tokens += 1
    return manager.get_blocks(request.request_id).get_block_ids()[0], hit


def test_what_each_request_may_leave_in_the_prefix_cache(vllm_core):
    """Vanilla: every full block. Forced (rotation fixed before prefill, salted by it) and deferred
    (its probe decides on the whole prompt and rotates nothing before; salted by its packs): its
    prompt's blocks only. A probe that may open on generated tokens (decided in the forward pass,
    unique salt): none, so its freed blocks carry no hash and are the first vLLM reuses, instead
    of pushing shared blocks out of the cache. Without a full-attention KV group (no block table
    to keep scores by) nothing is deferred."""
    manager, kv = vllm_core
    vanilla = _request("vanilla", None)
    forced = _request("forced", {"guardit_packs": "toy", "guardit_force": True})
    deferred = _request("deferred", {"guardit_packs": "toy"})
    probe = _request("probe", {"guardit_packs": "toy-all"})
    from vllm.config import VllmConfig

    Admission(VllmConfig(), kv).admit([vanilla, forced, deferred, probe])
    assert vanilla.cache_salt is None
    assert forced.cache_salt.startswith(SALT_MARK) and forced.cache_salt != f"{SALT_MARK}forced"
    assert deferred.cache_salt.startswith(f"{SALT_MARK}deferred-")
    assert deferred.sampling_params.extra_args["guardit_text"]["defer"] is True
    assert probe.cache_salt == f"{SALT_MARK}probe"  # unique: nothing to share
    assert probe.sampling_params.extra_args["guardit_text"]["defer"] is False

    pool = manager.block_pool
    hashed, blocks = {}, {}
    for request in (vanilla, forced, deferred, probe):
        ids, hit = _run(manager, request, generated=28)  # 128 tokens: 8 full blocks
        assert hit == 0
        blocks[request.request_id] = ids
        hashed[request.request_id] = sum(pool.blocks[b].block_hash is not None for b in ids)
    prompt_blocks = len(PROMPT) // BLOCK
    assert hashed == {"vanilla": 8, "forced": prompt_blocks, "deferred": prompt_blocks, "probe": 0}

    # The same requests again: vanilla, forced and deferred read their prompt's blocks; the probe nothing.
    manager.free(probe)
    again = (
        _request("vanilla-2", None),
        _request("forced-2", {"guardit_packs": "toy", "guardit_force": True}),
        _request("deferred-2", {"guardit_packs": "toy"}),
    )
    Admission(VllmConfig(), kv).admit(list(again))
    hits = [manager.get_computed_blocks(r)[1] for r in again]
    assert hits == [prompt_blocks * BLOCK] * 3
    # The probe's freed blocks are the first ones vLLM hands out again.
    first = pool.get_new_blocks(len(blocks["probe"]))
    assert {b.block_id for b in first} == set(blocks["probe"])

    # No full-attention group: the probe's decision is not deferred, and the unique salt stays.
    alone = _request("alone", {"guardit_packs": "toy"})
    Admission(VllmConfig(), None).admit([alone])
    assert alone.cache_salt == f"{SALT_MARK}alone"
