"""steering: the core of guardit. Rotation math, gate state, concept packs, policies.

Imports torch, pydantic, safetensors and nothing else of ours.
"""

from steering.errors import GuarditError, PackError, PolicyError
from steering.pack import ConceptPack, GateMeta, ModelFingerprint, PackMeta, fingerprint, load_packs
from steering.rotation import make_plane, rotate, rotate_rows_
from steering.runtime import GateStats, RowSettings, SteeringBank

__all__ = [
    "ConceptPack",
    "GateMeta",
    "GateStats",
    "GuarditError",
    "ModelFingerprint",
    "PackError",
    "PackMeta",
    "PolicyError",
    "RowSettings",
    "SteeringBank",
    "fingerprint",
    "load_packs",
    "make_plane",
    "rotate",
    "rotate_rows_",
]
