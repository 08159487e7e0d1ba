"""Lattices across processes, on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Two ways to use several processes:

- **Data parallel** (:func:`data_parallel_plasticity_step_`): every rank holds
  the whole lattice and presents its own batch. ``mode="exact"`` gathers the
  activity ``y`` of all ranks (``B·N`` values, far less than the ``K·N`` of
  ``Δw`` when ``B < K``) and every rank runs the same full-batch step, so the
  weights stay identical on all ranks *and* equal those of one process that saw
  the whole batch; the traces then hold the whole batch on every rank.
  ``mode="mean_delta"`` runs the step on the local batch and all-reduces ``Δw``
  (and θ) to their mean: cheaper when ``B ≥ K``, identical on all ranks, but
  not the full-batch step (normalisation and clamping are not linear in Δw).
- **Domain decomposition** (:class:`ZSlabs`): the lattice is split along z;
  each rank keeps its slab of ``w``, state, traces and θ with ``h`` halo planes
  on each side that has a neighbour, refreshed from the neighbouring ranks before
  each propagation and plasticity step (``h`` = the stencil's reach along z for
  propagation, twice that for competition: inhibition of a neighbour needs *its*
  neighbours). Kernels run on the padded slab with a ``zero`` z-boundary; a
  global ``periodic`` z-boundary wraps the halos between the last and first
  rank. Results equal the single-process run.

The halo exchange is one ``all_gather`` of the boundary planes per tensor (no
home-made transport); :attr:`ZSlabs.halo_seconds` accumulates its wall time.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
import torch.distributed as dist

from . import ops
from .rules import PlasticityRule, PlasticityState
from .stencil import parse_boundary, stencil as make_stencil

__all__ = ["ZSlabs", "data_parallel_plasticity_step_", "split_z"]

DP_MODES = ("exact", "mean_delta")


def _world(group) -> tuple:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("cellkern.distributed: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first, e.g. under torchrun)")
    return dist.get_world_size(group), dist.get_rank(group)


def split_z(D: int, world: int) -> list:
    """``[(z0, z1)]`` per rank: contiguous slabs along z, the first ``D % world`` one plane thicker."""
    if world < 1 or D < world:
        raise ValueError(f"split_z: cannot split D={D} planes over {world} ranks (need D >= world >= 1)")
    base, extra = divmod(D, world)
    out, z = [], 0
    for r in range(world):
        n = base + (r < extra)
        out.append((z, z + n))
        z += n
    return out


@torch.no_grad()
def data_parallel_plasticity_step_(w, y, state, rule, mask=None, *, mode: str = "exact", group=None, **kwargs):
    """The fused plasticity step on data-parallel ranks; ``w`` stays identical on all ranks.

    Args:
        w: the whole lattice's weights ``[K, D, H, W]``, identical on every rank.
        y: this rank's activity ``[B, D, H, W]`` (the same B on every rank).
        state: ``exact``: a :class:`~cellkern.PlasticityState` for the whole batch
            (``world·B`` samples, rank r's at ``[r·B, (r+1)·B)``), identical on every rank;
            ``mean_delta``: this rank's own state (batch B).
        rule, mask, kwargs: as in :func:`cellkern.ops.plasticity_step_`.
        mode: ``"exact"`` or ``"mean_delta"`` (see the module docstring). Default: ``"exact"``.

    Returns:
        ``w``.
    """
    if mode not in DP_MODES:
        raise ValueError(f"data_parallel_plasticity_step_: mode must be one of {', '.join(DP_MODES)}, got {mode!r}")
    world, _ = _world(group)
    if mode == "exact":
        parts = [torch.empty_like(y) for _ in range(world)]
        dist.all_gather(parts, y.contiguous(), group=group)
        y_all = torch.cat(parts)
        if state.x_pre.shape[0] != y_all.shape[0]:
            raise ValueError(f"data_parallel_plasticity_step_: mode 'exact' needs the state of the whole batch "
                             f"({y_all.shape[0]} samples), got {state.x_pre.shape[0]}")
        return ops.plasticity_step_(w, y_all, state, rule, mask, **kwargs)
    w0 = w.clone()
    ops.plasticity_step_(w, y, state, rule, mask, **kwargs)
    delta = (w - w0).to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    dist.all_reduce(delta, group=group)
    w.copy_(w0 + (delta / world).to(w.dtype))
    theta = state.theta.clone()
    dist.all_reduce(theta, group=group)
    state.theta.copy_(theta / world)
    return w


class ZSlabs:
    """This rank's slab of a lattice split along z, with halo planes.

    Args:
        dims: the whole lattice ``(D, H, W)``.
        stencil, boundary: of the ops that will run (the z-boundary decides the wrap).
        halo: halo planes on each side with a neighbour. Default: twice the
            stencil's reach along z (enough for propagation and for competition).
        group: the process group. Default: the world.

    Tensors "ext" (extended) hold ``lo + D_local + hi`` planes along their z dim;
    :meth:`interior` is the view of the rank's own planes.
    """

    def __init__(self, dims, stencil="moore", boundary="periodic", *, halo: Optional[int] = None, group=None):
        self.world, self.rank = _world(group)
        self.group = group
        self.dims = tuple(int(d) for d in dims)
        self.stencil = make_stencil(stencil)
        self.boundary = parse_boundary(boundary)
        reach = int(self.stencil.offsets[:, 0].abs().max())
        self.halo = 2 * reach if halo is None else int(halo)
        self.slabs = split_z(self.dims[0], self.world)
        self.z0, self.z1 = self.slabs[self.rank]
        self.depth = self.z1 - self.z0
        if min(z1 - z0 for z0, z1 in self.slabs) < self.halo:
            raise ValueError(f"ZSlabs: every slab needs at least halo={self.halo} planes; D={self.dims[0]} over "
                             f"{self.world} ranks gives {min(z1 - z0 for z0, z1 in self.slabs)}")
        periodic = self.boundary[0] == "periodic" and self.world > 1
        self.below = (self.rank - 1) % self.world if (self.rank > 0 or periodic) else None
        self.above = (self.rank + 1) % self.world if (self.rank < self.world - 1 or periodic) else None
        self.lo = self.halo if self.below is not None else 0
        self.hi = self.halo if self.above is not None else 0
        # inside the padded slab the kernels see a zero z-boundary (halos supply the neighbours)
        self.ext_boundary = ("zero",) + self.boundary[1:] if self.world > 1 else self.boundary
        self.halo_seconds = 0.0

    # --- layout -------------------------------------------------------------
    def local(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's planes of a whole-lattice tensor (a view)."""
        return t.narrow(dim, self.z0, self.depth)

    def pad(self, t_local: torch.Tensor, dim: int) -> torch.Tensor:
        """A new ext tensor: ``t_local`` in the interior, zero halos."""
        shape = list(t_local.shape)
        shape[dim] = self.lo + self.depth + self.hi
        ext = t_local.new_zeros(shape)
        self.interior(ext, dim).copy_(t_local)
        return ext

    def interior(self, t_ext: torch.Tensor, dim: int) -> torch.Tensor:
        return t_ext.narrow(dim, self.lo, self.depth)

    def gather(self, t_local: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole lattice's tensor from every rank's interior (for checks and output)."""
        t_local = t_local.contiguous()
        shapes = []
        for z0, z1 in self.slabs:
            s = list(t_local.shape)
            s[dim] = z1 - z0
            shapes.append(s)
        parts = [t_local.new_empty(s) for s in shapes]
        dist.all_gather(parts, t_local, group=self.group)
        return torch.cat(parts, dim)

    # --- halo exchange ------------------------------------------------------
    def exchange_(self, t_ext: torch.Tensor, dim: int) -> torch.Tensor:
        """Fill the halos of ``t_ext`` in place from the neighbouring ranks' boundary planes."""
        if self.world == 1:
            return t_ext
        t0 = time.perf_counter()
        h = self.halo
        mine = self.interior(t_ext, dim)
        send = torch.stack([mine.narrow(dim, 0, h), mine.narrow(dim, self.depth - h, h)]).contiguous()
        parts = [torch.empty_like(send) for _ in range(self.world)]
        dist.all_gather(parts, send, group=self.group)
        if self.below is not None:  # the planes just below mine: the top of the rank below
            t_ext.narrow(dim, 0, h).copy_(parts[self.below][1])
        if self.above is not None:
            t_ext.narrow(dim, self.lo + self.depth, h).copy_(parts[self.above][0])
        self.halo_seconds += time.perf_counter() - t0
        return t_ext

    # --- ops ----------------------------------------------------------------
    def propagate(self, s_local, w_ext, mask_ext=None, x_local=None, bias=None, **kwargs):
        """:func:`cellkern.ops.propagate` of this rank's slab; returns the new ``s_local``.

        ``w_ext``/``mask_ext`` are padded (:meth:`pad`, dim 1); ``x_local`` this
        rank's drive ``[B, C, D_local, H, W]``; ``bias`` ``[C]`` or the padded ``[C, D_ext, H, W]``.
        """
        s_ext = self.exchange_(self.pad(s_local, 2), 2)
        x_ext = None if x_local is None else self.pad(torch.broadcast_to(x_local, s_local.shape), 2)
        out = ops.propagate(s_ext, w_ext, mask_ext, x_ext, bias, stencil=self.stencil,
                            boundary=self.ext_boundary, **kwargs)
        return self.interior(out, 2).contiguous()

    def create_state(self, batch: int, **kwargs) -> PlasticityState:
        """A padded :class:`~cellkern.PlasticityState` (its tensors are ext along z)."""
        D, H, W = self.dims
        return PlasticityState.create((self.lo + self.depth + self.hi, H, W), batch, **kwargs)

    def plasticity_step_(self, w_ext, y_local, state_ext: PlasticityState, rule: PlasticityRule, mask_ext=None,
                         **kwargs):
        """:func:`cellkern.ops.plasticity_step_` of this rank's slab, in place on the
        padded ``w_ext`` and ``state_ext``; the neighbours' activity and pre-synaptic
        traces come through the halos. Per-cell tensors in ``kwargs`` (``lr_scale``,
        ``gate``) are padded by the caller."""
        y_ext = self.exchange_(self.pad(y_local, 1), 1)
        self.exchange_(state_ext.x_pre, 1)
        return ops.plasticity_step_(w_ext, y_ext, state_ext, rule, mask_ext, stencil=self.stencil,
                                    boundary=self.ext_boundary, **kwargs)
