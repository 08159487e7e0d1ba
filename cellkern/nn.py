"""Modules: a lattice as a torch layer (SPEC §10).

:class:`Lattice3d` holds the weights as a :class:`~torch.nn.Parameter` (so an
optimiser trains them by backprop) and the plasticity state — traces and θ —
as buffers (so ``state_dict`` round-trips and ``.to(device / dtype)`` moves
them). ``forward`` runs ``steps`` fused updates; :meth:`Lattice3d.plasticity_step`
applies the local rules to the weights in place, from the activity of the
last forward, so backprop and plasticity can train the same weights.

With ``mixing=True`` the lattice has the channel-mixing synapses of SPEC §11
(``w`` ``[K, C, C, D, H, W]``) and :meth:`Lattice3d.plasticity_step` runs the
competitive Hebbian rule (:class:`~cellkern.rules.CompetitiveHebbian`, with the
per-unit threshold β as a buffer). :class:`LocallyConnected3d` is the one-step
``C_in → C_out`` layer of that form: a conv3d with unshared weights.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import ops
from .contract import ACTIVATIONS
from . import validation
from .ops.competition import ACTIVITY_MODES
from .rules import CompetitiveHebbian, PlasticityRule, PlasticityState
from .stencil import parse_boundary, stencil as make_stencil

__all__ = ["Lattice3d", "LocallyConnected3d"]

_DEFAULT_RULE = PlasticityRule()


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
        rule: the plasticity rule of :meth:`plasticity_step`; None disables it. Default:
            ``PlasticityRule()``, or ``CompetitiveHebbian()`` with ``mixing=True`` (which takes
            only a :class:`~cellkern.rules.CompetitiveHebbian`).
        activity: how the activity ``y`` is taken from the last update: ``"change"``
            or ``"state"`` (:func:`cellkern.ops.activity`). Default: ``"change"``.
        init: ``(low, high)`` of the uniform initial weights. Default: None, which is
            ``(w_min, w_min + 0.1)`` of the rule (inside its bounds), ``(0, 0.1)`` without one.
            Shared form only (the mixing form draws its weights with ``gain``).
        mask: optional bool ``[K, D, H, W]`` (False = pruned), kept as a buffer. Default: None.
        checkpoint_every: gradient checkpointing of the T-step unroll. Default: None.
        theta0: initial BCM threshold. Default: 0.01.
        mixing: channel-mixing synapses ``w`` ``[K, C, C, D, H, W]`` (SPEC §11) and the
            competitive Hebbian rule, with β ``[C, D, H, W]`` (float32) as a buffer. Default: False.
        gain: g of the mixing form's initial weights, zero-mean normal with std
            ``g / sqrt(K·C)`` (g near 1 is the edge of stability). Default: 1.0.
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
                 rule=_DEFAULT_RULE, activity: str = "change",
                 init=None, mask: Optional[torch.Tensor] = None, checkpoint_every: Optional[int] = None,
                 theta0: float = 0.01, mixing: bool = False, gain: float = 1.0, backend: Optional[str] = None,
                 dtype=None, device=None):
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
        if self.activation == "triangle" and self.channels < 2:
            raise ValueError(f"{op}: activation 'triangle' needs channels >= 2 (it subtracts their mean), "
                             f"got {self.channels}")
        self.activity = validation.check_choice(op, "activity", activity, ACTIVITY_MODES)
        self.mixing = bool(mixing)
        if self.mixing:
            rule = CompetitiveHebbian() if rule is _DEFAULT_RULE else rule
            if rule is not None and not isinstance(rule, CompetitiveHebbian):
                raise TypeError(f"{op}: with mixing=True, rule must be a cellkern.CompetitiveHebbian or None, "
                                f"got {type(rule).__name__}")
            if init is not None:
                raise ValueError(f"{op}: init applies to the shared form; the mixing form draws its weights with "
                                 f"gain, got init={init!r}")
        elif rule is not None and not isinstance(rule, PlasticityRule):
            raise TypeError(f"{op}: rule must be a cellkern.PlasticityRule or None, got {type(rule).__name__}")
        self.rule = rule
        self.backend = backend
        factory = {"dtype": dtype, "device": device}
        K = self.stencil.K
        if self.mixing:
            self.gain = validation.check_real(op, "gain", gain, nonneg=True)
            C = self.channels
            self.w = nn.Parameter(torch.randn((K, C, C, *self.dims), **factory) * (self.gain / math.sqrt(K * C)))
        else:
            self._init_shared(op, init, factory)
        self.bias = nn.Parameter(torch.zeros((self.channels, *self.dims), **factory)) if bias else None
        if mask is not None:
            want = (K, *self.dims)
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != want:
                got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"{op}: mask must be a bool tensor of shape {want}, got {got}")
            mask = mask.to(self.w.device)
        self.register_buffer("mask", mask)
        if self.mixing:
            self.register_buffer("beta", torch.zeros((self.channels, *self.dims), dtype=torch.float32,
                                                     device=self.w.device))
        else:
            st = PlasticityState.create(self.dims, 1, theta0=theta0, dtype=self.w.dtype, device=self.w.device)
            self.register_buffer("x_pre", st.x_pre)
            self.register_buffer("x_post", st.x_post)
            self.register_buffer("theta", st.theta)
        self._last: Optional[tuple] = None

    def _init_shared(self, op, init, factory):
        rule = self.rule
        if init is None:
            init = (0.0, 0.1) if rule is None else (rule.w_min, rule.w_min + 0.1)
        lo, hi = (validation.check_real(op, "init[0]", init[0]), validation.check_real(op, "init[1]", init[1]))
        if hi < lo:
            raise ValueError(f"{op}: init must be (low, high) with low <= high, got {tuple(init)}")
        self.w = nn.Parameter(torch.empty((self.stencil.K, *self.dims), **factory).uniform_(lo, hi))

    @property
    def state(self) -> PlasticityState:
        """The traces and θ as a :class:`~cellkern.PlasticityState` (sharing the buffers)."""
        if self.mixing:
            raise RuntimeError("Lattice3d.state: a mixing lattice has no traces or θ (its state is beta)")
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
                        activity_threshold: Optional[float] = None, gate=None,
                        s: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Apply the rule to ``w`` in place (one fused pass; SPEC §4) and return ``w``.

        ``y`` ``[B, D, H, W]`` defaults to the activity of the last forward's final
        update. The traces follow the batch: when B changes they restart from 0.

        With ``mixing=True`` the step is :func:`cellkern.ops.competitive_hebbian_step_`
        on ``s`` ``[B, C, D, H, W]`` (default: the state the last forward's final update
        started from, whose aggregate it was), with η scaled by ``lr_scale``;
        ``y``, ``activity_threshold`` and ``gate`` belong to the shared form's rules.
        """
        if self.rule is None:
            raise RuntimeError("Lattice3d.plasticity_step: this layer was built with rule=None")
        if self.mixing:
            return self._hebbian_step(y, lr_scale, activity_threshold, gate, s)
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

    def _hebbian_step(self, y, lr_scale, activity_threshold, gate, s):
        op = "Lattice3d.plasticity_step"
        for name, v in (("y", y), ("activity_threshold", activity_threshold), ("gate", gate)):
            if v is not None:
                raise ValueError(f"{op}: {name} belongs to the shared form's rules; a mixing lattice takes s "
                                 f"(or the last forward's state), got {name}={type(v).__name__}")
        if s is None:
            if self._last is None:
                raise RuntimeError(f"{op}: no forward has run yet; pass s or call the layer first")
            s = self._last[0]
        eta = self.rule.eta * validation.check_real(op, "lr_scale", lr_scale, nonneg=True)
        beta = self.beta if self.beta.dtype == torch.float32 else self.beta.float()  # .to(dtype) moved it
        ops.competitive_hebbian_step_(self.w.data, s, beta, eta=eta, tau=self.rule.tau,
                                      eta_beta=self.rule.eta_beta, average=self.rule.average, mask=self.mask,
                                      stencil=self.stencil, boundary=self.boundary, backend=self.backend)
        if beta is not self.beta:
            self.beta.copy_(beta)
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
                f"bias={self.bias is not None}, plasticity={self.rule is not None}"
                + (", mixing=True" if self.mixing else ""))


class LocallyConnected3d(nn.Module):
    """A locally connected 3-D layer: a conv3d whose weights are not shared
    across positions (SPEC §11, the mixing form in one step, ``C_in → C_out``).

    ``y[b,o,i] = Σ_k m[k,i] · Σ_c W[k,o,c,i] · x[b,c,nbr(i,k)] + bias[o,i]``

    The same NCDHW layout as :class:`torch.nn.Conv3d`; the stencil replaces the
    kernel window and never includes the cell itself (``"moore"`` is a 3×3×3
    window without its centre), ``boundary="zero"`` is zero padding.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        dims: lattice dims ``(D, H, W)``; the layer holds one weight matrix per cell and offset.
        stencil: the neighbourhood. Default: ``"moore"``.
        boundary: ``"zero"`` (zero padding), ``"periodic"`` or per axis ``(z, y, x)``. Default: ``"zero"``.
        bias: learn a per-cell bias ``[C_out, D, H, W]``. Default: True.
        mask: optional bool ``[K, D, H, W]`` (False = pruned), kept as a buffer. Default: None.
        backend: force a backend (None: the fastest for the device). Default: None.
        dtype, device: of the parameters.

    The weights ``[K, C_out, C_in, D, H, W]`` and the bias start uniform in
    ``±1/sqrt(K·C_in)`` (the fan-in bound of torch's conv layers).

    Example:
        >>> import torch, cellkern as ck
        >>> layer = ck.nn.LocallyConnected3d(2, 5, (4, 4, 4))
        >>> layer(torch.randn(3, 2, 4, 4, 4)).shape
        torch.Size([3, 5, 4, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, dims, *, stencil="moore", boundary="zero",
                 bias: bool = True, mask: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                 dtype=None, device=None):
        super().__init__()
        op = "LocallyConnected3d"
        self.in_channels = validation.check_positive_int(op, "in_channels", in_channels)
        self.out_channels = validation.check_positive_int(op, "out_channels", out_channels)
        self.dims = _check_dims(op, dims)
        self.stencil = make_stencil(stencil)
        self.boundary = parse_boundary(boundary)
        self.backend = backend
        K = self.stencil.K
        bound = 1.0 / math.sqrt(K * self.in_channels)
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty((K, self.out_channels, self.in_channels, *self.dims), **factory)
                                   .uniform_(-bound, bound))
        self.bias = (nn.Parameter(torch.empty((self.out_channels, *self.dims), **factory).uniform_(-bound, bound))
                     if bias else None)
        if mask is not None:
            want = (K, *self.dims)
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != want:
                got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"{op}: mask must be a bool tensor of shape {want}, got {got}")
            mask = mask.to(self.weight.device)
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, C_in, D, H, W]`` → ``[B, C_out, D, H, W]``."""
        y = ops.aggregate(x, self.weight, self.mask, stencil=self.stencil, boundary=self.boundary,
                          backend=self.backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, dims={self.dims}, stencil={self.stencil.name}, "
                f"boundary={self.boundary}, bias={self.bias is not None}")


def _check_dims(op: str, dims) -> tuple:
    if (not isinstance(dims, (tuple, list)) or len(dims) != 3
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in dims)):
        raise ValueError(f"{op}: dims must be three positive ints (D, H, W), got {dims!r}")
    return tuple(dims)


def _per_step(x) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 6
