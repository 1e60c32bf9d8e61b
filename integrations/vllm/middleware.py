"""ASGI middleware for ``vllm serve --middleware integrations.vllm.middleware.GuarditMiddleware``.

- Tenant from the ``Authorization: Bearer`` key (hashed, compared in constant time, never logged);
  unknown or missing key on ``/v1/*`` → 401.
- The tenant's policy is combined with the client's ``vllm_xargs`` guardit fields: mandatory packs
  always apply (a client trying to switch one off gets 403), bad fields get 400 naming the field,
  server-only fields (``guardit_tenant``, ``guardit_rid``) sent by a client get 400.
- The final spec is written into ``vllm_xargs``; the response carries ``x-guardit-evaluated`` and
  ``x-guardit-fired`` headers (non-streaming responses; streams carry what is known when they start).
- Prometheus counters ``guardit_gate_evaluated_total`` / ``guardit_gate_fired_total`` by pack and
  tenant on ``/metrics``, fed from the engine's event log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from collections import defaultdict
from pathlib import Path

from steering.errors import PolicyError
from steering.policy import SERVER_KEYS, PolicyConfig

from integrations.vllm import config as vcfg

log = logging.getLogger("guardit.middleware")
GUARDED_PATHS = ("/v1/chat/completions", "/v1/completions")


class EventTail:
    """Reads the engine's event log incrementally; keeps per-request results and counters."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
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
                rid = e.get("rid")
                prev = self.by_rid.get(rid, {"evaluated": [], "fired": []}) if rid else {"evaluated": [], "fired": []}
                for p in e["evaluated"]:
                    if p not in prev["evaluated"]:
                        self.evaluated[(p, tenant)] += 1
                for p in e["fired"]:
                    if p not in prev["fired"]:
                        self.fired[(p, tenant)] += 1
                if rid:
                    merged = {"evaluated": sorted(set(prev["evaluated"]) | set(e["evaluated"])),
                              "fired": sorted(set(prev["fired"]) | set(e["fired"]))}
                    self.by_rid[rid] = merged
                    if len(self.by_rid) > 100_000:
                        self.by_rid.pop(next(iter(self.by_rid)))

    def result(self, rid: str) -> dict | None:
        self.poll()
        with self.lock:
            return self.by_rid.get(rid)


class _Collector:
    def __init__(self, tail: EventTail) -> None:
        self.tail = tail

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        self.tail.poll()
        ev = CounterMetricFamily("guardit_gate_evaluated", "Gate evaluations by concept pack and tenant", labels=["pack", "tenant"])
        fi = CounterMetricFamily("guardit_gate_fired", "Gate firings by concept pack and tenant", labels=["pack", "tenant"])
        with self.tail.lock:
            for (p, t), n in self.tail.evaluated.items():
                ev.add_metric([p, t], n)
            for (p, t), n in self.tail.fired.items():
                fi.add_metric([p, t], n)
        yield ev
        yield fi


def _json_response(status: int, message: str, field: str | None = None):
    body = json.dumps({"error": {"message": message, "type": "guardit_error", "param": field, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def respond(send):
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return respond


class GuarditMiddleware:
    def __init__(self, app, config_path: str | None = None) -> None:
        self.app = app
        path = config_path or os.environ.get(vcfg.ENV_CONFIG)
        if not path:
            raise RuntimeError(f"guardit middleware needs {vcfg.ENV_CONFIG} (a policies YAML)")
        self.config = PolicyConfig.load(path)
        self.tail = EventTail(vcfg.events_path())
        try:
            from prometheus_client import REGISTRY

            REGISTRY.register(_Collector(self.tail))
        except ValueError:  # already registered (app rebuilt in the same process)
            pass

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        tenant = self.config.tenant_for_key(key) if key else None
        if tenant is None:
            return await _json_response(401, "missing or unknown API key")(send)
        if scope["path"] not in GUARDED_PATHS or scope.get("method") != "POST":
            return await self.app(scope, receive, send)

        chunks = []
        more = True
        while more:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        raw = b"".join(chunks)
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
            client = {k: v for k, v in xargs.items() if k.startswith("guardit")}
            spec = self.config.resolve(tenant, client)
        except PermissionError as e:
            return await _json_response(403, str(e), "vllm_xargs")(send)
        except (PolicyError, ValueError) as e:
            return await _json_response(400, str(e), "vllm_xargs")(send)
        rid = uuid.uuid4().hex
        other = {k: v for k, v in xargs.items() if not k.startswith("guardit")}
        if spec.active:
            spec = spec.model_copy(update={"rid": rid})
            other.update(spec.to_extra_args())
        if other:
            body["vllm_xargs"] = other
        else:
            body.pop("vllm_xargs", None)
        new_raw = json.dumps(body).encode()
        sent = False

        async def new_receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": new_raw, "more_body": False}
            return await receive()

        async def new_send(message):
            if message["type"] == "http.response.start" and spec.active:
                result = None
                for _ in range(20):  # the engine logs the gate when the prompt is complete
                    result = self.tail.result(rid)
                    if result is not None or body.get("stream"):
                        break
                    await asyncio.sleep(0.025)
                hdrs = list(message.get("headers", []))
                hdrs.append((b"x-guardit-tenant", tenant.encode()))
                hdrs.append((b"x-guardit-evaluated", ",".join(spec.packs).encode()))
                if result is not None:
                    hdrs.append((b"x-guardit-fired", ",".join(result["fired"]).encode()))
                message = dict(message, headers=hdrs)
            await send(message)

        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope["headers"].append((b"content-length", str(len(new_raw)).encode()))
        return await self.app(scope, new_receive, new_send)
