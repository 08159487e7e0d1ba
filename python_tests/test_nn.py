"""ck.nn.Lattice3d: the layer equals the ops it wraps; state_dict, .to, plasticity, errors."""
import pytest
import torch

import cellkern as ck

DIMS = (4, 5, 6)


def _layer(**kw):
    torch.manual_seed(0)
    return ck.nn.Lattice3d(DIMS, channels=2, **kw)


def _inputs(B=2):
    g = torch.Generator().manual_seed(1)
    return torch.rand(B, 2, *DIMS, generator=g) - 0.5, torch.rand(B, 2, *DIMS, generator=g)


def test_forward_equals_propagate_steps_and_backprop_reaches_w():
    layer = _layer(steps=3, leak=0.3, activation="relu", bias=True)
    with torch.no_grad():
        layer.bias.normal_()
    s, x = _inputs()
    out = layer(s, x)
    want = ck.ops.propagate_steps(s, layer.w, 3, x=x, bias=layer.bias, leak=0.3, activation="relu")
    torch.testing.assert_close(out, want)
    out.square().sum().backward()
    assert layer.w.grad is not None and layer.w.grad.abs().sum() > 0
    assert layer.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("change", [dict(steps=2), dict(leak=0.9), dict(activation="sigmoid"),
                                    dict(stencil="von_neumann"), dict(boundary="zero"), dict(init=(0.5, 0.6))])
def test_every_constructor_argument_changes_the_output(change):
    s, x = _inputs()
    base, other = _layer()(s, x), _layer(**change)(s, x)
    assert not torch.allclose(base, other)


def test_checkpointing_gives_the_same_output_and_gradient():
    s, x = _inputs()
    grads = []
    for k in (None, 2):
        layer = _layer(steps=4, checkpoint_every=k)
        layer(s, x).sum().backward()
        grads.append(layer.w.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_mask_buffer_reaches_the_kernel():
    s, x = _inputs()
    mask = torch.rand(26, *DIMS) > 0.5
    a, b = _layer()(s, x), _layer(mask=mask)(s, x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, ck.ops.propagate(s, _layer().w, mask, x, leak=0.1))


@pytest.mark.parametrize("activity", ["change", "state"])
def test_plasticity_step_equals_the_op_on_the_last_update(activity):
    rule = ck.PlasticityRule(stdp=ck.STDP(lr=1.0), bcm=ck.BCM(lr=1.0), activity_threshold=0.05)
    layer = _layer(steps=3, rule=rule, activity=activity)
    s, x = _inputs()
    with torch.no_grad():
        before = ck.ops.propagate_steps(s, layer.w, 2, x=x, leak=0.1)
        after = ck.ops.propagate(before, layer.w, x=x, leak=0.1)
    layer(s, x)
    w, state = layer.w.detach().clone(), ck.PlasticityState.create(DIMS, 2)
    ck.ops.plasticity_step_(w, ck.ops.activity(before, after, activity), state, rule)
    assert layer.plasticity_step() is layer.w
    assert not torch.equal(w, layer.w.detach().clone().uniform_())
    torch.testing.assert_close(layer.w.detach(), w)
    torch.testing.assert_close(layer.x_pre, state.x_pre)
    torch.testing.assert_close(layer.theta, state.theta)


def test_state_dict_round_trip_and_to():
    layer = _layer(steps=2, bias=True, mask=torch.rand(26, *DIMS) > 0.3)
    s, x = _inputs(B=3)
    layer(s, x)
    layer.plasticity_step()
    sd = layer.state_dict()
    assert set(sd) == {"w", "bias", "mask", "x_pre", "x_post", "theta"}
    fresh = ck.nn.Lattice3d(DIMS, channels=2, steps=2, bias=True, mask=torch.ones(26, *DIMS, dtype=torch.bool))
    fresh.load_state_dict(sd)
    for k, v in sd.items():
        assert torch.equal(getattr(fresh, k), v), k
    torch.testing.assert_close(fresh(s, x), layer(s, x))
    d = layer.to(torch.float64)
    assert d.w.dtype == d.x_pre.dtype == d.theta.dtype == torch.float64 and d.mask.dtype == torch.bool
    assert d(s.double(), x.double()).dtype == torch.float64


def test_traces_follow_the_batch():
    layer = _layer()
    s, x = _inputs(B=3)
    layer(s, x)
    layer.plasticity_step()
    assert layer.x_pre.shape == (3, *DIMS)


def test_errors():
    with pytest.raises(ValueError, match=r"Lattice3d: dims must be three positive ints \(D, H, W\), got \(4, 0, 6\)"):
        ck.nn.Lattice3d((4, 0, 6))
    with pytest.raises(TypeError, match="Lattice3d: steps must be a positive int, got float 1.5"):
        ck.nn.Lattice3d(DIMS, steps=1.5)
    with pytest.raises(ValueError, match="Lattice3d: leak must be a finite number in"):
        ck.nn.Lattice3d(DIMS, leak=2.0)
    with pytest.raises(TypeError, match="Lattice3d: rule must be a cellkern.PlasticityRule or None, got str"):
        ck.nn.Lattice3d(DIMS, rule="stdp")
    with pytest.raises(ValueError, match=r"Lattice3d: mask must be a bool tensor of shape \(26, 4, 5, 6\)"):
        ck.nn.Lattice3d(DIMS, mask=torch.ones(26, 4, 5, 6))
    with pytest.raises(RuntimeError, match="no forward has run yet"):
        ck.nn.Lattice3d(DIMS).plasticity_step()
    with pytest.raises(RuntimeError, match="built with rule=None"):
        ck.nn.Lattice3d(DIMS, rule=None).plasticity_step()


def test_example_classifier_learns():
    pytest.importorskip("sklearn")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "lattice_classifier.py"
    spec = importlib.util.spec_from_file_location("lattice_classifier", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--epochs", "1"]) > 0.5  # chance is 0.1
