"""The backends' contract: the facts every backend and the C++/CUDA code share.

One definition each, read by ``backends/*`` and ``ops/*`` and checked against
``csrc/contract.h`` by ``python_tests/test_contract.py`` (the C++ side cannot
import Python, so a test holds the two together):

- the activation codes the compiled kernels take (:data:`ACTIVATION_CODES`);
- the accumulation dtype of every kernel (:func:`accumulation_dtype`);
- the order of the flags and scalars of ``cellkern::plasticity_``
  (:data:`PARAM_FLAGS`, :data:`PARAM_SCALARS`, :func:`params_args`).
"""
from __future__ import annotations

import torch

__all__ = ["ACTIVATIONS", "ACTIVATION_CODES", "PARAM_FLAGS", "PARAM_SCALARS", "accumulation_dtype",
           "params_args", "params_from_args"]

#: activation name → the integer code of the compiled kernels (csrc/contract.h: enum Act)
#: (``triangle``, SPEC §11, mixes a cell's channels: relu(u[o] − mean_c u[c]); the mixing-form kernels take it)
ACTIVATION_CODES = {"identity": 0, "tanh": 1, "relu": 2, "sigmoid": 3, "triangle": 4}
#: the activation names every propagate op accepts, in code order
ACTIVATIONS = tuple(ACTIVATION_CODES)

#: the order of the flags and scalars of ``cellkern::plasticity_`` (csrc/contract.h: kFlag*/kScalar*)
PARAM_FLAGS = ("stdp", "multiplicative", "bcm", "competition", "normalize")
PARAM_SCALARS = ("a_plus", "a_minus", "decay_pre", "decay_post", "bcm_lr", "bcm_decay", "tau_theta", "theta_min",
                 "theta_max", "beta", "threshold", "w_min", "w_max")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: fp64 stays fp64, everything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def params_args(p) -> tuple:
    """``(flags, scalars)`` of a :class:`~cellkern.rules.PlasticityParams`, in the contract's order."""
    return tuple(bool(getattr(p, f)) for f in PARAM_FLAGS), tuple(float(getattr(p, f)) for f in PARAM_SCALARS)


def params_from_args(flags, scalars):
    """The :class:`~cellkern.rules.PlasticityParams` of ``(flags, scalars)`` (the inverse of :func:`params_args`)."""
    from .rules import PlasticityParams

    return PlasticityParams(**dict(zip(PARAM_FLAGS, flags)), **dict(zip(PARAM_SCALARS, scalars)))
