"""The C++ CPU backend: fused OpenMP kernels from ``csrc/cpu`` (module ``cellkern._C``).

Importing this module fails (and the dispatcher falls back to the reference)
when the extension was not built.
"""
from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (registers the torch.ops.cellkern_cpu kernels)
from ..contract import ACTIVATION_CODES, params_args
from ..stencil import Geometry

_ops = torch.ops.cellkern_cpu
#: w may be below the precision of s: the ELL kernels take any lower float
#: dtype, the dense ones fp16/bf16 under fp32 (other pairs are cast by _dense_w)
MIXED_WEIGHTS = True


def _dense_w(w, s):
    """``w`` in a dtype the dense kernels pair with ``s``."""
    if w.dtype == s.dtype or (s.dtype == torch.float32 and w.dtype in (torch.float16, torch.bfloat16)):
        return w
    return w.to(s.dtype)


def set_poison(enabled: bool) -> None:
    """NaN-fill the kernels' outputs at allocation (see backends.poison_outputs)."""
    _ops.set_poison(bool(enabled))


def _tab(geom: Geometry) -> torch.Tensor:
    return geom.offsets_on("cpu", torch.int64)


def aggregate_forward(s, w, mask, geom: Geometry):
    return _ops.aggregate_forward(s, _dense_w(w, s), mask, _tab(geom), list(geom.periodic))


def aggregate_backward(g, s, w, mask, geom: Geometry, need_s: bool, need_w: bool):
    ds = _ops.aggregate_transposed(g, _dense_w(w, g), mask, _tab(geom), list(geom.periodic)) if need_s else None
    dw = _ops.weight_grad(g, s, mask, _tab(geom), list(geom.periodic)) if need_w else None
    return ds, dw


def propagate_forward(s, w, mask, x, bias, geom: Geometry, leak: float, activation: str, save_u: bool):
    out, u = _ops.propagate_forward(s, _dense_w(w, s), mask, x, bias, _tab(geom), list(geom.periodic),
                                    float(leak), ACTIVATION_CODES[activation], bool(save_u))
    return out, (u if save_u else None)


def propagate_backward(g, s, w, mask, u, geom: Geometry, leak: float, activation: str,
                       need_s: bool, need_w: bool, need_u: bool):
    ds, dw, du = _ops.propagate_backward(g, s, _dense_w(w, s), mask, u, _tab(geom), list(geom.periodic),
                                         float(leak), ACTIVATION_CODES[activation], bool(need_s), bool(need_w))
    return (ds if need_s else None), (dw if need_w else None), (du if need_u else None)


def aggregate_forward_ell(s, w_ell, idx, geom: Geometry):
    return _ops.aggregate_forward_ell(s, w_ell, idx, _tab(geom), list(geom.periodic))


def propagate_forward_ell(s, w_ell, idx, x, bias, geom: Geometry, leak: float, activation: str, save_u: bool):
    out, u = _ops.propagate_forward_ell(s, w_ell, idx, x, bias, _tab(geom), list(geom.periodic),
                                        float(leak), ACTIVATION_CODES[activation], bool(save_u))
    return out, (u if save_u else None)


def lateral_inhibition(y, beta: float, geom: Geometry):
    return _ops.lateral_inhibition(y, float(beta), _tab(geom), list(geom.periodic))


def local_winners(y, threshold: float, geom: Geometry):
    return _ops.local_winners(y, float(threshold), _tab(geom), list(geom.periodic))


def plasticity_(w, mask, geom: Geometry, p, y, spikes, x_pre, x_post, theta, gate, lr):
    flags, scalars = params_args(p)
    _ops.plasticity_(w, mask, _tab(geom), list(geom.periodic), y, spikes, x_pre, x_post, theta, gate, lr,
                     list(flags), list(scalars))


def ell_expand(w_ell, idx, K: int):
    """The dense masked form ``(w, mask)`` of an ELL pair, in one pass."""
    return _ops.ell_expand(w_ell, idx, int(K))


def ell_gather_(w_ell, idx, dense):
    """``w_ell[j, i] = dense[idx[j, i], i]`` (0 in empty slots), in place."""
    _ops.ell_gather_(w_ell, idx, dense)


def stochastic_round_(out, src, seed: int, step: int):
    """``out`` (fp16/bf16) ← ``src`` (fp32) stochastically rounded, bit for bit
    as :func:`cellkern.ops.rounding.round_weights_`."""
    _ops.stochastic_round_(out, src, int(seed), int(step))


def heterosynaptic_normalize_(w, mask, geom: Geometry, target, where):
    _ops.heterosynaptic_normalize_(w, mask, _tab(geom), list(geom.periodic), target, where)


# ---- the mixing form (SPEC §11): w [K, C_out, C_in, D, H, W] ----

#: this backend has the mixing-form kernels (csrc/cpu/mixing.cpp)
MIXING = True


def mixing_aggregate_forward(s, w, mask, geom: Geometry):
    return _ops.mixing_aggregate_forward(s, _dense_w(w, s), mask, _tab(geom), list(geom.periodic))


def mixing_aggregate_backward(g, s, w, mask, geom: Geometry, need_s: bool, need_w: bool):
    ds, dw = _ops.mixing_aggregate_backward(g, s, _dense_w(w, s), mask, _tab(geom), list(geom.periodic),
                                            bool(need_s), bool(need_w))
    if need_w and dw.dtype != w.dtype:
        dw = dw.to(w.dtype)
    return (ds if need_s else None), (dw if need_w else None)


def mixing_propagate_forward(s, w, mask, x, bias, geom: Geometry, leak: float, activation: str, save_u: bool):
    out, u = _ops.mixing_propagate_forward(s, _dense_w(w, s), mask, x, bias, _tab(geom), list(geom.periodic),
                                           float(leak), ACTIVATION_CODES[activation], bool(save_u))
    return out, (u if save_u else None)


def mixing_propagate_backward(g, s, w, mask, u, geom: Geometry, leak: float, activation: str,
                              need_s: bool, need_w: bool, need_u: bool):
    ds, dw, du = _ops.mixing_propagate_backward(g, s, _dense_w(w, s), mask, u, _tab(geom), list(geom.periodic),
                                                float(leak), ACTIVATION_CODES[activation], bool(need_s),
                                                bool(need_w))
    if need_w and dw.dtype != w.dtype:
        dw = dw.to(w.dtype)
    return (ds if need_s else None), (dw if need_w else None), (du if need_u else None)


def competitive_hebbian_(w, s, beta, mask, geom: Geometry, eta: float, tau: float, eta_beta: float, wins: bool):
    """In place on ``w`` and ``beta``: one read and one write of ``w`` (csrc/cpu/mixing.cpp)."""
    _ops.competitive_hebbian_(w, s, beta, mask, _tab(geom), list(geom.periodic), float(eta), float(tau),
                              float(eta_beta), bool(wins))
