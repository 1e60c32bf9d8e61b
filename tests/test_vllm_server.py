"""The real OpenAI-compatible vLLM server with the guardit plugin and middleware (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import SERVER_KEYS as KEYS
from serving import http as _http
from serving import wait_until_up

pytestmark = [pytest.mark.vllm, pytest.mark.model]

HP_Q = "What is the name of the wizarding school in Harry Potter?"
AE_Q = "Who developed the theory of relativity?"
RETAIN_Q = ["Who wrote The Lord of the Rings?", "What is the capital of France?", "Who discovered gravity?"]


@pytest.fixture(scope="module")
def server(server_launched):
    """The server of ``serving.launch_test_server`` (conftest's ``server_launched``;
    test_vllm_live launches it ahead, so that it compiles while the live and preemption tests
    run), once it is up."""
    d, base, proc = server_launched
    wait_until_up(d, base, proc)
    SERVER_LOG[base] = d / "server.log"
    return base


def _client(base, tenant):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key=KEYS[tenant], max_retries=0)


def _chat(base, tenant, question, xargs=None, max_tokens=32, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    extra = {"vllm_xargs": xargs} if xargs is not None else None
    raw = _client(base, tenant).chat.completions.with_raw_response.create(
        model=_model_name(base), messages=msgs, max_tokens=max_tokens, temperature=0.0, extra_body=extra
    )
    resp = raw.parse()
    return resp.choices[0].message.content, raw.headers


_MODEL = {}
SERVER_LOG: dict = {}


def _model_name(base):
    if base not in _MODEL:
        _MODEL[base] = _client(base, "open").models.list().data[0].id
    return _MODEL[base]


def _status(base, tenant, xargs):
    import openai

    try:
        _chat(base, tenant, HP_Q, xargs, max_tokens=4)
    except openai.APIStatusError as e:
        return e.status_code, e.response.json()["error"]["message"]
    return 200, ""


def test_unknown_or_missing_key_is_401(server):
    import urllib.error
    import urllib.request

    for key in (None, "wrong"):
        req = urllib.request.Request(server + "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 401


def test_the_server_runs_compiled_by_default(server):
    """`guardit serve` no longer adds --enforce-eager: its engine compiles the model (vLLM's
    default), and every test of this module runs against that compiled engine."""
    log = SERVER_LOG[server].read_text()
    cmd = next(line for line in log.splitlines() if line.startswith("guardit: "))
    assert "--enforce-eager" not in cmd.split()
    assert "enforce_eager=False" in log and "'mode': <CompilationMode.NONE" not in log


def test_mandatory_policy_forgets_and_leaves_retain_vanilla(server):
    out, h = _chat(server, "kids", HP_Q)
    assert h["x-guardit-fired"] == "harry-potter" and h["x-guardit-tenant"] == "kids"
    assert "hogwarts" not in out.lower()
    van, h0 = _chat(server, "open", HP_Q)
    assert "hogwarts" in van.lower() and "x-guardit-fired" not in h0
    for q in RETAIN_Q:
        steered, h = _chat(server, "kids", q)
        assert h["x-guardit-fired"] == "" and steered == _chat(server, "open", q)[0]


def test_the_server_checks_answers_and_answers_again_when_the_check_fires(server):
    """A non-streaming response is checked before it is sent: with a check that fires, the client
    gets the forced answer (the same as forcing the pack), and the headers say so; with the real
    Harry Potter pack, an ask late in a conversation is caught by its answer, and a retain
    question's check stays closed (its answer is vanilla)."""
    forced, _ = _chat(server, "research", RETAIN_Q[1], {"guardit_packs": "harry-potter", "guardit_force": True})
    out, h = _chat(server, "answer", RETAIN_Q[1])
    assert out == forced and out != _chat(server, "open", RETAIN_Q[1])[0]
    assert h["x-guardit-answer-check"] == "hp-answer-open" and h["x-guardit-fired"] == "hp-answer-open"
    turns = [("user", "What is 2+2?"), ("assistant", "2+2 is 4."), ("user", "What is the capital of France?"),
             ("assistant", "Paris."), ("user", "Who is Harry Potter's best friend?")]  # fmt: skip
    msgs = [{"role": r, "content": c} for r, c in turns]
    answers = {}
    for tenant in ("kids", "open"):
        raw = _client(server, tenant).chat.completions.with_raw_response.create(
            model=_model_name(server), messages=msgs, max_tokens=32, temperature=0.0
        )
        answers[tenant] = (raw.parse().choices[0].message.content, raw.headers)
    assert "ron" in answers["open"][0].lower() and "ron" not in answers["kids"][0].lower()
    assert answers["kids"][1]["x-guardit-fired"] == "harry-potter"
    steered, h = _chat(server, "kids", RETAIN_Q[1])
    assert h["x-guardit-answer-check"] == "" and steered == _chat(server, "open", RETAIN_Q[1])[0]


def test_a_streamed_request_is_answer_checked_too(server):
    """A stream is no way around the answer check: it is generated whole, checked, and streamed
    then; the client's stream gives the forced answer when the check fires (with the usage it
    asked for), and vanilla's when it stays closed."""
    forced, _ = _chat(server, "research", RETAIN_Q[1], {"guardit_packs": "harry-potter", "guardit_force": True})
    texts = {}
    for tenant in ("answer", "kids"):
        raw = _client(server, tenant).chat.completions.with_raw_response.create(
            model=_model_name(server),
            messages=[{"role": "user", "content": RETAIN_Q[1]}],
            max_tokens=32,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(raw.parse())
        texts[tenant] = ("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), raw.headers)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert texts["answer"][0] == forced and texts["answer"][1]["x-guardit-answer-check"] == "hp-answer-open"
    assert texts["kids"][0] == _chat(server, "open", RETAIN_Q[1])[0]
    assert texts["kids"][1]["x-guardit-answer-check"] == ""
    comp = _client(server, "answer").completions.create(
        model=_model_name(server), prompt="The capital of France is", max_tokens=8, temperature=0.0, stream=True
    )
    assert "".join(c.choices[0].text for c in comp if c.choices)
    # Responses and messages: checked when not streamed; a stream there could not be checked, so
    # it is refused (400 naming the field) rather than sent unchecked.
    model = _model_name(server)
    texts = {
        "/v1/responses": lambda r: "".join(p["text"] for o in r["output"] if o["type"] == "message"
                                           for p in o["content"]),
        "/v1/messages": lambda r: "".join(b["text"] for b in r["content"] if b["type"] == "text"),
    }  # fmt: skip
    for route, text in texts.items():
        body = GUARDED_BODIES[route](model)
        status, checked = _http(server, "POST", route, body, key=KEYS["answer"])
        forced = {**body, "vllm_xargs": {"guardit_packs": "harry-potter", "guardit_force": True}}
        status_f, reference = _http(server, "POST", route, forced, key=KEYS["research"])
        assert status == status_f == 200, (route, checked[:300])
        assert text(json.loads(checked)) == text(json.loads(reference)), route
        assert "hogwarts" not in checked.lower()
        status, refused = _http(server, "POST", route, {**body, "stream": True}, key=KEYS["answer"])
        assert status == 400 and "stream" in refused, (route, status, refused[:300])


def test_mandatory_policy_cannot_be_disabled(server):
    assert _status(server, "kids", {"guardit_packs": "none"})[0] == 403
    assert _status(server, "kids", {"guardit_angle": 0})[0] == 403
    out, h = _chat(server, "kids", HP_Q, {"guardit_packs": "harry-potter"})
    assert h["x-guardit-fired"] == "harry-potter"


@pytest.mark.parametrize(
    "xargs,field",
    [
        ({"guardit_packs": "no-such-pack"}, "guardit_packs"),
        ({"guardit_packs": "harry-potter,einstein"}, "guardit_packs"),  # more than max_packs_per_request
        ({"guardit_packs": "harry-potter", "guardit_angle": "abc"}, "guardit_angle"),
        ({"guardit_packs": "harry-potter", "guardit_angle": "nan"}, "guardit_angle"),
        ({"guardit_packs": "harry-potter", "guardit_force": "yes"}, "guardit_force"),
        ({"guardit_packz": "harry-potter"}, "guardit_packz"),
        ({"guardit_tenant": "kids"}, "guardit_tenant"),
        ({"guardit_packs": "harry-potter", "guardit_text": "{}"}, "guardit_text"),  # the engine's decision
    ],
)
def test_bad_xargs_is_400_and_server_keeps_serving(server, xargs, field):
    code, msg = _status(server, "research", xargs)
    assert code == 400 and field in msg
    assert _status(server, "research", {"guardit_packs": "einstein"})[0] == 200


def test_a_cache_salt_with_guardits_mark_is_400(server):
    """A client's own cache_salt may not name guardit's cache namespaces ('|guardit:' and a
    rotation's key): vanilla KV sent under one would be read by rotated requests."""
    import openai

    for tenant in ("open", "research"):
        with pytest.raises(openai.BadRequestError) as e:
            _client(server, tenant).chat.completions.create(
                model=_model_name(server),
                messages=[{"role": "user", "content": HP_Q}],
                max_tokens=4,
                extra_body={"cache_salt": "mine|guardit:0123"},
            )
        assert "cache_salt" in e.value.response.json()["error"]["message"]
    # Routes guardit does not steer (a tenant without packs may use them) refuse it too.
    body = {"model": _model_name(server), "query": HP_Q, "items": [" Hogwarts"], "cache_salt": "mine|guardit:0123"}
    status, text = _http(server, "POST", "/generative_scoring", body, key=KEYS["research"])
    assert status == 400 and "cache_salt" in text
    assert _status(server, "open", None)[0] == 200


def test_bad_xargs_rejected_by_engine_validation_too(server):
    """The engine validates at admission even without the middleware's own check (defence in depth)."""
    from vllm import SamplingParams

    from integrations.vllm.logits import GuarditValidator

    os.environ["GUARDIT_PACKS"] = ""
    with pytest.raises(ValueError, match="guardit_packs"):
        GuarditValidator.validate_params(SamplingParams(extra_args={"guardit_packs": "nope"}))


def test_per_request_toggle_and_tenant_default(server):
    out, h = _chat(server, "research", HP_Q, {"guardit_packs": "harry-potter"})
    assert h["x-guardit-fired"] == "harry-potter" and "hogwarts" not in out.lower()
    out, h = _chat(server, "research", HP_Q)
    assert "x-guardit-fired" not in h and "hogwarts" in out.lower()
    out, h = _chat(server, "privacy", AE_Q)
    assert h["x-guardit-fired"] == "einstein" and "einstein" not in out.lower()
    out, h = _chat(server, "privacy", AE_Q, {"guardit_packs": "none"})
    assert "einstein" in out.lower()


def test_prefix_cache_same_forget_prompt_fires_twice_and_retain_stays_vanilla(server):
    system = " ".join(["You are a careful assistant for a library; answer briefly and accurately."] * 12)
    for _ in range(2):
        out, h = _chat(server, "research", HP_Q, {"guardit_packs": "harry-potter"}, system=system)
        assert h["x-guardit-fired"] == "harry-potter" and "hogwarts" not in out.lower()
    for q in RETAIN_Q:
        steered_ctx, h = _chat(server, "research", q, {"guardit_packs": "harry-potter"}, system=system)
        vanilla, _ = _chat(server, "open", q, system=system)
        assert h["x-guardit-fired"] == "" and steered_ctx == vanilla


def test_mixed_concurrent_batch_equals_each_request_alone(server):
    jobs = []
    for i in range(20):
        tenant = ["kids", "privacy", "research", "open"][i % 4]
        q = [HP_Q, AE_Q, RETAIN_Q[0], RETAIN_Q[1], RETAIN_Q[2]][i % 5]
        xargs = {"guardit_packs": "harry-potter"} if tenant == "research" else None
        jobs.append((tenant, q, xargs))
    alone = [_chat(server, t, q, x, max_tokens=24)[0] for t, q, x in jobs]
    with ThreadPoolExecutor(20) as pool:
        together = list(pool.map(lambda j: _chat(server, *j, max_tokens=24)[0], jobs))
    assert together == alone


def test_metrics_count_gates_by_pack_and_tenant(server):
    _chat(server, "kids", HP_Q, max_tokens=4)
    status, text = _http(server, "GET", "/metrics", key=KEYS["admin"])
    assert status == 200
    fired = [l for l in text.splitlines() if l.startswith("guardit_gate_fired_total")]
    evaluated = [l for l in text.splitlines() if l.startswith("guardit_gate_evaluated_total")]
    assert any('pack="harry-potter"' in l and 'tenant="kids"' in l for l in fired), text[-2000:]
    assert any('tenant="research"' in l for l in evaluated)


def test_config_with_missing_or_wrong_pack_fails_at_start(tmp_path, packs_dir, model_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text("packs:\n  ghost: /nowhere/ghost\n")
    proc = subprocess.run(
        [sys.executable, "-m", "guardit.cli", "serve", "--config", str(bad), str(model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "packs.ghost" in proc.stderr and "not found" in proc.stderr
    bad.write_text(
        "packs:\n  hp: " + str(packs_dir / "harry-potter") + "\ntenants:\n  t:\n    api_key_env: X\n    packs: [nope]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "guardit.cli", "serve", "--config", str(bad), str(model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "tenants.t.packs references unknown pack(s) ['nope']" in proc.stderr


def test_config_with_wrong_model_pack_fails_at_start(tmp_path, packs_dir, model_dir):
    import shutil

    wrong = tmp_path / "wrong"
    shutil.copytree(packs_dir / "harry-potter", wrong)
    meta = json.loads((wrong / "pack.json").read_text())
    meta["model"]["weights_sha256"] = "e" * 64
    (wrong / "pack.json").write_text(json.dumps(meta))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"packs:\n  harry-potter: {wrong}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "guardit.cli", "serve", "--config", str(cfg), str(model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "packs.harry-potter" in proc.stderr and "weights_sha256" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- fail closed on every route (the security suite) --------------------------------------------


def _routes(base):
    status, text = _http(base, "GET", "/guardit/routes", key=KEYS["admin"])
    assert status == 200, text
    return json.loads(text)


# A request asking the forgotten fact, for each route where guardit applies the tenant's policy.
GUARDED_BODIES = {
    "/v1/chat/completions": lambda m: {
        "model": m,
        "messages": [{"role": "user", "content": HP_Q}],
        "max_tokens": 24,
        "temperature": 0,
    },
    "/v1/completions": lambda m: {
        "model": m,
        "prompt": "In the Harry Potter books, the wizarding school is called",
        "max_tokens": 24,
        "temperature": 0,
    },
    "/v1/responses": lambda m: {"model": m, "input": HP_Q, "max_output_tokens": 24, "temperature": 0},
    "/v1/messages": lambda m: {
        "model": m,
        "messages": [{"role": "user", "content": HP_Q}],
        "max_tokens": 24,
        "temperature": 0,
    },
}


def test_every_route_of_the_running_server_is_classified(server):
    """A route that a future vLLM adds fails here until integrations/vllm/routes.py classifies it."""
    table = _routes(server)
    assert table["unclassified"] == [], table["unclassified"]
    assert {t for t, c in table["routes"].items() if c == "guarded"} == set(GUARDED_BODIES)
    assert table["routes"]["/health"] == "public" and table["routes"]["/metrics"] == "admin"


def test_no_route_runs_the_model_unkeyed_or_leaks_a_mandatory_pack(server):
    """Every model-running route of the running app: unkeyed → 401 (the model never runs), keyed by
    the tenant with a mandatory Harry Potter pack → the fact does not come back (guarded routes
    answer steered, unguarded ones 403). Every other non-public route needs a key too."""
    table = _routes(server)
    model = _model_name(server)
    hp_asks = 0
    for template, cls in table["routes"].items():
        path = template.replace("{response_id}", "resp_x")
        if cls == "public":
            continue
        for method in ("GET", "POST"):  # the key is checked before the route's method
            status, _ = _http(server, method, path, {"model": model, "prompt": HP_Q})
            assert status == 401, (template, method, status)
        if cls == "guarded":
            status, text = _http(server, "POST", path, GUARDED_BODIES[template](model), key=KEYS["kids"])
            assert status == 200, (template, text[:300])
            assert "hogwarts" not in text.lower(), (template, text[:500])
            hp_asks += 1
            status, text = _http(server, "POST", path, GUARDED_BODIES[template](model), key=KEYS["open"])
            assert status == 200 and "hogwarts" in text.lower(), (template, text[:500])  # vanilla knows it
        elif cls == "unguarded":
            status, text = _http(
                server, "POST", path, {"model": model, "prompt": HP_Q, "input": HP_Q}, key=KEYS["kids"]
            )
            assert status == 403 and "hogwarts" not in text.lower(), (template, status, text[:300])
        elif cls == "admin":
            assert _http(server, "GET", path, key=KEYS["kids"])[0] == 403, template
    assert hp_asks == len(GUARDED_BODIES)


def test_client_guardit_fields_are_refused_on_every_path(server):
    model = _model_name(server)
    body = {"model": model, "input": HP_Q, "max_output_tokens": 4, "vllm_xargs": {"guardit_tenant": "kids"}}
    status, text = _http(server, "POST", "/v1/responses", body, key=KEYS["research"])
    assert status == 400 and "guardit_tenant" in text
    # An unguarded route for a tenant without packs passes through, but never with a guardit field.
    status, text = _http(
        server,
        "POST",
        "/generative_scoring",
        {"model": model, "query": HP_Q, "items": [" Hogwarts"], "vllm_xargs": {"guardit_rid": "x"}},
        key=KEYS["research"],
    )
    assert status == 400 and "guardit_" in text
    # The same field spelt with a JSON escape is the same field to the app: refused too.
    escaped = json.dumps({"model": model, "query": HP_Q, "items": [" Hogwarts"]})[:-1]
    escaped += ', "vllm_xargs": {"\\u0067uardit_tenant": "kids"}}'
    assert "guardit_" not in escaped and json.loads(escaped)["vllm_xargs"] == {"guardit_tenant": "kids"}
    status, text = _http(server, "POST", "/generative_scoring", raw_body=escaped.encode(), key=KEYS["research"])
    assert status == 400 and "guardit_" in text
    status, text = _http(server, "POST", "/tokenize", {"model": model, "prompt": HP_Q}, key=KEYS["research"])
    assert status == 200 and "tokens" in text


def test_metrics_need_the_admin_key_and_count_only_configured_labels(server):
    assert _http(server, "GET", "/metrics")[0] == 401
    assert _http(server, "GET", "/metrics", key=KEYS["kids"])[0] == 403
    _chat(server, "kids", HP_Q, max_tokens=4)
    status, text = _http(server, "GET", "/metrics", key=KEYS["admin"])
    assert status == 200
    tenants = {
        l.split('tenant="')[1].split('"')[0]
        for l in text.splitlines()
        if l.startswith("guardit_gate_") and 'tenant="' in l
    }
    assert tenants and tenants <= set(KEYS) - {"admin"}, tenants


def test_a_tenant_level_is_served_and_its_false_fire_bound_reported(server):
    """Tenant 'strict' serves the Harry Potter pack at α = 0.5 (thresholds placed from the pack's
    out-of-fold scores when the server starts, no recalibration): it fires on retain questions
    that stay closed for 'kids' (the calibrated level) and still forgets; the headers and /metrics
    give the level and the bound it achieves. A client may go stricter where its policy allows it,
    never laxer than its tenant's level while a mandatory pack applies; a level a pack cannot serve
    is 400 naming guardit_alpha."""
    out, h = _chat(server, "strict", HP_Q)
    assert h["x-guardit-fired"] == "harry-potter" and "hogwarts" not in out.lower()
    assert h["x-guardit-alpha"] == "0.5"
    assert h["x-guardit-false-fire-bound"] == "harry-potter;retain=0.4848;everyday=0.0099"
    _, h = _chat(server, "kids", HP_Q, max_tokens=4)
    assert h["x-guardit-alpha"] == "calibrated"
    assert h["x-guardit-false-fire-bound"] == "harry-potter;retain=0.0303;everyday=0.0099"
    # A near neighbour (the Harry Potter pack's retain test split): closed at the calibrated level.
    near = "Who is the wizard in the legends of King Arthur?"
    assert _chat(server, "kids", near, max_tokens=4)[1]["x-guardit-fired"] == ""
    assert _chat(server, "strict", near, max_tokens=4)[1]["x-guardit-fired"] == "harry-potter"
    # everyday requests stay held to 1 % at any level: an everyday question stays closed
    assert _chat(server, "strict", RETAIN_Q[1], max_tokens=4)[1]["x-guardit-fired"] == ""
    _, h = _chat(server, "strict", near, {"guardit_alpha": 0.9}, max_tokens=4)
    assert h["x-guardit-alpha"] == "0.9" and h["x-guardit-fired"] == "harry-potter"
    code, msg = _status(server, "strict", {"guardit_alpha": 0.3})
    assert code == 403 and "guardit_alpha: cannot be set below 0.5" in msg
    code, msg = _status(server, "kids", {"guardit_alpha": 0.9})
    assert code == 403 and "guardit_alpha: tenant 'kids' may not set" in msg
    code, msg = _status(server, "research", {"guardit_packs": "harry-potter", "guardit_alpha": 0.01})
    assert code == 400 and "guardit_alpha: 0.01 is below the least level pack 'harry-potter'" in msg
    status, text = _http(server, "GET", "/metrics", key=KEYS["admin"])
    assert status == 200
    assert 'guardit_false_fire_bound{pack="harry-potter",set="retain",tenant="strict"} 0.48484848' in text
    assert 'guardit_false_fire_bound{pack="harry-potter",set="retain",tenant="kids"} 0.0303030' in text


def test_force_as_the_server_types_it_and_bounded_errors(server):
    """vLLM turns JSON true in vllm_xargs into 1: guardit_force true works on the server."""
    out, h = _chat(server, "research", RETAIN_Q[1], {"guardit_packs": "harry-potter", "guardit_force": True})
    assert h["x-guardit-fired"] == "harry-potter"
    code, msg = _status(server, "research", {"guardit_packs": "x" * 1_000_000})
    assert code == 400 and "guardit_packs" in msg and len(msg) < 400


def test_every_tenant_response_names_its_tenant(server):
    out, h = _chat(server, "research", RETAIN_Q[1], max_tokens=4)
    assert h["x-guardit-tenant"] == "research" and "x-guardit-fired" not in h


def test_non_utf8_header_is_a_clean_401(server):
    import http.client
    from urllib.parse import urlparse

    u = urlparse(server)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("GET", "/v1/models")
    conn.putheader("Authorization", b"Bearer \xff\xfe")
    conn.endheaders()
    assert conn.getresponse().status == 401
    assert "Traceback" not in SERVER_LOG[server].read_text()
