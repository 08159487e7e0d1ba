"""Bad input gives a ValueError/TypeError naming the op, the argument, the
expected and the received value (issue point 6)."""
import math

import pytest
import torch

import cellkern as ck


def good(D=3, H=4, W=5, B=2, C=3, K=26, dtype=torch.float32):
    return torch.randn(B, C, D, H, W, dtype=dtype), torch.rand(K, D, H, W, dtype=dtype)


OPS = ["aggregate", "propagate", "propagate_steps"]


def call(op, s, w, **kw):
    if op == "propagate_steps":
        return ck.ops.propagate_steps(s, w, kw.pop("steps", 2), **kw)
    return getattr(ck.ops, op)(s, w, **kw)


@pytest.mark.parametrize("op", OPS)
def test_state_shape(op):
    s, w = good()
    with pytest.raises(ValueError, match=rf"{op}: s must have shape \(B, C, D, H, W\) \(5 dims\), got \(3, 3, 4, 5\)"):
        call(op, s[0], w)


@pytest.mark.parametrize("op", OPS)
def test_state_type_and_dtype(op):
    s, w = good()
    with pytest.raises(TypeError, match=rf"{op}: s must be a torch.Tensor, got list"):
        call(op, s.tolist(), w)
    with pytest.raises(TypeError, match=rf"{op}: s must be float16, bfloat16, float32 or float64, got torch.int64"):
        call(op, s.long(), w)


@pytest.mark.parametrize("op", OPS)
def test_weight_shape(op):
    s, w = good()
    with pytest.raises(ValueError, match=rf"{op}: w must have shape \(K, D, H, W\) = \(26, 3, 4, 5\), got \(26, 3, 4\)"):
        call(op, s, w[..., 0])
    with pytest.raises(ValueError, match=r"= \(6, 3, 4, 5\), got \(26, 3, 4, 5\)"):
        call(op, s, w, stencil="von_neumann")


@pytest.mark.parametrize("op", OPS)
def test_weight_dtype_and_device(op):
    s, w = good()
    with pytest.raises(TypeError, match=rf"{op}: w must have the dtype of s \(torch.float32\), got torch.float64"):
        call(op, s, w.double())
    with pytest.raises(ValueError, match=rf"{op}: w must be on the device of s \(cpu\), got meta"):
        call(op, s, w.to("meta"))


@pytest.mark.parametrize("op", OPS)
def test_mask(op):
    s, w = good()
    with pytest.raises(TypeError, match=rf"{op}: mask must be a bool tensor \(False = pruned\), got torch.float32"):
        call(op, s, w, mask=torch.ones_like(w))
    with pytest.raises(ValueError, match=rf"{op}: mask must have shape \(K, D, H, W\) = \(26, 3, 4, 5\), got \(26, 3, 4, 4\)"):
        call(op, s, w, mask=torch.ones(26, 3, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("op", OPS)
def test_stencil_and_boundary_names(op):
    s, w = good()
    with pytest.raises(ValueError, match=rf"{op}: stencil: expected one of von_neumann, moore18, moore, radius\(r\), got 'hex'"):
        call(op, s, w, stencil="hex")
    with pytest.raises(ValueError, match=rf"{op}: boundary: expected 'periodic', 'zero' or a 3-tuple .*, got 'mirror'"):
        call(op, s, w, boundary="mirror")


@pytest.mark.parametrize("op", ["propagate", "propagate_steps"])
@pytest.mark.parametrize("leak,exc,msg", [
    (1.5, ValueError, "leak must be a finite number in \\[0, 1\\], got 1.5"),
    (-0.1, ValueError, "leak must be a finite number in \\[0, 1\\], got -0.1"),
    (math.nan, ValueError, "leak must be a finite number in \\[0, 1\\], got nan"),
    (math.inf, ValueError, "leak must be a finite number in \\[0, 1\\], got inf"),
    ("0.5", TypeError, "leak must be a real number in \\[0, 1\\], got str '0.5'"),
    (True, TypeError, "leak must be a real number"),
])
def test_leak(op, leak, exc, msg):
    s, w = good()
    with pytest.raises(exc, match=f"{op}: {msg}"):
        call(op, s, w, leak=leak)


@pytest.mark.parametrize("op", ["propagate", "propagate_steps"])
def test_activation_drive_bias(op):
    s, w = good()
    with pytest.raises(ValueError, match=rf"{op}: activation must be one of identity, tanh, relu, sigmoid, triangle, got 'gelu'"):
        call(op, s, w, activation="gelu")
    with pytest.raises(ValueError, match=rf"{op}: x must be broadcastable to the shape of s \(2, 3, 3, 4, 5\), got \(2, 2, 3, 4, 5\)"):
        call(op, s, w, x=torch.randn(2, 2, 3, 4, 5))
    with pytest.raises(TypeError, match=rf"{op}: x must have the dtype of s \(torch.float32\), got torch.float16"):
        call(op, s, w, x=torch.randn(1, 3, 3, 4, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match=rf"{op}: bias must have shape \(C,\) = \(3,\) or \(C, D, H, W\) = \(3, 3, 4, 5\), got \(4,\)"):
        call(op, s, w, bias=torch.zeros(4))
    with pytest.raises(TypeError, match=rf"{op}: bias must have the dtype of s"):
        call(op, s, w, bias=torch.zeros(3, dtype=torch.float64))


def test_propagate_steps_arguments():
    s, w = good()
    with pytest.raises(ValueError, match="propagate_steps: steps must be a positive int, got 0"):
        ck.ops.propagate_steps(s, w, 0)
    with pytest.raises(TypeError, match="propagate_steps: steps must be a positive int, got float 2.0"):
        ck.ops.propagate_steps(s, w, 2.0)
    with pytest.raises(ValueError, match="propagate_steps: checkpoint_every must be a positive int, got -1"):
        ck.ops.propagate_steps(s, w, 2, checkpoint_every=-1)
    with pytest.raises(ValueError, match=r"per-step x must have shape \(T, B, C, D, H, W\) with T = steps = 2"):
        ck.ops.propagate_steps(s, w, 2, x=torch.randn(3, 2, 3, 3, 4, 5))


def test_empty_state():
    s, w = good(B=2)
    with pytest.raises(ValueError, match="aggregate: s must have no empty dim, got shape \\(0, 3, 3, 4, 5\\)"):
        ck.ops.aggregate(s[:0], w)


def test_backend_argument():
    s, w = good()
    with pytest.raises(ValueError, match="propagate: backend must be one of reference, cpu, triton, cuda or None, got 'gpu'"):
        ck.ops.propagate(s, w, backend="gpu")
    with pytest.raises(TypeError, match="propagate: backend must be a string or None, got int"):
        ck.ops.propagate(s, w, backend=1)
