"""Backends and dispatch.

Every backend module exposes the same functions, which trust their inputs
(validated, contiguous, on one device, ``s``/``w``/``x``/``bias`` of one dtype,
``mask`` bool or None, ``x`` shaped like ``s`` or None, ``bias`` ``[C, D, H, W]``
or None):

- ``aggregate_forward(s, w, mask, geom) -> a``
- ``aggregate_backward(g, s, w, mask, geom, need_s, need_w) -> (ds, dw)``
- ``propagate_forward(s, w, mask, x, bias, geom, leak, activation, save_u) -> (out, u)``
- ``propagate_backward(g, s, w, mask, u, geom, leak, activation, need_s, need_w, need_u)
  -> (ds, dw, du)``

``u`` (the pre-activation) and ``du`` are float32 (float64 for float64 input).

and the plasticity family (SPEC §3–§4, no autograd; ``y`` ``[B, D, H, W]``):

- ``lateral_inhibition(y, beta, geom) -> y'`` (dtype of ``y``)
- ``local_winners(y, threshold, geom) -> win`` (bool ``[B, D, H, W]``)
- ``plasticity_(w, mask, geom, p, y, spikes, x_pre, x_post, theta, gate, lr) -> None``:
  the fused step of :func:`cellkern.backends.reference.plasticity_`, in place on
  ``w``, ``x_pre``, ``x_post`` and ``theta``. ``p`` is a
  :class:`cellkern.rules.PlasticityParams`. ``w`` any float dtype; the per-cell
  tensors share one float dtype (the state dtype), any of them None where ``p``
  does not use it (``y`` None only when ``p.bcm`` and ``p.competition`` are
  off and ``spikes`` is given); ``spikes``/``gate`` ``[B, D, H, W]``, ``lr``
  ``[D, H, W]``, ``theta`` ``[D, H, W]``.
- ``heterosynaptic_normalize_(w, mask, geom, target, where) -> None``: ``target``
  ``[D, H, W]`` fp32 (fp64 for fp64 ``w``), ``where`` bool ``[D, H, W]`` or None.

The mixing form (SPEC §11; module attribute ``MIXING = True`` on a backend
that has it; for one without, the ops run the next backend of
:data:`PREFERENCE` that has it when none was forced, and raise a clear
``ValueError`` when it was — see ``cellkern.ops.mixing``). ``w`` is
``[K, C_out, C_in, D, H, W]``, ``mask`` bool ``[K, D, H, W]`` or None (a pruned
synapse cuts all of its channel pairs), ``s`` ``[B, C_in, D, H, W]``; sums in
fp32 (fp64 for fp64), results in the dtype of ``s`` (``dw`` in that of ``w``):

- ``mixing_aggregate_forward(s, w, mask, geom) -> a`` ``[B, C_out, D, H, W]``
- ``mixing_aggregate_backward(g, s, w, mask, geom, need_s, need_w) -> (ds, dw)``
- ``mixing_propagate_forward(s, w, mask, x, bias, geom, leak, activation, save_u) -> (out, u)``
  (``C_out == C_in``; ``x`` like ``s`` or None, ``bias`` ``[C, D, H, W]`` or None,
  ``u`` float32/float64 or None)
- ``mixing_propagate_backward(g, s, w, mask, u, geom, leak, activation, need_s, need_w, need_u)
  -> (ds, dw, du)``
- ``competitive_hebbian_(w, s, beta, mask, geom, eta, tau, eta_beta, wins) -> None``:
  in place on ``w`` and ``beta`` ``[C_out, D, H, W]`` (fp32); ``w`` and ``s`` of
  one dtype, fp32 or fp64 (the op updates fp16/bf16 weights in an fp32 copy and
  rounds back stochastically, as for the shared form); ``wins`` True for
  ``average="wins"`` (n = 1 + Σ_b p), False for ``"batch"`` (n = B); ``tau == 0``
  is hard WTA (the one-hot of ``argmax_o (u + β)``, ties to the lowest ``o``).

``MIXED_WEIGHTS`` (below) means the same for the mixing propagation functions
as for the shared ones (else the ops cast ``w`` to the dtype of ``s``).
Activations of the mixing ops: identity, tanh, relu, sigmoid and ``triangle``
(``φ(u)[o] = relu(u[o] − mean_c u[c])``, code 4 in :mod:`cellkern.contract`).
The shared-form kernels take the first four; ``triangle`` in the shared form
runs as the kernels' ``identity`` pre-activation plus a torch epilogue in
``cellkern.ops`` (the reference also has it natively). The ELL form is
shared-form only.

Weight forms and mixed precision (SPEC §5; the ops in ``cellkern.ops`` do the
conversions, backends see only what they declare they take):

- ``MIXED_WEIGHTS = True`` (module attribute): the kernels take ``w`` in a
  lower precision than ``s`` (fp16/bf16 weights under an fp32 state, sums in
  fp32) and return ``dw`` in the dtype they got. Without it the ops cast
  ``w`` to the dtype of ``s`` first (a transient copy) and ``dw`` back.
- Optional ELL forward kernels, ``aggregate_forward_ell(s, w_ell, idx, geom)``
  and ``propagate_forward_ell(s, w_ell, idx, x, bias, geom, leak, activation,
  save_u) -> (out, u)``, with ``w_ell``/``idx`` ``[Kmax, D, H, W]`` (``idx``
  uint8, 255 = empty slot; validated). A backend without them (triton, cuda
  today) gets the dense masked form expanded from the ELL pair
  (``sparse.expand_ell``: a transient dense ``w`` and bool mask) — the same
  result, not the memory saving. Every backward of the ELL form and every
  plasticity op on it runs through that dense form too; ``dw`` is gathered
  back to the live slots. Packed int32 masks are unpacked to bool masks at the
  op boundary, so no backend sees them.
- Optional ``ell_expand(w_ell, idx, K) -> (w, mask)`` and
  ``ell_gather_(w_ell, idx, dense)``: the two conversions in one pass each
  (else ``sparse.expand_ell`` / ``sparse.gather_ell`` in torch).
- Optional ``stochastic_round_(out, src, seed, step)``: ``out`` (fp16/bf16)
  ← ``src`` (fp32) rounded with the counter-based hash of
  ``cellkern.ops.rounding``, bit for bit as ``rounding.round_weights_`` (the
  torch version, used where a backend has no kernel).

Native ELL kernels: reference (the spec, ``*_forward_ell``) and cpu
(``csrc/cpu/sparse.cpp``). The triton backend runs the ELL form through the
documented dense conversion above (no Triton ELL kernel yet).

``backend=None`` picks the fastest backend that can take the tensors' device
(:data:`PREFERENCE`); ``CELLKERN_BACKEND`` in the environment or an explicit
``backend=`` forces one.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

NAMES = ("reference", "cpu", "triton", "cuda")
#: fastest first, per device type
PREFERENCE = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}

_modules: dict = {}
_reasons: dict = {}
_poison = False


def poison_outputs(enabled: bool) -> None:
    """Fill every kernel output with NaN when it is allocated (a test aid:
    an element a kernel forgets to write then fails the comparison with the
    reference instead of passing as the 0 of fresh memory). Off by default;
    the test suite turns it on."""
    global _poison
    _poison = bool(enabled)
    for name in ("cpu", "cuda"):
        mod = _modules.get(name)
        if mod is not None:
            mod.set_poison(_poison)


def outputs_poisoned() -> bool:
    return _poison


def new_output(shape, dtype, device) -> torch.Tensor:
    """The allocation of a backend's output: ``torch.empty``, NaN-filled when
    :func:`poison_outputs` is on."""
    if _poison:
        return torch.full(tuple(shape), float("nan"), dtype=dtype, device=device)
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load(name: str):
    """Import a backend once; remember why it is unavailable."""
    if name in _modules:
        return _modules[name]
    mod = None
    try:
        if name == "reference":
            from . import reference as mod
        elif name == "cpu":
            mod = importlib.import_module(".cpu", __name__)
        elif name == "triton":
            if not (torch.cuda.is_available() or _triton_interpret()):
                raise RuntimeError("no CUDA device and TRITON_INTERPRET is not 1")
            mod = importlib.import_module(".triton", __name__)
        elif name == "cuda":  # says itself why it cannot load (not built, or no device)
            mod = importlib.import_module(".cuda", __name__)
        else:  # pragma: no cover - guarded by callers
            raise ValueError(name)
        if name in ("cpu", "cuda") and _poison:
            mod.set_poison(True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", with the reason kept
        _reasons[name] = f"{type(exc).__name__}: {exc}"
        if name == "cpu":
            warnings.warn(
                f"cellkern: the C++ CPU extension did not load ({_reasons[name]}); "
                "the reference backend serves CPU tensors. `python -m cellkern.info` says more.",
                RuntimeWarning,
                stacklevel=3,
            )
        mod = None
    _modules[name] = mod
    return mod


def name_of(module) -> str:
    """The name under which :func:`select` loaded a backend module."""
    for name, mod in _modules.items():
        if mod is module:
            return name
    raise ValueError(f"cellkern: {module!r} is not a loaded backend")


def module(name: str):
    """The loaded backend module ``name`` (None where it is not available here)."""
    return _load(name)


def load_all() -> None:
    """Import every backend that can load here, once. Called when ``cellkern``
    is imported, so that no backend is imported inside a traced region
    (``torch.compile(fullgraph=True)`` of a model whose first cellkern call is compiled)."""
    for name in NAMES:
        _load(name)


def available_backends() -> list:
    """The backends that loaded on this install, e.g. ``["reference", "cpu"]``."""
    return [n for n in NAMES if _load(n) is not None]


def backend_status() -> dict:
    """``{name: "available" | reason it is not}`` for every backend."""
    return {n: ("available" if _load(n) is not None else _reasons.get(n, "unavailable")) for n in NAMES}


def supports(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and _triton_interpret())
    return False


def select(backend, device: torch.device, op: str):
    """Return ``(name, module)`` of the backend that runs ``op`` on ``device``."""
    forced = backend if backend is not None else os.environ.get("CELLKERN_BACKEND") or None
    if forced is not None:
        if not isinstance(forced, str):
            raise TypeError(f"{op}: backend must be a string or None, got {type(forced).__name__}")
        name = forced.strip().lower()
        src = "backend" if backend is not None else "CELLKERN_BACKEND"
        if name not in NAMES:
            raise ValueError(f"{op}: {src} must be one of {', '.join(NAMES)} or None, got {forced!r}")
        mod = _load(name)
        if mod is None:
            raise RuntimeError(
                f"{op}: {src}={name!r} is not available on this install ({_reasons.get(name)}); "
                f"available: {', '.join(available_backends())}"
            )
        if not supports(name, device):
            raise ValueError(f"{op}: {src}={name!r} cannot run on {device.type} tensors")
        return name, mod
    tried = []
    for name in PREFERENCE.get(device.type, ("reference",)):
        mod = _load(name)
        if mod is not None and supports(name, device):
            return name, mod
        tried.append(f"{name}: {_reasons.get(name, 'does not run on ' + device.type)}")
    raise RuntimeError(f"{op}: no backend can run on {device}: " + "; ".join(tried))  # pragma: no cover
