"""The mixing form's ``cellkern::`` custom ops (opcheck: schema, fake,
autograd registration, AOT dispatch) on every backend with mixing kernels,
``torch.compile(fullgraph=True)`` of models that use them (no graph break,
equal to eager), and the modules: ``LocallyConnected3d`` and
``Lattice3d(mixing=True)`` against the ops, ``state_dict``/``.to`` round trips,
errors."""
import pytest
import torch

import cellkern as ck
from cellkern import backends
from cellkern.ops import library

from conftest import backend_params, interpreted

#: dynamo + AOT autograd over the ops' fake implementations, without inductor's
#: C++ code generation for the surrounding torch ops (test_library.py runs inductor)
COMPILE_BACKEND = "aot_eager"
GEOM = ck.Geometry(ck.stencil("von_neumann"), ck.parse_boundary(("zero", "periodic", "periodic")))
OPCHECK_BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu")] + backend_params()


def _mixing_backend(backend):
    if not getattr(backends._load(backend), "MIXING", False):
        pytest.skip(f"backend {backend!r} has no mixing-form kernels on this build")


def _args(device, dtype, C_in=2, C_out=2, dims=(2, 3, 3)):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, C_in, *dims, generator=g, dtype=dtype).to(device).requires_grad_()
    w = (torch.randn(6, C_out, C_in, *dims, generator=g, dtype=dtype) * 0.3).to(device).requires_grad_()
    m = (torch.rand(6, *dims, generator=g) > 0.3).to(device)
    return s, w, m


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck_mixing_aggregate(backend, device):
    _mixing_backend(backend)
    dtype = torch.float32 if interpreted(backend, device) else torch.float64
    s, w, m = _args(device, dtype, C_in=2, C_out=3)
    torch.library.opcheck(library.mixing_aggregate_op, (s, w, m, *GEOM.op_args, backend))
    g = torch.randn(2, 3, *s.shape[2:], dtype=dtype, device=device)
    torch.library.opcheck(library.mixing_aggregate_backward_op, (g, s.detach(), w.detach(), None, *GEOM.op_args, backend,
                                                           True, True))


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck_mixing_propagate(backend, device):
    _mixing_backend(backend)
    dtype = torch.float32 if interpreted(backend, device) else torch.float64
    s, w, m = _args(device, dtype)
    x = torch.randn_like(s).requires_grad_()
    bias = torch.randn(2, *s.shape[2:], dtype=dtype, device=device).requires_grad_()
    args = (s, w, m, x, bias, *GEOM.op_args, 0.3, "triangle", backend, True)
    torch.library.opcheck(library.mixing_propagate_op, args)
    torch.library.opcheck(library.mixing_propagate_op, args[:-1] + (False,), test_utils=("test_schema", "test_faketensor"))
    u = library.mixing_propagate_op(*args)[1].detach()
    torch.library.opcheck(library.mixing_propagate_backward_op, (torch.randn_like(s), s.detach(), w.detach(), m, u,
                                                           *GEOM.op_args, 0.3, "triangle", backend, True, True, True))


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck_competitive_hebbian(backend, device):
    _mixing_backend(backend)
    dtype = torch.float32 if interpreted(backend, device) else torch.float64
    s, w, m = _args(device, dtype, C_in=2, C_out=3)
    beta = torch.zeros(3, *s.shape[2:], device=device)
    torch.library.opcheck(library.competitive_hebbian_op, (w.detach(), s.detach().abs(), beta, m, *GEOM.op_args, 0.1, 0.2,
                                                     0.05, True, backend))


def test_hebbian_op_mutates_what_it_declares():
    s, w, _ = _args("cpu", torch.float32)
    w, beta = w.detach(), torch.zeros(2, *s.shape[2:])
    before = (w.clone(), beta.clone())
    library.competitive_hebbian_op(w, s.detach(), beta, None, *GEOM.op_args, 0.5, 0.2, 0.5, True, "reference")
    assert not torch.equal(w, before[0]) and not torch.equal(beta, before[1])
    schema = library.competitive_hebbian_op._opoverload._schema
    assert [a.name for a in schema.arguments if a.alias_info and a.alias_info.is_write] == ["w", "beta"]


def _model(s, w, w_lc, x):
    a = ck.ops.propagate(s, w, x=x, leak=0.3, activation="triangle", stencil="von_neumann")
    b = ck.ops.propagate_steps(a, w, 2, leak=0.5, activation="tanh", stencil="von_neumann")
    return ck.ops.aggregate(b, w_lc, stencil="von_neumann", boundary="zero").square().mean()


def test_compile_fullgraph_matches_eager_with_no_graph_break():
    torch._dynamo.reset()
    s, w, _ = _args("cpu", torch.float32)
    w_lc = torch.randn(6, 3, 2, *s.shape[2:], requires_grad=True)
    x = torch.randn_like(s)
    explanation = torch._dynamo.explain(_model)(s, w, w_lc, x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    ops = {str(n.target) for gm in explanation.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {"cellkern.mixing_propagate.default", "cellkern.mixing_aggregate.default"} <= ops
    torch._dynamo.reset()
    results = []
    for fn in (_model, torch.compile(_model, fullgraph=True, backend=COMPILE_BACKEND)):
        for t in (s, w, w_lc):
            t.grad = None
        out = fn(s, w, w_lc, x)
        out.backward()
        results.append([out.detach()] + [t.grad.clone() for t in (s, w, w_lc)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_compiled_modules_match_eager():
    torch._dynamo.reset()
    lc = ck.nn.LocallyConnected3d(2, 3, (3, 2, 4), stencil="von_neumann")
    lat = ck.nn.Lattice3d((3, 2, 4), channels=3, steps=2, mixing=True, activation="triangle", rule=None,
                          stencil="von_neumann", bias=True)
    model = torch.nn.Sequential(lc, lat)
    x = torch.randn(2, 2, 3, 2, 4)
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)(x), model(x))


def test_locally_connected_is_aggregate_plus_bias():
    layer = ck.nn.LocallyConnected3d(2, 5, (3, 4, 2), stencil="moore18", boundary="zero")
    assert tuple(layer.weight.shape) == (18, 5, 2, 3, 4, 2) and tuple(layer.bias.shape) == (5, 3, 4, 2)
    bound = 1 / (18 * 2) ** 0.5
    assert layer.weight.abs().max() <= bound and layer.weight.std() > bound / 3
    x = torch.randn(4, 2, 3, 4, 2, requires_grad=True)
    y = layer(x)
    want = ck.ops.aggregate(x, layer.weight, stencil="moore18", boundary="zero", backend="reference") + layer.bias
    torch.testing.assert_close(y, want)
    y.square().sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None and x.grad is not None
    no_bias = ck.nn.LocallyConnected3d(2, 1, (3, 4, 2), bias=False)
    assert no_bias.bias is None and no_bias(x).shape == (4, 1, 3, 4, 2)
    mask = torch.rand(26, 3, 4, 2) < 0.5
    masked = ck.nn.LocallyConnected3d(2, 1, (3, 4, 2), mask=mask)
    torch.testing.assert_close(masked(x), ck.ops.aggregate(x, masked.weight, mask, boundary="zero") + masked.bias)


def test_locally_connected_state_dict_and_to_round_trip():
    layer = ck.nn.LocallyConnected3d(2, 3, (2, 3, 4), mask=torch.rand(26, 2, 3, 4) < 0.5)
    fresh = ck.nn.LocallyConnected3d(2, 3, (2, 3, 4), mask=torch.ones(26, 2, 3, 4, dtype=torch.bool))
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(1, 2, 2, 3, 4)
    torch.testing.assert_close(fresh(x), layer(x))
    d = layer.to(torch.float64)
    assert d.weight.dtype == torch.float64 and d.mask.dtype == torch.bool
    torch.testing.assert_close(d(x.double()).float(), fresh(x), rtol=1e-5, atol=1e-6)


def test_mixing_lattice_forward_is_the_ops():
    lat = ck.nn.Lattice3d((3, 2, 4), channels=3, steps=3, mixing=True, leak=0.4, activation="triangle", bias=True,
                          checkpoint_every=2, stencil="moore")
    K = 26
    assert tuple(lat.w.shape) == (K, 3, 3, 3, 2, 4) and tuple(lat.beta.shape) == (3, 3, 2, 4)
    assert abs(lat.w.std().item() - 1 / (K * 3) ** 0.5) < 0.2 / (K * 3) ** 0.5 and abs(lat.w.mean()) < 0.02
    s = torch.randn(2, 3, 3, 2, 4)
    x = torch.randn(2, 3, 3, 2, 4)
    want = ck.ops.propagate_steps(s, lat.w, 3, x=x, bias=lat.bias, leak=0.4, activation="triangle",
                                  backend="reference")
    torch.testing.assert_close(lat(s, x=x), want)


def test_mixing_lattice_plasticity_step_is_the_hebbian_op():
    lat = ck.nn.Lattice3d((3, 2, 4), channels=2, steps=2, mixing=True, stencil="von_neumann",
                          rule=ck.CompetitiveHebbian(eta=0.2, tau=0.5, eta_beta=0.1, average="batch"))
    s = torch.rand(3, 2, 3, 2, 4)
    w0, beta0 = lat.w.detach().clone(), lat.beta.clone()
    before_last = ck.ops.propagate(s, lat.w, leak=lat.leak, activation=lat.activation, stencil="von_neumann").detach()
    lat(s)
    assert lat.plasticity_step(lr_scale=0.5) is lat.w
    ck.ops.competitive_hebbian_step_(w0, before_last, beta0, eta=0.1, tau=0.5, eta_beta=0.1, average="batch",
                                     stencil="von_neumann", backend="reference")
    torch.testing.assert_close(lat.w.detach(), w0)
    torch.testing.assert_close(lat.beta, beta0)
    assert not torch.equal(beta0, torch.zeros_like(beta0))
    w1 = lat.w.detach().clone()
    lat.plasticity_step(s=s)  # an explicit presynaptic state
    ck.ops.competitive_hebbian_step_(w1, s, beta0, eta=0.2, tau=0.5, eta_beta=0.1, average="batch",
                                     stencil="von_neumann", backend="reference")
    torch.testing.assert_close(lat.w.detach(), w1)


def test_mixing_lattice_state_dict_and_to_round_trip():
    lat = ck.nn.Lattice3d((2, 3, 2), channels=2, mixing=True, bias=True, stencil="von_neumann")
    lat.plasticity_step(s=torch.rand(2, 2, 2, 3, 2))
    sd = lat.state_dict()
    assert set(sd) == {"w", "bias", "beta"}
    fresh = ck.nn.Lattice3d((2, 3, 2), channels=2, mixing=True, bias=True, stencil="von_neumann")
    fresh.load_state_dict(sd)
    for k in sd:
        torch.testing.assert_close(fresh.state_dict()[k], sd[k])
    d = fresh.to(torch.float64)  # beta goes along; the step keeps the op's float32 threshold
    assert d.w.dtype == torch.float64
    d.plasticity_step(s=torch.rand(2, 2, 2, 3, 2, dtype=torch.float64))
    assert d.beta.dtype == torch.float64 and torch.isfinite(d.w).all()
    assert "mixing=True" in repr(lat)


def test_module_errors():
    with pytest.raises(TypeError, match="Lattice3d: with mixing=True, rule must be a cellkern.CompetitiveHebbian or "
                                        "None, got PlasticityRule"):
        ck.nn.Lattice3d((2, 2, 2), channels=2, mixing=True, rule=ck.PlasticityRule())
    with pytest.raises(ValueError, match="Lattice3d: init applies to the shared form"):
        ck.nn.Lattice3d((2, 2, 2), channels=2, mixing=True, init=(0.0, 0.1))
    with pytest.raises(ValueError, match=r"Lattice3d: activation 'triangle' needs channels >= 2 \(it subtracts their mean\), got 1"):
        ck.nn.Lattice3d((2, 2, 2), activation="triangle")
    lat = ck.nn.Lattice3d((2, 2, 2), channels=2, mixing=True)
    with pytest.raises(RuntimeError, match="Lattice3d.plasticity_step: no forward has run yet; pass s"):
        lat.plasticity_step()
    with pytest.raises(ValueError, match="Lattice3d.plasticity_step: y belongs to the shared form's rules"):
        lat.plasticity_step(torch.rand(1, 2, 2, 2))
    with pytest.raises(RuntimeError, match="Lattice3d.state: a mixing lattice has no traces"):
        _ = lat.state
    with pytest.raises(ValueError, match=r"LocallyConnected3d: mask must be a bool tensor of shape \(26, 2, 2, 2\)"):
        ck.nn.LocallyConnected3d(1, 2, (2, 2, 2), mask=torch.ones(6, 2, 2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="LocallyConnected3d: out_channels must be a positive int, got float 2.0"):
        ck.nn.LocallyConnected3d(1, 2.0, (2, 2, 2))
    with pytest.raises(ValueError, match=r"aggregate: w must have shape .*\(C_in = 3 must equal the channels of s, 2\)"):
        ck.nn.LocallyConnected3d(3, 2, (2, 2, 2))(torch.randn(1, 2, 2, 2, 2))
