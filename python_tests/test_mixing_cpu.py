"""The C++ mixing kernels' row paths against the reference (csrc/cpu/mixing.cpp).

The kernels split a lattice row into whole SIMD vectors and single cells,
the output channels into register groups of 8, 4, 2, 1 and the samples (or
input channels) into groups of up to 8, 2, 1, and pad each staged row by the
stencil's x reach. These cases pick row lengths, channel counts and batch
sizes that take every one of those paths (a row of one cell, rows one cell
short of and past a vector, stencils reaching across the row) and compare
each backend function with the reference directly (the public ops and the
full backend matrix are python_tests/test_mixing*.py).
"""
import pytest
import torch
from conftest import TOL, assert_matches_reference

from cellkern import backends
from cellkern.backends import reference as ref
from cellkern.stencil import Geometry, parse_boundary, stencil

cpu = backends._load("cpu")
pytestmark = pytest.mark.skipif(cpu is None or not getattr(cpu, "MIXING", False),
                                reason="the C++ extension with the mixing kernels is not built")

# (dims, stencil, boundary): W = 1, 7, 15, 16, 17, 33 (vector / single-cell tiles)
SHAPES = [
    ((3, 4, 17), "moore", "periodic"),
    ((2, 3, 16), "von_neumann", "zero"),
    ((3, 3, 1), "moore", ("zero", "periodic", "periodic")),
    ((2, 5, 7), "moore18", ("periodic", "zero", "zero")),
    ((1, 2, 33), "radius(2)", "periodic"),
    ((2, 2, 3), "radius(2)", ("zero", "periodic", "periodic")),  # |dx| ≥ W: wraps twice / leaves the row
    ((3, 3, 15), "moore", ("periodic", "periodic", "zero")),
]
# (B, C_in, C_out): channel groups 8+1, 4+2+1, 2, 1; sample groups of 3, 6, 8, 2, 1
CHANNELS = [(1, 4, 4), (3, 2, 9), (7, 3, 7), (16, 8, 8), (2, 1, 1), (5, 5, 2)]


def _geom(name, boundary):
    if name.startswith("radius"):
        from cellkern.stencil import radius

        st = radius(float(name[7:-1]))
    else:
        st = stencil(name)
    return Geometry(st, parse_boundary(boundary))


def _case(dims, name, boundary, B, Ci, Co, dtype=torch.float32, w_dtype=None, masked=False):
    geom = _geom(name, boundary)
    s = torch.randn(B, Ci, *dims).to(dtype)
    w = (torch.randn(geom.K, Co, Ci, *dims) / (geom.K * Ci) ** 0.5).to(w_dtype or dtype)
    mask = (torch.rand(geom.K, *dims) > 0.3) if masked else None
    return geom, s, w, mask


def _exact(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("dims,name,boundary", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("B,Ci,Co", CHANNELS, ids=lambda v: str(v))
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_aggregate_and_gradients_on_every_row_path(dims, name, boundary, B, Ci, Co, masked):
    geom, s, w, mask = _case(dims, name, boundary, B, Ci, Co, masked=masked)
    a = cpu.mixing_aggregate_forward(s, w, mask, geom)
    assert_matches_reference(a, ref.mixing_aggregate_forward(s.double(), w.double(), mask, geom), name="a")
    g = torch.randn_like(a)
    ds, dw = cpu.mixing_aggregate_backward(g, s, w, mask, geom, True, True)
    rds, rdw = ref.mixing_aggregate_backward(g.double(), s.double(), w.double(), mask, geom, True, True)
    assert_matches_reference(ds, rds, name="ds")
    assert_matches_reference(dw, rdw, name="dw")


@pytest.mark.parametrize("dims,name,boundary", SHAPES[:4], ids=lambda v: str(v))
@pytest.mark.parametrize("activation", ["identity", "tanh", "relu", "sigmoid", "triangle"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
def test_propagate_forward_and_backward(dims, name, boundary, activation, masked):
    B, C = 3, 5
    geom, s, w, mask = _case(dims, name, boundary, B, C, C, masked=masked)
    x = torch.randn_like(s)
    bias = torch.randn(C, *dims)
    out, u = cpu.mixing_propagate_forward(s, w, mask, x, bias, geom, 0.7, activation, True)
    rout, ru = ref.mixing_propagate_forward(s.double(), w.double(), mask, x.double(), bias.double(), geom, 0.7,
                                            activation, True)
    assert_matches_reference(out, rout, name="out")
    assert u.dtype == torch.float32
    assert_matches_reference(u, ru, name="u")
    g = torch.randn_like(s)
    ds, dw, du = cpu.mixing_propagate_backward(g, s, w, mask, u, geom, 0.7, activation, True, True, True)
    # the reference at the kernel's own u (relu/triangle switch at u = 0 / the mean)
    rds, rdw, rdu = ref.mixing_propagate_backward(g.double(), s.double(), w.double(), mask, u.double(), geom, 0.7,
                                                  activation, True, True, True)
    assert_matches_reference(ds, rds, name="ds")
    assert_matches_reference(dw, rdw, name="dw")
    assert_matches_reference(du, rdu, name="du")


@pytest.mark.parametrize("dtype,w_dtype", [(torch.float64, torch.float64), (torch.float16, torch.float16),
                                           (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16),
                                           (torch.float32, torch.bfloat16)], ids=str)
def test_dtypes_and_mixed_weights(dtype, w_dtype):
    geom, s, w, mask = _case((2, 3, 19), "moore", "periodic", 3, 4, 4, dtype=dtype, w_dtype=w_dtype, masked=True)
    a = cpu.mixing_aggregate_forward(s, w, mask, geom)
    assert a.dtype == dtype
    same = ref.mixing_aggregate_forward(s, w, mask, geom)
    assert_matches_reference(a, ref.mixing_aggregate_forward(s.double(), w.double(), mask, geom), same, name="a")
    g = torch.randn_like(a)
    ds, dw = cpu.mixing_aggregate_backward(g, s, w, mask, geom, True, True)
    assert ds.dtype == dtype and dw.dtype == w_dtype
    rds, rdw = ref.mixing_aggregate_backward(g.double(), s.double(), w.double(), mask, geom, True, True)
    sds, sdw = ref.mixing_aggregate_backward(g, s, w, mask, geom, True, True)
    assert_matches_reference(ds, rds, sds, grad=True, name="ds")
    assert_matches_reference(dw, rdw, sdw, grad=True, name="dw")


@pytest.mark.parametrize("dims,name,boundary", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("B,Ci,Co", [(1, 4, 4), (6, 3, 7), (16, 8, 8), (2, 2, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("tau,wins", [(0.5, False), (0.0, True), (2.0, True)], ids=["soft-batch", "hard-wins",
                                                                                    "soft-wins"])
def test_competitive_hebbian_step(dims, name, boundary, B, Ci, Co, tau, wins):
    geom, s, w, mask = _case(dims, name, boundary, B, Ci, Co, masked=True)
    beta = 0.1 * torch.randn(Co, *dims)
    w_ref, beta_ref = w.double(), beta.double()
    ref.competitive_hebbian_(w_ref, s.double(), beta_ref, mask, geom, 0.05, tau, 0.01, wins)
    w0 = w.clone()
    cpu.competitive_hebbian_(w, s, beta, mask, geom, 0.05, tau, 0.01, wins)
    assert_matches_reference(w, w_ref, name="w")
    assert_matches_reference(beta, beta_ref, name="beta")
    assert not torch.equal(w, w0), "the step moved no weight"
    # masked and out-of-lattice synapses never change
    live = ref.live_synapses(mask, geom, dims, "cpu")
    dead = ~live.unsqueeze(1).unsqueeze(1).expand_as(w)
    assert torch.equal(w[dead], w0[dead])


@pytest.mark.parametrize("dtype,w_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float16),
                                           (torch.float16, torch.float32), (torch.float32, torch.float64)], ids=str)
def test_competitive_hebbian_dtypes(dtype, w_dtype):
    geom, s, w, mask = _case((2, 3, 18), "moore", "zero", 4, 3, 5, dtype=dtype, w_dtype=w_dtype)
    beta = 0.1 * torch.randn(5, 2, 3, 18)
    w_ref, beta_ref = w.clone(), beta.clone()
    ref.competitive_hebbian_(w_ref, s, beta_ref, mask, geom, 0.1, 1.0, 0.01, True)
    cpu.competitive_hebbian_(w, s, beta, mask, geom, 0.1, 1.0, 0.01, True)
    rtol, atol = TOL[w_dtype]
    torch.testing.assert_close(w.double(), w_ref.double(), rtol=max(rtol, 1e-5), atol=max(atol, 1e-5))
    torch.testing.assert_close(beta, beta_ref, rtol=1e-5, atol=1e-6)
