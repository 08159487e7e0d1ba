"""The competitive Hebbian step of SPEC §11 (``ck.ops.competitive_hebbian_step_``):
the reference against a separate, cell-by-cell transcription of the SPEC
formulas; every backend against the reference; weights that move by the
formula's amount; Oja's unit norm; the hard winner-take-all limit and its ties;
synapses that must not change; errors."""
import math
import random

import pytest
import torch

import cellkern as ck
from cellkern import backends

from conftest import backend_params, interpreted, skip_unsupported_dtype

ALL = [pytest.param("reference", "cpu", id="reference-cpu")] + backend_params()


def _mixing_backend(backend):
    if not getattr(backends._load(backend), "MIXING", False):
        pytest.skip(f"backend {backend!r} has no mixing-form kernels on this build")


def _neighbour(pos, off, dims, periodic):
    """The cell at ``pos + off``, or None outside a zero boundary."""
    out = []
    for p, d, n, per in zip(pos, off, dims, periodic):
        q = p + d
        if per:
            q %= n
        elif not 0 <= q < n:
            return None
        out.append(q)
    return tuple(out)


def transcribed_step(w, s, beta, mask, stencil, boundary, eta, tau, eta_beta, average):
    """SPEC §11 written cell by cell in float64: returns the new ``(W, β)``."""
    K, C_out, C_in, D, H, W = w.shape
    B = s.shape[0]
    offsets = ck.stencil(stencil).offset_tuples
    periodic = [b == "periodic" for b in ck.parse_boundary(boundary)]
    w, s, beta = w.double(), s.double(), beta.double()
    new_w, new_beta = w.clone(), beta.clone()
    for z in range(D):
        for y in range(H):
            for x in range(W):
                live = {}
                for k, o in enumerate(offsets):
                    q = _neighbour((z, y, x), o, (D, H, W), periodic)
                    if q is not None and (mask is None or mask[k, z, y, x]):
                        live[k] = s[:, :, q[0], q[1], q[2]]  # s[b, c, nbr(i,k)], [B, C_in]
                u = torch.zeros(B, C_out, dtype=torch.float64)
                for k, s_nbr in live.items():
                    u += s_nbr @ w[k, :, :, z, y, x].T
                v = u + beta[:, z, y, x]
                if tau == 0:
                    p = torch.zeros_like(v)
                    for b in range(B):
                        p[b, int(torch.argmax(v[b]))] = 1.0  # argmax: the first maximum
                else:
                    e = torch.exp((v - v.max(dim=1, keepdim=True).values) / tau)
                    p = e / e.sum(dim=1, keepdim=True)
                n = 1.0 + p.sum(0) if average == "wins" else torch.full((C_out,), float(B), dtype=torch.float64)
                for k, s_nbr in live.items():
                    for o in range(C_out):
                        for c in range(C_in):
                            acc = (p[:, o] * (s_nbr[:, c] - u[:, o] * w[k, o, c, z, y, x])).sum()  # Σ_b
                            new_w[k, o, c, z, y, x] = w[k, o, c, z, y, x] + eta / n[o] * acc
                new_beta[:, z, y, x] = beta[:, z, y, x] - eta_beta * (p.mean(0) - 1.0 / C_out)
    return new_w, new_beta


def _inputs(seed, dims, B, C_in, C_out, K, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(B, C_in, *dims, generator=g, dtype=torch.float64)
    w = torch.randn(K, C_out, C_in, *dims, generator=g, dtype=torch.float64) * scale / math.sqrt(K * C_in)
    beta = (torch.randn(C_out, *dims, generator=g) * 0.1).float()
    mask = torch.rand(K, *dims, generator=g) < 0.7
    return s, w, beta, mask


_TRANSCRIBED: dict = {}
TRANSCRIPTION_CASES = [
    dict(stencil="von_neumann", boundary="periodic", tau=0.3, average="wins", mask=True, C_in=2, C_out=3),
    dict(stencil="moore18", boundary=("zero", "periodic", "zero"), tau=0.0, average="batch", mask=False, C_in=1,
         C_out=2),
    dict(stencil="von_neumann", boundary="zero", tau=0.05, average="batch", mask=True, C_in=3, C_out=1),
]


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("case", TRANSCRIPTION_CASES, ids=lambda c: f"{c['stencil']}-tau{c['tau']}-{c['average']}")
def test_step_matches_the_transcribed_formulas(backend, device, case):
    _mixing_backend(backend)
    dims, B = (3, 2, 4), 3
    K = ck.stencil(case["stencil"]).K
    s, w, beta, mask = _inputs(1, dims, B, case["C_in"], case["C_out"], K, scale=2.0)
    mask = mask if case["mask"] else None
    kw = dict(eta=0.2, tau=case["tau"], eta_beta=0.05, average=case["average"])
    key = repr(sorted(case.items()))
    if key not in _TRANSCRIBED:  # one transcription per case, shared by the backends
        _TRANSCRIBED[key] = transcribed_step(w, s, beta, mask, case["stencil"], case["boundary"], **kw)
    want_w, want_beta = _TRANSCRIBED[key]
    dtype = torch.float32 if interpreted(backend, device) else torch.float64
    w_, s_, b_ = w.to(device, dtype).clone(), s.to(device, dtype), beta.to(device).clone()
    ck.ops.competitive_hebbian_step_(w_, s_, b_, mask=None if mask is None else mask.to(device),
                                     stencil=case["stencil"], boundary=case["boundary"], backend=backend, **kw)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert not torch.allclose(want_w, w)  # the step does something
    torch.testing.assert_close(w_.double().cpu(), want_w, rtol=tol, atol=tol)
    torch.testing.assert_close(b_.double().cpu(), want_beta, rtol=1e-6, atol=1e-6)


def _spacing(v, dtype):
    """The spacing of ``dtype``'s numbers at ``|v|`` (subnormals included)."""
    info = torch.finfo(dtype)
    mant = {torch.float16: 10, torch.bfloat16: 7}[dtype]
    e = torch.floor(torch.log2(v.abs().clamp(min=info.tiny)))
    return torch.exp2(e - mant).clamp(min=info.tiny * 2.0 ** -mant)


def _hebb_cases(n, seed):
    rng = random.Random(seed)
    dtypes = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float32, torch.float16),
              (torch.float16, torch.float16), (torch.float32, torch.bfloat16)]
    dims = [(3, 4, 5), (1, 3, 7), (2, 2, 1), (5, 5, 3)]
    stencils = ["von_neumann", "moore", "moore18", "radius(2)"]
    out = []
    for i in range(n):
        out.append(dict(dims=dims[i % len(dims)], B=rng.choice([1, 2, 5]), C_in=rng.choice([1, 2, 3]),
                        C_out=[1, 2, 4, 3][i % 4], stencil=stencils[i % len(stencils)],
                        boundary=rng.choice(["periodic", "zero", ("periodic", "zero", "periodic")]),
                        mask=[None, "bool", "packed"][i % 3], tau=[0.2, 0.0, 1.0][i % 3],
                        average=["wins", "batch"][i % 2], dtype=dtypes[i % len(dtypes)]))
    return out


def _hid(c):
    b = c["boundary"] if isinstance(c["boundary"], str) else "".join(x[0] for x in c["boundary"])
    d = "-".join(str(t).replace("torch.", "") for t in c["dtype"])
    return (f"{'x'.join(map(str, c['dims']))}-B{c['B']}-{c['C_in']}to{c['C_out']}-{c['stencil']}-{b}-tau{c['tau']}"
            f"-{c['average']}-{d}{'-m' + c['mask'] if c['mask'] else ''}")


HEBB_CASES = _hebb_cases(10, 3)


def _step(case, s, w, beta, mask, device, backend, seed_step=(5, 7)):
    sd, wd = case["dtype"]
    w_ = w.to(device, wd).clone()
    b_ = beta.to(device).clone()
    m = None if mask is None else mask.to(device)
    if case["mask"] == "packed":
        m = ck.sparse.pack_mask(m)
    ck.ops.competitive_hebbian_step_(w_, s.to(device, sd), b_, eta=0.3, tau=case["tau"], eta_beta=0.1,
                                     average=case["average"], mask=m, stencil=case["stencil"],
                                     boundary=case["boundary"], seed=seed_step[0], step=seed_step[1],
                                     backend=backend)
    return w_.cpu(), b_.cpu()


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", HEBB_CASES, ids=_hid)
def test_backends_match_the_reference(backend, device, case):
    _mixing_backend(backend)
    for dt in case["dtype"]:
        skip_unsupported_dtype(backend, device, dt)
    K = ck.stencil(case["stencil"]).K
    s, w, beta, mask = _inputs(2, case["dims"], case["B"], case["C_in"], case["C_out"], K, scale=2.0)
    mask = mask if case["mask"] else None
    sd, wd = case["dtype"]
    # the exact step starts from the inputs as stored in their dtypes
    s, w = s.to(sd).double(), w.to(wd).double()
    exact = _step(dict(case, dtype=(torch.float64, torch.float64)), s, w, beta, mask, "cpu", "reference")
    got = _step(case, s, w, beta, mask, device, backend)
    assert got[0].dtype == wd
    if wd in (torch.float16, torch.bfloat16):  # rounded stochastically: within one spacing of the exact value
        err = (got[0].double() - exact[0]).abs()
        assert (err <= _spacing(exact[0], wd) * 1.001 + 1e-3 * (sd == torch.float16)).all()
    else:
        tol = 1e-10 if wd == torch.float64 else 1e-5
        torch.testing.assert_close(got[0].double(), exact[0], rtol=tol, atol=tol)
    torch.testing.assert_close(got[1], exact[1], rtol=1e-5, atol=1e-5 + 3e-3 * (sd == torch.float16))


def test_cases_cover_the_matrix():
    assert {c["mask"] for c in HEBB_CASES} == {None, "bool", "packed"}
    assert {c["tau"] for c in HEBB_CASES} >= {0.0, 0.2} and {c["average"] for c in HEBB_CASES} == {"wins", "batch"}
    assert len({c["dtype"] for c in HEBB_CASES}) == 5 and any(c["C_out"] == 1 for c in HEBB_CASES)


@pytest.mark.parametrize("backend,device", ALL)
@pytest.mark.parametrize("average", ["batch", "wins"])
def test_weights_move_by_the_formula(backend, device, average):
    """From ``W = 0`` (so ``u = 0``) with unit 0 the sure winner (β₀ = 10, τ = 0),
    one sample: ``ΔW[k,0,c,i] = η/n · s[c, nbr(i,k)]`` (n = 1 for batch, 2 for wins),
    the other units do not move, and ``β ← β − η_β·(p − 1/C_out)``."""
    _mixing_backend(backend)
    dims, C_in, C_out, eta, eta_beta = (2, 3, 4), 2, 3, 0.25, 0.1
    s = torch.arange(C_in * 24, dtype=torch.float32).view(1, C_in, *dims) / 10
    w = torch.zeros(6, C_out, C_in, *dims, device=device)
    beta = torch.zeros(C_out, *dims, device=device)
    beta[0] = 10.0
    ck.ops.competitive_hebbian_step_(w, s.to(device), beta, eta=eta, tau=0.0, eta_beta=eta_beta, average=average,
                                     stencil="von_neumann", boundary="periodic", backend=backend)
    n = 1.0 if average == "batch" else 2.0
    for k, o in enumerate(ck.stencil("von_neumann").offset_tuples):
        s_nbr = torch.roll(s[0], shifts=tuple(-v for v in o), dims=(1, 2, 3))  # s[c, i + o_k], periodic
        torch.testing.assert_close(w[k, 0].cpu(), eta / n * s_nbr, rtol=1e-6, atol=1e-7)
    assert (w[:, 1:] == 0).all()
    torch.testing.assert_close(beta[0].cpu(), torch.full(dims, 10.0 - eta_beta * (1 - 1 / 3)))
    torch.testing.assert_close(beta[1:].cpu(), torch.full((2, *dims), eta_beta / 3))


@pytest.mark.parametrize("start", [0.2, 2.0])
def test_oja_term_drives_a_unit_to_unit_norm(start):
    """One unit per cell (it always wins, p = 1): ``ΔW = η·mean_b(x − u·W)`` has its
    fixed point where ``E[x] = (Wᵀ·E[x])·W``, i.e. at ``‖W‖ = 1`` along the mean
    input. Repeated steps bring every cell's weight vector (over k, c) there,
    from below and from above."""
    g = torch.Generator().manual_seed(4)
    dims, C_in, B = (3, 2, 3), 2, 8
    w = torch.rand(6, 1, C_in, *dims, generator=g)  # on the side of the (positive) mean input
    w = w / w.pow(2).sum(dim=(0, 1, 2), keepdim=True).sqrt() * start
    beta = torch.zeros(1, *dims)
    pattern = 0.3 * (1 + 0.2 * torch.randn(C_in, *dims, generator=g))  # every cell sees about the same |E[x]|
    norms = []
    for _ in range(60):
        s = pattern * (1 + 0.3 * torch.randn(B, 1, 1, 1, 1, generator=g)) + 0.05 * torch.randn(B, C_in, *dims,
                                                                                            generator=g)
        ck.ops.competitive_hebbian_step_(w, s, beta, eta=0.3, tau=0.1, eta_beta=0.0, average="batch",
                                         stencil="von_neumann", backend="reference")
        norms.append(w.pow(2).sum(dim=(0, 1, 2)).sqrt())
    assert (norms[0] - 1).abs().min() > 0.1  # it starts away from 1 …
    assert ((norms[-1] - 1).abs() < 0.02).all(), norms[-1]  # … and ends there
    assert (beta == 0).all()


@pytest.mark.parametrize("backend,device", ALL)
def test_hard_winner_take_all_is_the_limit_and_ties_go_to_the_lowest_unit(backend, device):
    _mixing_backend(backend)
    dims, K = (2, 3, 2), 6
    s, w, beta, _ = _inputs(6, dims, 4, 2, 3, K, scale=3.0)
    s, w = s.float().to(device), w.float().to(device)
    results = []
    for tau in (0.0, 1e-4):
        w_, b_ = w.clone(), beta.clone().to(device)
        ck.ops.competitive_hebbian_step_(w_, s, b_, eta=0.1, tau=tau, eta_beta=0.1, stencil="von_neumann",
                                         backend=backend)
        results.append((w_, b_))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)
    # units 0 and 1 identical (same u, same β): the tie goes to unit 0, unit 1 stays
    w_tie = w.clone()
    w_tie[:, 1] = w_tie[:, 0]
    w_tie[:, 2] = -10.0  # a clear loser
    b_tie = torch.zeros(3, *dims, device=device)
    before = w_tie.clone()
    ck.ops.competitive_hebbian_step_(w_tie, s.abs(), b_tie, eta=0.1, tau=0.0, eta_beta=0.1, average="batch",
                                     stencil="von_neumann", backend=backend)
    assert not torch.equal(w_tie[:, 0], before[:, 0])
    assert torch.equal(w_tie[:, 1:], before[:, 1:])
    torch.testing.assert_close(b_tie[1].cpu(), torch.full(dims, 0.1 / 3))  # never won: β falls by η_β·(0 − 1/3)


@pytest.mark.parametrize("backend,device", ALL)
def test_masked_and_out_of_lattice_synapses_never_change(backend, device):
    _mixing_backend(backend)
    dims, K = (3, 4, 2), 26
    s, w, beta, mask = _inputs(7, dims, 3, 2, 2, K)
    s, w = s.float().to(device), w.float().to(device)
    w_ = w.clone()
    ck.ops.competitive_hebbian_step_(w_, s, beta.to(device), eta=0.5, mask=mask.to(device), boundary="zero",
                                     backend=backend)
    geom = ck.Geometry(ck.stencil("moore"), ck.parse_boundary("zero"))
    live = ck.backends.reference.live_synapses(mask, geom, dims, "cpu")  # [K, D, H, W]
    changed = (w_ != w).any(dim=1).any(dim=1).cpu()
    assert not (changed & ~live).any()
    assert changed[live].float().mean() > 0.9


def test_fp16_weights_are_rounded_stochastically_from_fp32():
    """fp16 weights: the update runs in fp32 and is rounded with the counter
    (seed, step), as the shared form's plasticity: reproducible, and different
    counters round differently."""
    s, w, beta, _ = _inputs(8, (3, 3, 3), 2, 2, 2, 6)
    runs = []
    for seed, step in ((1, 0), (1, 0), (2, 0)):
        w_ = w.half()
        ck.ops.competitive_hebbian_step_(w_, s.float(), beta.clone(), eta=1e-3, stencil="von_neumann", seed=seed,
                                         step=step, backend="reference")
        runs.append(w_)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_errors_name_the_op_argument_expected_and_received():
    s = torch.rand(2, 2, 3, 4, 5)
    w = torch.randn(26, 3, 2, 3, 4, 5)
    beta = torch.zeros(3, 3, 4, 5)
    op = "competitive_hebbian_step_"
    with pytest.raises(ValueError, match=rf"{op}: w must have shape \(K, C_out, C_in, D, H, W\) \(the mixing form\), "
                                         r"got \(26, 3, 4, 5\) \(4 dims\)"):
        ck.ops.competitive_hebbian_step_(torch.rand(26, 3, 4, 5), s, beta)
    with pytest.raises(ValueError, match=rf"{op}: w must have shape .*\(C_in = 2 must equal the channels of s, 3\)"):
        ck.ops.competitive_hebbian_step_(w, torch.rand(2, 3, 3, 4, 5), beta)
    with pytest.raises(ValueError, match=rf"{op}: beta must have shape \(C_out, D, H, W\) = \(3, 3, 4, 5\), "
                                         r"got \(2, 3, 4, 5\)"):
        ck.ops.competitive_hebbian_step_(w, s, beta[:2])
    with pytest.raises(TypeError, match=rf"{op}: beta must be float32, got torch.float64"):
        ck.ops.competitive_hebbian_step_(w, s, beta.double())
    with pytest.raises(ValueError, match=rf"{op}: eta must be >= 0, got -0.1"):
        ck.ops.competitive_hebbian_step_(w, s, beta, eta=-0.1)
    with pytest.raises(ValueError, match=rf"{op}: tau must be a finite number, got nan"):
        ck.ops.competitive_hebbian_step_(w, s, beta, tau=float("nan"))
    with pytest.raises(ValueError, match=rf"{op}: average must be one of wins, batch, got 'mean'"):
        ck.ops.competitive_hebbian_step_(w, s, beta, average="mean")
    with pytest.raises(ValueError, match=rf"{op}: the ELL form .* is shared-form only"):
        ck.ops.competitive_hebbian_step_(w, s, beta, mask=torch.zeros(20, 3, 4, 5, dtype=torch.uint8))
