"""Input checks at the public boundary (STYLE rule 3).

Every message names the op, the argument, what was expected and what came.
Backends trust what passes these checks.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DTYPE_NAMES = "float16, bfloat16, float32 or float64"


def _shape(t) -> tuple:
    return tuple(t.shape)


def contiguous(t):
    """The one contiguity helper: a no-op for contiguous tensors and None."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def check_tensor(op: str, name: str, t, *, allow_none: bool = False):
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")


def check_state(op: str, s, name: str = "s") -> None:
    """``s`` is a float tensor ``[B, C, D, H, W]`` with no empty dim."""
    check_tensor(op, name, s)
    if s.dim() != 5:
        raise ValueError(f"{op}: {name} must have shape (B, C, D, H, W) (5 dims), got {_shape(s)} ({s.dim()} dims)")
    if s.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be {_DTYPE_NAMES}, got {s.dtype}")
    if s.numel() == 0:
        raise ValueError(f"{op}: {name} must have no empty dim, got shape {_shape(s)}")


def check_weights(op: str, w, s, K: int, name: str = "w", slots: bool = False) -> None:
    """``w`` is ``[K, D, H, W]`` (``[Kmax ≤ K, D, H, W]`` for ELL ``slots``)
    on the device of ``s``, with its dtype or a lower precision (see
    :func:`check_weight_dtype`)."""
    check_tensor(op, name, w)
    dims = _shape(s)[2:]
    if slots:
        if w.dim() != 4 or _shape(w)[1:] != dims or not 1 <= w.shape[0] <= K:
            raise ValueError(f"{op}: {name} must have shape (Kmax, D, H, W) with 1 <= Kmax <= K = {K} and "
                             f"(D, H, W) = {dims}, got {_shape(w)}")
    elif _shape(w) != (K,) + dims:
        raise ValueError(f"{op}: {name} must have shape (K, D, H, W) = {(K,) + dims}, got {_shape(w)}")
    check_weight_dtype(op, name, w, s)


#: the weight dtypes each state dtype takes (mixed precision: weights may be
#: stored in a lower precision than the state; accumulation stays fp32/fp64)
WEIGHT_DTYPES = {
    torch.float64: (torch.float64, torch.float32, torch.float16, torch.bfloat16),
    torch.float32: (torch.float32, torch.float16, torch.bfloat16),
    torch.float16: (torch.float16,),
    torch.bfloat16: (torch.bfloat16,),
}


def check_weight_dtype(op: str, name: str, w, s) -> None:
    """``w`` on the device of ``s``, with the dtype of ``s`` or, for fp32/fp64
    ``s``, a lower float precision."""
    allowed = WEIGHT_DTYPES.get(s.dtype, (s.dtype,))
    if w.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} must have the dtype of s ({s.dtype}), got {w.dtype} "
                        f"(the weight dtypes {s.dtype} state takes: {names})")
    if w.device != s.device:
        raise ValueError(f"{op}: {name} must be on the device of s ({s.device}), got {w.device}")


def check_same(op: str, name: str, t, s, what: str = "s") -> None:
    if t.dtype != s.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of {what} ({s.dtype}), got {t.dtype}")
    if t.device != s.device:
        raise ValueError(f"{op}: {name} must be on the device of {what} ({s.device}), got {t.device}")


def check_mask(op: str, mask, K: int, s) -> None:
    if mask is None:
        return
    check_tensor(op, "mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor (False = pruned), got {mask.dtype}")
    want = (K,) + _shape(s)[2:]
    if _shape(mask) != want:
        raise ValueError(f"{op}: mask must have shape (K, D, H, W) = {want}, got {_shape(mask)}")
    if mask.device != s.device:
        raise ValueError(f"{op}: mask must be on the device of s ({s.device}), got {mask.device}")


def check_drive(op: str, x, s, name: str = "x") -> None:
    """``x`` broadcasts to the shape of ``s`` and matches its dtype/device."""
    if x is None:
        return
    check_tensor(op, name, x)
    try:
        shape = torch.broadcast_shapes(_shape(x), _shape(s))
    except RuntimeError:
        shape = None
    if shape != _shape(s):
        raise ValueError(f"{op}: {name} must be broadcastable to the shape of s {_shape(s)}, got {_shape(x)}")
    check_same(op, name, x, s)


def check_bias(op: str, bias, s) -> None:
    if bias is None:
        return
    check_tensor(op, "bias", bias)
    C, dims = s.shape[1], _shape(s)[2:]
    if _shape(bias) not in ((C,), (C,) + dims):
        raise ValueError(f"{op}: bias must have shape (C,) = ({C},) or (C, D, H, W) = {(C,) + dims}, got {_shape(bias)}")
    check_same(op, "bias", bias, s)


def check_leak(op: str, leak) -> float:
    if isinstance(leak, bool) or not isinstance(leak, numbers.Real):
        raise TypeError(f"{op}: leak must be a real number in [0, 1], got {type(leak).__name__} {leak!r}")
    leak = float(leak)
    if not math.isfinite(leak) or not 0.0 <= leak <= 1.0:
        raise ValueError(f"{op}: leak must be a finite number in [0, 1], got {leak!r}")
    return leak


def check_choice(op: str, name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{op}: {name} must be one of {', '.join(choices)}, got {type(value).__name__} {value!r}")
    v = value.strip().lower()
    if v not in choices:
        raise ValueError(f"{op}: {name} must be one of {', '.join(choices)}, got {value!r}")
    return v


def check_positive_int(op: str, name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
    return int(value)


def check_lattice_weights(op: str, w, K: int, name: str = "w") -> tuple:
    """``w`` is a float ``[K, D, H, W]``; returns ``(D, H, W)``."""
    check_tensor(op, name, w)
    if w.dim() != 4 or w.shape[0] != K:
        raise ValueError(f"{op}: {name} must have shape (K, D, H, W) with K = {K}, got {_shape(w)}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be {_DTYPE_NAMES}, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{op}: {name} must have no empty dim, got shape {_shape(w)}")
    return _shape(w)[1:]


def check_cells(op: str, name: str, t, dims, w, *, batch=None, per_sample=True, allow_bool=False,
                allow_none=False):
    """A per-cell field: ``[B, D, H, W]`` (``per_sample``) or ``[D, H, W]``, a
    float tensor (or bool when ``allow_bool``) on the device of ``w``; returns B."""
    if t is None and allow_none:
        return batch
    check_tensor(op, name, t)
    if per_sample:
        if t.dim() != 4 or _shape(t)[1:] != tuple(dims) or (batch is not None and t.shape[0] != batch):
            b = "B" if batch is None else str(batch)
            raise ValueError(f"{op}: {name} must have shape ({b}, D, H, W) with (D, H, W) = {tuple(dims)}, "
                             f"got {_shape(t)}")
        if t.shape[0] == 0:
            raise ValueError(f"{op}: {name} must have a batch of at least 1, got shape {_shape(t)}")
    elif _shape(t) != tuple(dims):
        raise ValueError(f"{op}: {name} must have shape (D, H, W) = {tuple(dims)}, got {_shape(t)}")
    if t.dtype not in FLOAT_DTYPES and not (allow_bool and t.dtype == torch.bool):
        kinds = _DTYPE_NAMES + (" or bool" if allow_bool else "")
        raise TypeError(f"{op}: {name} must be {kinds}, got {t.dtype}")
    if t.device != w.device:
        raise ValueError(f"{op}: {name} must be on the device of w ({w.device}), got {t.device}")
    return t.shape[0] if per_sample else batch


def check_real(op: str, name: str, value, *, positive=False, nonneg=False, allow_inf=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{op}: {name} must be a finite number, got {value!r}")
    if positive and not v > 0:
        raise ValueError(f"{op}: {name} must be > 0, got {value!r}")
    if nonneg and not v >= 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {value!r}")
    return v


def check_bounds(op: str, lo_name: str, lo, hi_name: str, hi, allow_inf=False) -> tuple:
    lo = check_real(op, lo_name, lo, allow_inf=allow_inf)
    hi = check_real(op, hi_name, hi, allow_inf=allow_inf)
    if lo > hi:
        raise ValueError(f"{op}: {lo_name} must be <= {hi_name}, got {lo_name}={lo} > {hi_name}={hi}")
    return lo, hi
