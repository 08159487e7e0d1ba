"""Plasticity ops (SPEC §4) on every backend, the reference included:
analytic cases (an STDP pair, BCM's θ and step, a single winner), the fused
step against the sequence of separate rules, invariants (bounds, dead
synapses, Σ|w| under normalisation, freeze, per-cell rates, thresholds) and
in-place updates of strided tensors."""
import dataclasses
import math

import pytest
import torch

import cellkern as ck
from cellkern.stencil import live_synapses

from conftest import all_backends, copy_state as _copy, interpreted

# ---- analytic cases ----

def _nbr(i, o, dims):
    """nbr(i, k) on a periodic lattice, by hand."""
    return tuple((a + d) % n for a, d, n in zip(i, o, dims))


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("via", ["stdp_", "plasticity_step_"])
@pytest.mark.parametrize("dep", ["additive", "multiplicative"])
def test_stdp_pair_changes_the_weight_by_the_kernel(backend, device, via, dep):
    """Pre cell j spikes at step 0, post cell i at step n: w[k,i] (j → i)
    grows by η·A₊·F₊·exp(−n·dt/τ₊) and w[k',j] (i → j, the reverse order)
    shrinks by η·A₋·F₋·exp(−n·dt/τ₋); no other synapse moves."""
    dims, n, dt, w0, lo, hi = (3, 4, 5), 3, 0.5, 0.5, 0.1, 1.2
    lr, ap, am, tp, tm = 0.2, 0.7, 0.4, 4.0, 6.0
    st = ck.stencil("moore")
    offs = [tuple(o) for o in st.offsets.tolist()]
    k, kr = offs.index((0, 1, -1)), offs.index((0, -1, 1))
    i = (1, 2, 2)
    j = _nbr(i, offs[k], dims)
    assert _nbr(j, offs[kr], dims) == i
    w = torch.full((26,) + dims, w0, dtype=torch.float64, device=device)
    state = ck.PlasticityState.create(dims, batch=1, dtype=torch.float64, device=device)
    rule = ck.PlasticityRule(stdp=ck.STDP(lr=lr, a_plus=ap, a_minus=am, tau_plus=tp, tau_minus=tm,
                                          weight_dependence=dep),
                             bcm=None, competition=None, normalize=False, activity_threshold=0.5, dt=dt,
                             w_min=lo, w_max=hi)
    for t in range(n + 1):
        z = torch.zeros((1,) + dims, dtype=torch.float64, device=device)
        if t == 0:
            z[(0,) + j] = 1.0
        if t == n:
            z[(0,) + i] = 1.0
        if via == "stdp_":
            ck.ops.stdp_(w, z, state.x_pre, state.x_post, a_plus=ap, a_minus=am, tau_plus=tp, tau_minus=tm, dt=dt,
                         lr=lr, w_min=lo, w_max=hi, weight_dependence=dep, backend=backend)
        else:
            ck.ops.plasticity_step_(w, z, state, rule, backend=backend)
        if t < n:
            assert (w == w0).all(), f"no pair yet at step {t}, but w changed"
    fp, fm = (hi - w0, w0 - lo) if dep == "multiplicative" else (1.0, 1.0)
    want = torch.full_like(w, w0)
    want[(k,) + i] = w0 + lr * ap * fp * math.exp(-n * dt / tp)
    want[(kr,) + j] = w0 - lr * am * fm * math.exp(-n * dt / tm)
    torch.testing.assert_close(w, want, rtol=1e-12, atol=1e-12)
    assert state.x_pre[(0,) + j].item() == pytest.approx(math.exp(-n * dt / tp), rel=1e-12)
    assert state.x_post[(0,) + j].item() == pytest.approx(math.exp(-n * dt / tm), rel=1e-12)
    assert state.x_pre[(0,) + i].item() == 1.0 and state.x_post[(0,) + i].item() == 1.0
    assert (state.theta == 0.01).all(), "BCM is off: θ must not move"


@pytest.mark.parametrize("backend,device", all_backends())
def test_bcm_theta_tracks_the_mean_square_activity(backend, device):
    """Under a stationary input θ converges to E[y²] per cell (y = c_i·U(0,1): E[y²] = c_i²/3)."""
    # interpreted Triton pays per call: a faster EMA over a larger batch, same noise
    tau, steps, B = (2.0, 15, 256) if interpreted(backend, device) else (20.0, 300, 16)
    dims = (2, 3, 4)
    g = torch.Generator().manual_seed(3)
    scale = 0.4 + 0.6 * torch.rand(dims, generator=g)
    w = torch.full((6,) + dims, 0.5, device=device)
    theta = torch.full(dims, 0.01, device=device)
    for _ in range(steps):
        y = (scale * torch.rand((B,) + dims, generator=g)).to(device)
        ck.ops.bcm_(w, y, theta, lr=0.01, tau_theta=tau, theta_max=1.0, stencil="von_neumann", backend=backend)
    want = scale.square() / 3
    err = (theta.cpu() - want).abs()
    assert err.max() < 0.06 and err.mean() < 0.015, f"θ - E[y²]: max {err.max():.3g}, mean {err.mean():.3g}"


@pytest.mark.parametrize("backend,device", all_backends())
def test_bcm_step_matches_the_formula_at_a_hand_picked_cell(backend, device):
    """Δw[k,i] = η·mean_b(y_i·(y_i − θ_i)·y_j) − ε·w[k,i], j = nbr(i,k) across a
    periodic edge; θ_i ← θ_i + (mean_b y_i² − θ_i)/τ_θ; the synapse whose
    neighbour lies outside the zero boundary does not move."""
    dims, lr, eps, tau = (3, 4, 5), 0.3, 0.02, 7.0
    g = torch.Generator().manual_seed(4)
    y = torch.rand((2,) + dims, generator=g, dtype=torch.float64)
    theta = 0.1 + 0.3 * torch.rand(dims, generator=g, dtype=torch.float64)
    w = 0.2 + 0.6 * torch.rand((6,) + dims, generator=g, dtype=torch.float64)
    offs = [tuple(o) for o in ck.stencil("von_neumann").offsets.tolist()]
    i = (0, 3, 4)
    k, k_out = offs.index((0, 1, 0)), offs.index((-1, 0, 0))
    j = _nbr(i, offs[k], dims)
    assert j == (0, 0, 4)
    yi, yj = y[(slice(None),) + i], y[(slice(None),) + j]
    want_w = w[(k,) + i] + lr * (yi * (yi - theta[i]) * yj).mean() - eps * w[(k,) + i]
    want_theta = theta[i] + ((yi * yi).mean() - theta[i]) / tau
    w_, th_ = w.to(device, copy=True), theta.to(device, copy=True)
    ck.ops.bcm_(w_, y.to(device), th_, lr=lr, tau_theta=tau, decay=eps, w_min=-5.0, w_max=5.0,
                stencil="von_neumann", boundary=("zero", "periodic", "periodic"), backend=backend)
    assert w_[(k,) + i].item() == pytest.approx(want_w.item(), rel=1e-12, abs=1e-12)
    assert th_[i].item() == pytest.approx(want_theta.item(), rel=1e-12, abs=1e-12)
    assert w_[(k_out,) + i].item() == w[(k_out,) + i].item()
    assert (w_.cpu() != w).sum() > 0


@pytest.mark.parametrize("backend,device", all_backends())
def test_only_the_winner_learns(backend, device):
    """One strongly driven cell wins its neighbourhood; with competition on,
    only its incoming synapses move (and their Σ|w| is kept)."""
    dims = (5, 5, 5)
    hot = (2, 2, 3)
    y = torch.full((1,) + dims, 0.2)
    y[(0,) + hot] = 2.0
    g = torch.Generator().manual_seed(5)
    w = 0.3 + 0.4 * torch.rand((26,) + dims, generator=g)
    state = ck.PlasticityState.create(dims, batch=1, theta0=0.1)
    state.x_pre.copy_(torch.rand((1,) + dims, generator=g))
    state.x_post.copy_(torch.rand((1,) + dims, generator=g))
    rule = ck.PlasticityRule(stdp=ck.STDP(lr=0.5, a_plus=0.5, a_minus=0.3), bcm=ck.BCM(lr=0.1, tau_theta=10.0),
                             competition=ck.Competition(beta=0.5), activity_threshold=0.5, w_min=0.0, w_max=1.0)
    w_ = w.to(device, copy=True)
    ck.ops.plasticity_step_(w_, y.to(device), _copy(state, device), rule, backend=backend)
    w_ = w_.cpu()
    moved = (w_ != w).any(0)
    assert moved[hot] and moved.sum() == 1, f"cells that learnt: {moved.nonzero().tolist()}"
    assert (w_[(slice(None),) + hot] - w[(slice(None),) + hot]).abs().max() > 1e-3
    assert w_[(slice(None),) + hot].sum().item() == pytest.approx(w[(slice(None),) + hot].sum().item(), rel=1e-5)


# ---- the fused step against the sequence of separate rules ----

def _fused_inputs(dims, B, K, seed, device):
    g = torch.Generator().manual_seed(seed)
    inp = dict(w=0.2 + 0.8 * torch.rand((K,) + dims, generator=g, dtype=torch.float64),
               y=[torch.rand((B,) + dims, generator=g, dtype=torch.float64) for _ in range(2)],
               x_pre=torch.rand((B,) + dims, generator=g, dtype=torch.float64),
               x_post=torch.rand((B,) + dims, generator=g, dtype=torch.float64),
               theta=0.05 + 0.3 * torch.rand(dims, generator=g, dtype=torch.float64),
               mask=torch.rand((K,) + dims, generator=g) < 0.8,
               gate=torch.rand((B,) + dims, generator=g) < 0.8)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else [t.to(device) for t in v]) for k, v in inp.items()}


FUSED_GEO = [("moore", ("zero", "periodic", "periodic"), (3, 4, 5), 2),
             ("von_neumann", "zero", (2, 3, 7), 3),
             ("radius(2)", "periodic", (4, 3, 4), 1)]


def _assert_state_equal(a, b, what):
    for name in ("x_pre", "x_post", "theta"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-10, atol=1e-10,
                                   msg=lambda m: f"{what}: {name}: {m}")


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("dep,gated", [("additive", False), ("multiplicative", True)], ids=["additive", "mult-gate"])
def test_stdp_only_step_equals_stdp_(backend, device, dep, gated):
    dims, B, K = (3, 4, 5), 2, 26
    inp = _fused_inputs(dims, B, K, 6, device)
    s = ck.STDP(lr=0.4, a_plus=0.3, a_minus=0.2, tau_plus=4.0, tau_minus=6.0, weight_dependence=dep)
    rule = ck.PlasticityRule(stdp=s, bcm=None, competition=None, normalize=False, activity_threshold=0.4, dt=0.7,
                             w_min=0.1, w_max=0.9)
    gate = inp["gate"] if gated else None
    w1, w2 = inp["w"].clone(), inp["w"].clone()
    st1 = ck.PlasticityState(inp["x_pre"].clone(), inp["x_post"].clone(), inp["theta"].clone())
    st2 = ck.PlasticityState(inp["x_pre"].clone(), inp["x_post"].clone(), inp["theta"].clone())
    for y in inp["y"]:
        ck.ops.plasticity_step_(w1, y, st1, rule, inp["mask"], gate=gate, backend=backend)
        ck.ops.stdp_(w2, (y > 0.4).double(), st2.x_pre, st2.x_post, a_plus=0.3, a_minus=0.2, tau_plus=4.0,
                     tau_minus=6.0, dt=0.7, lr=0.4, w_min=0.1, w_max=0.9, weight_dependence=dep, gate=gate,
                     mask=inp["mask"], backend=backend)
    assert (w1 != inp["w"]).any()
    torch.testing.assert_close(w1, w2, rtol=1e-10, atol=1e-10)
    _assert_state_equal(st1, st2, "fused vs stdp_")
    assert torch.equal(st1.theta, inp["theta"]), "BCM is off: θ must not move"


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("decay", [0.0, 0.03])
def test_bcm_only_step_equals_bcm_(backend, device, decay):
    dims, B, K = (2, 3, 7), 3, 6
    inp = _fused_inputs(dims, B, K, 7, device)
    b = ck.BCM(lr=0.4, tau_theta=3.0, decay=decay, theta_min=0.02, theta_max=0.3)
    rule = ck.PlasticityRule(stdp=None, bcm=b, competition=None, normalize=False, w_min=0.1, w_max=0.9)
    w1, w2 = inp["w"].clone(), inp["w"].clone()
    st1 = ck.PlasticityState(inp["x_pre"].clone(), inp["x_post"].clone(), inp["theta"].clone())
    st2 = ck.PlasticityState(inp["x_pre"].clone(), inp["x_post"].clone(), inp["theta"].clone())
    for y in inp["y"]:
        ck.ops.plasticity_step_(w1, y, st1, rule, inp["mask"], stencil="von_neumann", boundary="zero",
                                backend=backend)
        ck.ops.bcm_(w2, y, st2.theta, lr=0.4, tau_theta=3.0, decay=decay, theta_min=0.02, theta_max=0.3,
                    w_min=0.1, w_max=0.9, mask=inp["mask"], stencil="von_neumann", boundary="zero", backend=backend)
    assert (w1 != inp["w"]).any()
    torch.testing.assert_close(w1, w2, rtol=1e-10, atol=1e-10)
    _assert_state_equal(st1, st2, "fused vs bcm_")
    assert torch.equal(st1.x_pre, inp["x_pre"]) and torch.equal(st1.x_post, inp["x_post"]), "STDP is off"


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("stencil,boundary,dims,B", FUSED_GEO, ids=lambda v: v if isinstance(v, str) else None)
def test_fused_step_equals_the_sequence(backend, device, stencil, boundary, dims, B):
    """STDP + BCM (additive, no decay, bounds not binding), competition and
    normalisation on: the fused step equals lateral_inhibition → local_winners
    → z = y' > θ_act → l1 = synapse_l1(w) → stdp_(gate=win) → bcm_(y', gate=win)
    → heterosynaptic_normalize_(target=l1, where=win.any(0))."""
    K = ck.stencil(stencil).K
    inp = _fused_inputs(dims, B, K, 8, device)
    thr, beta, lo, hi = 0.25, 0.3, -10.0, 10.0
    s = ck.STDP(lr=0.5, a_plus=0.3, a_minus=0.2, tau_plus=4.0, tau_minus=6.0)
    b = ck.BCM(lr=0.4, tau_theta=3.0, theta_min=0.02, theta_max=0.6)
    rule = ck.PlasticityRule(stdp=s, bcm=b, competition=ck.Competition(beta=beta), normalize=True,
                             activity_threshold=thr, dt=1.0, w_min=lo, w_max=hi)
    geo = dict(stencil=stencil, boundary=boundary, backend=backend)
    mask = inp["mask"]
    w1, w2 = inp["w"].clone(), inp["w"].clone()
    st1 = ck.PlasticityState(inp["x_pre"].clone(), inp["x_post"].clone(), inp["theta"].clone())
    st2 = ck.PlasticityState(inp["x_pre"].clone(), inp["x_post"].clone(), inp["theta"].clone())
    n_win = 0
    for y in inp["y"]:
        ck.ops.plasticity_step_(w1, y, st1, rule, mask, **geo)
        yp = ck.ops.lateral_inhibition(y, beta=beta, **geo)
        win = ck.ops.local_winners(yp, thr, **geo)
        n_win += int(win.sum())
        z = (yp > thr).to(y.dtype)
        l1 = ck.ops.synapse_l1(w2, mask, stencil=stencil, boundary=boundary)
        ck.ops.stdp_(w2, z, st2.x_pre, st2.x_post, a_plus=0.3, a_minus=0.2, tau_plus=4.0, tau_minus=6.0, lr=0.5,
                     w_min=lo, w_max=hi, gate=win, mask=mask, **geo)
        ck.ops.bcm_(w2, yp, st2.theta, lr=0.4, tau_theta=3.0, theta_min=0.02, theta_max=0.6, w_min=lo, w_max=hi,
                    gate=win, mask=mask, **geo)
        ck.ops.heterosynaptic_normalize_(w2, l1, mask, where=win.any(0), **geo)
    assert 0 < n_win < y.numel() * 2, "the case needs some, not all, winners"
    assert (w1 != inp["w"]).any()
    torch.testing.assert_close(w1, w2, rtol=1e-10, atol=1e-10)
    _assert_state_equal(st1, st2, "fused vs sequence")


# ---- invariants ----

def _full_rule(**kw):
    base = dict(stdp=ck.STDP(lr=0.5, a_plus=0.4, a_minus=0.3, tau_plus=5.0, tau_minus=5.0),
                bcm=ck.BCM(lr=0.5, tau_theta=5.0, decay=0.02, theta_min=0.02, theta_max=0.6),
                competition=ck.Competition(beta=0.3), normalize=True, activity_threshold=0.3, w_min=0.1, w_max=0.9)
    base.update(kw)
    return ck.PlasticityRule(**base)


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("dep", ["additive", "multiplicative"])
def test_weights_stay_in_bounds(backend, device, dep):
    dims, steps = (3, 4, 5), 6
    g = torch.Generator().manual_seed(9)
    rule = _full_rule(stdp=ck.STDP(lr=4.0, a_plus=0.5, a_minus=0.6, weight_dependence=dep),
                      bcm=ck.BCM(lr=4.0, tau_theta=5.0), competition=None, normalize=False)
    w = (0.1 + 0.8 * torch.rand((26,) + dims, generator=g)).to(device)
    state = ck.PlasticityState.create(dims, batch=2, device=device)
    for _ in range(steps):
        ck.ops.plasticity_step_(w, torch.rand((2,) + dims, generator=g).to(device), state, rule, backend=backend)
        assert w.min() >= 0.1 and w.max() <= 0.9
    assert ((w == 0.1) | (w == 0.9)).any() or dep == "multiplicative", "the bounds never bound: the case is weak"
    assert ((w - 0.1).abs() < 0.05).any() and ((w - 0.9).abs() < 0.05).any()


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("op", ["stdp_", "bcm_", "plasticity_step_", "heterosynaptic_normalize_"])
def test_dead_synapses_never_change(backend, device, op):
    """Masked synapses and synapses to cells outside a zero boundary keep
    their bits, even when they hold values outside [w_min, w_max]."""
    dims, B, boundary = (3, 4, 5), 2, ("zero", "periodic", "zero")
    geom = ck.Geometry(ck.stencil("moore"), ck.parse_boundary(boundary))
    g = torch.Generator().manual_seed(10)
    mask = torch.rand((26,) + dims, generator=g) < 0.7
    live = live_synapses(mask, geom, dims, "cpu")
    assert (~live & mask).any() and (~mask).any()
    w = 0.2 + 0.6 * torch.rand((26,) + dims, generator=g)
    w = torch.where(live, w, torch.where(torch.rand(w.shape, generator=g) < 0.5, 7.0, -3.0))
    w0 = w.clone()
    w = w.to(device, copy=True)
    state = ck.PlasticityState.create(dims, batch=B, theta0=0.1, device=device)
    geo = dict(mask=mask.to(device), boundary=boundary, backend=backend)
    for _ in range(3):
        y = torch.rand((B,) + dims, generator=g).to(device)
        if op == "stdp_":
            state.x_pre.add_(0.5)
            ck.ops.stdp_(w, y > 0.5, state.x_pre, state.x_post, a_plus=0.5, a_minus=0.4, tau_plus=5, tau_minus=5,
                         w_min=0.1, w_max=0.9, **geo)
        elif op == "bcm_":
            ck.ops.bcm_(w, y, state.theta, lr=0.5, tau_theta=5, decay=0.1, w_min=0.1, w_max=0.9, **geo)
        elif op == "plasticity_step_":
            ck.ops.plasticity_step_(w, y, state, _full_rule(competition=None), **geo)
        else:
            ck.ops.heterosynaptic_normalize_(w, 2 + torch.rand(dims, generator=g).to(device), **geo)
    w = w.cpu()
    assert torch.equal(w[~live], w0[~live]), "a dead synapse changed"
    assert (w[live] != w0[live]).any(), "no live synapse changed: the case tests nothing"


@pytest.mark.parametrize("backend,device", all_backends())
def test_normalisation_keeps_each_updated_cells_l1(backend, device):
    dims, B, stencil, boundary = (4, 3, 5), 2, "moore18", ("periodic", "zero", "periodic")
    g = torch.Generator().manual_seed(11)
    mask = torch.rand((18,) + dims, generator=g) < 0.8
    w = 0.3 + 0.4 * torch.rand((18,) + dims, generator=g)
    y = torch.rand((B,) + dims, generator=g)
    rule = _full_rule(w_min=-10.0, w_max=10.0, competition=ck.Competition(beta=0.2))
    state = ck.PlasticityState.create(dims, batch=B, theta0=0.1)
    state.x_pre.copy_(torch.rand((B,) + dims, generator=g))
    geo = dict(stencil=stencil, boundary=boundary)
    before = ck.ops.synapse_l1(w, mask, **geo)
    yp = ck.ops.lateral_inhibition(y, beta=0.2, backend="reference", **geo)
    win = ck.ops.local_winners(yp, 0.3, backend="reference", **geo).any(0)
    assert 0 < win.sum() < win.numel()
    w_ = w.to(device, copy=True)
    ck.ops.plasticity_step_(w_, y.to(device), _copy(state, device), rule, mask.to(device), backend=backend, **geo)
    w_ = w_.cpu()
    after = ck.ops.synapse_l1(w_, mask, **geo)
    torch.testing.assert_close(after[win], before[win], rtol=1e-5, atol=1e-6)
    assert torch.equal(w_[:, ~win], w[:, ~win]), "a cell without a winner changed"
    assert (w_[:, win] - w[:, win]).abs().max() > 1e-3, "the winners did not learn"


@pytest.mark.parametrize("backend,device", all_backends())
def test_freeze_leaves_weights_unchanged(backend, device):
    dims = (3, 4, 5)
    g = torch.Generator().manual_seed(12)
    w = (0.2 + 0.6 * torch.rand((26,) + dims, generator=g)).to(device)
    w0 = w.clone()
    y = torch.rand((2,) + dims, generator=g).to(device)
    state = ck.PlasticityState.create(dims, batch=2, device=device)
    ck.ops.plasticity_step_(w, y, state, _full_rule(stdp=None, bcm=None), backend=backend)
    assert torch.equal(w, w0), "a rule without STDP and BCM changed w"
    ck.ops.plasticity_step_(w, y, state, _full_rule(), lr_scale=0.0, backend=backend)
    torch.testing.assert_close(w, w0, rtol=1e-6, atol=1e-7, msg=lambda m: f"lr_scale=0 changed w: {m}")
    ck.ops.plasticity_step_(w, y, state, _full_rule(), gate=torch.zeros_like(y), backend=backend)
    torch.testing.assert_close(w, w0, rtol=1e-6, atol=1e-7, msg=lambda m: f"an all-zero gate changed w: {m}")
    ck.ops.plasticity_step_(w, y, state, _full_rule(), backend=backend)
    assert (w != w0).any(), "the same call with learning on must change w"


@pytest.mark.parametrize("backend,device", all_backends())
def test_lr_scale_tensor_scales_each_cell(backend, device):
    """A per-cell lr_scale equal to a on the lower half and b on the upper
    gives, on each half, what a float lr_scale of a resp. b gives."""
    dims, B, a, b = (4, 3, 5), 2, 0.5, 1.7
    g = torch.Generator().manual_seed(13)
    w = (0.2 + 0.6 * torch.rand((26,) + dims, generator=g)).to(device)
    y = torch.rand((B,) + dims, generator=g).to(device)
    st = ck.PlasticityState.create(dims, batch=B, theta0=0.1, device=device)
    st.x_pre.copy_(torch.rand((B,) + dims, generator=g))
    lr = torch.full(dims, a, device=device)
    lr[2:] = b
    rule = _full_rule(competition=None)

    def run(scale):
        w_, s_ = w.clone(), _copy(st, device)
        ck.ops.plasticity_step_(w_, y, s_, rule, lr_scale=scale, boundary="zero", backend=backend)
        return w_.cpu()

    per_cell, wa, wb = run(lr), run(a), run(b)
    assert (wa != wb).any() and (wa != w.cpu()).any()
    torch.testing.assert_close(per_cell[:, :2], wa[:, :2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_cell[:, 2:], wb[:, 2:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", all_backends())
def test_activity_threshold_overrides_the_rule(backend, device):
    dims, B = (3, 4, 5), 2
    g = torch.Generator().manual_seed(14)
    w = (0.2 + 0.6 * torch.rand((26,) + dims, generator=g)).to(device)
    y = torch.rand((B,) + dims, generator=g).to(device)

    def run(rule, thr):
        w_ = w.clone()
        st = ck.PlasticityState(x.clone(), x.clone(), torch.full(dims, 0.1, device=device))
        ck.ops.plasticity_step_(w_, y, st, rule, activity_threshold=thr, backend=backend)
        return w_.cpu(), st.x_pre.cpu()

    x = torch.rand((B,) + dims, generator=g).to(device)
    low = _full_rule(activity_threshold=0.3, competition=None)
    high = _full_rule(activity_threshold=0.7, competition=None)
    w_over, x_over = run(low, 0.7)
    w_high, x_high = run(high, None)
    w_low, x_low = run(low, None)
    torch.testing.assert_close(w_over, w_high, rtol=0, atol=0)
    torch.testing.assert_close(x_over, x_high, rtol=0, atol=0)
    assert not torch.equal(x_over, x_low) and not torch.equal(w_over, w_low), "θ_act must change the result"


def _strided(t):
    """A non-contiguous view holding the values of ``t`` (reversed-dims storage)."""
    base = t.permute(*reversed(range(t.dim()))).contiguous()
    view = base.permute(*reversed(range(t.dim())))
    assert not view.is_contiguous() and torch.equal(view, t)
    return view, base


@pytest.mark.parametrize("backend,device", all_backends())
@pytest.mark.parametrize("op", ["stdp_", "bcm_", "plasticity_step_", "heterosynaptic_normalize_"])
def test_strided_tensors_are_updated_in_place(backend, device, op):
    dims, B = (3, 4, 5), 2
    g = torch.Generator().manual_seed(15)
    w = (0.2 + 0.6 * torch.rand((26,) + dims, generator=g)).to(device)
    x_pre, x_post = (torch.rand((B,) + dims, generator=g).to(device) for _ in range(2))
    theta = (0.05 + 0.2 * torch.rand(dims, generator=g)).to(device)
    y = torch.rand((B,) + dims, generator=g).to(device)
    target = (2 + 4 * torch.rand(dims, generator=g)).to(device)
    big = torch.zeros((26, 5, 6, 5), device=device)  # a slice of a bigger tensor, too
    big[:, 1:4, 1:5] = w
    tensors = {"w": w, "x_pre": x_pre, "x_post": x_post, "theta": theta}

    def call(w, x_pre, x_post, theta, backend):
        kw = dict(boundary="zero", backend=backend)
        if op == "stdp_":
            ck.ops.stdp_(w, y > 0.5, x_pre, x_post, a_plus=0.5, a_minus=0.4, tau_plus=5, tau_minus=5, **kw)
        elif op == "bcm_":
            ck.ops.bcm_(w, y, theta, lr=0.5, tau_theta=5, **kw)
        elif op == "plasticity_step_":
            ck.ops.plasticity_step_(w, y, ck.PlasticityState(x_pre, x_post, theta), _full_rule(), **kw)
        else:
            ck.ops.heterosynaptic_normalize_(w, target, **kw)

    want = {k: v.clone() for k, v in tensors.items()}
    call(**want, backend="reference")
    views = {k: _strided(v) for k, v in tensors.items()}
    call(**{k: v[0] for k, v in views.items()}, backend=backend)
    sliced = big[:, 1:4, 1:5]
    assert not sliced.is_contiguous()
    call(sliced, *(v.clone() for v in (x_pre, x_post, theta)), backend=backend)
    for k, (view, base) in views.items():
        torch.testing.assert_close(view.cpu(), want[k].cpu(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
        torch.testing.assert_close(base.permute(*reversed(range(base.dim()))).cpu(), want[k].cpu(),
                                   rtol=1e-5, atol=1e-6)
    assert (want["w"] != w).any()
    torch.testing.assert_close(sliced.cpu(), want["w"].cpu(), rtol=1e-5, atol=1e-6)
    assert (big[:, 0] == 0).all() and (big[:, 4] == 0).all() and (big[:, :, 0] == 0).all() \
        and (big[:, :, 5] == 0).all(), "a write outside the slice"


# ---- no dead switches ----

def _rule_variants():
    """Every field of the rule dataclasses, each changed on its own."""
    base = dict(stdp=ck.STDP(lr=0.5, a_plus=0.3, a_minus=0.2, tau_plus=5.0, tau_minus=8.0),
                bcm=ck.BCM(lr=0.5, tau_theta=5.0, decay=0.01, theta_min=0.02, theta_max=0.8),
                competition=ck.Competition(beta=0.4), normalize=True, activity_threshold=0.3, dt=1.0,
                w_min=0.1, w_max=1.0)
    out = []
    for sub, cls in (("stdp", ck.STDP), ("bcm", ck.BCM), ("competition", ck.Competition)):
        for f in dataclasses.fields(cls):
            old = getattr(base[sub], f.name)
            new = {"weight_dependence": "multiplicative"}.get(f.name, old * 1.5 + 0.05 if not isinstance(old, str) else old)
            if f.name == "theta_max":
                new = 0.05
            out.append((f"{sub}.{f.name}", base, dict(base, **{sub: dataclasses.replace(base[sub], **{f.name: new})})))
        out.append((f"{sub}=None", base, dict(base, **{sub: None})))
    for f in ("normalize", "activity_threshold", "dt", "w_min", "w_max"):
        new = {"normalize": False, "activity_threshold": 0.45, "dt": 2.0, "w_min": 0.3, "w_max": 0.6}[f]
        out.append((f, base, dict(base, **{f: new})))
    return out


@pytest.mark.parametrize("name,base,changed", _rule_variants(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_rule_field_changes_the_step(name, base, changed):
    """Each field of PlasticityRule, STDP, BCM and Competition reaches the kernel:
    changing it alone changes w, the traces or θ after two steps."""
    dims, B = (4, 5, 6), 2
    g = torch.Generator().manual_seed(3)
    w0 = torch.rand(26, *dims, generator=g) * 0.8 + 0.15
    ys = [torch.rand(B, *dims, generator=g) for _ in range(2)]
    results = []
    for kw in (base, changed):
        w, st = w0.clone(), ck.PlasticityState.create(dims, B, theta0=0.1)
        st.x_pre.copy_(torch.rand(B, *dims, generator=torch.Generator().manual_seed(5)))
        for y in ys:
            ck.ops.plasticity_step_(w, y, st, ck.PlasticityRule(**kw), boundary=("zero", "periodic", "periodic"))
        results.append(torch.cat([w.flatten(), st.x_pre.flatten(), st.x_post.flatten(), st.theta.flatten()]))
    assert not torch.equal(results[0], results[1]), f"changing {name} changed nothing"
