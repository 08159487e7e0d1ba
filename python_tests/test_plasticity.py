"""Plasticity ops (SPEC §4): every backend against the reference for every
rule on a matrix of dims (odd, prime, 1-thick), stencils, boundaries (uniform
and per axis), masks, batch sizes and weight dtypes, after one and after
several steps. Analytic cases, the fused step against the sequence and the
invariants are in test_plasticity_rules.py."""
import random
import zlib

import pytest
import torch

import cellkern as ck

from conftest import (LOW_PRECISION, assert_matches_reference, backend_params, interpreted, skip_unsupported_dtype)

STENCILS = ["von_neumann", "moore18", "moore", "radius(2)"]
BOUNDARIES = ["periodic", "zero", ("zero", "periodic", "periodic"), ("periodic", "zero", "periodic"),
              ("periodic", "periodic", "zero"), ("zero", "zero", "periodic")]
DIMS = [(1, 5, 7), (3, 4, 5), (2, 3, 9), (5, 4, 3), (4, 4, 4), (3, 11, 2)]  # all ≤ 66 cells (interpreted Triton)
W_DTYPES = [torch.float32, torch.bfloat16, torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float16]

W_MIN, W_MAX = 0.1, 1.0
THRESHOLD, BETA = 0.35, 0.4
STDP_KW = dict(a_plus=0.3, a_minus=0.25, tau_plus=5.0, tau_minus=8.0)
STDP_LR = 0.5
BCM_KW = dict(lr=0.5, tau_theta=5.0, theta_min=0.02, theta_max=0.8)


def _bid(boundary):
    return boundary if isinstance(boundary, str) else "".join(b[0] for b in boundary)


def _cases(op, n, seed):
    rng = random.Random(seed)
    combos = [(s, b, c, nrm, lr) for s, b in [(True, False), (False, True), (True, True)]
              for c in (False, True) for nrm in (False, True) for lr in ("float", "tensor")]
    out = []
    for i in range(n):
        c = dict(op=op, dims=DIMS[i % len(DIMS)], B=rng.choice([1, 2, 3]), stencil=STENCILS[i % len(STENCILS)],
                 boundary=BOUNDARIES[rng.randrange(len(BOUNDARIES))], mask=rng.random() < 0.5,
                 dtype=W_DTYPES[i % len(W_DTYPES)], steps=(1, 3)[i % 2],
                 gate=rng.choice([None, None, "bool", "float"]), dep=rng.choice(["additive", "multiplicative"]),
                 dt=rng.choice([1.0, 0.5]), decay=rng.choice([0.0, 0.05]), zbool=rng.random() < 0.5)
        if op == "plasticity_step_":
            c["stdp"], c["bcm"], c["competition"], c["normalize"], c["lr"] = combos[i % len(combos)]
        if op == "heterosynaptic_normalize_":
            c["where"] = rng.random() < 0.6
        out.append(c)
    return out


def _id(c):
    d = str(c["dtype"]).replace("torch.", "")
    s = (f"{'x'.join(map(str, c['dims']))}-B{c['B']}-{c['stencil']}-{_bid(c['boundary'])}-{d}-s{c['steps']}"
         f"{'-m' if c['mask'] else ''}{'-g' + c['gate'] if c['gate'] else ''}")
    if c["op"] == "stdp_":
        s += f"-{c['dep'][:4]}-dt{c['dt']}" + ("-zbool" if c["zbool"] else "")
    elif c["op"] == "bcm_":
        s += f"-decay{c['decay']}"
    elif c["op"] == "plasticity_step_":
        rules = "+".join(n for n, on in (("stdp", c["stdp"]), ("bcm", c["bcm"]), ("wta", c["competition"])) if on)
        s += f"-{rules}{'-norm' if c['normalize'] else ''}-lr{c['lr']}"
        s += f"-{c['dep'][:4]}" if c["stdp"] else ""
        s += f"-decay{c['decay']}" if c["bcm"] else ""
    else:
        s += "-where" if c["where"] else ""
    return s


def _inputs(c):
    """fp64 master inputs: weights mostly inside the bounds, 10% next to a
    bound (so the clamp binds), activity with some cells above θ_act."""
    D, H, W = c["dims"]
    B, K, steps = c["B"], ck.stencil(c["stencil"]).K, c["steps"]
    g = torch.Generator().manual_seed(zlib.crc32(_id(c).encode()))
    w = W_MIN + 0.05 + (W_MAX - W_MIN - 0.1) * torch.rand(K, D, H, W, generator=g, dtype=torch.float64)
    edge = torch.rand(K, D, H, W, generator=g) < 0.1
    near = torch.where(torch.rand(K, D, H, W, generator=g) < 0.5, W_MIN + 0.002, W_MAX - 0.002).double()
    w = torch.where(edge, near, w)
    if c["op"] == "heterosynaptic_normalize_":
        w = w * torch.where(torch.rand(K, D, H, W, generator=g) < 0.2, -1.0, 1.0).double()  # Σ|w|, not Σw
    inp = dict(
        w=w,
        mask=torch.rand(K, D, H, W, generator=g) < 0.7 if c["mask"] else None,
        y=[torch.rand(B, D, H, W, generator=g, dtype=torch.float64) for _ in range(steps)],
        x_pre=1.5 * torch.rand(B, D, H, W, generator=g, dtype=torch.float64),
        x_post=1.5 * torch.rand(B, D, H, W, generator=g, dtype=torch.float64),
        theta=0.05 + 0.45 * torch.rand(D, H, W, generator=g, dtype=torch.float64),
        lr=0.5 + torch.rand(D, H, W, generator=g, dtype=torch.float64),
        target=0.5 + 3 * torch.rand(D, H, W, generator=g, dtype=torch.float64),
        where=torch.rand(D, H, W, generator=g) < 0.6,
        gate=None,
    )
    if c["gate"] == "bool":
        inp["gate"] = torch.rand(B, D, H, W, generator=g) < 0.7
    elif c["gate"] == "float":
        inp["gate"] = torch.rand(B, D, H, W, generator=g, dtype=torch.float64) * (
            torch.rand(B, D, H, W, generator=g) < 0.7)
    return inp


def _state_dtype(w_dtype):
    return torch.float64 if w_dtype == torch.float64 else torch.float32


def _rounded(inp, w_dtype):
    """The inputs exactly as a run in ``w_dtype`` sees them, held in fp64."""
    sd = _state_dtype(w_dtype)
    out = {k: (v if v is None or v.dtype == torch.bool else v.to(sd).double()) for k, v in inp.items() if k != "y"}
    out["w"] = inp["w"].to(w_dtype).double()
    out["y"] = [y.to(sd).double() for y in inp["y"]]
    return out


def _rule(c):
    return ck.PlasticityRule(
        stdp=ck.STDP(lr=STDP_LR, weight_dependence=c["dep"], **STDP_KW) if c["stdp"] else None,
        bcm=ck.BCM(decay=c["decay"], **BCM_KW) if c["bcm"] else None,
        competition=ck.Competition(beta=BETA) if c["competition"] else None,
        normalize=c["normalize"], activity_threshold=THRESHOLD, dt=c["dt"], w_min=W_MIN, w_max=W_MAX)


def _run(c, inp, w_dtype, s_dtype, backend, device):
    """Run ``c["steps"]`` calls of the case's op; a snapshot after each."""
    def dev(t, dtype=None):
        if t is None:
            return None
        keep = dtype is None or t.dtype == torch.bool
        return t.to(device=device, dtype=None if keep else dtype, copy=True)

    w = dev(inp["w"], w_dtype)
    x_pre, x_post, theta = dev(inp["x_pre"], s_dtype), dev(inp["x_post"], s_dtype), dev(inp["theta"], s_dtype)
    mask, gate = dev(inp["mask"]), dev(inp["gate"], s_dtype)
    geo = dict(mask=mask, stencil=c["stencil"], boundary=c["boundary"], backend=backend)
    snaps = []
    for t in range(c["steps"]):
        y = dev(inp["y"][t], s_dtype)
        if c["op"] == "stdp_":
            z = y > 0.5
            out = ck.ops.stdp_(w, z if c["zbool"] else z.to(s_dtype), x_pre, x_post, lr=STDP_LR, dt=c["dt"],
                               w_min=W_MIN, w_max=W_MAX, weight_dependence=c["dep"], gate=gate, **STDP_KW, **geo)
        elif c["op"] == "bcm_":
            out = ck.ops.bcm_(w, y, theta, decay=c["decay"], w_min=W_MIN, w_max=W_MAX, gate=gate, **BCM_KW, **geo)
        elif c["op"] == "plasticity_step_":
            state = ck.PlasticityState(x_pre, x_post, theta)
            lr = 0.8 if c["lr"] == "float" else dev(inp["lr"], s_dtype)
            out = ck.ops.plasticity_step_(w, y, state, _rule(c), lr_scale=lr, gate=gate, **geo)
        else:
            where = dev(inp["where"]) if c["where"] else None
            out = ck.ops.heterosynaptic_normalize_(w, dev(inp["target"], s_dtype), where=where, **geo)
        assert out is w, f"{c['op']} must return w itself"
        snaps.append(dict(w=w.clone(), x_pre=x_pre.clone(), x_post=x_post.clone(), theta=theta.clone()))
    return snaps


# moore on rows wider than two warps: the CUDA synapse kernel has paths of its
# own for warps of interior rows, with and without an x edge in them
WIDE = [dict(c, dims=dims, stencil="moore", dep=dep)
        for c, dims, dep in zip(_cases("plasticity_step_", 24, 15)[::6], [(3, 4, 97), (4, 3, 70), (3, 3, 66), (3, 4, 97)],
                                ["multiplicative", "additive", "multiplicative", "multiplicative"])]
MATRIX = (_cases("stdp_", 10, 11) + _cases("bcm_", 6, 12) + _cases("plasticity_step_", 24, 13)
          + _cases("heterosynaptic_normalize_", 4, 14) + WIDE)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("case", MATRIX, ids=lambda c: f"{c['op']}-{_id(c)}")
def test_plasticity_matches_reference(backend, device, case):
    _check_case(backend, device, case)


def _simd_cases():
    """Rows long enough for the cpu kernel's SIMD paths (W = 37: two fp32
    vectors, four fp64 vectors, then single cells): moore with every row
    present (the all-offsets-in-registers sweep) and with rows missing along a
    zero z/y boundary, a non-moore stencil (the looped sweep), each flag of
    the sweep (multiplicative, normalise, masked or zero-x live synapses, B > 1)."""
    rng = random.Random(21)
    out = []
    for i, (stencil, boundary, mask, B, dep, nrm, dtype) in enumerate([
            ("moore", "periodic", False, 1, "additive", True, torch.float32),
            ("moore", "periodic", True, 1, "multiplicative", True, torch.float32),
            ("moore", "periodic", False, 3, "multiplicative", False, torch.float32),
            ("moore", ("periodic", "periodic", "zero"), False, 2, "additive", True, torch.float32),
            ("moore", ("periodic", "periodic", "zero"), True, 1, "additive", False, torch.bfloat16),
            ("moore", ("zero", "periodic", "periodic"), True, 3, "multiplicative", True, torch.float32),
            ("moore", "zero", False, 1, "additive", True, torch.float64),
            ("moore", "periodic", True, 2, "additive", True, torch.float64),
            ("moore", "periodic", False, 1, "additive", True, torch.float16),
            ("moore18", "periodic", True, 2, "multiplicative", True, torch.float32)]):
        out.append(dict(op="plasticity_step_", dims=(3, 4, 37), B=B, stencil=stencil, boundary=boundary, mask=mask,
                        dtype=dtype, steps=2, gate=rng.choice([None, "float"]), dep=dep, dt=1.0, decay=0.05,
                        zbool=False, stdp=True, bcm=True, competition=i % 3 != 2, normalize=nrm,
                        lr=("float", "tensor")[i % 2]))
    return out


@pytest.mark.parametrize("case", _simd_cases(), ids=_id)
def test_cpu_simd_rows_match_reference(case):
    if "cpu" not in ck.available_backends():
        pytest.skip("the cpu backend is not built")
    _check_case("cpu", "cpu", case)


def _check_case(backend, device, case):
    dtype = case["dtype"]
    skip_unsupported_dtype(backend, device, dtype)
    if interpreted(backend, device) and case in WIDE:
        pytest.skip("large lattice: interpreted Triton runs the small ones")
    sd = _state_dtype(dtype)
    inp = _inputs(case)
    if interpreted(backend, device) and case["op"] != "plasticity_step_":
        # interpreted Triton pays per call: the separate ops run the fused kernel with parts
        # switched off, and the fused step's 3-step cases run in full
        case = dict(case, steps=1)
    exact = _run(case, _rounded(inp, dtype), torch.float64, torch.float64, "reference", "cpu")
    same = _run(case, inp, dtype, sd, "reference", "cpu") if dtype in LOW_PRECISION else None
    got = _run(case, inp, dtype, device=device, s_dtype=sd, backend=backend)
    w0 = _rounded(inp, dtype)["w"]
    want_move = (exact[-1]["w"] - w0).abs().max().item()
    assert want_move > 0.02, f"the case is too weak to test anything: reference moves w by {want_move:.3g}"
    got_move = (got[-1]["w"].double().cpu() - w0).abs().max().item()
    assert got_move >= 0.5 * want_move, f"w moved by {got_move:.3g}, the reference by {want_move:.3g}"
    for t in range(case["steps"]):
        for name in exact[t]:
            assert got[t][name].dtype == (dtype if name == "w" else sd)
            assert_matches_reference(got[t][name], exact[t][name], None if same is None else same[t][name],
                                     name=f"{name} after step {t + 1}")


def test_matrix_covers_the_cases():
    ops = {c["op"] for c in MATRIX}
    assert ops == {"stdp_", "bcm_", "plasticity_step_", "heterosynaptic_normalize_"}
    for key in ("stencil", "dims", "B", "dtype", "steps"):
        for op in ops:
            seen = {str(c[key]) for c in MATRIX if c["op"] == op}
            assert len(seen) >= 2, (op, key, seen)
    assert {str(c["stencil"]) for c in MATRIX} == set(STENCILS)
    assert {str(c["dtype"]) for c in MATRIX} == {str(d) for d in set(W_DTYPES)}
    assert len({str(c["boundary"]) for c in MATRIX}) >= 5
    steps = [c for c in MATRIX if c["op"] == "plasticity_step_"]
    assert {(c["stdp"], c["bcm"], c["competition"], c["normalize"], c["lr"]) for c in steps} == {
        (s, b, w, n, lr) for s, b in [(True, False), (False, True), (True, True)]
        for w in (False, True) for n in (False, True) for lr in ("float", "tensor")}
    stdp = [c for c in MATRIX if c["op"] == "stdp_"]
    assert {c["dep"] for c in stdp} == {"additive", "multiplicative"} and {c["gate"] for c in stdp} >= {None, "bool"}
    assert {c["decay"] for c in MATRIX if c["op"] == "bcm_"} == {0.0, 0.05}
    assert any(c["mask"] for c in MATRIX) and any(not c["mask"] for c in MATRIX)
