"""The main job on several processes: how a :class:`~cellkern.Trainer` lays
out its tensors and runs its ops when started by ``torchrun``.

Three layouts, one interface (:class:`Local`, :class:`DataParallel`,
:class:`DomainParallel`); the trainer's loop is the same for all three:

- ``None`` (:class:`Local`): one process holds everything.
- ``"data"`` (:class:`DataParallel`): every rank holds the whole lattice and
  presents its share of the batch: the run's batch ``B`` (``batch`` in the
  config) is split into ``world`` equal parts, rank r taking samples
  ``[r·B/world, (r+1)·B/world)`` of the batch drawn from the run's generator
  (the same on every rank). Each rank propagates its own samples; the plasticity
  step gathers the activity of all ranks and applies the full-batch step
  (:func:`cellkern.distributed.data_parallel_plasticity_step_`, mode ``"exact"``),
  so the weights stay identical on all ranks and equal those of one process.
- ``"domain"`` (:class:`DomainParallel`): the lattice is split along z
  (:class:`cellkern.distributed.ZSlabs`); each rank holds its slab of the
  weights, mask, traces, θ, cluster factors, state and drive, with halo planes
  exchanged before each propagation and plasticity step. The input face (z = 0)
  lives on the first rank, the output face on the last.

What needs the whole lattice — re-clustering, the emergence metrics, the
decoder's features, checkpoints, the stage transfer and the final evaluation —
sees gathered tensors (:meth:`Local.full_activity`, :meth:`Local.full_weights`,
:meth:`Local.unshard`), so every rank takes the same decisions and a checkpoint
has the single-process layout: a run can resume in any mode, or in one process.
Rank 0 alone logs and writes files. The result equals the single-process run
of the same config in both modes (``python_tests/test_parallel_run.py``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from .. import ops
from ..distributed import ZSlabs, data_parallel_plasticity_step_
from .monitor import BOUNDARY, face_features

__all__ = ["MODES", "Local", "DataParallel", "DomainParallel", "make_layout", "init_from_env", "shutdown"]

#: the ``parallel`` modes of :class:`~cellkern.Trainer` and ``cellkern run --parallel``
MODES = ("data", "domain")


def init_from_env(backend: Optional[str] = None) -> int:
    """Initialise ``torch.distributed`` from ``torchrun``'s environment
    (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``…) unless already done; returns
    the world size (1 when not started by ``torchrun``). ``backend``: default
    gloo (the trainer's tensors live on the CPU)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if "WORLD_SIZE" not in os.environ:
        return 1
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    dist.init_process_group(backend or "gloo")
    return dist.get_world_size()


def shutdown() -> None:
    """Destroy the default process group (if any) and collect the garbage
    right away. The collection matters: once ``torch._dynamo`` is imported
    (the first custom-op call imports it), a gloo process group left to the
    interpreter's teardown aborts the process now and then ("terminate called
    without an active exception", 4 runs in 10 on torch 2.13); collected
    while the interpreter is alive, it does not (0 in 10)."""
    import gc

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def make_layout(parallel: Optional[str], cfg) -> "Local":
    """The layout object of ``parallel`` (None, ``"data"`` or ``"domain"``)."""
    if parallel is None:
        return Local()
    if parallel not in MODES:
        raise ValueError(f"Trainer: parallel must be None or one of {', '.join(map(repr, MODES))}, got {parallel!r}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"Trainer: parallel={parallel!r} needs torch.distributed initialised "
                           "(start the job with torchrun, e.g. `torchrun --nproc-per-node 2 -m cellkern.cli run "
                           f"--parallel {parallel}`)")
    return DataParallel(cfg) if parallel == "data" else DomainParallel(cfg)


def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` of every rank, concatenated along ``dim`` in rank order (equal shapes)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


class Local:
    """One process: the trainer's tensors are the whole lattice's."""

    mode: Optional[str] = None
    world, rank = 1, 0

    @property
    def is_writer(self) -> bool:
        """Whether this rank logs and writes files (rank 0)."""
        return self.rank == 0

    def describe(self) -> dict:
        return {"mode": self.mode, "world": self.world}

    # the trainer's tensors: whole lattice ⇄ this rank's part (idempotent, in place on the trainer)
    def shard(self, t) -> None:
        """Replace the trainer's whole-lattice tensors by this rank's parts."""

    def unshard(self, t) -> None:
        """Replace the trainer's parts by the whole-lattice tensors (collective)."""

    def local_input(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole-batch, whole-lattice drive ``[B, C, D, H, W]``."""
        return x

    # the step
    def propagate(self, t, s, x, **kw) -> torch.Tensor:
        return ops.propagate(s, t.w, t.mask, x=x, **kw)

    def plasticity_step_(self, t, y, rule, *, lr_scale, activity_threshold, **kw) -> None:
        ops.plasticity_step_(t.w, y, t.pstate, rule, t.mask, lr_scale=lr_scale,
                             activity_threshold=activity_threshold, **kw)

    # whole-lattice views (collective where the layout splits)
    def features(self, s: torch.Tensor) -> torch.Tensor:
        """The decoder's features of the whole batch (SPEC §9)."""
        return face_features(s)

    def full_activity(self, y: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The whole batch's, whole lattice's activity ``[B, D, H, W]`` from this rank's part."""
        return y

    def full_weights(self, t) -> tuple:
        """``(w, mask)`` of the whole lattice."""
        return t.w, t.mask

    def synapses(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's form of a whole-lattice per-synapse tensor ``[K, D, H, W]``."""
        return full

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return obj


class DataParallel(Local):
    """Data parallel: the batch split over the ranks, the lattice whole on each."""

    mode = "data"

    def __init__(self, cfg):
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        if cfg.batch % self.world:
            raise ValueError(f"Trainer: parallel='data' splits the batch over {self.world} ranks; batch must be a "
                             f"multiple of {self.world}, got {cfg.batch}")
        self.per_rank = cfg.batch // self.world
        self.sharded = False

    def _mine(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.narrow(0, self.rank * self.per_rank, self.per_rank).clone()

    def _all(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else _gather(t, 0)

    def shard(self, t) -> None:
        if not self.sharded:
            t.s, t.x, t.y_prev = self._mine(t.s), self._mine(t.x), self._mine(t.y_prev)
            self.sharded = True

    def unshard(self, t) -> None:
        if self.sharded:
            t.s, t.x, t.y_prev = self._all(t.s), self._all(t.x), self._all(t.y_prev)
            self.sharded = False

    def local_input(self, x):
        return self._mine(x)

    def plasticity_step_(self, t, y, rule, *, lr_scale, activity_threshold, **kw) -> None:
        data_parallel_plasticity_step_(t.w, y, t.pstate, rule, t.mask, mode="exact", lr_scale=lr_scale,
                                       activity_threshold=activity_threshold, **kw)

    def features(self, s):
        return _gather(face_features(s), 0)

    def full_activity(self, y):
        return self._all(y)

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class DomainParallel(Local):
    """Domain decomposition: the lattice split along z, halos exchanged each step."""

    mode = "domain"

    def __init__(self, cfg):
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.stencil = cfg.stencil
        self.slabs: Optional[ZSlabs] = None
        self.sharded = False
        self.halo_seconds = 0.0   # of the stages before the current slabs'

    def describe(self) -> dict:
        d = super().describe()
        d["halo_seconds"] = self.halo_seconds + (0.0 if self.slabs is None else self.slabs.halo_seconds)
        if self.slabs is not None:
            d["slab"] = [self.slabs.z0, self.slabs.z1]
        return d

    def _slabs_for(self, dims) -> ZSlabs:
        if self.slabs is None or self.slabs.dims != tuple(dims):
            if self.slabs is not None:
                self.halo_seconds += self.slabs.halo_seconds
            self.slabs = ZSlabs(dims, self.stencil, BOUNDARY)
        return self.slabs

    def shard(self, t) -> None:
        if self.sharded:
            return
        z = self._slabs_for(tuple(t.w.shape[1:]))

        def ext(v, dim):
            return None if v is None else z.pad(z.local(v, dim), dim)

        def loc(v, dim):
            return None if v is None else z.local(v, dim).clone()

        t.w, t.mask, t.factor = ext(t.w, 1), ext(t.mask, 1), ext(t.factor, 1)
        ps = t.pstate
        ps.x_pre, ps.x_post, ps.theta = ext(ps.x_pre, 1), ext(ps.x_post, 1), ext(ps.theta, 0)
        t.s, t.x, t.y_prev = loc(t.s, 2), loc(t.x, 2), loc(t.y_prev, 1)
        self.sharded = True

    def unshard(self, t) -> None:
        if not self.sharded:
            return
        z = self.slabs

        def full(v, dim, ext=True):
            return None if v is None else z.gather(z.interior(v, dim) if ext else v, dim)

        t.w, t.mask, t.factor = full(t.w, 1), full(t.mask, 1), full(t.factor, 1)
        ps = t.pstate
        ps.x_pre, ps.x_post, ps.theta = full(ps.x_pre, 1), full(ps.x_post, 1), full(ps.theta, 0)
        t.s, t.x, t.y_prev = full(t.s, 2, False), full(t.x, 2, False), full(t.y_prev, 1, False)
        self.sharded = False

    def local_input(self, x):
        return self.slabs.local(x, 2).contiguous()

    @staticmethod
    def _own(kw) -> dict:  # the slabs bring their own stencil and (padded) boundary
        return {k: v for k, v in kw.items() if k not in ("stencil", "boundary")}

    def propagate(self, t, s, x, **kw):
        return self.slabs.propagate(s, t.w, t.mask, x, **self._own(kw))

    def plasticity_step_(self, t, y, rule, *, lr_scale, activity_threshold, **kw) -> None:
        z = self.slabs
        if isinstance(lr_scale, torch.Tensor) and lr_scale.dim() == 3:   # per cell: this slab, padded
            lr_scale = z.pad(z.local(lr_scale, 0), 0)
        z.plasticity_step_(t.w, y, t.pstate, rule, t.mask, lr_scale=lr_scale,
                           activity_threshold=activity_threshold, **self._own(kw))

    def features(self, s):
        feats = face_features(s).contiguous()   # right on the last rank, which holds the output face
        dist.broadcast(feats, src=self.world - 1)
        return feats

    def full_activity(self, y):
        return None if y is None else self.slabs.gather(y, 1)

    def full_weights(self, t):
        z = self.slabs
        return (z.gather(z.interior(t.w, 1), 1),
                None if t.mask is None else z.gather(z.interior(t.mask, 1), 1))

    def synapses(self, full):
        z = self.slabs
        return z.pad(z.local(full, 1), 1)

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
