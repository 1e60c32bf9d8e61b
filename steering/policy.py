"""Policies: which concept packs apply to a request, with what angle, and what a client may change.

- :class:`RequestSpec` is the per-request steering spec, parsed and validated once, when the
  request arrives (flat JSON scalars, as ``vllm_xargs`` on the OpenAI server allows).
- :class:`PolicyConfig` is the operator's file (YAML): packs to load, tenants keyed by API key
  (hashes or env vars, never the key itself), per-tenant default and mandatory packs.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from steering.conformal import check_alpha
from steering.errors import PolicyError, PolicyForbidden, echo
from steering.pack import PACK_ID_RE, PackMeta
from steering.rotation import check_angle

# Every guardit key of SamplingParams.extra_args / vllm_xargs starts with this.
PREFIX = "guardit_"
# Keys a client may send.
KEY_PACKS = "guardit_packs"  # "id1,id2" (or a list offline); "none" or "" = no packs
KEY_ANGLE = "guardit_angle"  # degrees, overrides the packs' calibrated angle
KEY_FORCE = "guardit_force"  # rotate without the gate (evaluation)
KEY_ALPHA = "guardit_alpha"  # gate strictness: the false-fire level its thresholds are placed at
# Keys only the server middleware sets (any client value is removed before it).
KEY_TENANT = "guardit_tenant"
KEY_RID = "guardit_rid"
# Set inside the engine (vLLM's scheduler): the request's text-gate decision, made before its prefill.
KEY_TEXT = "guardit_text"
CLIENT_KEYS = (KEY_PACKS, KEY_ANGLE, KEY_FORCE, KEY_ALPHA)
SERVER_KEYS = (KEY_TENANT, KEY_RID, KEY_TEXT)
DEFAULT_MAX_PACKS = 16


class RequestSpec(BaseModel):
    """What one request asked for (already resolved against tenant policy by the server)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    packs: tuple[str, ...] = ()
    angle: float | None = None
    force: bool = False
    alpha: float | None = None  # None: each pack's calibrated level
    tenant: str | None = None
    rid: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.packs)

    def check_levels(self, metas: Mapping[str, PackMeta]) -> None:
        """Can every pack of the request serve its gate level (:meth:`PackMeta.check_alpha`;
        ``metas``: the loaded packs' metadata by concept id)? Raises :class:`PolicyError` naming
        ``guardit_alpha`` otherwise."""
        if self.alpha is not None:
            for pid in self.packs:
                metas[pid].check_alpha(self.alpha, KEY_ALPHA)

    def to_extra_args(self) -> dict[str, Any]:
        out: dict[str, Any] = {KEY_PACKS: ",".join(self.packs) if self.packs else "none"}
        if self.angle is not None:
            out[KEY_ANGLE] = self.angle
        if self.force:
            out[KEY_FORCE] = True
        if self.alpha is not None:
            out[KEY_ALPHA] = self.alpha
        if self.tenant is not None:
            out[KEY_TENANT] = self.tenant
        if self.rid is not None:
            out[KEY_RID] = self.rid
        return out


def guardit_fields(extra_args: dict[str, Any], keep: bool = True) -> dict[str, Any]:
    """The guardit fields of a request's extra_args (``keep=False``: all the others)."""
    return {k: v for k, v in extra_args.items() if k.startswith(PREFIX) == keep}


def names_packs(extra_args: dict[str, Any] | None) -> bool:
    """Does a request ask for packs? (A value that does not parse counts as yes: fail closed.)"""
    if not extra_args or KEY_PACKS not in extra_args:
        return False
    try:
        return bool(_split_packs(extra_args[KEY_PACKS]))
    except PolicyError:
        return True


def _split_packs(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        v = value.strip()
        if v.lower() in ("", "none", "off"):
            return ()
        items = [x.strip() for x in v.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
        items = [x.strip() for x in value]
    else:
        raise PolicyError(f"{KEY_PACKS} must be a comma-separated string of concept ids, got {type(value).__name__}")
    for x in items:
        if not PACK_ID_RE.match(x):
            raise PolicyError(f"{KEY_PACKS}: {echo(x)} is not a valid concept id")
    if len(set(items)) != len(items):
        raise PolicyError(f"{KEY_PACKS}: duplicated concept id in {echo(value)}")
    return tuple(items)


def parse_request(
    extra_args: dict[str, Any] | None,
    known: set[str] | frozenset[str],
    max_packs: int = DEFAULT_MAX_PACKS,
    keep_empty: bool = False,
) -> RequestSpec | None:
    """Parse the guardit fields of a request's extra_args. None when it names no packs (unless
    ``keep_empty``, used when a tenant policy still has to be combined with it).

    Raises :class:`PolicyError` (a ValueError) naming the offending field.
    """
    if not extra_args:
        return None
    fields = guardit_fields(extra_args)
    if not fields:
        return None
    unknown = set(fields) - set(CLIENT_KEYS) - set(SERVER_KEYS)
    if unknown:
        raise PolicyError(f"unknown field(s) {echo(sorted(unknown))}; expected some of {list(CLIENT_KEYS)}")
    packs = _split_packs(fields.get(KEY_PACKS, "none"))
    missing = [p for p in packs if p not in known]
    if missing:
        raise PolicyError(f"{KEY_PACKS}: unknown concept id(s) {echo(missing)}; loaded: {sorted(known)}")
    if len(packs) > max_packs:
        raise PolicyError(f"{KEY_PACKS}: {len(packs)} packs requested, at most {max_packs} allowed")
    angle = fields.get(KEY_ANGLE)
    if angle is not None:
        if isinstance(angle, bool) or not isinstance(angle, (int, float, str)):
            raise PolicyError(f"{KEY_ANGLE} must be a number of degrees, got {type(angle).__name__}")
        angle = check_angle(angle, KEY_ANGLE)
    force = _flag(KEY_FORCE, fields.get(KEY_FORCE, False))
    alpha = fields.get(KEY_ALPHA)
    if alpha is not None:
        alpha = check_alpha(alpha, KEY_ALPHA)
    tenant, rid = fields.get(KEY_TENANT), fields.get(KEY_RID)
    for key, val in ((KEY_TENANT, tenant), (KEY_RID, rid)):
        if val is not None and not isinstance(val, str):
            raise PolicyError(f"{key} must be a string")
    spec = RequestSpec(packs=packs, angle=angle, force=force, alpha=alpha, tenant=tenant, rid=rid)
    return spec if spec.active or keep_empty else None


def _flag(key: str, value: Any) -> bool:
    """A boolean as clients can send it: JSON true/false, or 1/0 (the OpenAI server's
    ``vllm_xargs`` turns JSON booleans into integers), or the strings "true"/"false"/"1"/"0"."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise PolicyError(f"{key} must be true or false (or 1 or 0), got {echo(value)}")


# -- operator config -------------------------------------------------------------------------


class ApiKey(BaseModel):
    """Where a key's hash comes from: an environment variable holding the key, or its SHA-256."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_key_env: str | None = Field(default=None, description="environment variable holding the API key")
    api_key_sha256: str | None = Field(default=None, description="hex SHA-256 of the API key")

    @model_validator(mode="after")
    def _one_key(self) -> ApiKey:
        if (self.api_key_env is None) == (self.api_key_sha256 is None):
            raise ValueError("give exactly one of api_key_env or api_key_sha256")
        if self.api_key_sha256 is not None and len(self.api_key_sha256) != 64:
            raise ValueError("api_key_sha256 must be 64 hex digits")
        return self

    def matches(self, digest: str) -> bool:
        """Is ``digest`` (hex SHA-256 of a presented key) this key's? Constant-time comparison."""
        import hmac

        if self.api_key_sha256 is not None:
            expected = self.api_key_sha256.lower()
        else:
            env = os.environ.get(self.api_key_env or "")
            if not env:
                return False
            expected = hashlib.sha256(env.encode()).hexdigest()
        return hmac.compare_digest(digest, expected)


class TenantPolicy(ApiKey):
    packs: list[str] = Field(default_factory=list, description="applied unless the client chooses others")
    mandatory: list[str] = Field(default_factory=list, description="always applied; the client cannot switch them off")
    allow_client_packs: bool = Field(default=True, description="may the client choose packs (beyond mandatory)")
    angle: float | None = None
    alpha: float | None = Field(
        default=None,
        description="gate strictness: the false-fire level the packs' thresholds are placed at (higher: "
        "fires more, with more false fires); None: each pack's calibrated level",
    )
    allow_client_alpha: bool = Field(
        default=False,
        description="may the client set guardit_alpha; with mandatory packs only at or above this tenant's alpha",
    )

    @property
    def has_packs(self) -> bool:
        """Does a policy apply to this tenant's requests by default (so an unguarded route is refused)?"""
        return bool(self.packs or self.mandatory)

    @field_validator("angle")
    @classmethod
    def _angle(cls, v: float | None) -> float | None:
        return None if v is None else check_angle(v, "angle")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float | None) -> float | None:
        return None if v is None else check_alpha(v, "alpha")


class PolicyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    packs: dict[str, str] = Field(description="concept id -> pack directory (relative to the config file)")
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)
    max_packs_per_request: int = Field(default=DEFAULT_MAX_PACKS, ge=1, le=256)
    admin: ApiKey | None = Field(default=None, description="the operators' key: /metrics and admin routes")
    public_paths: list[str] = Field(
        default_factory=lambda: ["/health", "/ping"], description="routes served without a key"
    )
    metrics_public: bool = Field(default=False, description="serve /metrics to anyone with a tenant key too")

    @model_validator(mode="after")
    def _refs(self) -> PolicyConfig:
        for name, t in self.tenants.items():
            for field in ("packs", "mandatory"):
                missing = [p for p in getattr(t, field) if p not in self.packs]
                if missing:
                    raise ValueError(f"tenants.{name}.{field} references unknown pack(s) {missing}")
        return self

    @classmethod
    def load(cls, path: str | Path) -> PolicyConfig:
        p = Path(path)
        if not p.is_file():
            raise PolicyError(f"policy config not found: {p}")
        return cls.parse(p.read_text(), p.resolve().parent, str(p))

    @classmethod
    def parse(cls, text: str, base: str | Path, source: str) -> PolicyConfig:
        """A config from YAML (or JSON) text; pack paths relative to ``base`` are made absolute.
        Errors name ``source`` and the field."""
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PolicyError(f"{source}: not valid YAML ({e})") from None
        try:
            cfg = cls.model_validate(raw or {})
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"]) or "(root)"
            raise PolicyError(f"{source}: field '{loc}': {first['msg']}") from None
        root = Path(base).resolve()
        return cfg.model_copy(update={"packs": {k: str((root / v).resolve()) for k, v in cfg.packs.items()}})

    def check_levels(self, metas: Mapping[str, PackMeta]) -> None:
        """Can every pack a tenant applies serve the tenant's gate level? (:meth:`PackMeta.check_alpha`;
        ``metas``: the loaded packs' metadata by concept id.) Raises :class:`PolicyError` naming the
        tenant's field."""
        for name, t in self.tenants.items():
            if t.alpha is not None:
                for pid in dict.fromkeys(t.mandatory + t.packs):
                    metas[pid].check_alpha(t.alpha, f"tenants.{name}.alpha")

    def tenant_for_key(self, api_key: str) -> str | None:
        """The tenant whose key this is (constant-time comparison of hashes), or None."""
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        found = None
        for name, t in self.tenants.items():
            if t.matches(digest):
                found = name
        return found

    def is_admin_key(self, api_key: str) -> bool:
        return self.admin is not None and self.admin.matches(hashlib.sha256(api_key.encode()).hexdigest())

    def resolve(self, tenant: str, client: dict[str, Any]) -> RequestSpec:
        """Combine the tenant's policy with the client's guardit fields.

        Mandatory packs always apply; a client naming "none" or leaving out a mandatory pack does
        not remove it, and a client that explicitly tries to is refused (:class:`PolicyForbidden`, HTTP 403).
        """
        t = self.tenants[tenant]
        known = set(self.packs)
        spec = parse_request(client, known, self.max_packs_per_request, keep_empty=True) if client else None
        asked_packs = KEY_PACKS in client
        if asked_packs:
            chosen = list(spec.packs) if spec else []
            if not t.allow_client_packs and set(chosen) - set(t.mandatory) - set(t.packs):
                raise PolicyForbidden(f"{KEY_PACKS}: tenant '{tenant}' may not choose packs")
            dropped = [p for p in t.mandatory if p not in chosen]
            if dropped:
                raise PolicyForbidden(
                    f"{KEY_PACKS}: pack(s) {dropped} are mandatory for this tenant and cannot be switched off"
                )
        else:
            chosen = list(t.packs)
        if t.mandatory and spec is not None and spec.angle is not None:
            raise PolicyForbidden(f"{KEY_ANGLE}: cannot be set while mandatory packs {t.mandatory} apply")
        packs = tuple(dict.fromkeys(list(t.mandatory) + chosen))
        angle = spec.angle if spec and spec.angle is not None else t.angle
        force = bool(spec.force) if spec else False
        alpha = t.alpha if spec is None or spec.alpha is None else self._client_alpha(tenant, spec.alpha)
        return RequestSpec(packs=packs, angle=angle, force=force, alpha=alpha, tenant=tenant)

    def _client_alpha(self, tenant: str, alpha: float) -> float:
        """A client's strictness, where the tenant's policy allows it: never laxer than the
        tenant's level while mandatory packs apply (and not at all there without a tenant level)."""
        t = self.tenants[tenant]
        if not t.allow_client_alpha:
            raise PolicyForbidden(f"{KEY_ALPHA}: tenant '{tenant}' may not set the gate's strictness")
        if t.mandatory and (t.alpha is None or alpha < t.alpha):
            floor = "" if t.alpha is None else f" below {t.alpha}"
            raise PolicyForbidden(f"{KEY_ALPHA}: cannot be set{floor} while mandatory packs {t.mandatory} apply")
        return alpha
