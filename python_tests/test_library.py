"""The cellkern:: custom ops: opcheck (schema, fake, autograd registration, AOT dispatch)
and torch.compile(fullgraph=True) of models that use the ops, against eager."""
import pytest
import torch

import cellkern as ck
from cellkern.contract import params_args
from cellkern.ops import library

from conftest import backend_params, interpreted

BOUNDARY = ("zero", "periodic", "periodic")


def _geom(stencil="moore"):
    return ck.Geometry(ck.stencil(stencil), ck.parse_boundary(BOUNDARY))


def _args(backend, device, dtype=torch.float64, dims=(4, 3, 5), bc=(2, 2), mask=True):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*bc, *dims, generator=g, dtype=dtype).to(device).requires_grad_()
    w = (torch.rand(26, *dims, generator=g, dtype=dtype) * 0.2).to(device).requires_grad_()
    m = (torch.rand(26, *dims, generator=g) > 0.3).to(device) if mask else None
    return s, w, m


OPCHECK_BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu")] + backend_params()


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck_aggregate(backend, device):
    dtype = torch.float32 if interpreted(backend, device) else torch.float64
    s, w, m = _args(backend, device, dtype)
    for mask in (m, None):
        torch.library.opcheck(library.aggregate_op, (s, w, mask, *_geom().op_args, backend))
        g = torch.randn_like(s)
        torch.library.opcheck(library.aggregate_backward_op, (g, s.detach(), w.detach(), mask, *_geom().op_args, backend,
                                                        True, True))


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
@pytest.mark.parametrize("save_u", [True, False])
def test_opcheck_propagate(backend, device, save_u):
    dtype = torch.float32 if interpreted(backend, device) else torch.float64
    s, w, m = _args(backend, device, dtype)
    x = torch.randn_like(s).requires_grad_()
    bias = torch.randn(2, *s.shape[2:], dtype=dtype, device=device).requires_grad_()
    args = (s, w, m, x, bias, *_geom().op_args, 0.3, "tanh", backend, save_u)
    if save_u:
        torch.library.opcheck(library.propagate_op, args)
    else:  # without u the op has no backward: check everything but the autograd tests
        torch.library.opcheck(library.propagate_op, args, test_utils=("test_schema", "test_faketensor"))
    u = library.propagate_op(*args[:-1], True)[1].detach()
    g = torch.randn_like(s)
    torch.library.opcheck(library.propagate_backward_op, (g, s.detach(), w.detach(), m, u, *_geom().op_args, 0.3, "tanh",
                                                    backend, True, True, True))


def _model(s, w, x, bias):
    a = ck.ops.propagate(s, w, x=x, bias=bias, leak=0.3, activation="sigmoid", boundary=BOUNDARY)
    b = ck.ops.propagate_steps(a, w, 2, leak=0.5, stencil="moore", boundary=BOUNDARY)
    return ck.ops.aggregate(b, w, boundary=BOUNDARY).square().mean()


def _grads(fn, *ts):
    for t in ts:
        t.grad = None
    out = fn(*ts)
    out.backward()
    return out.detach(), [t.grad.clone() for t in ts]


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    s, w, _ = _args("cpu", "cpu", torch.float32, mask=False)
    x = torch.randn_like(s).requires_grad_()
    bias = torch.randn(2, requires_grad=True)
    want, want_g = _grads(_model, s, w, x, bias)
    got, got_g = _grads(torch.compile(_model, fullgraph=True), s, w, x, bias)  # raises on any graph break
    torch.testing.assert_close(got, want)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)


def test_compile_counts_one_graph_and_no_break():
    torch._dynamo.reset()
    s, w, _ = _args("cpu", "cpu", torch.float32, mask=False)
    x = torch.randn_like(s)
    explanation = torch._dynamo.explain(_model)(s, w, x, None)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    ops = {str(n.target) for gm in explanation.graphs for n in gm.graph.nodes if n.op == "call_function"}
    assert {"cellkern.propagate.default", "cellkern.aggregate.default"} <= ops


def test_compiled_layer_matches_eager():
    torch._dynamo.reset()
    layer = ck.nn.Lattice3d((4, 3, 5), channels=2, steps=3, rule=None, bias=True)
    s, _, _ = _args("cpu", "cpu", torch.float32, mask=False)
    want = layer(s.detach())
    got = torch.compile(layer, fullgraph=True)(s.detach())
    torch.testing.assert_close(got, want)


def test_backward_without_saved_u_is_an_error():
    s, w, _ = _args("reference", "cpu", torch.float64, mask=False)
    out, _ = library.propagate_op(s, w, None, None, None, *_geom().op_args, 0.3, "tanh", "reference", False)
    with pytest.raises(RuntimeError, match="needs the forward to run with save_u=True"):
        out.sum().backward()


@pytest.mark.parametrize("backend,device", OPCHECK_BACKENDS)
def test_opcheck_plasticity_ops(backend, device):
    dtype = torch.float32 if interpreted(backend, device) else torch.float64
    g = torch.Generator().manual_seed(2)
    dims, B = (4, 3, 5), 2
    w = (torch.rand(26, *dims, generator=g, dtype=dtype) + 0.5).to(device)
    m = (torch.rand(26, *dims, generator=g) > 0.3).to(device)
    y = torch.rand(B, *dims, generator=g, dtype=dtype).to(device)
    st = ck.PlasticityState.create(dims, B, dtype=dtype, device=device)
    st.x_pre.uniform_()
    p = ck.PlasticityRule(w_min=0.0, w_max=2.0).params(activity_threshold=0.3)
    geo = _geom().op_args
    torch.library.opcheck(library.plasticity_op, (w, m, *geo, *params_args(p), y, None, st.x_pre, st.x_post, st.theta,
                                            None, None, backend))
    target = torch.rand(dims, generator=g, dtype=dtype).to(device) + 1
    torch.library.opcheck(library.normalize_op, (w, m, *geo, target, None, backend))
    torch.library.opcheck(library.lateral_inhibition_op, (y, 0.5, *geo, backend))
    torch.library.opcheck(library.local_winners_op, (y, 0.3, *geo, backend))


def test_plasticity_op_mutates_what_it_declares():
    dims = (4, 3, 5)
    w = torch.rand(26, *dims) + 0.5
    st = ck.PlasticityState.create(dims, 2)
    y = torch.rand(2, *dims)
    before = [t.clone() for t in (w, st.x_pre, st.theta)]
    p = ck.PlasticityRule(stdp=ck.STDP(lr=1.0), bcm=ck.BCM(lr=1.0), w_min=0.0, w_max=2.0).params()
    library.plasticity_op(w, None, *_geom().op_args, *params_args(p), y, None, st.x_pre, st.x_post, st.theta, None, None,
                    "reference")
    assert all(not torch.equal(a, b) for a, b in zip(before, (w, st.x_pre, st.theta)))
    assert [n.name for n in library.plasticity_op._opoverload._schema.arguments if n.alias_info and n.alias_info.is_write] \
        == ["w", "x_pre", "x_post", "theta"]


def test_eager_calls_skip_the_custom_op_layer_only_where_it_changes_nothing():
    """No-grad eager calls on plain tensors run the backend kernel itself (issue 19's per-call cost);
    the same values as the custom op; fake tensors and traced calls still go through the custom op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    g = torch.Generator().manual_seed(3)
    s, w = torch.randn(2, 3, 4, 5, 6, generator=g), 0.1 * torch.rand(26, 4, 5, 6, generator=g)
    with torch.no_grad():
        direct = ck.ops.propagate(s, w, boundary=BOUNDARY)
        via_op = library.propagate_op(s, w, None, None, None, *_geom().op_args, 1.0, "tanh",
                                      ck.backends.select(None, s.device, "t")[0], False)[0]
    torch.testing.assert_close(direct, via_op, rtol=0, atol=0)
    assert library.eager_direct(s, w, None)
    with FakeTensorMode() as mode:
        fs, fw = mode.from_tensor(s), mode.from_tensor(w)
        assert not library.eager_direct(fs, fw)
        out = ck.ops.propagate(fs, fw, boundary=BOUNDARY)
    assert tuple(out.shape) == tuple(s.shape)
