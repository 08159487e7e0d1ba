"""Every op on every backend takes the ELL form and the packed mask and gives
the result of the dense masked form on the reference."""
import pytest
import torch

import cellkern as ck
from cellkern import sparse as S

from conftest import all_backends, assert_matches_reference

CASES = [
    dict(dims=(3, 4, 5), stencil="moore", boundary="periodic", keep=0.3, B=2, C=3),
    dict(dims=(4, 3, 6), stencil="moore", boundary=("zero", "periodic", "zero"), keep=0.5, B=1, C=2),
    dict(dims=(5, 2, 3), stencil="von_neumann", boundary="zero", keep=0.7, B=2, C=1),
    dict(dims=(2, 5, 4), stencil="radius(2)", boundary="periodic", keep=0.2, B=1, C=1),
    # rows of several 16-cell vectors and a tail, one and five (b, c) (the cpu kernels' vector paths)
    dict(dims=(3, 2, 37), stencil="moore", boundary=("periodic", "zero", "periodic"), keep=0.3, B=1, C=1),
    dict(dims=(2, 3, 21), stencil="moore18", boundary=("zero", "zero", "zero"), keep=0.4, B=1, C=5),
]
FORMS = ["ell", "pair", "packed"]


def _id(c):
    b = c["boundary"] if isinstance(c["boundary"], str) else "".join(x[0] for x in c["boundary"])
    return f"{'x'.join(map(str, c['dims']))}-{c['stencil']}-{b}-keep{c['keep']}"


def _inputs(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = ck.stencil(c["stencil"]).K
    w = torch.rand(K, *c["dims"], generator=g, dtype=torch.float64) * 0.3 - 0.05
    mask = S.prune(w, keep=c["keep"])
    mask[:, 0, 0, 0] = False  # a cell with no synapse
    s = torch.randn(c["B"], c["C"], *c["dims"], generator=g, dtype=torch.float64)
    return s, w, mask


def _form(form, w, mask):
    """``(w, mask)`` arguments of the op in the given form."""
    if form == "ell":
        return S.SparseWeights.from_dense(w, mask), None
    if form == "pair":
        return S.to_ell(w, mask)
    return w, S.pack_mask(mask)


def _dtype(backend):
    return torch.float32 if backend == "triton" else torch.float64


@pytest.mark.parametrize("dt", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("c", CASES, ids=_id)
@pytest.mark.parametrize("backend, device", all_backends())
def test_aggregate_and_propagate_forms(backend, device, c, form, dt):
    if form == "packed" and ck.stencil(c["stencil"]).K > 32:
        pytest.skip("the packed mask holds K <= 32")
    if backend == "triton" and dt == torch.float64:
        pytest.skip("Triton takes fp16/bf16/fp32")
    s, w, mask = _inputs(c)
    geo = dict(stencil=c["stencil"], boundary=c["boundary"])
    want_a = ck.ops.aggregate(s, w, mask, backend="reference", **geo)
    x = torch.randn_like(s) * 0.1
    want_p = ck.ops.propagate(s, w, mask, x=x, leak=0.3, backend="reference", **geo)
    wf, mf = _form(form, w.to(dt), mask)
    wf = wf.to(device) if isinstance(wf, S.SparseWeights) else wf.to(device)
    mf = None if mf is None else mf.to(device)
    sd = s.to(device, dt)
    a = ck.ops.aggregate(sd, wf, mf, backend=backend, **geo)
    assert_matches_reference(a, want_a, name="aggregate")
    p = ck.ops.propagate(sd, wf, mf, x=x.to(device, dt), leak=0.3, backend=backend, **geo)
    assert_matches_reference(p, want_p, name="propagate")


@pytest.mark.parametrize("form", ["ell", "pair"])
@pytest.mark.parametrize("c", CASES[:3], ids=_id)
@pytest.mark.parametrize("backend, device", all_backends())
def test_gradients_of_the_ell_form(backend, device, c, form):
    """Gradients w.r.t. s and w_ell equal the dense masked gradients (w's at the live slots)."""
    s, w, mask = _inputs(c)
    geo = dict(stencil=c["stencil"], boundary=c["boundary"], activation="tanh", leak=0.5)
    K = w.shape[0]
    s_ref, w_ref = s.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(s.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = ck.ops.propagate_steps(s_ref, w_ref, 3, mask, backend="reference", **geo)
    ds_want, dw_want = torch.autograd.grad(out, (s_ref, w_ref), g)
    dt = _dtype(backend)
    w_ell, idx = S.to_ell(w.to(dt), mask)
    w_ell = w_ell.to(device).requires_grad_()
    sd = s.to(device, dt).requires_grad_()
    wf, mf = (S.SparseWeights(w_ell, idx.to(device), K), None) if form == "ell" else (w_ell, idx.to(device))
    out2 = ck.ops.propagate_steps(sd, wf, 3, mf, backend=backend, **geo)
    assert_matches_reference(out2, out.detach(), name="out")
    ds, dw_ell = torch.autograd.grad(out2, (sd, w_ell), g.to(device, dt))
    assert_matches_reference(ds, ds_want, grad=True, name="ds")
    assert_matches_reference(dw_ell, S.gather_ell(dw_want, idx, K), grad=True, name="dw_ell")


def test_gradcheck_ell_reference_and_cpu():
    c = CASES[1]
    s, w, mask = _inputs(c)
    w_ell, idx = S.to_ell(w, mask)
    for backend in [b for b in ("reference", "cpu") if b in ck.available_backends()]:
        f = lambda s_, w_: ck.ops.propagate(s_, w_, idx, stencil=c["stencil"], boundary=c["boundary"],  # noqa: E731
                                            backend=backend)
        assert torch.autograd.gradcheck(f, (s.clone().requires_grad_(), w_ell.clone().requires_grad_()))


def _plastic_inputs(c, seed=1):
    g = torch.Generator().manual_seed(seed)
    B, dims = 2, c["dims"]
    return dict(
        y=torch.rand(B, *dims, generator=g, dtype=torch.float64),
        x_pre=torch.rand(B, *dims, generator=g, dtype=torch.float64),
        x_post=torch.rand(B, *dims, generator=g, dtype=torch.float64),
        theta=0.05 + 0.2 * torch.rand(*dims, generator=g, dtype=torch.float64),
        target=1 + torch.rand(*dims, generator=g, dtype=torch.float64),
    )


def _apply(op, w, mask, inp, geo, backend, device, dt):
    """Run one plasticity op on copies of the inputs; return the per-cell state it changed."""
    t = {k: v.to(device, dt, copy=True) for k, v in inp.items()}
    kw = dict(mask=mask, backend=backend, step=7, **geo)
    if op == "stdp_":
        ck.ops.stdp_(w, (t["y"] > 0.5).to(dt), t["x_pre"], t["x_post"], a_plus=0.05, a_minus=0.04, tau_plus=5,
                     tau_minus=5, w_min=-0.1, w_max=0.4, weight_dependence="multiplicative", **kw)
        return [t["x_pre"], t["x_post"]]
    if op == "bcm_":
        ck.ops.bcm_(w, t["y"], t["theta"], lr=0.3, tau_theta=10, decay=0.01, w_min=-0.1, w_max=0.4, **kw)
        return [t["theta"]]
    if op == "plasticity_step_":
        state = ck.PlasticityState(t["x_pre"], t["x_post"], t["theta"])
        rule = ck.PlasticityRule(stdp=ck.STDP(lr=0.5), bcm=ck.BCM(lr=0.2), competition=ck.Competition(beta=0.3),
                                 normalize=True, activity_threshold=0.3, w_min=-0.1, w_max=0.4)
        ck.ops.plasticity_step_(w, t["y"], state, rule, kw.pop("mask"), **kw)
        return [t["x_pre"], t["x_post"], t["theta"]]
    ck.ops.heterosynaptic_normalize_(w, t["target"], mask, where=t["y"][0] > 0.3, step=7, backend=backend, **geo)
    return []


@pytest.mark.parametrize("op", ["stdp_", "bcm_", "plasticity_step_", "heterosynaptic_normalize_"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("c", CASES[:3], ids=_id)
@pytest.mark.parametrize("backend, device", all_backends())
def test_plasticity_forms(backend, device, c, form, op):
    s, w, mask = _inputs(c)
    geo = dict(stencil=c["stencil"], boundary=c["boundary"])
    inp = _plastic_inputs(c)
    w_ref = w.clone()
    want_state = _apply(op, w_ref, mask, inp, geo, "reference", "cpu", torch.float64)
    dt = _dtype(backend)
    wf, mf = _form(form, w.to(dt, copy=True), mask)
    wf = wf.to(device)
    mf = None if mf is None else mf.to(device)
    got_state = _apply(op, wf, mf, inp, geo, backend, device, dt)
    if form == "ell":
        got_w, got_m = wf.to_dense()
    elif form == "pair":
        got_w, got_m = S.from_ell(wf, mf, w.shape[0])
    else:
        got_w, got_m = wf, mask
    assert torch.equal(got_m.cpu(), mask)
    assert_matches_reference(torch.where(mask, got_w.cpu(), 0), torch.where(mask, w_ref, 0), name="w")
    # masked synapses never change (dense) / stay empty (ELL)
    if form == "packed":
        assert torch.equal(got_w.cpu()[~mask], w.to(dt)[~mask])
    assert not torch.equal(w_ref[mask], w[mask]), "the case must change some weight"
    for got, want in zip(got_state, want_state):
        assert_matches_reference(got, want, name="state")
