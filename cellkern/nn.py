"""Modules: a lattice as a torch layer (SPEC §10).

:class:`Lattice3d` holds the weights as a :class:`~torch.nn.Parameter` (so an
optimiser trains them by backprop) and the plasticity state — traces and θ —
as buffers (so ``state_dict`` round-trips and ``.to(device / dtype)`` moves
them). ``forward`` runs ``steps`` fused updates; :meth:`Lattice3d.plasticity_step`
applies the local rules to the weights in place, from the activity of the
last forward, so backprop and plasticity can train the same weights.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import ops
from .contract import ACTIVATIONS
from . import validation
from .ops.competition import ACTIVITY_MODES
from .rules import PlasticityRule, PlasticityState
from .stencil import parse_boundary, stencil as make_stencil

__all__ = ["Lattice3d"]


class Lattice3d(nn.Module):
    """A 3-D lattice of cells as a layer.

    Args:
        dims: lattice dims ``(D, H, W)`` (z, y, x).
        channels: C, channels per cell. Default: 1.
        steps: updates per forward (T). Default: 1.
        stencil: the neighbourhood. Default: ``"moore"``.
        boundary: ``"periodic"``, ``"zero"`` or per axis ``(z, y, x)``. Default: ``"periodic"``.
        leak: α of the update ``s' = (1-α)·s + α·φ(u)``. Default: 0.1.
        activation: φ. Default: ``"tanh"``.
        bias: learn a per-channel, per-cell bias ``[C, D, H, W]``. Default: False.
        rule: the plasticity rule of :meth:`plasticity_step`; None disables it. Default: ``PlasticityRule()``.
        activity: how the activity ``y`` is taken from the last update: ``"change"``
            or ``"state"`` (:func:`cellkern.ops.activity`). Default: ``"change"``.
        init: ``(low, high)`` of the uniform initial weights. Default: None, which is
            ``(w_min, w_min + 0.1)`` of the rule (inside its bounds), ``(0, 0.1)`` without one.
        mask: optional bool ``[K, D, H, W]`` (False = pruned), kept as a buffer. Default: None.
        checkpoint_every: gradient checkpointing of the T-step unroll. Default: None.
        theta0: initial BCM threshold. Default: 0.01.
        backend: force a backend (None: the fastest for the device). Default: None.
        dtype, device: of the weights and buffers.

    Example:
        >>> import torch, cellkern as ck
        >>> layer = ck.nn.Lattice3d((4, 5, 6), channels=2, steps=3)
        >>> s = layer(torch.zeros(2, 2, 4, 5, 6), x=torch.ones(2, 2, 4, 5, 6))
        >>> s.shape, layer.plasticity_step() is layer.w
        (torch.Size([2, 2, 4, 5, 6]), True)
    """

    def __init__(self, dims, channels: int = 1, *, steps: int = 1, stencil="moore", boundary="periodic",
                 leak: float = 0.1, activation: str = "tanh", bias: bool = False,
                 rule: Optional[PlasticityRule] = PlasticityRule(), activity: str = "change",
                 init=None, mask: Optional[torch.Tensor] = None, checkpoint_every: Optional[int] = None,
                 theta0: float = 0.01, backend: Optional[str] = None, dtype=None, device=None):
        super().__init__()
        op = "Lattice3d"
        self.dims = _check_dims(op, dims)
        self.channels = validation.check_positive_int(op, "channels", channels)
        self.steps = validation.check_positive_int(op, "steps", steps)
        self.checkpoint_every = validation.check_positive_int(op, "checkpoint_every", checkpoint_every, allow_none=True)
        self.stencil = make_stencil(stencil)
        self.boundary = parse_boundary(boundary)
        self.leak = validation.check_leak(op, leak)
        self.activation = validation.check_choice(op, "activation", activation, ACTIVATIONS)
        self.activity = validation.check_choice(op, "activity", activity, ACTIVITY_MODES)
        if rule is not None and not isinstance(rule, PlasticityRule):
            raise TypeError(f"{op}: rule must be a cellkern.PlasticityRule or None, got {type(rule).__name__}")
        self.rule = rule
        self.backend = backend
        if init is None:
            init = (0.0, 0.1) if rule is None else (rule.w_min, rule.w_min + 0.1)
        lo, hi = (validation.check_real(op, "init[0]", init[0]), validation.check_real(op, "init[1]", init[1]))
        if hi < lo:
            raise ValueError(f"{op}: init must be (low, high) with low <= high, got {tuple(init)}")
        factory = {"dtype": dtype, "device": device}
        K = self.stencil.K
        self.w = nn.Parameter(torch.empty((K, *self.dims), **factory).uniform_(lo, hi))
        self.bias = nn.Parameter(torch.zeros((self.channels, *self.dims), **factory)) if bias else None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != self.w.shape:
                got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"{op}: mask must be a bool tensor of shape {tuple(self.w.shape)}, got {got}")
            mask = mask.to(self.w.device)
        self.register_buffer("mask", mask)
        st = PlasticityState.create(self.dims, 1, theta0=theta0, dtype=self.w.dtype, device=self.w.device)
        self.register_buffer("x_pre", st.x_pre)
        self.register_buffer("x_post", st.x_post)
        self.register_buffer("theta", st.theta)
        self._last: Optional[tuple] = None

    @property
    def state(self) -> PlasticityState:
        """The traces and θ as a :class:`~cellkern.PlasticityState` (sharing the buffers)."""
        return PlasticityState(self.x_pre, self.x_post, self.theta)

    def forward(self, s: torch.Tensor, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``steps`` fused updates of ``s`` ``[B, C, D, H, W]`` with drive ``x`` (broadcastable
        to ``s``, or one per step ``[T, B, C, D, H, W]``); returns the new state."""
        kw = dict(leak=self.leak, activation=self.activation, stencil=self.stencil, boundary=self.boundary,
                  backend=self.backend)
        T, per_step = self.steps, _per_step(x)
        if self.rule is None or T == 1:
            before = s
            out = ops.propagate_steps(s, self.w, T, self.mask, x, self.bias,
                                      checkpoint_every=self.checkpoint_every, **kw)
        else:  # T-1 steps, then the last one on its own: plasticity needs the state before it
            before = ops.propagate_steps(s, self.w, T - 1, self.mask, x[: T - 1] if per_step else x, self.bias,
                                         checkpoint_every=self.checkpoint_every, **kw)
            out = ops.propagate(before, self.w, self.mask, x[T - 1] if per_step else x, self.bias, **kw)
        if self.rule is not None:
            self._last = (before.detach(), out.detach())
        return out

    @torch.no_grad()
    def plasticity_step(self, y: Optional[torch.Tensor] = None, *, lr_scale=1.0,
                        activity_threshold: Optional[float] = None, gate=None) -> torch.Tensor:
        """Apply the rule to ``w`` in place (one fused pass; SPEC §4) and return ``w``.

        ``y`` ``[B, D, H, W]`` defaults to the activity of the last forward's final
        update. The traces follow the batch: when B changes they restart from 0.
        """
        if self.rule is None:
            raise RuntimeError("Lattice3d.plasticity_step: this layer was built with rule=None")
        if y is None:
            if self._last is None:
                raise RuntimeError("Lattice3d.plasticity_step: no forward has run yet; pass y or call the layer first")
            y = ops.activity(*self._last, mode=self.activity)
        B = y.shape[0] if isinstance(y, torch.Tensor) and y.dim() == 4 else None
        if B is not None and B != self.x_pre.shape[0]:
            self.x_pre = torch.zeros((B, *self.dims), dtype=self.x_pre.dtype, device=self.x_pre.device)
            self.x_post = torch.zeros_like(self.x_pre)
        ops.plasticity_step_(self.w.data, y, self.state, self.rule, self.mask, lr_scale=lr_scale,
                             activity_threshold=activity_threshold, gate=gate, stencil=self.stencil,
                             boundary=self.boundary, backend=self.backend)
        return self.w

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the traces follow the batch they were recorded with: take the saved shape
        for name in ("x_pre", "x_post"):
            t = state_dict.get(prefix + name)
            if isinstance(t, torch.Tensor) and t.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(t, dtype=self.x_pre.dtype, device=self.x_pre.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, channels={self.channels}, steps={self.steps}, stencil={self.stencil.name}, "
                f"boundary={self.boundary}, leak={self.leak}, activation={self.activation}, "
                f"bias={self.bias is not None}, plasticity={self.rule is not None}")


def _check_dims(op: str, dims) -> tuple:
    if (not isinstance(dims, (tuple, list)) or len(dims) != 3
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims)):
        raise ValueError(f"{op}: dims must be three positive ints (D, H, W), got {dims!r}")
    return tuple(dims)


def _per_step(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 6
