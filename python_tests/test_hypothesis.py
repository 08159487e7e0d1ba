"""Property-based cases: hypothesis draws the lattice, wiring and inputs;
every fast backend must agree with the reference, forward and backward."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cellkern as ck

from conftest import TOL, backend_params, interpreted

AXIS = st.sampled_from(["periodic", "zero"])


@st.composite
def lattice_case(draw, small=False):
    top = 4 if small else 7
    dims = tuple(draw(st.integers(1, top)) for _ in range(3))
    return dict(
        dims=dims,
        B=draw(st.integers(1, 2 if small else 3)),
        C=draw(st.integers(1, 2 if small else 3)),
        stencil=draw(st.sampled_from(["von_neumann", "moore18", "moore", "radius(2)", "radius(1.5)"])),
        boundary=(draw(AXIS), draw(AXIS), draw(AXIS)),
        mask=draw(st.booleans()),
        x=draw(st.booleans()),
        activation=draw(st.sampled_from(["identity", "tanh", "relu", "sigmoid"])),
        leak=draw(st.floats(0.0, 1.0)),
        dtype=draw(st.sampled_from([torch.float32] if small else [torch.float32, torch.float64])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _check(case, backend, device):
    g = torch.Generator().manual_seed(case["seed"])
    D, H, W = case["dims"]
    K = ck.stencil(case["stencil"]).K
    s0 = torch.randn(case["B"], case["C"], D, H, W, generator=g, dtype=torch.float64)
    w0 = torch.randn(K, D, H, W, generator=g, dtype=torch.float64) * 0.3
    mask = (torch.rand(K, D, H, W, generator=g) < 0.6) if case["mask"] else None
    x0 = torch.randn(1, case["C"], D, H, W, generator=g, dtype=torch.float64) if case["x"] else None
    up = torch.randn(s0.shape, generator=g, dtype=torch.float64)

    def run(dtype, dev, be):
        s = s0.to(dev, dtype).detach().requires_grad_()
        w = w0.to(dev, dtype).detach().requires_grad_()
        x = None if x0 is None else x0.to(dev, dtype).detach().requires_grad_()
        out = ck.ops.propagate(s, w, None if mask is None else mask.to(dev), x, leak=case["leak"],
                               activation=case["activation"], stencil=case["stencil"],
                               boundary=case["boundary"], backend=be)
        out.backward(up.to(dev, dtype))
        return [out.detach(), s.grad, w.grad] + ([] if x is None else [x.grad])

    want = run(torch.float64, "cpu", "reference")
    got = run(case["dtype"], device, backend)
    rtol, atol = TOL[case["dtype"]]
    for name, a, b in zip(["out", "ds", "dw", "dx"], got, want):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.cpu().double(), b, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,device", backend_params())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_lattices_match_reference(backend, device, data):
    if interpreted(backend, device):
        pytest.skip("interpreted Triton: see test_random_small_lattices_triton")
    _check(data.draw(lattice_case()), backend, device)


@pytest.mark.triton
@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] == "triton"])
@settings(max_examples=8, deadline=None)
@given(case=lattice_case(small=True))
def test_random_small_lattices_triton(backend, device, case):
    _check(case, backend, device)
