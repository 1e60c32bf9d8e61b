"""What each route of vLLM's OpenAI-compatible server is, for the guardit middleware (vLLM 0.32).

Every route the running app serves falls in one class:

- ``public``: no key (health and readiness; the config's ``public_paths``).
- ``info``: needs a tenant or admin key; runs no model (model list, tokenizer, templates).
- ``admin``: needs the admin key (metrics, profiling, cache resets, weight updates, sleep).
- ``guarded``: runs the model on a JSON body whose ``vllm_xargs`` reach the engine as the
  request's ``extra_args``: the middleware writes the tenant's policy into it.
- ``unguarded``: runs the model, but guardit cannot put a policy on it (pooling, scoring, batch,
  SageMaker dispatch, token-in/token-out): refused for every tenant that has packs.

A route of the app that this table does not name is **unclassified** and treated as
``unguarded`` (fail closed); the middleware logs it at start-up and lists it on
``/guardit/routes``, and the security test fails until it is classified here.
"""

from __future__ import annotations

from typing import Literal

RouteClass = Literal["public", "info", "admin", "guarded", "unguarded"]

# The middleware's own endpoint (admin key): the classification of the running app's routes.
ROUTES_ENDPOINT = "/guardit/routes"

DEFAULT_PUBLIC = ("/health", "/ping")

ROUTE_CLASSES: dict[str, RouteClass] = {
    # runs no model
    "/v1/models": "info",
    "/version": "info",
    "/load": "info",
    "/tokenize": "info",
    "/detokenize": "info",
    "/tokenizer_info": "info",
    "/openapi.json": "info",
    "/docs": "info",
    "/docs/oauth2-redirect": "info",
    "/redoc": "info",
    "/v1/messages/count_tokens": "info",
    "/v1/chat/completions/render": "info",
    "/v1/completions/render": "info",
    "/v1/messages/render": "info",
    "/v1/responses/render": "info",
    "/v1/chat/completions/derender": "info",
    "/v1/completions/derender": "info",
    "/v1/responses/{response_id}/cancel": "info",
    "/is_sleeping": "info",
    # operators only
    "/metrics": "admin",
    ROUTES_ENDPOINT: "admin",
    "/kv_event_sources": "admin",
    "/server_info": "admin",
    "/scale_elastic_ep": "admin",
    "/is_scaling_elastic_ep": "admin",
    "/inference/v1/abort_requests": "admin",
    "/abort_requests": "admin",
    "/reset_prefix_cache": "admin",
    "/reset_mm_cache": "admin",
    "/reset_encoder_cache": "admin",
    "/collective_rpc": "admin",
    "/sleep": "admin",
    "/wake_up": "admin",
    "/release_kv_cache_memory": "admin",
    "/start_profile": "admin",
    "/stop_profile": "admin",
    "/v1/load_lora_adapter": "admin",
    "/v1/unload_lora_adapter": "admin",
    "/pause": "admin",
    "/resume": "admin",
    "/get_world_size": "admin",
    "/weight_info": "admin",
    "/update_weights": "admin",
    "/fault_tolerance/status": "admin",
    # runs the model with the tenant's policy written into vllm_xargs
    "/v1/chat/completions": "guarded",
    "/v1/completions": "guarded",
    "/v1/responses": "guarded",
    "/v1/messages": "guarded",
    # runs the model (or returns its stored output), no way to apply a policy
    "/v1/chat/completions/batch": "unguarded",
    "/v1/responses/{response_id}": "unguarded",
    "/invocations": "unguarded",
    "/generative_scoring": "unguarded",
    "/inference/v1/generate": "unguarded",
    "/v1/systemone": "unguarded",
    "/v1/realtime": "unguarded",
    "/v1/audio/transcriptions": "unguarded",
    "/v1/audio/translations": "unguarded",
    "/pooling": "unguarded",
    "/classify": "unguarded",
    "/v1/embeddings": "unguarded",
    "/v2/embed": "unguarded",
    "/score": "unguarded",
    "/v1/score": "unguarded",
    "/rerank": "unguarded",
    "/v1/rerank": "unguarded",
    "/v2/rerank": "unguarded",
}


class RouteTable:
    """The running app's routes, each with its class; matches a request path to its route the way
    the app's router does (each route's own path regex)."""

    def __init__(self, app, public: tuple[str, ...] | list[str] = DEFAULT_PUBLIC) -> None:
        if not getattr(app, "routes", None):
            raise RuntimeError("guardit: cannot read the app's routes; refusing to serve (fail closed)")
        self.public = frozenset(public)
        self.routes: list[tuple[str, object, RouteClass]] = []
        self.unclassified: list[str] = []
        for route in getattr(app, "routes", []):
            path = getattr(route, "path", None)
            regex = getattr(route, "path_regex", None)
            if path is None or regex is None:
                continue
            cls = self.classify(path)
            if path not in self.public and path not in ROUTE_CLASSES and path not in self.unclassified:
                self.unclassified.append(path)
            self.routes.append((path, regex, cls))

    def classify(self, path: str) -> RouteClass:
        if path in self.public:
            return "public"
        return ROUTE_CLASSES.get(path, "unguarded")

    def match(self, path: str) -> tuple[str | None, RouteClass]:
        """(route template, class) of a request's route path (the path without the app's
        root_path, as the router matches it). A path no route serves is (None, 'unguarded'): the
        app answers it 404, and if our table missed a route, that route fails closed."""
        if path == ROUTES_ENDPOINT:
            return path, "admin"
        for template, regex, cls in self.routes:
            if regex.match(path):
                return template, cls
        return None, "public" if path in self.public else "unguarded"

    def as_dict(self) -> dict:
        return {"routes": {t: c for t, _, c in self.routes}, "unclassified": list(self.unclassified)}
