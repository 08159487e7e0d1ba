"""Stencils of more than 32 offsets against the reference: kernels keep a
cell's synapses in registers up to K = 32 and loop beyond, so these cases reach
the loop code (the matrices of test_propagate.py / test_plasticity.py stop at
radius(2), K = 32)."""
import pytest
import torch

import cellkern as ck

from conftest import assert_matches_reference, backend_params

STENCIL = "radius(2.5)"  # K = 80
DIMS = (3, 4, 5)
BOUNDARIES = ["periodic", ("zero", "periodic", "zero")]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("boundary", BOUNDARIES, ids=["periodic", "zpz"])
@pytest.mark.parametrize("bc", [(1, 1), (2, 3)], ids=["B1C1", "B2C3"])
def test_propagate_large_stencil(backend, device, boundary, bc):
    g = torch.Generator().manual_seed(11)
    K = ck.stencil(STENCIL).K
    B, C = bc
    s = torch.randn(B, C, *DIMS, generator=g, dtype=torch.float64)
    w = torch.rand(K, *DIMS, generator=g, dtype=torch.float64) * 0.1 - 0.02
    mask = torch.rand(K, *DIMS, generator=g) < 0.8
    x = torch.randn(B, C, *DIMS, generator=g, dtype=torch.float64)
    up = torch.randn(B, C, *DIMS, generator=g, dtype=torch.float64)

    def run(dtype, dev, be):
        s_ = s.to(dev, dtype).detach().requires_grad_()
        w_ = w.to(dev, dtype).detach().requires_grad_()
        out = ck.ops.propagate(s_, w_, mask.to(dev), x.to(dev, dtype), leak=0.4, activation="sigmoid",
                               stencil=STENCIL, boundary=boundary, backend=be)
        out.backward(up.to(dev, dtype))
        return {"out": out.detach(), "ds": s_.grad, "dw": w_.grad}

    exact = run(torch.float64, "cpu", "reference")
    got = run(torch.float32, device, backend)
    for name in exact:
        assert_matches_reference(got[name], exact[name], grad=name != "out", name=name)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("boundary", BOUNDARIES, ids=["periodic", "zpz"])
def test_plasticity_large_stencil(backend, device, boundary):
    g = torch.Generator().manual_seed(12)
    K, B = ck.stencil(STENCIL).K, 2
    w0 = 0.2 + 0.6 * torch.rand(K, *DIMS, generator=g, dtype=torch.float64)
    mask = torch.rand(K, *DIMS, generator=g) < 0.8
    y = torch.rand(B, *DIMS, generator=g, dtype=torch.float64)
    state0 = ck.PlasticityState(1.5 * torch.rand(B, *DIMS, generator=g, dtype=torch.float64),
                                1.5 * torch.rand(B, *DIMS, generator=g, dtype=torch.float64),
                                0.05 + 0.4 * torch.rand(*DIMS, generator=g, dtype=torch.float64))
    rule = ck.PlasticityRule(stdp=ck.STDP(lr=0.5, a_plus=0.3, a_minus=0.25, tau_plus=5.0, tau_minus=8.0,
                                          weight_dependence="multiplicative"),
                             bcm=ck.BCM(lr=0.5, tau_theta=5.0, decay=0.05, theta_min=0.02, theta_max=0.8),
                             competition=ck.Competition(beta=0.3), normalize=True, activity_threshold=0.3,
                             w_min=0.1, w_max=1.0)
    target = 0.5 + torch.rand(*DIMS, generator=g, dtype=torch.float64)

    def run(dtype, dev, be):
        w = w0.to(dev, dtype, copy=True)
        st = ck.PlasticityState(*(t.to(dev, dtype, copy=True) for t in (state0.x_pre, state0.x_post, state0.theta)))
        ck.ops.plasticity_step_(w, y.to(dev, dtype), st, rule, mask.to(dev), stencil=STENCIL, boundary=boundary,
                                backend=be)
        stepped = w.clone()
        ck.ops.heterosynaptic_normalize_(w, target.to(dev, dtype), mask.to(dev), stencil=STENCIL, boundary=boundary,
                                         backend=be)
        return {"w": stepped, "x_pre": st.x_pre, "x_post": st.x_post, "theta": st.theta, "normalized": w}

    exact = run(torch.float64, "cpu", "reference")
    got = run(torch.float32, device, backend)
    assert (exact["w"] - w0).abs().max() > 0.02, "the case is too weak to test anything"
    for name in exact:
        assert_matches_reference(got[name], exact[name], name=name)
