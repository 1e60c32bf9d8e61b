"""Property tests of the rotation math (float32, random inputs)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from steering.rotation import check_angle, make_plane, rotate, rotate_rows_

seeds = st.integers(0, 2**31 - 1)
angles = st.floats(-2 * math.pi, 2 * math.pi, allow_nan=False)
dims = st.sampled_from([2, 3, 16, 576, 1024])


def _setup(seed: int, d: int, n: int = 8, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * scale
    basis = make_plane(torch.randn(d, generator=g), torch.randn(d, generator=g))
    return h, basis


def _ortho64(basis: torch.Tensor) -> torch.Tensor:
    """The float32 basis re-orthonormalised in float64 (Gram-Schmidt, same plane, same b1)."""
    b1 = basis[0].double() / basis[0].double().norm()
    b2 = basis[1].double() - (basis[1].double() @ b1) * b1
    return torch.stack([b1, b2 / b2.norm()])


@settings(max_examples=150, deadline=None)
@given(
    seed=seeds,
    d=dims,
    theta=angles,
    mode=st.sampled_from(["absolute", "relative"]),
    scale=st.sampled_from([1e-3, 1.0, 50.0, 1e3]),
)
def test_norm_preserved_float32(seed, d, theta, mode, scale):
    h, basis = _setup(seed, d, scale=scale)
    out = rotate(h, basis, theta, mode)
    assert out.dtype == torch.float32
    rel = ((out.norm(dim=-1) - h.norm(dim=-1)).abs() / h.norm(dim=-1)).max().item()
    assert rel < 1e-6


@settings(max_examples=100, deadline=None)
@given(seed=seeds, d=dims, theta=angles)
def test_out_of_plane_component_untouched(seed, d, theta):
    h, basis = _setup(seed, d)
    b = _ortho64(basis)
    out = rotate(h.double(), b, theta, "absolute")
    diff = out - h.double()
    residual = diff - (diff @ b.T) @ b  # part of the change outside the plane
    assert residual.abs().max().item() < 1e-9
    # and every direction orthogonal to the plane keeps its projection
    v = torch.randn(d, dtype=torch.float64)
    v = v - (v @ b.T) @ b
    assert torch.allclose(out @ v, h.double() @ v, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(seed=seeds, d=dims, theta=angles)
def test_absolute_angle_sets_in_plane_angle(seed, d, theta):
    h, basis = _setup(seed, d)
    b = _ortho64(basis)
    out = rotate(h.double(), b, theta, "absolute")
    x, y = out @ b[0], out @ b[1]
    got = torch.atan2(y, x)
    want = torch.full_like(got, math.atan2(math.sin(theta), math.cos(theta)))
    wrapped = torch.remainder(got - want + math.pi, 2 * math.pi) - math.pi
    assert wrapped.abs().max().item() < 1e-7


@settings(max_examples=50, deadline=None)
@given(seed=seeds, d=dims)
def test_relative_zero_is_identity(seed, d):
    h, basis = _setup(seed, d)
    assert torch.allclose(rotate(h, basis, 0.0, "relative"), h, rtol=1e-6, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(seed=seeds, d=dims, theta=angles)
def test_relative_angles_compose(seed, d, theta):
    h, basis = _setup(seed, d)
    b = _ortho64(basis)
    once = rotate(h.double(), b, 2 * theta, "relative")
    twice = rotate(rotate(h.double(), b, theta, "relative"), b, theta, "relative")
    assert torch.allclose(once, twice, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(seed=seeds, d=dims, theta=angles, dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_masked_rows_bit_identical(seed, d, theta, dtype):
    h, basis = _setup(seed, d, n=10)
    h = h.to(dtype)
    before = h.clone()
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 4, 7]] = True
    rotate_rows_(h, mask, basis, theta, "absolute")
    assert torch.equal(h[~mask].view(torch.uint8), before[~mask].view(torch.uint8))
    assert not torch.equal(h[mask], before[mask])


def test_per_row_angles():
    h, basis = _setup(0, 32, n=4)
    thetas = torch.tensor([0.0, 0.5, 1.0, 3.0])
    out = rotate(h, basis, thetas, "absolute")
    for i in range(4):
        assert torch.allclose(out[i], rotate(h[i : i + 1], basis, float(thetas[i]), "absolute")[0], atol=1e-6)


def test_bf16_input_is_computed_in_float32_and_cast_back():
    h, basis = _setup(3, 64)
    out = rotate(h.to(torch.bfloat16), basis, 1.0)
    assert out.dtype == torch.bfloat16
    ref = rotate(h.to(torch.bfloat16).float(), basis, 1.0).to(torch.bfloat16)
    assert torch.equal(out, ref)


def test_make_plane_is_orthonormal_and_rejects_degenerate():
    c, t = torch.randn(64), torch.randn(64)
    b = make_plane(c, t)
    assert torch.allclose(b @ b.T, torch.eye(2), atol=1e-6)
    assert torch.allclose(b[0], c / c.norm(), atol=1e-6)
    with pytest.raises(ValueError, match="parallel"):
        make_plane(c, 3 * c)
    with pytest.raises(ValueError, match="zero norm"):
        make_plane(torch.zeros(64), t)
    with pytest.raises(ValueError, match="finite"):
        make_plane(torch.full((64,), float("nan")), t)
    with pytest.raises(ValueError, match="same size"):
        make_plane(c, torch.randn(32))


def test_rotate_rejects_bad_basis_and_mode():
    h, basis = _setup(0, 16)
    with pytest.raises(ValueError, match="basis"):
        rotate(h, basis[:, :8], 1.0)
    with pytest.raises(ValueError, match="mode"):
        rotate(h, basis, 1.0, "sideways")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 400, "x", None])
def test_check_angle_rejects(bad):
    with pytest.raises(ValueError, match="myfield"):
        check_angle(bad, "myfield")
