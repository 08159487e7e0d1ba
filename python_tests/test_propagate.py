"""Every fast backend against the reference: forward and gradients, on a
matrix of dims (odd, prime, 1- and 2-thick), batch/channels, stencils,
boundaries (uniform and per axis), masks, drives, biases, activations, leaks
and dtypes."""
import random
import zlib

import pytest
import torch

import cellkern as ck
from cellkern import backends
from cellkern.backends import reference as R

from conftest import LOW_PRECISION, assert_matches_reference, backend_params, interpreted, skip_unsupported_dtype

STENCILS = ["von_neumann", "moore18", "moore", "radius(2)"]
BOUNDARIES = ["periodic", "zero", ("zero", "periodic", "periodic"), ("periodic", "zero", "periodic"),
              ("periodic", "periodic", "zero")]
ACTIVATIONS = ["identity", "tanh", "relu", "sigmoid"]
DIMS = [(1, 5, 7), (2, 3, 9), (5, 4, 3), (3, 1, 4), (4, 4, 4), (7, 6, 5), (1, 1, 1), (3, 11, 2)]


def _cases(n, seed, dtypes, big=False):
    rng = random.Random(seed)
    dims = DIMS + ([(9, 13, 17), (16, 8, 33)] if big else [])
    out = []
    for i in range(n):
        out.append(dict(
            dims=dims[i % len(dims)],
            B=rng.choice([1, 2, 3]), C=rng.choice([1, 2, 4]),
            stencil=STENCILS[i % len(STENCILS)],
            boundary=BOUNDARIES[rng.randrange(len(BOUNDARIES))],
            mask=rng.random() < 0.5, x=rng.random() < 0.6,
            bias=rng.choice([None, "C", "CDHW"]),
            activation=ACTIVATIONS[i % len(ACTIVATIONS)],
            leak=rng.choice([0.0, 0.3, 1.0, 0.75]),
            dtype=dtypes[i % len(dtypes)],
        ))
    return out


def _id(c):
    b = c["boundary"] if isinstance(c["boundary"], str) else "".join(x[0] for x in c["boundary"])
    d = str(c["dtype"]).replace("torch.", "")
    return (f"{'x'.join(map(str, c['dims']))}-B{c['B']}C{c['C']}-{c['stencil']}-{b}-{c['activation']}"
            f"-a{c['leak']}-{d}{'-m' if c['mask'] else ''}{'-x' if c['x'] else ''}{'-b' + c['bias'] if c['bias'] else ''}")


ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CASES = _cases(48, 1, ALL_DTYPES, big=True)


def _inputs(c, device):
    D, H, W = c["dims"]
    B, C = c["B"], c["C"]
    K = ck.stencil(c["stencil"]).K
    g = torch.Generator().manual_seed(zlib.crc32(_id(c).encode()))
    s = torch.randn(B, C, D, H, W, generator=g, dtype=torch.float64)
    w = torch.rand(K, D, H, W, generator=g, dtype=torch.float64) * 0.4 - 0.1
    mask = torch.rand(K, D, H, W, generator=g) < 0.7 if c["mask"] else None
    x = torch.randn(B, C, D, H, W, generator=g, dtype=torch.float64) if c["x"] else None
    bias = {None: None, "C": torch.randn(C, generator=g, dtype=torch.float64),
            "CDHW": torch.randn(C, D, H, W, generator=g, dtype=torch.float64)}[c["bias"]]
    up = torch.randn(B, C, D, H, W, generator=g, dtype=torch.float64)
    return s, w, mask, x, bias, up


def _run(c, tensors, dtype, device, backend, grads=True):
    s, w, mask, x, bias, up = [t if t is None else t.to(device) for t in tensors]
    cast = [t if t is None or t.dtype == torch.bool else t.to(dtype).detach().requires_grad_(grads) for t in (s, w, x, bias)]
    s_, w_, x_, b_ = cast
    out = ck.ops.propagate(s_, w_, mask, x_, b_, leak=c["leak"], activation=c["activation"],
                           stencil=c["stencil"], boundary=c["boundary"], backend=backend)
    res = {"out": out.detach()}
    if grads:
        out.backward(up.to(dtype))
        for name, t in zip(("s", "w", "x", "bias"), cast):
            if t is not None:
                res["d" + name] = t.grad
    return res


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_propagate_matches_reference(backend, device, case):
    dtype = case["dtype"]
    skip_unsupported_dtype(backend, device, dtype)
    if interpreted(backend, device) and case["dims"][0] * case["dims"][1] * case["dims"][2] > 200:
        pytest.skip("large lattice: interpreted Triton runs the small ones")
    tensors = _inputs(case, device)
    exact = _run(case, tensors, torch.float64, "cpu", "reference")
    same = _run(case, tensors, dtype, "cpu", "reference") if dtype in LOW_PRECISION else {}
    got = _run(case, tensors, dtype, device, backend)
    assert set(got) == set(exact)
    for name in exact:
        assert_matches_reference(got[name], exact[name], same.get(name), grad=name != "out", name=name)


AGG_CASES = [c for c in _cases(24, 2, [torch.float32, torch.float64, torch.float16])]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", AGG_CASES, ids=_id)
def test_aggregate_matches_reference(backend, device, case):
    dtype = case["dtype"]
    skip_unsupported_dtype(backend, device, dtype)
    s, w, mask, _, _, up = _inputs(case, device)

    def run(dt, dev, be):
        s_ = s.to(dev, dt).detach().requires_grad_()
        w_ = w.to(dev, dt).detach().requires_grad_()
        a = ck.ops.aggregate(s_, w_, None if mask is None else mask.to(dev), stencil=case["stencil"],
                             boundary=case["boundary"], backend=be)
        a.backward(up.to(dev, dt))
        return {"a": a.detach(), "ds": s_.grad, "dw": w_.grad}

    exact = run(torch.float64, "cpu", "reference")
    same = run(dtype, "cpu", "reference") if dtype in LOW_PRECISION else {}
    got = run(dtype, device, backend)
    for name in exact:
        assert_matches_reference(got[name], exact[name], same.get(name), grad=name != "a", name=name)


def test_reference_gradients_match_autograd():
    """The explicit gradient formulas of the reference (SPEC §2) equal torch
    autograd through the reference forward."""
    for c in _cases(16, 3, [torch.float64]):
        s, w, mask, x, bias, up = _inputs(c, "cpu")
        geom = ck.Geometry(ck.stencil(c["stencil"]), ck.parse_boundary(c["boundary"]))
        bias_full = None if bias is None else bias.view(-1, 1, 1, 1).expand(-1, *s.shape[2:]).contiguous() \
            if bias.dim() == 1 else bias
        leaves = [t.clone().requires_grad_() for t in (s, w)]
        out, _ = R.propagate_forward(leaves[0], leaves[1], mask, x, bias_full, geom, c["leak"], c["activation"], False)
        auto = torch.autograd.grad(out, leaves, up)
        _, u = R.propagate_forward(s, w, mask, x, bias_full, geom, c["leak"], c["activation"], True)
        ds, dw, _ = R.propagate_backward(up, s, w, mask, u, geom, c["leak"], c["activation"], True, True, True)
        torch.testing.assert_close(ds, auto[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(dw, auto[1], rtol=1e-10, atol=1e-10)


GRADCHECK_BACKENDS = ["reference"] + (["cpu"] if "cpu" in ck.available_backends() else [])


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("boundary", ["periodic", ("zero", "periodic", "zero")], ids=["periodic", "zpz"])
def test_gradcheck_propagate(backend, activation, boundary):
    g = torch.Generator().manual_seed(5)
    D, H, W, B, C = 2, 3, 4, 2, 2
    s = torch.randn(B, C, D, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(26, D, H, W, dtype=torch.float64, generator=g) * 0.2).requires_grad_()
    x = torch.randn(1, C, D, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(C, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(26, D, H, W, generator=g) < 0.8
    if activation == "relu":  # keep pre-activations away from the kink
        x = (x + 3 * torch.sign(x)).detach().requires_grad_()

    def f(s, w, x, bias):
        return ck.ops.propagate(s, w, mask, x, bias, leak=0.6, activation=activation,
                                boundary=boundary, backend=backend)

    assert torch.autograd.gradcheck(f, (s, w, x, bias), fast_mode=backend == "reference")


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("stencil", STENCILS)
def test_gradcheck_aggregate(backend, stencil):
    g = torch.Generator().manual_seed(6)
    K = ck.stencil(stencil).K
    s = torch.randn(1, 2, 2, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(K, 2, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s, w: ck.ops.aggregate(s, w, stencil=stencil, boundary=("zero", "periodic", "zero"), backend=backend),
        (s, w), fast_mode=backend == "reference")


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck_propagate_steps(backend):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.rand(6, 3, 4, 4, dtype=torch.float64, generator=g) * 0.3).requires_grad_()
    x = torch.randn(4, 1, 2, 3, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s, w, x: ck.ops.propagate_steps(s, w, 4, x=x, checkpoint_every=3, leak=0.5, stencil="von_neumann",
                                               boundary="zero", backend=backend),
        (s, w, x), fast_mode=backend == "reference")


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_checkpointing_gives_the_same_gradients(backend, k):
    s0 = torch.randn(2, 2, 4, 5, 6)
    w0 = torch.rand(26, 4, 5, 6) * 0.1
    x = torch.randn(2, 2, 4, 5, 6)

    def grads(ck_every):
        s, w = s0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = ck.ops.propagate_steps(s, w, 7, x=x, leak=0.3, checkpoint_every=ck_every, backend=backend)
        out.square().sum().backward()
        return out.detach(), s.grad, w.grad

    plain, ckpt = grads(None), grads(k)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_propagate_steps_equals_repeated_propagate():
    s = torch.randn(1, 3, 5, 5, 5)
    w = torch.rand(26, 5, 5, 5) * 0.1
    xs = torch.randn(3, 1, 3, 5, 5, 5)
    want = s
    for t in range(3):
        want = ck.ops.propagate(want, w, x=xs[t], leak=0.4, activation="sigmoid")
    got = ck.ops.propagate_steps(s, w, 3, x=xs, leak=0.4, activation="sigmoid")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend,device", backend_params())
def test_non_contiguous_inputs(backend, device):
    """Strided views are made contiguous once, never read wrongly."""
    base = torch.randn(3, 4, 6, 5, 7, device=device)
    s = base.permute(1, 0, 2, 3, 4)[:, :, :, :, :]  # (4, 3, 6, 5, 7), non-contiguous
    assert not s.is_contiguous()
    w = torch.rand(26, 7, 5, 6, device=device).permute(0, 3, 2, 1) * 0.2  # (26, 6, 5, 7)
    assert not w.is_contiguous()
    x = torch.randn(4, 3, 7, 5, 6, device=device).transpose(2, 4)
    got = ck.ops.propagate(s, w, x=x, leak=0.5, boundary="zero", backend=backend)
    want = ck.ops.propagate(s.contiguous(), w.contiguous(), x=x.contiguous(), leak=0.5, boundary="zero",
                            backend="reference")
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5)


def test_fp32_accumulation_in_low_precision():
    """Summing many small bf16 terms must not lose them (accumulation in fp32)."""
    s = torch.ones(1, 1, 4, 4, 4, dtype=torch.bfloat16)
    w = torch.full((ck.stencil("radius(2)").K, 4, 4, 4), 1.0 / 256, dtype=torch.bfloat16)
    for backend in ["reference"] + (["cpu"] if "cpu" in ck.available_backends() else []):
        a = ck.ops.aggregate(s, w, stencil="radius(2)", backend=backend)
        assert torch.allclose(a.float(), torch.full_like(a.float(), 32 / 256)), backend


def test_backend_none_picks_the_fastest(no_backend_env):
    name, _ = backends.select(None, torch.device("cpu"), "t")
    assert name == ("cpu" if "cpu" in ck.available_backends() else "reference")


def test_env_forces_a_backend(no_backend_env):
    no_backend_env.setenv("CELLKERN_BACKEND", "reference")
    assert backends.select(None, torch.device("cpu"), "t")[0] == "reference"
    no_backend_env.setenv("CELLKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="CELLKERN_BACKEND must be one of"):
        ck.ops.aggregate(torch.randn(1, 1, 2, 2, 2), torch.rand(26, 2, 2, 2))


def test_unavailable_backend_is_a_clear_error(no_backend_env):
    if "cuda" in ck.available_backends():
        pytest.skip("cuda backend is available here")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available"):
        ck.ops.propagate(torch.randn(1, 1, 2, 2, 2), torch.rand(26, 2, 2, 2), backend="cuda")


@pytest.mark.skipif("cpu" not in ck.available_backends(), reason="cpu extension not built")
def test_cpu_backend_refuses_other_devices(no_backend_env):
    with pytest.raises(ValueError, match="cannot run on meta tensors"):
        ck.ops.propagate(torch.randn(1, 1, 2, 2, 2, device="meta"), torch.rand(26, 2, 2, 2, device="meta"),
                         backend="cpu")


def test_cases_cover_the_matrix():
    """The random matrix really holds every stencil, boundary, activation and dtype."""
    seen = {k: {str(c[k]) for c in CASES} for k in ("stencil", "boundary", "activation", "dtype")}
    assert seen["stencil"] == set(STENCILS)
    assert len(seen["boundary"]) >= 4
    assert seen["activation"] == set(ACTIVATIONS)
    assert seen["dtype"] == {str(d) for d in ALL_DTYPES}
    assert any(c["mask"] for c in CASES) and any(not c["mask"] for c in CASES)
    assert {c["bias"] for c in CASES} == {None, "C", "CDHW"}
    assert any(1 in c["dims"] for c in CASES)


ONE_PLANE_CASES = [dict(dims=dims, B=1, C=1, stencil="moore", boundary=boundary, mask=mask, x=True, bias="C",
                        activation="tanh", leak=0.3, dtype=dtype)
                   for dims, boundary, mask, dtype in [
                       ((5, 6, 7), "periodic", False, torch.float32), ((4, 3, 9), "zero", True, torch.float32),
                       ((3, 5, 4), ("zero", "periodic", "periodic"), False, torch.float16),
                       ((2, 7, 3), ("periodic", "zero", "zero"), True, torch.float64),
                       # rows wider than two warps: warps with no x edge in them (a CUDA path of their own)
                       ((3, 4, 97), ("zero", "zero", "periodic"), True, torch.float32),
                       ((4, 3, 70), "periodic", False, torch.float16)]]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", ONE_PLANE_CASES, ids=_id)
def test_one_plane_moore_matches_reference(backend, device, case):
    """B = C = 1 with the moore stencil, the benchmarks' case (a kernel may take
    a path of its own there), forward and gradients."""
    test_propagate_matches_reference(backend, device, case)


WIDE_CASES = [dict(dims=dims, B=B, C=C, stencil=stencil, boundary=boundary, mask=mask, x=False, bias=None,
                   activation="identity", leak=1.0, dtype=dtype)
              for dims, B, C, stencil, boundary, mask, dtype in [
                  ((3, 4, 97), 2, 2, "moore", "zero", True, torch.float32),
                  ((4, 3, 70), 1, 3, "moore18", "periodic", False, torch.float16),
                  ((3, 3, 66), 3, 1, "moore", ("periodic", "zero", "periodic"), True, torch.float64)]]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", WIDE_CASES, ids=_id)
def test_wide_rows_match_reference(backend, device, case):
    """B·C > 1 on rows wider than two warps (K ≤ 32): the CUDA kernels' own
    paths for warps of interior rows with and without an x edge, forward and
    gradients."""
    test_propagate_matches_reference(backend, device, case)
