"""The CUDA C++ backend: hand-written kernels from ``csrc/cuda`` (module ``cellkern._C_cuda``).

The same functions as :mod:`cellkern.backends.cpu`, for CUDA tensors. Each op
runs on the tensors' device and on torch's current stream there, which is
handed to the kernels as an integer (the glue needs no CUDA headers).

Importing this module fails (and the dispatcher reports why in
``cellkern.backend_status()``) when the extension was not built
(``CELLKERN_CUDA=1 python setup.py build_ext --inplace`` where nvcc exists) or
when torch sees no CUDA device.
"""
from __future__ import annotations

import importlib.util

import torch

if importlib.util.find_spec("cellkern._C_cuda") is None:
    raise ImportError("not built: this install has no CUDA C++ kernels "
                      "(build with CELLKERN_CUDA=1 where torch has CUDA and nvcc exists)")
if not torch.cuda.is_available():
    raise RuntimeError("built, but torch sees no CUDA device (torch.cuda.is_available() is False)")

from .. import _C_cuda  # noqa: E402,F401  (registers the torch.ops.cellkern_cuda kernels)
from ..stencil import Geometry  # noqa: E402

_ops = torch.ops.cellkern_cuda


def _on(t: torch.Tensor):
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(t.device)


def _stream(t: torch.Tensor) -> int:
    """torch's current stream on the tensor's GPU, as the integer the kernels take."""
    return torch.cuda.current_stream(t.device).cuda_stream


# ---- the backend functions (python_tests/test_cuda_emulation.py runs this part
# with _ops, _on and _stream of the host-emulated kernels; hence the absolute import) ----

from cellkern.contract import ACTIVATION_CODES, params_args  # noqa: E402


def set_poison(enabled: bool) -> None:
    """NaN-fill the kernels' outputs at allocation (see backends.poison_outputs)."""
    _ops.set_poison(bool(enabled))


def _tab(geom: Geometry, t: torch.Tensor) -> torch.Tensor:
    return geom.offsets_on(t.device, torch.int32)


def aggregate_forward(s, w, mask, geom: Geometry):
    with _on(s):
        return _ops.aggregate_forward(s, w, mask, _tab(geom, s), list(geom.periodic), _stream(s))


def aggregate_backward(g, s, w, mask, geom: Geometry, need_s: bool, need_w: bool):
    with _on(s):
        tab, per, st = _tab(geom, s), list(geom.periodic), _stream(s)
        ds = _ops.aggregate_transposed(g, w, mask, tab, per, st) if need_s else None
        dw = _ops.weight_grad(g, s, mask, tab, per, st) if need_w else None
    return ds, dw


def propagate_forward(s, w, mask, x, bias, geom: Geometry, leak: float, activation: str, save_u: bool):
    with _on(s):
        out, u = _ops.propagate_forward(s, w, mask, x, bias, _tab(geom, s), list(geom.periodic),
                                        float(leak), ACTIVATION_CODES[activation], bool(save_u), _stream(s))
    return out, (u if save_u else None)


def propagate_backward(g, s, w, mask, u, geom: Geometry, leak: float, activation: str,
                       need_s: bool, need_w: bool, need_u: bool):
    with _on(s):
        ds, dw, du = _ops.propagate_backward(g, s, w, mask, u, _tab(geom, s), list(geom.periodic),
                                             float(leak), ACTIVATION_CODES[activation], bool(need_s), bool(need_w),
                                             _stream(s))
    return (ds if need_s else None), (dw if need_w else None), (du if need_u else None)


def lateral_inhibition(y, beta: float, geom: Geometry):
    with _on(y):
        return _ops.lateral_inhibition(y, float(beta), _tab(geom, y), list(geom.periodic), _stream(y))


def local_winners(y, threshold: float, geom: Geometry):
    with _on(y):
        return _ops.local_winners(y, float(threshold), _tab(geom, y), list(geom.periodic), _stream(y))


def plasticity_(w, mask, geom: Geometry, p, y, spikes, x_pre, x_post, theta, gate, lr):
    flags, scalars = params_args(p)
    with _on(w):
        _ops.plasticity_(w, mask, _tab(geom, w), list(geom.periodic), y, spikes, x_pre, x_post, theta, gate, lr,
                         list(flags), list(scalars), _stream(w))


def heterosynaptic_normalize_(w, mask, geom: Geometry, target, where):
    with _on(w):
        _ops.heterosynaptic_normalize_(w, mask, _tab(geom, w), list(geom.periodic), target, where, _stream(w))


# ---- the mixing form (SPEC §11): csrc/cuda/mixing.cu ----

#: this backend has the mixing-form kernels
MIXING = True


def mixing_aggregate_forward(s, w, mask, geom: Geometry):
    with _on(s):
        return _ops.mixing_aggregate_forward(s, w.to(s.dtype), mask, _tab(geom, s), list(geom.periodic), _stream(s))


def mixing_aggregate_backward(g, s, w, mask, geom: Geometry, need_s: bool, need_w: bool):
    with _on(s):
        ds, dw = _ops.mixing_aggregate_backward(g, s, w.to(s.dtype), mask, _tab(geom, s), list(geom.periodic),
                                                bool(need_s), bool(need_w), _stream(s))
    return (ds if need_s else None), (dw.to(w.dtype) if need_w else None)


def mixing_propagate_forward(s, w, mask, x, bias, geom: Geometry, leak: float, activation: str, save_u: bool):
    with _on(s):
        out, u = _ops.mixing_propagate_forward(s, w.to(s.dtype), mask, x, bias, _tab(geom, s), list(geom.periodic),
                                               float(leak), ACTIVATION_CODES[activation], bool(save_u), _stream(s))
    return out, (u if save_u else None)


def mixing_propagate_backward(g, s, w, mask, u, geom: Geometry, leak: float, activation: str,
                              need_s: bool, need_w: bool, need_u: bool):
    with _on(s):
        ds, dw, du = _ops.mixing_propagate_backward(g, s, w.to(s.dtype), mask, u, _tab(geom, s), list(geom.periodic),
                                                    float(leak), ACTIVATION_CODES[activation], bool(need_s), bool(need_w),
                                                    _stream(s))
    return (ds if need_s else None), (dw.to(w.dtype) if need_w else None), (du if need_u else None)


def competitive_hebbian_(w, s, beta, mask, geom: Geometry, eta: float, tau: float, eta_beta: float, wins: bool):
    with _on(w):
        _ops.competitive_hebbian_(w, s, beta, mask, _tab(geom, w), list(geom.periodic), float(eta), float(tau),
                                  float(eta_beta), bool(wins), _stream(w))
