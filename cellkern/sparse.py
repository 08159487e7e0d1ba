"""Sparse synapses (SPEC §5): pruning, the packed mask and the compact ELL form.

Three forms hold which synapses of a cell are live:

- the **dense mask**, bool ``[K, D, H, W]`` (False = pruned), the form the
  kernels of the dense ops take;
- the **packed mask**, int32 ``[D, H, W]``: bit k of cell i is ``mask[k, i]``
  (K ≤ 32; bit 31 is the sign bit, so K = 32 packs into negative numbers) —
  1/8 of the bool mask, for storage and for the ops' ``mask`` argument;
- the **ELL form** ``(w_ell [Kmax, D, H, W], idx [Kmax, D, H, W] uint8)``:
  slot j of cell i holds the weight of offset ``idx[j, i]`` (255 = empty
  slot, weight 0). Live offsets fill the first slots in ascending k;
  ``Kmax`` = the largest live count of any cell (at least 1). At keep = 0.3
  of the Moore stencil (Kmax = 8 of K = 26) and bf16 weights this is 24
  bytes per cell instead of 104 (fp32 weights) + 26 (bool mask).

Every propagation and plasticity op takes the ELL form as a
:class:`SparseWeights` in place of ``w`` (or ``w_ell`` as ``w`` with ``idx``
as ``mask``), and the packed mask as ``mask``; results equal the dense masked
form's. :func:`to_ell` / :func:`from_ell` convert.
"""
from __future__ import annotations

import torch

from . import validation
from .stencil import geometry, live_synapses, shift

__all__ = ["prune", "pack_mask", "unpack_mask", "to_ell", "from_ell", "SparseWeights", "keep_count",
           "EMPTY", "CRITERIA", "PRUNE_OF"]

#: the ``idx`` value of an empty ELL slot
EMPTY = 255
CRITERIA = ("magnitude", "emergence")


def keep_count(live: torch.Tensor, keep: float) -> torch.Tensor:
    """The number of synapses :func:`prune` keeps in a cell with ``live``
    live synapses: ``floor(keep·live + 1/2)`` (round half up; computed in
    fp64, so 0.3·26 = 7.8 → 8 and 0.25·26 = 6.5 → 7)."""
    return torch.floor(live.to(torch.float64) * keep + 0.5).to(torch.int64)


PRUNE_OF = ("live", "stencil")


def prune(w, mask=None, keep=0.3, criterion="magnitude", saliency=None, lam=1.0, *, of="live", stencil="moore",
          boundary="periodic"):
    """Keep the top ``keep`` fraction of each cell's live synapses (SPEC §5).

    Cell i keeps exactly :func:`keep_count` ``= floor(keep·n_i + 1/2)`` of
    its live synapses, the ones of largest score; equal scores are broken by
    the lower offset index k. Pruned synapses stay pruned. What ``n_i``
    counts is named by ``of``:

    - ``"live"``: the synapses live now (``mask`` True; all K when ``mask`` is
      None), so pruning twice with 0.3 keeps 9% (SPEC §5's ``prune``);
    - ``"stencil"``: the cell's synapses inside the lattice (its stencil under
      ``boundary``), so pruning twice with 0.3 keeps 30% (the staged
      schedule's ``sparse_keep``); synapses to cells outside a ``zero``
      boundary are never kept.

    ``magnitude``: score = |w[k,i]|.
    ``emergence``: score = |w[k,i]| · (1 + λ·saliency[nbr(i,k)]) — the
    saliency of SPEC §7, ``[D, H, W]`` in [0, 1], read at the presynaptic
    cell (0 outside a ``zero`` boundary), so a cell keeps the synapses that
    come from salient cells. (A factor of the postsynaptic cell alone would
    scale all of a cell's scores alike and change nothing.) A per-synapse
    ``[K, D, H, W]`` saliency is used as it is.

    Args:
        w: weights ``[K, D, H, W]``, float.
        mask: optional bool ``[K, D, H, W]`` or packed int32 ``[D, H, W]``. Default: None.
        keep: the fraction in [0, 1]. Default: 0.3.
        criterion: ``"magnitude"`` or ``"emergence"``. Default: ``"magnitude"``.
        saliency: ``[D, H, W]`` or ``[K, D, H, W]`` float, required by ``emergence``. Default: None.
        lam: λ. Default: 1.
        of: ``"live"`` or ``"stencil"``, what ``keep`` is a fraction of. Default: ``"live"``.
        stencil, boundary: the lattice of ``w`` (to find the presynaptic
            cells for ``emergence``, and the in-lattice synapses for
            ``of="stencil"``). Default: ``"moore"``, ``"periodic"``.

    Returns:
        The new mask, bool ``[K, D, H, W]``.

    Example:
        >>> import torch, cellkern as ck
        >>> w = torch.rand(26, 4, 4, 4)
        >>> m = ck.sparse.prune(w, keep=0.3)
        >>> int(m[:, 0, 0, 0].sum())
        8
    """
    op = "prune"
    validation.check_tensor(op, "w", w)
    if w.dim() != 4 or w.dtype not in validation.FLOAT_DTYPES or w.numel() == 0:
        raise ValueError(f"{op}: w must be a float tensor (K, D, H, W) with no empty dim, got "
                         f"{tuple(w.shape)} {w.dtype}")
    K = w.shape[0]
    mask = dense_mask(op, mask, K, tuple(w.shape[1:]), w.device)
    keep = validation.check_real(op, "keep", keep, nonneg=True)
    if keep > 1:
        raise ValueError(f"{op}: keep must be in [0, 1], got {keep!r}")
    criterion = validation.check_choice(op, "criterion", criterion, CRITERIA)
    score = w.detach().to(torch.float64).abs()
    if criterion == "emergence":
        if saliency is None:
            raise ValueError(f"{op}: criterion='emergence' needs saliency ((D, H, W) or (K, D, H, W)), got None")
        validation.check_tensor(op, "saliency", saliency)
        if tuple(saliency.shape) not in (tuple(w.shape), tuple(w.shape[1:])):
            raise ValueError(f"{op}: saliency must have shape (D, H, W) = {tuple(w.shape[1:])} or (K, D, H, W) = "
                             f"{tuple(w.shape)}, got {tuple(saliency.shape)}")
        lam = validation.check_real(op, "lam", lam)
        sal = saliency.to(device=w.device, dtype=torch.float64)
        if sal.dim() == 3:
            geom = geometry(op, stencil, boundary)
            if geom.K != K:
                raise ValueError(f"{op}: w must have K = {geom.K} offsets for stencil {stencil!r}, got {K}")
            sal = torch.stack([shift(sal, o, geom.periodic)[0] for o in geom.offsets])
        score = score * (1.0 + lam * sal)
    elif saliency is not None:
        raise ValueError(f"{op}: saliency is only used by criterion='emergence', got criterion={criterion!r}")
    of = validation.check_choice(op, "of", of, PRUNE_OF)
    if of == "stencil":
        geom = geometry(op, stencil, boundary)
        if geom.K != K:
            raise ValueError(f"{op}: w must have K = {geom.K} offsets for stencil {stencil!r}, got {K}")
        valid = live_synapses(None, geom, tuple(w.shape[1:]), w.device)
        live = valid if mask is None else valid & mask
        n = keep_count(valid.sum(0), keep)
    else:
        live = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
        n = keep_count(live.sum(0), keep)
    score = torch.where(live & ~torch.isnan(score), score, -torch.inf)
    # stable descending sort: equal scores keep ascending k, so lower k wins
    order = torch.sort(score, dim=0, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(K, device=w.device).view(-1, 1, 1, 1)
                                            .expand_as(order).contiguous())
    return (rank < n.unsqueeze(0)) & live


def pack_mask(mask) -> torch.Tensor:
    """A bool mask ``[K, D, H, W]`` (K ≤ 32) as one int32 bit-field per cell:
    bit k of ``packed[i]`` is ``mask[k, i]``.

    Example:
        >>> import torch, cellkern as ck
        >>> m = torch.zeros(6, 1, 1, 1, dtype=torch.bool); m[0] = m[5] = True
        >>> int(ck.sparse.pack_mask(m))
        33
    """
    op = "pack_mask"
    validation.check_tensor(op, "mask", mask)
    if mask.dtype != torch.bool or mask.dim() != 4:
        raise TypeError(f"{op}: mask must be a bool tensor (K, D, H, W), got {mask.dtype} {tuple(mask.shape)}")
    K = mask.shape[0]
    if not 1 <= K <= 32:
        raise ValueError(f"{op}: the packed mask holds 1 to 32 offsets, got K = {K}")
    bits = torch.ones(K, dtype=torch.int64, device=mask.device).bitwise_left_shift(
        torch.arange(K, device=mask.device))
    v = (mask.to(torch.int64) * bits.view(-1, 1, 1, 1)).sum(0)
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


def unpack_mask(packed, K: int) -> torch.Tensor:
    """The bool mask ``[K, D, H, W]`` of a packed int32 ``[D, H, W]``."""
    op = "unpack_mask"
    validation.check_tensor(op, "packed", packed)
    if packed.dtype != torch.int32 or packed.dim() != 3:
        raise TypeError(f"{op}: packed must be an int32 tensor (D, H, W), got {packed.dtype} {tuple(packed.shape)}")
    K = validation.check_positive_int(op, "K", K)
    if K > 32:
        raise ValueError(f"{op}: the packed mask holds 1 to 32 offsets, got K = {K}")
    ks = torch.arange(K, dtype=torch.int32, device=packed.device).view(-1, 1, 1, 1)
    return (packed.unsqueeze(0).bitwise_right_shift(ks) & 1).to(torch.bool)


def dense_mask(op, mask, K, dims, device):
    """``mask`` (None, bool ``[K, D, H, W]`` or packed int32 ``[D, H, W]``) as a bool mask or None."""
    if mask is None:
        return None
    validation.check_tensor(op, "mask", mask)
    if mask.device != device:
        raise ValueError(f"{op}: mask must be on the device of w ({device}), got {mask.device}")
    if mask.dtype == torch.int32:
        if tuple(mask.shape) != tuple(dims):
            raise ValueError(f"{op}: a packed int32 mask must have shape (D, H, W) = {tuple(dims)}, "
                             f"got {tuple(mask.shape)}")
        if K > 32:
            raise ValueError(f"{op}: a packed int32 mask holds at most 32 offsets, the stencil has K = {K}")
        return unpack_mask(mask, K)
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor (False = pruned), got {mask.dtype} (other forms: a "
                        f"packed int32 (D, H, W) mask, or uint8 ELL idx with w_ell as w)")
    if tuple(mask.shape) != (K,) + tuple(dims):
        raise ValueError(f"{op}: mask must have shape (K, D, H, W) = {(K,) + tuple(dims)}, got {tuple(mask.shape)}")
    return mask


def to_ell(w, mask=None):
    """The ELL form of ``w`` with ``mask``: ``(w_ell, idx)``, both ``[Kmax, D, H, W]``.

    Slot j of cell i holds the j-th live offset of the cell in ascending k:
    ``idx[j, i] = k`` and ``w_ell[j, i] = w[k, i]``; the slots past the cell's
    live count hold ``idx = 255`` and ``w_ell = 0``.

    Args:
        w: weights ``[K, D, H, W]`` (K ≤ 255).
        mask: optional bool ``[K, D, H, W]`` or packed int32 ``[D, H, W]``. Default: None (all live).

    Returns:
        ``w_ell`` (dtype of ``w``) and ``idx`` (uint8).

    Example:
        >>> import torch, cellkern as ck
        >>> w = torch.rand(26, 4, 4, 4)
        >>> w_ell, idx = ck.sparse.to_ell(w, ck.sparse.prune(w, keep=0.3))
        >>> tuple(w_ell.shape), idx.dtype
        ((8, 4, 4, 4), torch.uint8)
    """
    op = "to_ell"
    validation.check_tensor(op, "w", w)
    if w.dim() != 4 or w.numel() == 0:
        raise ValueError(f"{op}: w must have shape (K, D, H, W) with no empty dim, got {tuple(w.shape)}")
    K = w.shape[0]
    if K >= EMPTY:
        raise ValueError(f"{op}: the ELL form holds at most 254 offsets, got K = {K}")
    mask = dense_mask(op, mask, K, tuple(w.shape[1:]), w.device)
    live = torch.ones_like(w, dtype=torch.bool) if mask is None else mask
    kmax = max(1, int(live.sum(0).max()))
    # live offsets first, in ascending k (a stable sort of the dead flags)
    order = torch.sort((~live).to(torch.uint8), dim=0, stable=True).indices[:kmax]
    used = live.gather(0, order)
    idx = torch.where(used, order, EMPTY).to(torch.uint8)
    w_ell = torch.where(used, w.gather(0, order), torch.zeros((), dtype=w.dtype, device=w.device))
    return w_ell, idx


def check_ell(op: str, w_ell, idx, K: int, *, full: bool = True) -> None:
    """``w_ell``/``idx`` form a valid ELL pair for a stencil of ``K`` offsets;
    ``full`` also checks the values of ``idx`` (< K or 255, no offset twice in a cell)."""
    validation.check_tensor(op, "w_ell", w_ell)
    validation.check_tensor(op, "idx", idx)
    if idx.dtype != torch.uint8:
        raise TypeError(f"{op}: idx must be a uint8 tensor (offset index, 255 = empty), got {idx.dtype}")
    if w_ell.dtype not in validation.FLOAT_DTYPES:
        raise TypeError(f"{op}: w_ell must be float16, bfloat16, float32 or float64, got {w_ell.dtype}")
    if w_ell.dim() != 4 or w_ell.numel() == 0:
        raise ValueError(f"{op}: w_ell must have shape (Kmax, D, H, W) with no empty dim, got {tuple(w_ell.shape)}")
    if tuple(idx.shape) != tuple(w_ell.shape):
        raise ValueError(f"{op}: idx must have the shape of w_ell {tuple(w_ell.shape)}, got {tuple(idx.shape)}")
    if idx.device != w_ell.device:
        raise ValueError(f"{op}: idx must be on the device of w_ell ({w_ell.device}), got {idx.device}")
    if w_ell.shape[0] > K:
        raise ValueError(f"{op}: w_ell has Kmax = {w_ell.shape[0]} slots, more than the stencil's K = {K}")
    if full:
        bad = (idx >= K) & (idx != EMPTY)
        if bool(bad.any()):
            raise ValueError(f"{op}: idx must hold offsets < K = {K} or 255 (empty), got {int(idx[bad].max())}")
        count = torch.zeros((K + 1,) + tuple(idx.shape[1:]), dtype=torch.int16, device=idx.device)
        slot = torch.where(idx == EMPTY, K, idx.to(torch.int64))
        count.scatter_add_(0, slot, torch.ones_like(slot, dtype=torch.int16))
        if bool((count[:K] > 1).any()):
            raise ValueError(f"{op}: idx names an offset twice in one cell")


def _dense_slots(idx, K):
    """The dense offset of every slot, ``K`` for empty slots (int64)."""
    return torch.where(idx == EMPTY, K, idx.to(torch.int64))


def from_ell(w_ell, idx, K: int):
    """The dense form ``(w [K, D, H, W], mask bool [K, D, H, W])`` of an ELL pair.

    Differentiable in ``w_ell`` (the gradient of a dense weight goes back to its slot).

    Example:
        >>> import torch, cellkern as ck
        >>> w = torch.rand(6, 3, 3, 3); m = ck.sparse.prune(w, keep=0.5)
        >>> w2, m2 = ck.sparse.from_ell(*ck.sparse.to_ell(w, m), 6)
        >>> bool(torch.equal(m2, m) and torch.equal(w2[m], w[m]))
        True
    """
    op = "from_ell"
    K = validation.check_positive_int(op, "K", K)
    check_ell(op, w_ell, idx, K)
    return expand_ell(w_ell, idx, K)


def expand_ell(w_ell, idx, K: int):
    """:func:`from_ell` without the checks (for pairs already validated)."""
    slots = _dense_slots(idx, K)
    dims = tuple(w_ell.shape[1:])
    w = torch.zeros((K + 1,) + dims, dtype=w_ell.dtype, device=w_ell.device).scatter(0, slots, w_ell)[:K]
    mask = torch.zeros((K + 1,) + dims, dtype=torch.bool, device=w_ell.device).scatter_(
        0, slots, torch.ones_like(slots, dtype=torch.bool))[:K]
    return w, mask


def gather_ell(dense, idx, K):
    """``dense[idx[j, i], i]`` for every slot (0 in empty slots): the ELL
    values of a dense ``[K, D, H, W]`` tensor (e.g. a weight gradient)."""
    slots = _dense_slots(idx, K).clamp(max=K - 1)
    return torch.where(idx == EMPTY, torch.zeros((), dtype=dense.dtype, device=dense.device),
                       dense.gather(0, slots))


class SparseWeights:
    """The ELL pair ``(w_ell, idx)`` of a stencil with ``K`` offsets, as one
    object every op takes in place of ``w``. The pair is validated once, here;
    the ops then trust it (change ``idx`` only through a new object).
    Plasticity ops update ``w_ell`` in place; ``w_ell`` may require grad.

    Args:
        w_ell: ``[Kmax, D, H, W]`` float.
        idx: ``[Kmax, D, H, W]`` uint8, offset index per slot, 255 = empty.
        K: the stencil's K.

    Example:
        >>> import torch, cellkern as ck
        >>> w = torch.rand(26, 6, 6, 6) * 0.1
        >>> sw = ck.sparse.SparseWeights.from_dense(w, ck.sparse.prune(w, keep=0.3))
        >>> s = torch.randn(1, 2, 6, 6, 6)
        >>> ck.ops.propagate(s, sw).shape, sw.Kmax
        (torch.Size([1, 2, 6, 6, 6]), 8)
    """

    def __init__(self, w_ell, idx, K: int):
        K = validation.check_positive_int("SparseWeights", "K", K)
        check_ell("SparseWeights", w_ell, idx, K)
        self.w_ell, self.idx, self.K = w_ell, validation.contiguous(idx), K

    @classmethod
    def from_dense(cls, w, mask=None) -> "SparseWeights":
        """The ELL form of ``w`` and ``mask`` (see :func:`to_ell`)."""
        return cls(*to_ell(w, mask), w.shape[0])

    def to_dense(self):
        """``(w, mask)``, dense (see :func:`from_ell`)."""
        return from_ell(self.w_ell, self.idx, self.K)

    @property
    def Kmax(self) -> int:
        return self.w_ell.shape[0]

    @property
    def dims(self) -> tuple:
        return tuple(self.w_ell.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.w_ell.dtype

    @property
    def device(self) -> torch.device:
        return self.w_ell.device

    @property
    def nbytes(self) -> int:
        """Bytes held: ``w_ell`` plus ``idx``."""
        return self.w_ell.nelement() * self.w_ell.element_size() + self.idx.nelement()

    def to(self, *args, **kwargs) -> "SparseWeights":
        """A copy with ``w_ell`` moved/cast like ``Tensor.to`` (``idx`` only moved)."""
        w_ell = self.w_ell.to(*args, **kwargs)
        return SparseWeights(w_ell, self.idx.to(w_ell.device), self.K)

    def __repr__(self) -> str:
        return f"SparseWeights(K={self.K}, Kmax={self.Kmax}, dims={self.dims}, dtype={self.dtype})"
