"""Request specs, tenant policies, route classes and the serve command line (no model, no engine)."""

from __future__ import annotations

import hashlib
import re

import pytest

from steering.errors import ECHO_LIMIT, PolicyError, PolicyForbidden
from steering.policy import PolicyConfig, parse_request

KNOWN = {"harry-potter", "einstein"}


@pytest.mark.parametrize(
    "value,expected",
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (1.0, True),
        ("true", True),
        ("FALSE", False),
        ("1", True),
        ("0", False),
    ],
)
def test_force_accepts_what_clients_and_the_openai_server_send(value, expected):
    spec = parse_request({"guardit_packs": "einstein", "guardit_force": value}, KNOWN)
    assert spec is not None and spec.force is expected


@pytest.mark.parametrize("value", ["yes", 2, -1, [True], None])
def test_bad_force_names_the_field(value):
    with pytest.raises(PolicyError, match="guardit_force"):
        parse_request({"guardit_packs": "einstein", "guardit_force": value}, KNOWN)


@pytest.mark.parametrize(
    "xargs",
    [
        {"guardit_packs": "x" * 1_000_000},
        {"guardit_packs": "a" * 60 + "!" * 10**6},
        {"guardit_packs": "einstein", "guardit_angle": "n" * 10**6},
        {"guardit_" + "z" * 10**6: 1},
    ],
)
def test_errors_echo_a_bounded_part_of_the_value(xargs):
    with pytest.raises(PolicyError) as e:
        parse_request(xargs, KNOWN)
    assert len(str(e.value)) < ECHO_LIMIT + 200


def _config(tmp_path, **extra) -> PolicyConfig:
    import json

    for name in ("hp", "ae"):
        (tmp_path / name).mkdir(exist_ok=True)
    cfg = {
        "packs": {"harry-potter": "hp", "einstein": "ae"},
        "tenants": {
            "kids": {"api_key_env": "T_KIDS", "mandatory": ["harry-potter"]},
            "research": {"api_key_sha256": hashlib.sha256(b"r").hexdigest()},
        },
        **extra,
    }
    (tmp_path / "p.yaml").write_text(json.dumps(cfg))
    return PolicyConfig.load(tmp_path / "p.yaml")


def test_mandatory_pack_cannot_be_dropped_and_that_is_a_403_not_a_400(tmp_path, monkeypatch):
    monkeypatch.setenv("T_KIDS", "k")
    cfg = _config(tmp_path)
    assert cfg.tenant_for_key("k") == "kids" and cfg.tenant_for_key("r") == "research"
    with pytest.raises(PolicyForbidden, match="mandatory"):
        cfg.resolve("kids", {"guardit_packs": "none"})
    assert not issubclass(PolicyForbidden, (ValueError, OSError))
    assert cfg.resolve("kids", {}).packs == ("harry-potter",)
    assert cfg.tenants["kids"].has_packs and not cfg.tenants["research"].has_packs


def test_admin_key_and_its_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("T_ADMIN", "a")
    cfg = _config(tmp_path, admin={"api_key_env": "T_ADMIN"})
    assert cfg.is_admin_key("a") and not cfg.is_admin_key("k") and cfg.tenant_for_key("a") is None
    assert not _config(tmp_path).is_admin_key("a")  # no admin configured: nobody is admin
    with pytest.raises(PolicyError, match="admin"):
        _config(tmp_path, admin={"api_key_env": "X", "api_key_sha256": "0" * 64})


def test_readme_serve_command_parses_as_written():
    """`guardit serve --config policies.yaml -- --port 8000` hands --port to vLLM, not to MODEL."""
    from conftest import ROOT

    from guardit.cli import _parse

    readme = (ROOT / "README.md").read_text()
    lines = re.findall(r"^guardit serve .*$", readme, flags=re.M)
    assert lines
    for line in lines:
        args = _parse(line.split()[1:])
        assert args.model is None or not args.model.startswith("-"), line
    args = _parse("serve --config p.yaml -- --port 8000".split())
    assert args.model is None and args.vllm_args == ["--port", "8000"]
    args = _parse("serve --config p.yaml /models/m --port 8000".split())
    assert args.model == "/models/m" and args.vllm_args == ["--port", "8000"]


def test_route_table_matches_like_the_router_and_fails_closed():
    pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from integrations.vllm.routes import RouteTable

    def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[
            Route(p, ok) for p in ("/health", "/v1/chat/completions", "/v1/responses/{response_id}", "/v9/brand-new")
        ]
    )
    table = RouteTable(app)
    assert table.match("/health") == ("/health", "public")
    assert table.match("/v1/chat/completions") == ("/v1/chat/completions", "guarded")
    assert table.match("/v1/responses/abc") == ("/v1/responses/{response_id}", "unguarded")
    assert table.match("/v9/brand-new") == ("/v9/brand-new", "unguarded")  # unclassified: fail closed
    assert table.unclassified == ["/v9/brand-new"]
    assert table.match("/nowhere") == (None, "unguarded")  # no route: 404 from the app; refused for packs
    with pytest.raises(RuntimeError, match="fail closed"):
        RouteTable(None)


def test_one_angle_rule_and_one_default():
    """Request, tenant policy, pack and HF session read angles through check_angle; the default
    angle is one constant (the CLI's help names it)."""
    from helpers import FP

    from guardit.cli import build_parser
    from steering.pack import GateMeta, PackMeta
    from steering.rotation import DEFAULT_ANGLE_DEG

    meta = PackMeta(concept_id="x", model=FP, layers=[3], gate=GateMeta(layer=1, threshold=0.0, alpha=0.1))
    assert meta.angle_deg == DEFAULT_ANGLE_DEG
    calibrate = build_parser()._subparsers._group_actions[0].choices["calibrate"]
    assert f"default {DEFAULT_ANGLE_DEG:g}" in calibrate.format_help()
    for bad in ("nan", "400", "x" * 10_000):
        with pytest.raises(PolicyError, match="guardit_angle") as e:
            parse_request({"guardit_packs": "einstein", "guardit_angle": bad}, KNOWN)
        assert len(str(e.value)) < ECHO_LIMIT + 100


@pytest.mark.parametrize(
    "extra,expected",
    [
        (None, False),
        ({}, False),
        ({"guardit_packs": "none"}, False),
        ({"guardit_packs": " Off "}, False),
        ({"guardit_angle": 30}, False),
        ({"guardit_packs": "einstein"}, True),
        ({"guardit_packs": "bad id!"}, True),
        ({"guardit_packs": 5}, True),
    ],
)
def test_names_packs_fails_closed(extra, expected):
    """What decides a unique prefix-cache salt: a value that does not parse counts as naming packs."""
    from steering.policy import names_packs

    assert names_packs(extra) is expected


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        (b'{"vllm_xargs": {"guardit_tenant": "kids"}}', True),
        (b'{"vllm_xargs": {"\\u0067uardit_tenant": "kids"}}', True),  # a JSON escape: the same key to the app
        (b'{"prompt": "caf\\u00e9 \\u0047uardit_"}', False),  # another case is another name
        ('{"type": "session.update", "\\u0067uardit_rid": "x"}', True),  # a websocket text message
        (b"model=m&vllm_xargs=%7B%22%67uardit_packs%22%3A%22x%22%7D", True),  # a percent-encoded form
        (b'{"prompt": "100% sure", "n": 1}', False),
        (b"not json \\u0067", False),
    ],
)
def test_a_guardit_field_is_found_however_the_client_spells_it(raw, names):
    """What the middleware refuses on routes that take no guardit field (and on websocket messages):
    the prefix in the body as sent or as the app will decode it."""
    from integrations.vllm.middleware import _names_guardit

    assert _names_guardit(raw) is names
