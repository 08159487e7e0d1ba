"""The mixing form (SPEC §11) of aggregate / propagate / propagate_steps: every
backend with mixing kernels against the reference (forward and gradients) on a
matrix of dims (odd, 1-thick, tile-crossing), B, C_in, C_out (including 1),
stencils, boundaries, masks (bool and packed), activations (triangle included)
and dtypes (fp16/bf16 weights under fp32 states too); the reference's gradient
formulas against autograd, gradcheck, the shared form as the diagonal mixing
form, the shared form's triangle epilogue, backend choice and errors."""
import random
import types
import zlib

import pytest
import torch

import cellkern as ck
from cellkern import backends
from cellkern import sparse
from cellkern.backends import reference as R

from conftest import LOW_PRECISION, assert_matches_reference, backend_params, interpreted, skip_unsupported_dtype

STENCILS = ["von_neumann", "moore18", "moore", "radius(2)"]
BOUNDARIES = ["periodic", "zero", ("zero", "periodic", "periodic"), ("periodic", "zero", "zero")]
ACTIVATIONS = ["identity", "tanh", "relu", "sigmoid", "triangle"]
DIMS = [(3, 4, 5), (1, 5, 3), (2, 1, 7), (5, 5, 5), (1, 1, 1), (3, 2, 2)]
#: (state dtype, weight dtype): one dtype, and fp16/bf16 weights under an fp32 state
DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float16),
          (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16), (torch.float32, torch.bfloat16)]


def _cases(n, seed, square):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c_in = [1, 2, 3, 4][i % 4]
        act = ACTIVATIONS[i % len(ACTIVATIONS)]
        if act == "triangle" and c_in < 2:
            c_in = 3
        out.append(dict(
            dims=DIMS[i % len(DIMS)], B=rng.choice([1, 2, 3]), C_in=c_in,
            C_out=c_in if square else [1, 2, 3, 4][(i * 3 + 1) % 4],
            stencil=STENCILS[i % len(STENCILS)], boundary=BOUNDARIES[rng.randrange(len(BOUNDARIES))],
            mask=[None, "bool", "packed"][i % 3], x=rng.random() < 0.6, bias=rng.choice([None, "C", "CDHW"]),
            activation=act, leak=rng.choice([0.3, 1.0, 0.75]), dtype=DTYPES[i % len(DTYPES)],
        ))
    return out


def _id(c):
    b = c["boundary"] if isinstance(c["boundary"], str) else "".join(x[0] for x in c["boundary"])
    d = "-".join(str(t).replace("torch.", "") for t in sorted(set(c["dtype"]), key=str))
    return (f"{'x'.join(map(str, c['dims']))}-B{c['B']}-{c['C_in']}to{c['C_out']}-{c['stencil']}-{b}"
            f"-{c['activation']}-a{c['leak']}-{d}{'-m' + c['mask'] if c['mask'] else ''}{'-x' if c['x'] else ''}"
            f"{'-b' + c['bias'] if c['bias'] else ''}")


PROP_CASES = _cases(12, 1, square=True)
AGG_CASES = _cases(10, 2, square=False)


def _mixing_backend(backend):
    """Skip a backend whose module has no mixing kernels (yet)."""
    if not getattr(backends._load(backend), "MIXING", False):
        pytest.skip(f"backend {backend!r} has no mixing-form kernels on this build")


def _skip(backend, device, case):
    _mixing_backend(backend)
    for dt in case["dtype"]:
        skip_unsupported_dtype(backend, device, dt)
    D, H, W = case["dims"]
    if interpreted(backend, device) and D * H * W > 130:
        pytest.skip("large lattice: interpreted Triton runs the small ones")


def _inputs(c):
    D, H, W = c["dims"]
    B, Ci, Co = c["B"], c["C_in"], c["C_out"]
    K = ck.stencil(c["stencil"]).K
    g = torch.Generator().manual_seed(zlib.crc32(_id(c).encode()))
    s = torch.randn(B, Ci, D, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(K, Co, Ci, D, H, W, generator=g, dtype=torch.float64) / (K * Ci) ** 0.5
    mask = torch.rand(K, D, H, W, generator=g) < 0.7 if c["mask"] else None
    x = torch.randn(B, Co, D, H, W, generator=g, dtype=torch.float64) if c["x"] else None
    bias = {None: None, "C": torch.randn(Co, generator=g, dtype=torch.float64),
            "CDHW": torch.randn(Co, D, H, W, generator=g, dtype=torch.float64)}[c["bias"]]
    up = torch.randn(B, Co, D, H, W, generator=g, dtype=torch.float64)
    return s, w, mask, x, bias, up


def _rounded_weights(c, tensors):
    """Mixed precision (fp16/bf16 ``w`` under an fp32 state): the exact reference
    takes ``w`` as stored, so only the kernel's arithmetic is compared."""
    s, w, *rest = tensors
    sd, wd = c["dtype"]
    return (s, w.to(wd).double() if wd != sd else w, *rest)


def _mask_arg(c, mask, device):
    if mask is None:
        return None
    mask = mask.to(device)
    return sparse.pack_mask(mask) if c["mask"] == "packed" and mask.shape[0] <= 32 else mask


def _leaves(tensors, dtypes, device):
    """Differentiable copies: ``s``, ``x``, ``bias`` in the state dtype, ``w`` in the weight dtype."""
    s, w, x, bias = tensors
    sd, wd = dtypes
    return [None if t is None else t.to(device, d).detach().requires_grad_()
            for t, d in ((s, sd), (w, wd), (x, sd), (bias, sd))]


def _propagate(c, tensors, dtypes, device, backend):
    s, w, mask, x, bias, up = tensors
    leaves = _leaves((s, w, x, bias), dtypes, device)
    out = ck.ops.propagate(leaves[0], leaves[1], _mask_arg(c, mask, device), leaves[2], leaves[3], leak=c["leak"],
                           activation=c["activation"], stencil=c["stencil"], boundary=c["boundary"], backend=backend)
    out.backward(up.to(device, dtypes[0]))
    res = {"out": out.detach()}
    res.update({"d" + n: t.grad for n, t in zip(("s", "w", "x", "bias"), leaves) if t is not None})
    return res


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", PROP_CASES, ids=_id)
def test_mixing_propagate_matches_reference(backend, device, case):
    _skip(backend, device, case)
    tensors = _rounded_weights(case, _inputs(case))
    exact = _propagate(case, tensors, (torch.float64, torch.float64), "cpu", "reference")
    low = case["dtype"][0] in LOW_PRECISION
    same = _propagate(case, tensors, case["dtype"], "cpu", "reference") if low else {}
    got = _propagate(case, tensors, case["dtype"], device, backend)
    assert set(got) == set(exact)
    for name in exact:
        assert_matches_reference(got[name], exact[name], same.get(name), grad=name != "out", name=name)


def _aggregate(c, tensors, dtypes, device, backend):
    s, w, mask, _, _, up = tensors
    s_, w_, _, _ = _leaves((s, w, None, None), dtypes, device)
    a = ck.ops.aggregate(s_, w_, _mask_arg(c, mask, device), stencil=c["stencil"], boundary=c["boundary"],
                         backend=backend)
    a.backward(up.to(device, dtypes[0]))
    return {"a": a.detach(), "ds": s_.grad, "dw": w_.grad}


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", AGG_CASES, ids=_id)
def test_mixing_aggregate_matches_reference(backend, device, case):
    _skip(backend, device, case)
    tensors = _rounded_weights(case, _inputs(case))
    exact = _aggregate(case, tensors, (torch.float64, torch.float64), "cpu", "reference")
    assert exact["a"].shape[1] == case["C_out"] and exact["ds"].shape[1] == case["C_in"]
    low = case["dtype"][0] in LOW_PRECISION
    same = _aggregate(case, tensors, case["dtype"], "cpu", "reference") if low else {}
    got = _aggregate(case, tensors, case["dtype"], device, backend)
    for name in exact:
        assert_matches_reference(got[name], exact[name], same.get(name), grad=name != "a", name=name)


def test_cases_cover_the_matrix():
    """The random matrices really hold every stencil, activation, mask form, dtype pair and a C_out ≠ C_in."""
    cases = PROP_CASES + AGG_CASES
    assert {c["stencil"] for c in cases} == set(STENCILS)
    assert {c["activation"] for c in PROP_CASES} == set(ACTIVATIONS)
    assert {c["mask"] for c in cases} == {None, "bool", "packed"}
    assert {c["dtype"] for c in PROP_CASES} == set(DTYPES)
    assert any(c["C_out"] != c["C_in"] for c in AGG_CASES) and any(c["C_out"] == 1 for c in AGG_CASES)
    assert any(c["C_in"] == 1 for c in AGG_CASES) and any(1 in c["dims"] for c in cases)
    assert any(c["dims"][0] * c["dims"][1] * c["dims"][2] > 64 for c in cases)  # crosses a Triton cell block


def _geometry(stencil, boundary):
    return ck.Geometry(ck.stencil(stencil), ck.parse_boundary(boundary))


@pytest.mark.parametrize("case", [c for c in PROP_CASES if c["dims"] != (5, 5, 5)], ids=_id)
def test_reference_mixing_gradients_match_autograd(case):
    """The explicit gradient formulas of the reference (SPEC §11, triangle's
    Jacobian included) equal torch autograd through the reference forward."""
    s, w, mask, x, bias, up = _inputs(case)
    geom = _geometry(case["stencil"], case["boundary"])
    if bias is not None and bias.dim() == 1:
        bias = bias.view(-1, 1, 1, 1).expand(-1, *s.shape[2:]).contiguous()
    leaves = [t.clone().requires_grad_() for t in (s, w)]
    out, _ = R.mixing_propagate_forward(leaves[0], leaves[1], mask, x, bias, geom, case["leak"],
                                        case["activation"], False)
    auto = torch.autograd.grad(out, leaves, up)
    _, u = R.mixing_propagate_forward(s, w, mask, x, bias, geom, case["leak"], case["activation"], True)
    ds, dw, _ = R.mixing_propagate_backward(up, s, w, mask, u, geom, case["leak"], case["activation"],
                                            True, True, True)
    torch.testing.assert_close(ds, auto[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dw, auto[1], rtol=1e-10, atol=1e-10)


def _reference_a_by_loops(s, w, mask, geom):
    """``a[b,o,i] = Σ_k m[k,i]·Σ_c W[k,o,c,i]·s[b,c,nbr(i,k)]`` written cell by cell (SPEC §11)."""
    B, C_in, D, H, W = s.shape
    a = torch.zeros(B, w.shape[1], D, H, W, dtype=s.dtype)
    for z in range(D):
        for y in range(H):
            for x in range(W):
                for k, (dz, dy, dx) in enumerate(geom.offsets):
                    pos = []
                    for p, d, n, per in zip((z, y, x), (dz, dy, dx), (D, H, W), geom.periodic):
                        q = p + d
                        if per:
                            q %= n
                        elif not 0 <= q < n:
                            break
                        pos.append(q)
                    if len(pos) < 3 or (mask is not None and not mask[k, z, y, x]):
                        continue
                    a[:, :, z, y, x] += s[:, :, pos[0], pos[1], pos[2]] @ w[k, :, :, z, y, x].T
    return a


def test_reference_forward_is_the_formula():
    """The reference's mixing aggregate equals the SPEC sum written cell by cell."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 3, 2, 4, dtype=torch.float64, generator=g)
    w = torch.randn(6, 2, 3, 3, 2, 4, dtype=torch.float64, generator=g)
    mask = torch.rand(6, 3, 2, 4, generator=g) < 0.7
    for boundary in ("periodic", ("zero", "periodic", "zero")):
        geom = _geometry("von_neumann", boundary)
        torch.testing.assert_close(R.mixing_aggregate_forward(s, w, mask, geom), _reference_a_by_loops(s, w, mask, geom))


GRADCHECK_BACKENDS = ["reference"] + [b for b in ("cpu",) if getattr(backends._load(b), "MIXING", False)]


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_mixing_propagate(backend, activation):
    g = torch.Generator().manual_seed(5)
    D, H, W, B, C = 2, 3, 2, 2, 2
    s = torch.randn(B, C, D, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    w = (torch.randn(6, C, C, D, H, W, dtype=torch.float64, generator=g) * 0.3).requires_grad_()
    x = torch.randn(1, C, D, H, W, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(C, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.rand(6, D, H, W, generator=g) < 0.8
    if activation in ("relu", "triangle"):  # keep pre-activations away from the kinks
        x = (x * 3 + torch.arange(C, dtype=torch.float64).view(1, C, 1, 1, 1) * 2).detach().requires_grad_()

    def f(s, w, x, bias):
        return ck.ops.propagate(s, w, mask, x, bias, leak=0.6, activation=activation, stencil="von_neumann",
                                boundary=("zero", "periodic", "zero"), backend=backend)

    assert torch.autograd.gradcheck(f, (s, w, x, bias), fast_mode=backend == "reference")


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
def test_gradcheck_mixing_aggregate_and_steps(backend):
    g = torch.Generator().manual_seed(6)
    s = torch.randn(2, 2, 1, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(6, 3, 2, 1, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda s, w: ck.ops.aggregate(s, w, stencil="von_neumann", boundary="zero", backend=backend), (s, w),
        fast_mode=backend == "reference")
    w2 = (torch.randn(6, 2, 2, 1, 2, 3, dtype=torch.float64, generator=g) * 0.3).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, w: ck.ops.propagate_steps(s, w, 3, checkpoint_every=2, leak=0.5, stencil="von_neumann",
                                            backend=backend), (s, w2), fast_mode=backend == "reference")


ALL = [pytest.param("reference", "cpu", id="reference-cpu")] + backend_params()


CHECKPOINT_CASES = ([pytest.param("reference", "cpu", k, id=f"reference-cpu-k{k}") for k in (1, 2, 3)]
                    + [pytest.param(*p.values, 2, id=f"{p.id}-k2", marks=p.marks) for p in backend_params()])


@pytest.mark.parametrize("backend,device,k", CHECKPOINT_CASES)
def test_mixing_checkpointing_gives_the_same_gradients(backend, device, k):
    _mixing_backend(backend)
    if interpreted(backend, device):
        pytest.skip("checkpointing lives in cellkern.ops, the same for every backend; interpreted Triton is slow")
    g = torch.Generator().manual_seed(7)
    s0 = torch.randn(2, 2, 3, 2, 4, generator=g)
    w0 = torch.randn(6, 2, 2, 3, 2, 4, generator=g) * 0.3
    x = torch.randn(2, 2, 3, 2, 4, generator=g)

    def run(every):
        s, w = s0.to(device).requires_grad_(), w0.to(device).requires_grad_()
        out = ck.ops.propagate_steps(s, w, 3, x=x.to(device), leak=0.3, activation="triangle",
                                     checkpoint_every=every, stencil="von_neumann", backend=backend)
        out.square().sum().backward()
        return out.detach(), s.grad, w.grad

    for a, b in zip(run(k), run(None)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", ALL)
def test_shared_form_is_the_diagonal_mixing_form(backend, device):
    """``W[k,o,c,i] = δ_oc·w[k,i]`` on the backend gives the shared form's results
    (the shared reference); the shared ``dw`` is the diagonal of ``dW`` summed over ``o``."""
    _mixing_backend(backend)
    g = torch.Generator().manual_seed(8)
    C, dims = 3, (3, 4, 2)
    s = torch.randn(2, C, *dims, generator=g, dtype=torch.float64)
    w = torch.rand(18, *dims, generator=g, dtype=torch.float64) * 0.2
    mask = torch.rand(18, *dims, generator=g) < 0.7
    x = torch.randn(2, C, *dims, generator=g, dtype=torch.float64)
    up = torch.randn(2, C, *dims, generator=g, dtype=torch.float64)
    dtype = torch.float32 if interpreted(backend, device) else torch.float64
    W = torch.einsum("oc,kdhw->kocdhw", torch.eye(C, dtype=torch.float64), w)
    for op in ("aggregate", "propagate"):
        res = []
        for form, be, dev, dt in (("shared", "reference", "cpu", torch.float64), ("mixing", backend, device, dtype)):
            s_ = s.to(dev, dt).detach().clone().requires_grad_()
            w_ = (w if form == "shared" else W).to(dev, dt).detach().clone().requires_grad_()
            kw = dict(stencil="moore18", boundary=("zero", "periodic", "zero"), backend=be)
            out = (ck.ops.aggregate(s_, w_, mask.to(dev), **kw) if op == "aggregate" else
                   ck.ops.propagate(s_, w_, mask.to(dev), x.to(dev, dt), leak=0.7, activation="sigmoid", **kw))
            out.backward(up.to(dev, dt))
            dw = w_.grad if form == "shared" else torch.einsum("kccdhw->kdhw", w_.grad)
            res.append([t.detach().double().cpu() for t in (out, s_.grad, dw)])
        for a, b in zip(*res):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", ALL)
def test_triangle_in_the_shared_form(backend, device):
    """The shared form's triangle (kernel identity + torch epilogue) equals the
    reference's native triangle, forward and gradients."""
    if interpreted(backend, device):
        pytest.skip("the epilogue is the same torch code on every backend; the shared-form Triton kernels are "
                    "slow when interpreted (test_propagate runs them)")
    g = torch.Generator().manual_seed(9)
    dims, C = (3, 2, 5), 3
    s = torch.randn(2, C, *dims, generator=g, dtype=torch.float64)
    w = torch.rand(26, *dims, generator=g, dtype=torch.float64) * 0.3
    bias = torch.randn(C, *dims, generator=g, dtype=torch.float64)
    up = torch.randn(2, C, *dims, generator=g, dtype=torch.float64)
    geom = _geometry("moore", "zero")
    s_r, w_r = s.clone().requires_grad_(), w.clone().requires_grad_()
    want, _ = R.propagate_forward(s_r, w_r, None, None, bias, geom, 0.4, "triangle", False)
    want.backward(up)
    dtype = torch.float32 if interpreted(backend, device) else torch.float64
    s_, w_ = s.to(device, dtype).requires_grad_(), w.to(device, dtype).requires_grad_()
    got = ck.ops.propagate(s_, w_, bias=bias.to(device, dtype), leak=0.4, activation="triangle", boundary="zero",
                           backend=backend)
    got.backward(up.to(device, dtype))
    for a, b in ((got, want), (s_.grad, s_r.grad), (w_.grad, w_r.grad)):
        torch.testing.assert_close(a.detach().double().cpu(), b.detach(), rtol=1e-5, atol=1e-5)
    assert (want >= (1 - 0.4) * s - 1e-12).all()  # relu: φ ≥ 0, and it is not the identity
    assert not torch.allclose(want, R.propagate_forward(s, w, None, None, bias, geom, 0.4, "identity", False)[0])


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(10)
    s = torch.randn(3, 2, 4, 5, 2, generator=g).transpose(2, 4)  # (3, 2, 2, 5, 4), not contiguous
    w = torch.randn(2, 3, 26, 2, 5, 4, generator=g).permute(2, 0, 1, 3, 4, 5)  # (26, 2, 3, ...)
    w = w.transpose(1, 2)  # (26, 3, 2, 2, 5, 4)
    assert not s.is_contiguous() and not w.is_contiguous()
    want = R.mixing_aggregate_forward(s.contiguous(), w.contiguous(), None, _geometry("moore", "periodic"))
    torch.testing.assert_close(ck.ops.aggregate(s, w), want)


def test_no_mixing_backend_falls_back_or_says_so(no_backend_env):
    """A backend module without ``MIXING``: chosen automatically, the next one
    with mixing kernels runs (the reference here); forced, a clear error."""
    no_backend_env.setitem(backends._modules, "cpu", types.SimpleNamespace(__name__="no_mixing"))
    s = torch.randn(1, 2, 3, 3, 3)
    w = torch.randn(26, 4, 2, 3, 3, 3)
    want = R.mixing_aggregate_forward(s, w, None, _geometry("moore", "periodic"))
    torch.testing.assert_close(ck.ops.aggregate(s, w), want)
    with pytest.raises(ValueError, match=r"aggregate: backend 'cpu' has no mixing-form kernels .*backends with them "
                                         r"for cpu tensors here: reference"):
        ck.ops.aggregate(s, w, backend="cpu")
    no_backend_env.setenv("CELLKERN_BACKEND", "cpu")
    with pytest.raises(ValueError, match="propagate: backend 'cpu' has no mixing-form kernels"):
        ck.ops.propagate(s, w[:, :2])


def test_errors_name_the_op_argument_expected_and_received():
    s = torch.randn(2, 3, 4, 5, 6)
    w = torch.randn(26, 2, 3, 4, 5, 6)
    with pytest.raises(ValueError, match=r"aggregate: w must have shape \(K, D, H, W\) = \(26, 4, 5, 6\), got "
                                         r"\(26, 3, 4, 5, 6\) \(5 dims; the mixing form is \(K, C_out, C_in, D, H, W\)"):
        ck.ops.aggregate(s, w[:, 0])
    with pytest.raises(ValueError, match=r"aggregate: w must have shape \(K, C_out, C_in, D, H, W\) = "
                                         r"\(26, C_out, 2, 4, 5, 6\), got \(26, 2, 3, 4, 5, 6\) \(C_in = 3 must equal "
                                         r"the channels of s, 2\)"):
        ck.ops.aggregate(s[:, :2], w)
    with pytest.raises(ValueError, match=r"propagate: w must have shape .* = \(26, 3, 3, 4, 5, 6\), got "
                                         r"\(26, 2, 3, 4, 5, 6\) \(propagate needs C_out = C_in = 3, got C_out = 2\)"):
        ck.ops.propagate(s, w)
    with pytest.raises(ValueError, match=r"propagate_steps: w must have shape .* got \(6, 3, 3, 4, 5, 6\)"):
        ck.ops.propagate_steps(s, torch.randn(6, 3, 3, 4, 5, 6), 2)
    with pytest.raises(ValueError, match=r"aggregate: w must have shape .*= \(6, C_out, 3, 4, 5, 6\), got \(26, "):
        ck.ops.aggregate(s, w, stencil="von_neumann")
    with pytest.raises(ValueError, match=r"aggregate: mask must have shape \(K, D, H, W\) = \(26, 4, 5, 6\)"):
        ck.ops.aggregate(s, w, torch.ones(26, 2, 4, 5, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="aggregate: the ELL form .* is shared-form only"):
        ck.ops.aggregate(s, w, torch.zeros(20, 4, 5, 6, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"aggregate: w must have the dtype of s \(torch.float32\), got torch.float64"):
        ck.ops.aggregate(s, w.double())
    with pytest.raises(ValueError, match=r"propagate: bias must have shape \(C,\) = \(3,\)"):
        ck.ops.propagate(s, torch.randn(26, 3, 3, 4, 5, 6), bias=torch.randn(2))
    with pytest.raises(ValueError, match="propagate: activation 'triangle' needs at least 2 channels per cell"):
        ck.ops.propagate(s[:, :1], torch.randn(26, 1, 1, 4, 5, 6), activation="triangle")
    with pytest.raises(ValueError, match="propagate: activation 'triangle' needs at least 2 channels per cell"):
        ck.ops.propagate(s[:, :1], torch.rand(26, 4, 5, 6), activation="triangle")


def test_triangle_in_the_ell_form_is_the_dense_masked_form():
    g = torch.Generator().manual_seed(11)
    dims = (3, 3, 2)
    s = torch.randn(2, 3, *dims, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(26, *dims, generator=g, dtype=torch.float64) * 0.3
    mask = torch.rand(26, *dims, generator=g) < 0.5
    w_ell, idx = sparse.to_ell(w, mask)
    ell = dict(w=w_ell, mask=idx)
    dense = ck.ops.propagate(s, w, mask, leak=0.5, activation="triangle", backend="reference")
    from_ell = ck.ops.propagate(s, ell["w"], ell["mask"], leak=0.5, activation="triangle", backend="reference")
    torch.testing.assert_close(from_ell, dense)
    (gd,) = torch.autograd.grad(dense.sum(), s)
    (gs,) = torch.autograd.grad(from_ell.sum(), s)
    torch.testing.assert_close(gs, gd)
