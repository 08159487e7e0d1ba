"""Mixed precision (SPEC §5): fp16/bf16 weights under an fp32 state, fp32
accumulation; seeded stochastic rounding of plasticity updates."""
import pytest
import torch

import cellkern as ck
from cellkern import sparse as S
from cellkern.ops.rounding import hash_uniform, stochastic_round

from conftest import all_backends, assert_matches_reference

LOW = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("w_dtype", LOW + [torch.float32], ids=str)
@pytest.mark.parametrize("form", ["dense", "ell"])
@pytest.mark.parametrize("backend, device", all_backends())
def test_low_precision_weights_under_an_fp32_state(backend, device, form, w_dtype):
    """Forward and gradients with w in fp16/bf16 equal the fp64 reference run
    on the same (rounded) weights: the only rounding is the output's."""
    g = torch.Generator().manual_seed(5)
    dims, boundary = (3, 5, 4), ("zero", "periodic", "periodic")
    w = (torch.rand(26, *dims, generator=g) * 0.3).to(w_dtype)
    mask = S.prune(w, keep=0.4)
    s = torch.randn(2, 3, *dims, generator=g)
    out_grad = torch.randn(2, 3, *dims, generator=g, dtype=torch.float64)
    s64, w64 = s.double().requires_grad_(), w.double().requires_grad_()
    ref = ck.ops.propagate_steps(s64, w64, 2, mask, leak=0.5, boundary=boundary, backend="reference")
    ds_ref, dw_ref = torch.autograd.grad(ref, (s64, w64), out_grad)
    sd = s.to(device).requires_grad_()
    if form == "dense":
        wd = w.to(device).requires_grad_()
        out = ck.ops.propagate_steps(sd, wd, 2, mask.to(device), leak=0.5, boundary=boundary, backend=backend)
        dw_want, leaf = dw_ref, wd
    else:
        w_ell, idx = S.to_ell(w, mask)
        leaf = w_ell.to(device).requires_grad_()
        out = ck.ops.propagate_steps(sd, S.SparseWeights(leaf, idx.to(device), 26), 2, leak=0.5, boundary=boundary,
                                     backend=backend)
        dw_want = S.gather_ell(dw_ref, idx, 26)
    assert out.dtype == torch.float32
    assert_matches_reference(out, ref.detach(), name="out")
    ds, dw = torch.autograd.grad(out, (sd, leaf), out_grad.float().to(device))
    assert dw.dtype == w_dtype
    assert_matches_reference(ds, ds_ref, name="ds")
    # dw is rounded once to w's dtype
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}[w_dtype]
    torch.testing.assert_close(dw.double().cpu(), dw_want, rtol=rtol, atol=rtol * dw_want.abs().max().item())


def test_fp64_state_takes_lower_weights_and_fp16_state_does_not():
    s = torch.randn(1, 1, 3, 3, 3, dtype=torch.float64)
    w = torch.rand(26, 3, 3, 3)
    for backend in ck.available_backends()[:2]:
        torch.testing.assert_close(ck.ops.aggregate(s, w, backend=backend),
                                   ck.ops.aggregate(s, w.double(), backend="reference"))
    with pytest.raises(TypeError, match=r"aggregate: w must have the dtype of s \(torch.float16\), got torch.float32"):
        ck.ops.aggregate(s.half(), w)
    with pytest.raises(TypeError, match=r"propagate: w must have the dtype of s \(torch.float32\), got torch.float64"):
        ck.ops.propagate(s.float(), w.double())


# ---- stochastic rounding ----

def test_hash_uniform_is_uniform_and_counter_based():
    idx = torch.arange(200_000)
    u = hash_uniform(7, 3, idx)
    assert u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert (counts - 10_000).abs().max() < 600  # ~6 sigma
    assert torch.equal(u, hash_uniform(7, 3, idx))  # a pure function
    for other in (hash_uniform(8, 3, idx), hash_uniform(7, 4, idx), hash_uniform(7, 3, idx + 1)):
        assert (u == other).float().mean() < 0.01
    # steps differ in their high 32 bits too
    assert (u == hash_uniform(7, 3 + (1 << 32), idx)).float().mean() < 0.01


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_stochastic_round_is_unbiased_and_keeps_representable_values(dtype):
    x = torch.tensor([0.5 + 1e-4, 0.7 + 3e-4, -0.3 - 2e-4, 1.2, 3e-3]).double()
    n = 100_000
    u = hash_uniform(1, 0, torch.arange(n * x.numel())).view(n, -1)
    r = stochastic_round(x.expand(n, -1), dtype, u)
    assert r.dtype == dtype
    spacing = (torch.nextafter(x.to(dtype), torch.tensor(float("inf"), dtype=dtype)).double() - x.to(dtype).double()).abs()
    err = (r.double().mean(0) - x).abs()
    assert (err < 5 * spacing / n ** 0.5 + 1e-12).all(), (err, spacing)
    # each result is one of the two neighbours
    lo = torch.minimum(r.double().amin(0), x)
    hi = torch.maximum(r.double().amax(0), x)
    assert ((hi - lo) <= spacing * 1.01 + 1e-12).all()
    exact = x.to(dtype).double()
    assert torch.equal(stochastic_round(exact.expand(5, -1), dtype, u[:5]).double(), exact.expand(5, -1))


def _drift_run(w_dtype, steps, rounding, seed=0):
    """STDP at the default rates of SPEC §8 (lr 0.01, A₊ = 0.01, additive;
    A₋ = 0.002 so that the weights drift) on weights in ``w_dtype``;
    ``rounding="nearest"`` emulates the old behaviour (the update computed in
    fp32, rounded to nearest)."""
    dims, B = (6, 6, 6), 2
    g = torch.Generator().manual_seed(seed)
    w = (0.5 + 0.4 * torch.rand(26, *dims, generator=g)).to(w_dtype)
    state = ck.PlasticityState.create(dims, batch=B)
    rule = ck.PlasticityRule(stdp=ck.STDP(a_minus=0.002), bcm=None, competition=None, normalize=False,
                             activity_threshold=0.5,
                             w_min=0.1, w_max=2.0)
    for t in range(steps):
        y = (torch.rand(B, *dims, generator=g) < 0.3 + 0.4 * (t % 2)).float()
        if rounding == "nearest":
            wf = w.float()
            ck.ops.plasticity_step_(wf, y, state, rule, backend="reference")
            w = wf.to(w_dtype)
        else:
            ck.ops.plasticity_step_(w, y, state, rule, backend="reference")
    return w.double()


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_small_updates_accumulate_on_average(dtype):
    steps = 80
    start = _drift_run(torch.float32, 0, "stochastic").double()
    ref = _drift_run(torch.float32, steps, "stochastic")
    drift = (ref - start).mean().item()
    assert abs(drift) > 1e-3, "the case must move the weights"
    sr = _drift_run(dtype, steps, "stochastic")
    rtn = _drift_run(dtype, steps, "nearest")
    start_low = start.to(dtype).double()
    # round-to-nearest loses every update of bf16 (spacing 2^-8 near 0.5-1,
    # updates ~3e-4); fp16 (spacing 2^-11) keeps some of them
    if dtype == torch.bfloat16:
        assert torch.equal(rtn, start_low)
        assert abs((rtn - start_low).mean().item() - drift) > 0.9 * abs(drift)
    # stochastic rounding follows the fp32 trajectory in expectation
    assert abs((sr - start_low).mean().item() - drift) < 0.05 * abs(drift)


def test_seed_and_step_select_the_rounding():
    w0 = torch.full((26, 4, 4, 4), 0.6, dtype=torch.bfloat16)
    y = torch.rand(1, 4, 4, 4)

    def run(**kw):
        w = w0.clone()
        st = ck.PlasticityState.create((4, 4, 4))
        st.x_pre.fill_(1.0)
        st.x_post.fill_(0.5)
        ck.ops.plasticity_step_(w, y, st, ck.PlasticityRule(bcm=None, competition=None, activity_threshold=0.2),
                                backend="reference", **kw)
        return w, st

    a, st = run(seed=1, step=5)
    assert st.step == 6
    assert torch.equal(a, run(seed=1, step=5)[0])
    assert not torch.equal(a, run(seed=2, step=5)[0])
    assert not torch.equal(a, run(seed=1, step=6)[0])
    b, st = run(seed=1)  # step None: state.step (0), then advanced
    assert st.step == 1 and torch.equal(b, run(seed=1, step=0)[0])
    with pytest.raises(TypeError, match=r"plasticity_step_: seed must be a non-negative int, got float 1.5"):
        run(seed=1.5)
    with pytest.raises(TypeError, match=r"plasticity_step_: step must be a non-negative int or None, got int -1"):
        run(step=-1)


@pytest.mark.parametrize("backend, device", all_backends())
def test_backends_round_alike(backend, device):
    """The rounding hash is the same on every backend: bf16 (fp16 in the
    Triton interpreter) results equal the reference's except where the fp32
    values differ in their last bits right at a rounding threshold."""
    dtype = torch.float16 if backend == "triton" else torch.bfloat16
    dims = (4, 5, 3)
    g = torch.Generator().manual_seed(2)
    w = (0.3 + 0.5 * torch.rand(26, *dims, generator=g)).to(dtype)
    y = torch.rand(2, *dims, generator=g)
    rule = ck.PlasticityRule(competition=ck.Competition(beta=0.2), normalize=True, activity_threshold=0.3)
    outs = []
    for be, dev in (("reference", "cpu"), (backend, device)):
        ww = w.to(dev, copy=True)
        st = ck.PlasticityState.create(dims, batch=2, device=dev)
        st.x_pre.fill_(0.7)
        ck.ops.plasticity_step_(ww, y.to(dev), st, rule, seed=3, step=11, backend=be)
        outs.append(ww.cpu())
    same = (outs[0] == outs[1]).float().mean().item()
    assert same > 0.995
    assert not torch.equal(outs[0], w)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_cpu_rounding_kernel_gives_the_bits_of_the_torch_rounding(dtype):
    if "cpu" not in ck.available_backends():
        pytest.skip("the C++ extension did not load")
    from cellkern.backends import cpu
    from cellkern.ops.rounding import round_weights_

    g = torch.Generator().manual_seed(4)
    src = torch.randn(6, 7, 8, 9, generator=g) * torch.logspace(-8, 1, 9)  # tiny to large, both signs
    src[0] = src[0].to(dtype).float()  # representable values stay
    src[1, 0, 0, :3] = torch.tensor([0.0, -0.0, 1e-40])
    for seed, step in ((0, 0), (3, 17), (2**31 + 5, 2**33 + 7)):
        want = torch.empty(src.shape, dtype=dtype)
        got = torch.empty(src.shape, dtype=dtype)
        round_weights_(want, src, seed, step)
        cpu.stochastic_round_(got, src, seed, step)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (seed, step)
