"""ASGI middleware for ``vllm serve --middleware integrations.vllm.middleware.GuarditMiddleware``.

An allow-list: every route of the running app has a class (:mod:`integrations.vllm.routes`),
learnt from the app itself at start-up, and each request is handled by its route's class.

- Every route needs a key except the config's ``public_paths`` (health, readiness). The tenant
  comes from the ``Authorization: Bearer`` key (hashed, compared in constant time, never
  logged); a missing or unknown key → 401. Admin routes (``/metrics`` too, unless the config
  opens it) need the config's ``admin`` key → 403 for tenants.
- Guarded routes (chat, completions, responses, messages): the tenant's policy is combined with
  the client's ``vllm_xargs`` guardit fields: mandatory packs always apply (a client trying to
  switch one off gets 403), bad fields get 400 naming the field, server-only fields
  (``guardit_tenant``, ``guardit_rid``) from a client get 400. The final spec is written into
  ``vllm_xargs``.
- Unguarded routes (they run the model, but no policy can be put on them): 403 for a tenant with
  packs; for the others, a body that carries any ``guardit_`` field is refused (400).
- Responses to a tenant carry ``x-guardit-tenant``; guarded ones with packs also
  ``x-guardit-evaluated``, ``x-guardit-alpha`` (the gates' level: the tenant's or the client's
  ``guardit_alpha`` where the policy allows it, or "calibrated"), ``x-guardit-false-fire-bound``
  (per pack, the bound that level achieves on the concept's neighbours and on everyday requests)
  and ``x-guardit-fired`` (non-streaming responses; streams carry what is known when they start).
- The answer check (:mod:`integrations.vllm.answer_check`): the response to a chat or
  completions request with a pack that has one is held back until checked (a stream is generated
  whole, then streamed); when the check fires, the request runs again with the fired packs forced
  and the client gets that response, with ``x-guardit-answer-check`` naming the packs the check
  fired.
- Live policy changes: ``GET``/``PUT /guardit/policy`` (admin key) shows the version in force or
  installs a new one in the policy store (:mod:`integrations.vllm.store`) after checking it as at
  start-up; each request reads the version in force once, when it arrives, and keeps it.
- Prometheus counters ``guardit_gate_evaluated_total`` / ``guardit_gate_fired_total`` by pack and
  tenant on ``/metrics``, fed from the engine's event log, and the gauge
  ``guardit_false_fire_bound`` by pack, tenant and negative set, at each tenant's level; labels
  come only from the configured tenants and packs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_plus

from integrations.vllm import config as vcfg
from integrations.vllm.admission import check_client_salt
from integrations.vllm.answer_check import ServerAnswerCheck, event_stream
from integrations.vllm.routes import ROUTES_ENDPOINT, RouteTable
from steering.errors import GuarditError, PolicyError, PolicyForbidden
from steering.pack import PackMeta
from steering.policy import PREFIX, SERVER_KEYS, PolicyConfig, guardit_fields

log = logging.getLogger("guardit.middleware")
MESSAGE_LIMIT = 300  # characters of an error message sent back
POLICY_ENDPOINT = "/guardit/policy"  # admin: GET the policy version in force, PUT a new one


class EventTail:
    """Reads the engine's event log incrementally; keeps per-request results and counters."""

    def __init__(self, path: Path | None, tenants: set[str], packs: set[str]) -> None:
        self.path = path
        self.tenants, self.packs = tenants, packs  # the only label values counted
        self.offset = path.stat().st_size if path is not None and path.is_file() else 0
        self.by_rid: dict[str, dict] = {}
        self.evaluated: dict[tuple[str, str], int] = defaultdict(int)
        self.fired: dict[tuple[str, str], int] = defaultdict(int)
        self.lock = threading.Lock()

    def poll(self) -> None:
        if self.path is None:
            return
        with self.lock:
            events, self.offset = vcfg.read_events(self.path, self.offset)
            for e in events:
                tenant = e.get("tenant") or ""
                if tenant not in self.tenants:
                    continue
                rid = e.get("rid")
                prev = self.by_rid.get(rid, {"evaluated": [], "fired": []}) if rid else {"evaluated": [], "fired": []}
                for p in e["evaluated"]:
                    if p not in prev["evaluated"] and p in self.packs:
                        self.evaluated[(p, tenant)] += 1
                for p in e["fired"]:
                    if p not in prev["fired"] and p in self.packs:
                        self.fired[(p, tenant)] += 1
                if rid:
                    merged = {
                        "evaluated": sorted(set(prev["evaluated"]) | set(e["evaluated"])),
                        "fired": sorted(set(prev["fired"]) | set(e["fired"])),
                    }
                    self.by_rid[rid] = merged
                    if len(self.by_rid) > 100_000:
                        self.by_rid.pop(next(iter(self.by_rid)))

    def result(self, rid: str) -> dict | None:
        self.poll()
        with self.lock:
            return self.by_rid.get(rid)


@dataclass(frozen=True)
class Served:
    """One policy version as the middleware serves it; a request keeps the one it started with."""

    version: int  # the policy store's version (0: a config file, fixed)
    config: PolicyConfig
    metas: dict[str, PackMeta]  # every pack the engine may hold (a store's earlier versions' too)
    answers: ServerAnswerCheck | None

    def bounds(self) -> list[tuple[str, str, str, float]]:
        """The false-fire bounds of each tenant's packs at the tenant's level."""
        return [
            (pid, name, kind, value)
            for name, t in self.config.tenants.items()
            for pid in dict.fromkeys(t.mandatory + t.packs)
            for kind, value in self.metas[pid].false_fire_bounds(t.alpha).items()
        ]


class _Collector:
    def __init__(self, middleware: GuarditMiddleware) -> None:
        self.middleware = middleware

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        served, tail = self.middleware.current(), self.middleware.tail
        tail.poll()
        ev = CounterMetricFamily(
            "guardit_gate_evaluated", "Gate evaluations by concept pack and tenant", labels=["pack", "tenant"]
        )
        fi = CounterMetricFamily(
            "guardit_gate_fired", "Gate firings by concept pack and tenant", labels=["pack", "tenant"]
        )
        with tail.lock:
            for (p, t), n in tail.evaluated.items():
                ev.add_metric([p, t], n)
            for (p, t), n in tail.fired.items():
                fi.add_metric([p, t], n)
        yield ev
        yield fi
        bound = GaugeMetricFamily(
            "guardit_false_fire_bound",
            "Bound on a gate's false-fire rate at the tenant's level, on the concept's neighbours "
            "(set=retain) and on everyday requests (set=everyday); packs without out-of-fold scores have none",
            labels=["pack", "tenant", "set"],
        )
        for p, t, kind, value in served.bounds():
            bound.add_metric([p, t, kind], value)
        yield bound


def _json_value(raw: bytes | str) -> object:
    """A body read as JSON (None when it is not JSON)."""
    try:
        return json.loads(raw or b"{}")
    except ValueError:
        return None


def _names_guardit(raw: bytes | str, body: object = None) -> bool:
    """Does a client's body or message carry guardit's field prefix anywhere, however it is spelt
    on the wire? The bytes as sent, and also the text as the server will read it: a JSON body
    decoded (``"\\u0067uardit_tenant"`` is ``guardit_tenant`` to the app) and a form body
    percent-decoded. ``body``: the JSON already decoded from ``raw``, if it was."""
    text = raw if isinstance(raw, str) else raw.decode("latin-1")
    if PREFIX in text:
        return True
    if "\\u" in text:
        value = body if body is not None else _json_value(raw)
        if value is not None and PREFIX in json.dumps(value, ensure_ascii=False):
            return True
    return "%" in text and PREFIX in unquote_plus(text)


def _json_response(status: int, message: str, field: str | None = None):
    if len(message) > MESSAGE_LIMIT:
        message = message[: MESSAGE_LIMIT - 3] + "..."
    body = json.dumps({"error": {"message": message, "type": "guardit_error", "param": field, "code": status}})
    return _json_body(status, body.encode())


def _json_body(status: int, body: bytes):
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def respond(send):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return respond


def _guardit_headers(
    tenant: str, spec=None, fired: list[str] | None = None, metas: dict[str, PackMeta] | None = None
) -> list[tuple[bytes, bytes]]:
    """The response headers a tenant gets: its name; for a request with packs, the packs evaluated,
    the gates' level and the false-fire bounds it achieves per pack (``metas``: the packs'
    metadata), and, when the gate result is known, the packs that fired."""
    hdrs = [(b"x-guardit-tenant", tenant.encode())]
    if spec is not None and spec.active:
        hdrs.append((b"x-guardit-evaluated", ",".join(spec.packs).encode()))
        hdrs.append((b"x-guardit-alpha", b"calibrated" if spec.alpha is None else str(spec.alpha).encode()))
        if metas is not None:
            bounds = []
            for pid in spec.packs:
                b = metas[pid].false_fire_bounds(spec.alpha)
                bounds.append(";".join([pid, *(f"{k}={v:.4f}" for k, v in b.items())]))
            hdrs.append((b"x-guardit-false-fire-bound", ",".join(bounds).encode()))
        if fired is not None:
            hdrs.append((b"x-guardit-fired", ",".join(fired).encode()))
    return hdrs


def _policy_view(served: Served) -> dict:
    """What the admin endpoint shows of a version: its number, its packs and tenants (no keys)."""
    cfg = served.config
    tenants = {
        name: t.model_dump(mode="json", exclude={"api_key_env", "api_key_sha256"}) for name, t in cfg.tenants.items()
    }
    return {"version": served.version, "packs": sorted(cfg.packs), "tenants": tenants}


def _route_path(scope) -> str:
    """The path the app's router matches: the request path without the app's root_path."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


def _api_key(scope) -> str:
    """The request's key ('' when none): ``Authorization: Bearer KEY``, or ``x-api-key: KEY`` as
    Anthropic clients send it on /v1/messages. Header bytes are decoded as latin-1, as HTTP
    defines them, so no byte raises; a key with non-ASCII bytes matches no tenant."""
    headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    auth = headers.get(b"authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return headers.get(b"x-api-key", "").strip()


async def _read_body(receive) -> bytes:
    chunks = []
    more = True
    while more:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunks.append(msg.get("body", b""))
        more = msg.get("more_body", False)
    return b"".join(chunks)


def _replay(raw: bytes, receive):
    """A receive() that hands the app the (possibly rewritten) body once, then the client's own."""
    sent = False

    async def new_receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return new_receive


def _with_length(scope, raw: bytes) -> dict:
    scope = dict(scope)
    scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    scope["headers"].append((b"content-length", str(len(raw)).encode()))
    return scope


class GuarditMiddleware:
    def __init__(self, app, config_path: str | None = None) -> None:
        self.app = app
        self.store = vcfg.store()
        self.config_path = config_path or os.environ.get(vcfg.ENV_CONFIG)
        if self.store is None and not self.config_path:
            raise RuntimeError(f"guardit middleware needs {vcfg.ENV_CONFIG} (a policies YAML)")
        self.model_dir = os.environ.get(vcfg.ENV_MODEL)
        self._lock = threading.Lock()
        self.served = self._load()
        cfg = self.served.config
        self.tail = EventTail(vcfg.events_path(), set(cfg.tenants), set(cfg.packs))
        self.routes: RouteTable | None = None
        try:
            from prometheus_client import REGISTRY

            REGISTRY.register(_Collector(self))
        except ValueError:  # already registered (app rebuilt in the same process)
            pass

    def _load(self) -> Served:
        if self.store is not None:
            version, cfg = self.store.version(), self.store.config()
        else:
            version, cfg = 0, PolicyConfig.load(self.config_path)
        metas = vcfg.pack_metas()
        cfg.check_levels(metas)
        return Served(version, cfg, metas, ServerAnswerCheck.from_config(cfg, self.model_dir))

    def current(self) -> Served:
        """The policy version in force (with a store, switched to a newly installed one as a whole)."""
        served = self.served
        if self.store is not None and self.store.version() != served.version:
            with self._lock:
                if self.store.version() != self.served.version:
                    self.served = self._load()
                    self.tail.tenants |= set(self.served.config.tenants)
                    self.tail.packs |= set(self.served.config.packs)
                    log.info("guardit: policy version %d in force", self.served.version)
            served = self.served
        return served

    def _learn_routes(self, scope) -> RouteTable:
        """Classify the running app's routes once (at the lifespan start-up event, or else at the
        first request); Starlette puts the app in every scope."""
        if self.routes is None:
            self.routes = RouteTable(scope.get("app"), self.served.config.public_paths)
            if self.routes.unclassified:
                log.warning(
                    "guardit: routes not classified, treated as unguarded (refused for tenants with packs): %s",
                    self.routes.unclassified,
                )
        return self.routes

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            if scope["type"] == "lifespan":
                self._learn_routes(scope)
            return await self.app(scope, receive, send)
        served = self.current()
        cfg = served.config
        path = _route_path(scope)
        template, cls = self._learn_routes(scope).match(path)
        if path == POLICY_ENDPOINT:
            template, cls = POLICY_ENDPOINT, "admin"
        if cls == "public":
            return await self.app(scope, receive, send)
        key = _api_key(scope)
        tenant = cfg.tenant_for_key(key) if key else None
        admin = bool(key) and tenant is None and cfg.is_admin_key(key)
        refusal = self._refusal(served, cls, template, tenant, admin)
        if scope["type"] == "websocket":
            if refusal is not None:
                return await send({"type": "websocket.close", "code": 1008})
            return await self.app(scope, self._scanning(receive, send), send)
        if refusal is not None:
            return await _json_response(*refusal)(send)
        if template == ROUTES_ENDPOINT:
            return await _json_body(200, json.dumps(self.routes.as_dict()).encode())(send)
        if template == POLICY_ENDPOINT:
            return await self._policy(scope, receive, send, served)
        if cls == "guarded" and scope.get("method") == "POST":
            return await self._guarded(scope, receive, send, tenant, served)
        if cls == "unguarded" and scope.get("method") in ("POST", "PUT", "PATCH"):
            raw = await _read_body(receive)
            body = _json_value(raw)
            if _names_guardit(raw, body):
                return await _json_response(
                    400,
                    f"{PREFIX}* fields are set by the server; this route takes "
                    f"none (a body that contains '{PREFIX}', in any spelling, is refused)",
                )(send)
            try:
                check_client_salt(body.get("cache_salt") if isinstance(body, dict) else None)
            except ValueError as e:
                return await _json_response(400, str(e), "cache_salt")(send)
            scope, receive = _with_length(scope, raw), _replay(raw, receive)
        return await self.app(scope, receive, self._headers(send, served, tenant))

    async def _policy(self, scope, receive, send, served: Served):
        """``GET``: the policy version in force. ``PUT``: install a new one (the whole policies
        document, YAML or JSON, pack paths relative to the server's config file), validated first
        as at start-up (packs against the served model, levels); on any error nothing changes and
        the answer is 400 naming the field. The next request runs under the new version; requests
        already admitted finish under theirs."""
        method = scope.get("method")
        if method == "GET":
            return await _json_body(200, json.dumps(_policy_view(served)).encode())(send)
        if method != "PUT":
            return await _json_response(405, f"{POLICY_ENDPOINT} takes GET or PUT")(send)
        if self.store is None:
            return await _json_response(409, "live policy changes need the policy store that guardit serve makes")(send)
        raw = await _read_body(receive)
        try:
            await asyncio.to_thread(self._install, raw.decode("utf-8"), served)
        except (GuarditError, UnicodeDecodeError, ValueError) as e:
            return await _json_response(400, str(e), "body")(send)
        return await _json_body(200, json.dumps(_policy_view(self.current())).encode())(send)

    def _install(self, text: str, served: Served) -> int:
        from integrations.vllm.serve import check_policies, served_fingerprint

        assert self.store is not None
        base = Path(self.config_path).resolve().parent if self.config_path else Path.cwd()
        cfg = PolicyConfig.parse(text, base, "policy")
        if cfg.admin is None:
            raise PolicyError("policy: field 'admin': a live change keeps an admin key (no later change could be made)")
        if cfg.public_paths != served.config.public_paths:
            raise PolicyError("policy: field 'public_paths': the routes served without a key change only at a restart")
        check_policies(cfg, "policy", served_fingerprint(self.model_dir), vcfg.allow_precision_change())
        with self._lock:
            version = self.store.install(cfg)
        log.info(
            "guardit: policy version %d installed: packs %s, tenants %s",
            version,
            sorted(cfg.packs),
            sorted(cfg.tenants),
        )
        return version

    def _refusal(self, served: Served, cls: str, template: str | None, tenant: str | None, admin: bool):
        """(status, message) when the caller may not use this route, else None."""
        if tenant is None and not admin:
            return 401, "missing or unknown API key"
        if cls == "admin":
            if admin or (template == "/metrics" and served.config.metrics_public):
                return None
            return 403, f"{template} needs the admin key"
        if cls in ("guarded", "unguarded") and admin:
            return 403, "the admin key runs no model; use a tenant's key"
        if cls == "unguarded" and served.config.tenants[tenant].has_packs:
            return 403, (
                f"{template} runs the model where guardit cannot apply tenant '{tenant}''s packs; "
                "use /v1/chat/completions, /v1/completions, /v1/responses or /v1/messages"
            )
        return None

    def _scanning(self, receive, send):
        """A websocket receive() that closes the session on any message carrying a guardit_ field."""

        async def new_receive():
            msg = await receive()
            if _names_guardit(msg.get("text") or msg.get("bytes") or b""):
                await send({"type": "websocket.close", "code": 1008})
                return {"type": "websocket.disconnect", "code": 1008}
            return msg

        return new_receive

    def _headers(self, send, served: Served, tenant: str | None, spec=None, wait: bool = False):
        """A send() that adds the guardit headers to the response start."""

        async def new_send(message):
            if message["type"] == "http.response.start" and tenant is not None:
                result = await self._gate_result(spec.rid, wait) if spec is not None and spec.active else None
                fired = None if result is None else result["fired"]
                extra = _guardit_headers(tenant, spec, fired, served.metas)
                message = dict(message, headers=list(message.get("headers", [])) + extra)
            await send(message)

        return new_send

    async def _gate_result(self, rid: str | None, wait: bool) -> dict | None:
        for _ in range(20 if wait else 1):  # the engine logs the gate when the prompt is complete
            result = self.tail.result(rid) if rid else None
            if result is not None:
                return result
            await asyncio.sleep(0.025)
        return None

    async def _run_buffered(self, scope, receive, body: dict) -> tuple[int, list, bytes]:
        """Run the app on ``body`` and keep its whole response: (status, headers, body bytes)."""
        raw = json.dumps(body).encode()
        start: dict = {}
        chunks: list[bytes] = []

        async def keep(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(_with_length(scope, raw), _replay(raw, receive), keep)
        return start.get("status", 500), list(start.get("headers", [])), b"".join(chunks)

    async def _answer_checked(self, scope, receive, send, served: Served, tenant: str, spec, body: dict, route: str):
        """A request whose packs have an answer check: run it (a stream as one response), check the
        answer, and when the check fires run it again with the fired packs forced (same rid: its
        gate events merge, so /metrics counts one evaluation and the fire); send the kept
        response (to a stream, as its events)."""
        answers = served.answers
        assert answers is not None
        stream = bool(body.get("stream"))
        usage = stream and bool((body.get("stream_options") or {}).get("include_usage"))
        body = {k: v for k, v in body.items() if k != "stream_options"} | {"stream": False}
        status, headers, payload = await self._run_buffered(scope, receive, body)
        result = await self._gate_result(spec.rid, wait=True)
        fired = set(result["fired"]) if result is not None else set()
        by_answer: list[str] = []
        if status == 200:
            try:
                response = json.loads(payload)
            except ValueError:
                response = {}
            redo = await asyncio.to_thread(answers.redo, route, spec, body, response, fired)
            if redo:
                again = spec.model_copy(update={"packs": tuple(sorted(redo)), "force": True})
                other = guardit_fields(body.get("vllm_xargs") or {}, keep=False)
                body = {**body, "vllm_xargs": {**other, **again.to_extra_args()}}
                status, headers, payload = await self._run_buffered(scope, receive, body)
                by_answer, fired = sorted(redo - fired), fired | redo
        if stream and status == 200:
            payload = event_stream(json.loads(payload), usage)
            headers = [(k, v) for k, v in headers if k.lower() != b"content-type"]
            headers.append((b"content-type", b"text/event-stream; charset=utf-8"))
        hdrs = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        hdrs.append((b"content-length", str(len(payload)).encode()))
        hdrs += _guardit_headers(tenant, spec, sorted(fired) if result is not None or by_answer else None, served.metas)
        hdrs.append((b"x-guardit-answer-check", ",".join(by_answer).encode()))
        await send({"type": "http.response.start", "status": status, "headers": hdrs})
        await send({"type": "http.response.body", "body": payload})

    async def _guarded(self, scope, receive, send, tenant: str, served: Served):
        """Write the tenant's policy, combined with the client's guardit fields, into vllm_xargs."""
        raw = await _read_body(receive)
        try:
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("request body must be a JSON object")
            xargs = body.get("vllm_xargs") or {}
            if not isinstance(xargs, dict):
                raise PolicyError("vllm_xargs must be a JSON object")
            bad = [k for k in SERVER_KEYS if k in xargs]
            if bad:
                raise PolicyError(f"{bad[0]} is set by the server and may not be sent by a client")
            client = guardit_fields(xargs)
            spec = served.config.resolve(tenant, client)
            spec.check_levels(served.metas)
        except PolicyForbidden as e:
            return await _json_response(403, str(e), "vllm_xargs")(send)
        except (PolicyError, ValueError) as e:
            return await _json_response(400, str(e), "vllm_xargs")(send)
        try:
            check_client_salt(body.get("cache_salt"))
        except ValueError as e:
            return await _json_response(400, str(e), "cache_salt")(send)
        other = guardit_fields(xargs, keep=False)
        if spec.active:
            spec = spec.model_copy(update={"rid": uuid.uuid4().hex})
            other.update(spec.to_extra_args())
        if other:
            body["vllm_xargs"] = other
        else:
            body.pop("vllm_xargs", None)
        route = _route_path(scope)
        try:
            checked = spec.active and served.answers is not None and served.answers.applies(route, spec, body)
        except PolicyError as e:
            return await _json_response(400, str(e), "stream")(send)
        if checked:
            return await self._answer_checked(scope, receive, send, served, tenant, spec, body, route)
        new_raw = json.dumps(body).encode()
        new_send = self._headers(send, served, tenant, spec, wait=not body.get("stream"))
        return await self.app(_with_length(scope, new_raw), _replay(new_raw, receive), new_send)
