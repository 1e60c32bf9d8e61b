"""Exact norm-preserving rotation of hidden states inside a 2D plane.

For an orthonormal basis (b1, b2) and a hidden state h:

    x = h·b1, y = h·b2, r = sqrt(x² + y²), φ = atan2(y, x)
    h' = h - x b1 - y b2 + r (cos φ' b1 + sin φ' b2)

with φ' = θ ("absolute": the in-plane part is pointed at angle θ from b1 towards b2) or
φ' = φ + δ ("relative": the in-plane part is turned by δ). Only the in-plane component changes,
so ‖h'‖ = ‖h‖. The arithmetic is done in float32 (or float64 if h is float64) and cast back.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from steering.errors import PolicyError, echo

AngleMode = Literal["absolute", "relative"]
ANGLE_MODES: tuple[str, ...] = ("absolute", "relative")


def make_plane(concept: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Orthonormal basis (2, d): b1 = concept direction, b2 = target orthogonalised against b1.

    Raises ValueError when either vector is zero/non-finite or the target is (nearly) parallel
    to the concept direction, since the plane would then be undefined.
    """
    if concept.ndim != 1 or target.shape != concept.shape:
        raise ValueError(
            f"concept and target must be 1-D vectors of the same size, got {tuple(concept.shape)} "
            f"and {tuple(target.shape)}"
        )
    c = concept.detach().to(torch.float64)
    t = target.detach().to(torch.float64)
    if not (torch.isfinite(c).all() and torch.isfinite(t).all()):
        raise ValueError("concept and target directions must be finite")
    c_norm = c.norm()
    if c_norm < eps:
        raise ValueError("concept direction has (near) zero norm")
    b1 = c / c_norm
    t_perp = t - (t @ b1) * b1
    t_norm = t_perp.norm()
    if t_norm < eps * max(1.0, float(t.norm())):
        raise ValueError("target direction is parallel to the concept direction; the plane is undefined")
    b2 = t_perp / t_norm
    return torch.stack([b1, b2]).to(torch.float32)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rotate(
    h: torch.Tensor,
    basis: torch.Tensor,
    angle: float | torch.Tensor,
    mode: AngleMode = "absolute",
) -> torch.Tensor:
    """Rotate every row of ``h`` (shape (..., d)) in the plane ``basis`` (2, d).

    ``angle`` is in radians: a float, or a tensor broadcastable to ``h.shape[:-1]`` (one angle
    per row). Returns a new tensor of h's dtype; ``h`` is not modified.
    """
    if mode not in ANGLE_MODES:
        raise ValueError(f"mode must be one of {ANGLE_MODES}, got {mode!r}")
    if basis.ndim != 2 or basis.shape[0] != 2 or basis.shape[1] != h.shape[-1]:
        raise ValueError(f"basis must have shape (2, {h.shape[-1]}), got {tuple(basis.shape)}")
    cdt = _compute_dtype(h.dtype)
    x_all = h.to(cdt)
    b = basis.to(device=h.device, dtype=cdt)
    b1, b2 = b[0], b[1]
    x = x_all @ b1
    y = x_all @ b2
    r = torch.sqrt(x * x + y * y)
    ang = torch.as_tensor(angle, dtype=cdt, device=h.device)
    if mode == "absolute":
        phi_new = ang.expand_as(x) if ang.ndim else torch.full_like(x, float(ang))
    else:
        phi_new = torch.atan2(y, x) + ang
    new_x = r * torch.cos(phi_new)
    new_y = r * torch.sin(phi_new)
    out = x_all + (new_x - x).unsqueeze(-1) * b1 + (new_y - y).unsqueeze(-1) * b2
    return out.to(h.dtype)


def rotate_rows_(
    h: torch.Tensor,
    rows: torch.Tensor,
    basis: torch.Tensor,
    angle: float | torch.Tensor,
    mode: AngleMode = "absolute",
) -> torch.Tensor:
    """In place: rotate only ``h[rows]`` (h is (N, d), rows a bool mask (N,) or an index tensor).

    Rows not selected are never read back or rewritten, so they stay bit-identical. ``angle`` is a
    float or a tensor with one angle per *selected* row. Returns ``h``.
    """
    if h.ndim != 2:
        raise ValueError(f"h must be 2-D (tokens, hidden), got shape {tuple(h.shape)}")
    idx = rows.nonzero().squeeze(-1) if rows.dtype == torch.bool else rows
    if idx.numel() == 0:
        return h
    h[idx] = rotate(h[idx], basis, angle, mode)
    return h


DEFAULT_ANGLE_DEG = 60.0  # a pack's rotation angle unless calibrated otherwise (FINDINGS.md: angle sweep)


def check_angle(value: float | str, field: str = "angle") -> float:
    """The one rule for an angle in degrees, wherever one is read (request, tenant policy, pack,
    HF session): finite and within [-360, 360]. Returns it as float; raises PolicyError naming
    ``field`` (a ValueError, so pydantic validators report it as the field's error)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PolicyError(f"{field} must be a number (degrees), got {echo(value)}") from None
    if not math.isfinite(v) or abs(v) > 360.0:
        raise PolicyError(f"{field} must be a finite number of degrees in [-360, 360], got {echo(value)}")
    return v
