"""Live policy changes on a running ``guardit serve`` (the real server and engine, no mocks): the
admin endpoint installs a new policy version as a whole, a bad one changes nothing, the next
request runs under the new version, and a request already running finishes under its own."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
from serving import core_halves, http, start_server, stop_process

from guardit.vllm_generation import ENV_CPU_KV

pytestmark = [pytest.mark.vllm, pytest.mark.model]

KEYS = {"kids": "live-kids-key", "adults": "live-adults-key", "admin": "live-admin-key"}
ENV = {"GUARDIT_LIVE_KIDS": KEYS["kids"], "GUARDIT_LIVE_ADULTS": KEYS["adults"], "GUARDIT_LIVE_ADMIN": KEYS["admin"]}
HP_Q = "What is the name of the wizarding school in Harry Potter?"
LOTR_Q = "Who is Frodo Baggins?"  # a calibration forget prompt of the Lord of the Rings pack
PLAIN_Q = "What is the capital of France?"
POLICY = "/guardit/policy"


def _policy(packs: dict, kids: list[str], adults: list[str], admin: bool = True) -> dict:
    cfg = {
        "packs": {k: str(v) for k, v in packs.items()},
        "tenants": {
            "kids": {"api_key_env": "GUARDIT_LIVE_KIDS", "mandatory": kids},
            "adults": {"api_key_env": "GUARDIT_LIVE_ADULTS", "mandatory": adults},
        },
    }
    if admin:
        cfg["admin"] = {"api_key_env": "GUARDIT_LIVE_ADMIN"}
    return cfg


@pytest.fixture(scope="module")
def live(request, tmp_path_factory, packs_dir):
    if any("server" in item.fixturenames for item in request.session.items):
        # test_vllm_server's compiled server starts now, on the other half of the cores: it
        # compiles while this module's and test_vllm_preemption's tests run.
        request.getfixturevalue("server_launched")
    d = tmp_path_factory.mktemp("live")
    # Eager here (its engine starts in a quarter of the compiled one's time); the server module's
    # server runs compiled, as `guardit serve` does by default. A 1 GiB KV cache: vLLM's CPU
    # default (half the NUMA node) leaves too little for the compiled server beside it.
    policy = _policy({"harry-potter": packs_dir / "harry-potter"}, ["harry-potter"], [])
    base, proc = start_server(d, policy, {**ENV, ENV_CPU_KV: "1", **core_halves()[0]}, "--enforce-eager")
    yield base
    stop_process(proc)


def _chat(base, tenant, question, max_tokens=32, xargs=None):
    """(status, answer text or error message, headers) of a greedy chat request."""
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0.0}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        base + "/v1/chat/completions",
        data=json.dumps({"model": _model(base), **body}).encode(),
        headers={"content-type": "application/json", "Authorization": f"Bearer {KEYS[tenant]}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())["choices"][0]["message"]["content"], dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]["message"], dict(e.headers)


_MODEL: dict[str, str] = {}


def _model(base):
    if base not in _MODEL:
        _MODEL[base] = json.loads(http(base, "GET", "/v1/models", key=KEYS["adults"])[1])["data"][0]["id"]
    return _MODEL[base]


def _put(base, cfg, key=KEYS["admin"]) -> tuple[int, str]:
    raw = cfg if isinstance(cfg, str) else json.dumps(cfg)
    return http(base, "PUT", POLICY, raw_body=raw.encode(), key=key)


def _version(base) -> int:
    status, text = http(base, "GET", POLICY, key=KEYS["admin"])
    assert status == 200, text
    return json.loads(text)["version"]


def test_the_policy_endpoint_needs_the_admin_key(live):
    assert http(live, "GET", POLICY)[0] == 401
    assert http(live, "GET", POLICY, key="nobody")[0] == 401
    status, text = http(live, "GET", POLICY, key=KEYS["kids"])
    assert status == 403 and "admin key" in text
    assert _put(live, "packs: {}", key=KEYS["kids"])[0] == 403
    status, text = http(live, "GET", POLICY, key=KEYS["admin"])
    view = json.loads(text)
    assert status == 200 and view["version"] == 1 and view["packs"] == ["harry-potter"]
    assert view["tenants"]["kids"]["mandatory"] == ["harry-potter"] and "api_key_env" not in text
    assert http(live, "DELETE", POLICY, key=KEYS["admin"])[0] == 405


def test_live_add_remove_and_reject_keep_each_request_under_one_version(live, packs_dir, tmp_path):
    hp, lotr = packs_dir / "harry-potter", packs_dir / "lord-of-the-rings"
    # version 1: the kids' mandatory Harry Potter pack forgets; the adults get vanilla
    status, kids_hp, h = _chat(live, "kids", HP_Q)
    assert status == 200 and h["x-guardit-fired"] == "harry-potter" and "hogwarts" not in kids_hp.lower()
    vanilla_hp = _chat(live, "adults", HP_Q)[1]
    assert "hogwarts" in vanilla_hp.lower()
    vanilla_lotr, vanilla_plain = _chat(live, "adults", LOTR_Q)[1], _chat(live, "adults", PLAIN_Q)[1]
    long_steered = _chat(live, "kids", HP_Q, max_tokens=96)[1]

    # Bad versions are refused, naming the field, and change nothing.
    wrong_model = tmp_path / "wrong-model"
    shutil.copytree(lotr, wrong_model)
    meta = json.loads((wrong_model / "pack.json").read_text())
    meta["model"]["weights_sha256"] = "f" * 64
    (wrong_model / "pack.json").write_text(json.dumps(meta))
    other_hp = tmp_path / "hp-recalibrated"
    shutil.copytree(hp, other_hp)
    meta = json.loads((other_hp / "pack.json").read_text())
    meta["gate"]["threshold"] += 1.0  # the same id, other content
    (other_hp / "pack.json").write_text(json.dumps(meta))
    bad = [
        (_policy({"harry-potter": hp, "lord-of-the-rings": tmp_path / "nowhere"}, [], []), "packs.lord-of-the-rings"),
        (_policy({"harry-potter": hp}, ["lord-of-the-rings"], []), "tenants.kids.mandatory"),
        (_policy({"lord-of-the-rings": wrong_model}, [], ["lord-of-the-rings"]), "calibrated on model"),
        (_policy({"harry-potter": other_hp}, ["harry-potter"], []), "already served with other content"),
        (_policy({"harry-potter": hp}, [], [], admin=False), "admin"),
        ("packs: [unclosed", "not valid YAML"),
    ]
    for cfg, needle in bad:
        status, text = _put(live, cfg)
        assert status == 400 and needle in text, (needle, status, text)
    assert _version(live) == 1
    status, again, h = _chat(live, "kids", HP_Q)
    assert again == kids_hp and h["x-guardit-fired"] == "harry-potter"

    # Version 2, installed while a kids' request runs: a pack not loaded at start-up is added and
    # made the adults' mandatory pack, the kids' policy loses its pack.
    running: dict = {}
    thread = threading.Thread(target=lambda: running.update(r=_chat(live, "kids", HP_Q, max_tokens=96)))
    thread.start()
    time.sleep(1.5)
    status, text = _put(live, _policy({"harry-potter": hp, "lord-of-the-rings": lotr}, [], ["lord-of-the-rings"]))
    assert status == 200 and json.loads(text)["version"] == 2, text
    thread.join()
    status, text_running, h = running["r"]
    assert status == 200 and h["x-guardit-evaluated"] == "harry-potter"  # admitted under version 1
    assert text_running == long_steered  # and finished under it, token for token
    status, kids_now, h = _chat(live, "kids", HP_Q)
    assert kids_now == vanilla_hp and "x-guardit-evaluated" not in h
    status, adults_lotr, h = _chat(live, "adults", LOTR_Q)
    assert h["x-guardit-evaluated"] == "lord-of-the-rings" and h["x-guardit-fired"] == "lord-of-the-rings"
    assert adults_lotr != vanilla_lotr
    status, adults_plain, h = _chat(live, "adults", PLAIN_Q)
    assert h["x-guardit-fired"] == "" and adults_plain == vanilla_plain
    status, metrics = http(live, "GET", "/metrics", key=KEYS["admin"])
    assert 'guardit_false_fire_bound{pack="lord-of-the-rings",set="retain",tenant="adults"}' in metrics

    # Version 3 withdraws the Harry Potter pack: a client can no longer name it.
    status, text = _put(live, _policy({"lord-of-the-rings": lotr}, [], ["lord-of-the-rings"]))
    assert status == 200 and json.loads(text)["packs"] == ["lord-of-the-rings"]
    status, message, _ = _chat(live, "adults", HP_Q, xargs={"guardit_packs": "lord-of-the-rings,harry-potter"})
    assert status == 400 and "harry-potter" in message
    assert _chat(live, "kids", HP_Q)[1] == vanilla_hp
