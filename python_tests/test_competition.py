"""Activity and competition (SPEC §3, §4): ``lateral_inhibition`` and
``local_winners`` of every backend against the reference on a matrix of dims,
stencils, boundaries, batch sizes and dtypes; hand cases for them and for
``activity``."""
import random
import zlib

import pytest
import torch

import cellkern as ck

from conftest import LOW_PRECISION, all_backends, assert_matches_reference, backend_params, skip_unsupported_dtype

STENCILS = ["von_neumann", "moore18", "moore", "radius(2)"]
BOUNDARIES = ["periodic", "zero", ("zero", "periodic", "periodic"), ("periodic", "zero", "periodic"),
              ("periodic", "periodic", "zero"), ("zero", "zero", "periodic")]
DIMS = [(1, 5, 7), (3, 4, 5), (2, 3, 9), (5, 4, 3), (4, 4, 4), (3, 11, 2), (1, 1, 1)]
DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32]


def _cases(n, seed):
    rng = random.Random(seed)
    return [dict(dims=DIMS[i % len(DIMS)], B=rng.choice([1, 2, 3]), stencil=STENCILS[i % len(STENCILS)],
                 boundary=BOUNDARIES[rng.randrange(len(BOUNDARIES))], dtype=DTYPES[i % len(DTYPES)],
                 beta=rng.choice([0.0, 0.3, 1.0, 2.5]), threshold=rng.choice([0.0, 0.25, 0.5]),
                 ties=rng.random() < 0.5)
            for i in range(n)]


def _id(c):
    b = c["boundary"] if isinstance(c["boundary"], str) else "".join(x[0] for x in c["boundary"])
    d = str(c["dtype"]).replace("torch.", "")
    return (f"{'x'.join(map(str, c['dims']))}-B{c['B']}-{c['stencil']}-{b}-{d}-beta{c['beta']}-thr{c['threshold']}"
            f"{'-ties' if c['ties'] else ''}")


def _y(c):
    """Activity in [0, 1); with ``ties`` quantised to eighths so that equal
    neighbours and values exactly at the threshold occur."""
    g = torch.Generator().manual_seed(zlib.crc32(_id(c).encode()))
    y = torch.rand((c["B"],) + c["dims"], generator=g, dtype=torch.float64)
    return (y * 8).floor() / 8 if c["ties"] else y


CASES = _cases(28, 21)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_lateral_inhibition_matches_reference(backend, device, case):
    dtype = case["dtype"]
    skip_unsupported_dtype(backend, device, dtype)
    y = _y(case).to(dtype)
    kw = dict(beta=case["beta"], stencil=case["stencil"], boundary=case["boundary"])
    exact = ck.ops.lateral_inhibition(y.double(), backend="reference", **kw)
    same = ck.ops.lateral_inhibition(y, backend="reference", **kw) if dtype in LOW_PRECISION else None
    got = ck.ops.lateral_inhibition(y.to(device), backend=backend, **kw)
    assert got.shape == y.shape and got.dtype == dtype
    assert_matches_reference(got, exact, same, name="y'")


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_local_winners_matches_reference(backend, device, case):
    """Winners compare exact values, so every backend must give the
    reference's answer bit for bit (ties included)."""
    dtype = case["dtype"]
    skip_unsupported_dtype(backend, device, dtype)
    y = _y(case).to(dtype)
    kw = dict(stencil=case["stencil"], boundary=case["boundary"])
    want = ck.ops.local_winners(y, case["threshold"], backend="reference", **kw)
    got = ck.ops.local_winners(y.to(device), case["threshold"], backend=backend, **kw)
    assert got.dtype == torch.bool and got.shape == y.shape
    assert torch.equal(got.cpu(), want), f"{int((got.cpu() != want).sum())} cells differ"


def test_cases_cover_the_matrix():
    seen = {k: {str(c[k]) for c in CASES} for k in ("stencil", "boundary", "dtype", "dims", "beta", "B")}
    assert seen["stencil"] == set(STENCILS)
    assert seen["dtype"] == {str(d) for d in DTYPES}
    assert len(seen["boundary"]) >= 5 and len(seen["beta"]) >= 3 and len(seen["B"]) == 3
    assert any(c["ties"] for c in CASES) and any(not c["ties"] for c in CASES)
    assert any(1 in c["dims"] for c in CASES)
    assert sum(bool(ck.ops.local_winners(_y(c), c["threshold"], stencil=c["stencil"], boundary=c["boundary"],
                                         backend="reference").any()) for c in CASES) >= len(CASES) // 2


# ---- hand cases ----

def _hot(dims=(5, 5, 5), base=0.2, hot=(2, 2, 3), value=2.0):
    y = torch.full((1,) + dims, base)
    y[(0,) + hot] = value
    return y


@pytest.mark.parametrize("backend,device", all_backends())
def test_a_strongly_driven_cell_inhibits_its_neighbours(backend, device):
    y = _hot().to(device)
    yp = ck.ops.lateral_inhibition(y, beta=0.5, backend=backend).cpu()
    far, nbr, hot = 0.2 - 0.5 * 0.2, 0.2 - 0.5 * (25 * 0.2 + 2.0) / 26, 2.0 - 0.5 * 0.2
    assert yp[0, 2, 2, 3].item() == pytest.approx(hot, rel=1e-6)
    assert yp[0, 1, 1, 2].item() == pytest.approx(nbr, rel=1e-6)  # a corner neighbour
    assert yp[0, 2, 2, 4].item() == pytest.approx(nbr, rel=1e-6)
    assert yp[0, 0, 0, 0].item() == pytest.approx(far, rel=1e-6)  # two steps away along z
    st = ck.stencil("moore")
    near = torch.zeros(5, 5, 5, dtype=torch.bool)
    for o in st.offsets.tolist():
        near[(2 + o[0]) % 5, (2 + o[1]) % 5, (3 + o[2]) % 5] = True
    assert (yp[0][near] < far).all()
    win = ck.ops.local_winners(yp.to(device), 0.5, backend=backend).cpu()
    assert win.sum() == 1 and win[0, 2, 2, 3]


@pytest.mark.parametrize("backend,device", all_backends())
def test_inhibition_clamps_at_zero_and_beta_zero_is_identity(backend, device):
    y = _hot(base=0.1, value=3.0).to(device)
    yp = ck.ops.lateral_inhibition(y, beta=2.0, backend=backend).cpu()
    assert (yp >= 0).all() and (yp == 0).sum() == 26 + 98, "relu: neighbours and far cells go to 0"
    same = ck.ops.lateral_inhibition(y, beta=0.0, backend=backend)
    assert torch.equal(same.cpu(), y.cpu())
    assert same.data_ptr() != y.data_ptr(), "a new tensor, y is not changed in place"


@pytest.mark.parametrize("backend,device", all_backends())
def test_zero_boundary_reads_zero_but_the_mean_divides_by_K(backend, device):
    """At a corner of a zero-bounded lattice only 7 of 26 moore neighbours
    exist; the others read 0 and the mean still divides by 26."""
    y = torch.ones(1, 3, 3, 3, device=device)
    yp = ck.ops.lateral_inhibition(y, beta=1.0, boundary="zero", backend=backend).cpu()
    assert yp[0, 0, 0, 0].item() == pytest.approx(1 - 7 / 26, rel=1e-6)
    assert yp[0, 1, 1, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert yp[0, 0, 1, 1].item() == pytest.approx(1 - 17 / 26, rel=1e-6)
    per_axis = ck.ops.lateral_inhibition(y, beta=1.0, boundary=("zero", "periodic", "periodic"),
                                         backend=backend).cpu()
    assert per_axis[0, 0, 0, 0].item() == pytest.approx(1 - 17 / 26, rel=1e-6)


@pytest.mark.parametrize("backend,device", all_backends())
def test_winner_rules(backend, device):
    """Strictly above the threshold; ties with a neighbour win together; the
    zero boundary's outside reads 0, so an edge cell above 0 can win."""
    y = torch.zeros(2, 1, 1, 7)
    y[0, 0, 0] = torch.tensor([1, 4, 4, 2, 3, 3, 3.5]) / 8  # binary fractions: exact in every dtype
    y[1, 0, 0] = torch.tensor([7, 1, 1, 1, 1, 1, 6]) / 8
    kw = dict(stencil="von_neumann", backend=backend)
    win = ck.ops.local_winners(y.to(device), 0.375, boundary="zero", **kw).cpu()
    assert win[0, 0, 0].tolist() == [False, True, True, False, False, False, True]
    assert win[1, 0, 0].tolist() == [True, False, False, False, False, False, True]
    periodic = ck.ops.local_winners(y.to(device), 0.375, boundary="periodic", **kw).cpu()
    assert periodic[1, 0, 0].tolist() == [True, False, False, False, False, False, False]
    one = torch.full((1, 1, 1, 1), 0.75, device=device)  # a single cell is its own neighbour
    assert ck.ops.local_winners(one, 0.5, **kw).item() and not ck.ops.local_winners(one, 0.75, **kw).item()


def test_activity_change_and_state():
    g = torch.Generator().manual_seed(22)
    s0 = torch.randn(2, 3, 2, 3, 4, generator=g)
    s1 = torch.randn(2, 3, 2, 3, 4, generator=g)
    y = ck.ops.activity(s0, s1)
    assert y.shape == (2, 2, 3, 4) and y.dtype == torch.float32
    torch.testing.assert_close(y, (s1 - s0).abs().mean(1))
    assert ck.ops.activity(s0, s1, mode="change")[1, 1, 2, 3].item() == pytest.approx(
        sum(abs(s1[1, c, 1, 2, 3].item() - s0[1, c, 1, 2, 3].item()) for c in range(3)) / 3, rel=1e-6)
    assert torch.equal(ck.ops.activity(s0, s1, mode="state"), s1[:, 0])
    assert torch.equal(ck.ops.activity(None, s1, mode="state"), s1[:, 0]), "state mode ignores s_prev"
    assert (ck.ops.activity(s1, s1) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_activity_keeps_the_dtype_and_accumulates_wide(dtype):
    s0 = torch.zeros(1, 64, 2, 2, 2, dtype=dtype)
    s1 = s0.clone()
    s1[:, :2] = 0.5  # mean over 64 channels: 1/64, exact in every dtype
    y = ck.ops.activity(s0, s1)
    assert y.dtype == dtype
    assert (y.double() == 1 / 64).all()


def test_activity_feeds_plasticity():
    """The documented pipeline: activity → plasticity_step_ with the
    seeds' thresholds (0.01–0.1) moves some weights."""
    g = torch.Generator().manual_seed(23)
    s0 = torch.randn(2, 4, 3, 4, 5, generator=g)
    s1 = s0 + 0.1 * torch.randn(2, 4, 3, 4, 5, generator=g)
    y = ck.ops.activity(s0, s1)
    w = torch.full((26, 3, 4, 5), 0.5)
    state = ck.PlasticityState.create((3, 4, 5), batch=2)
    rule = ck.PlasticityRule(stdp=ck.STDP(lr=1.0, a_plus=0.5), bcm=ck.BCM(lr=5.0), activity_threshold=0.05)
    ck.ops.plasticity_step_(w, y, state, rule, backend="reference")
    ck.ops.plasticity_step_(w, y, state, rule, backend="reference")
    assert (w != 0.5).any()
