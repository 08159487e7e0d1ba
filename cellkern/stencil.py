"""Stencils (the ordered neighbour offsets of a cell) and boundary handling.

SPEC §1: a stencil is an ordered tuple of K offsets ``o_k = (dz, dy, dx)``,
never ``(0, 0, 0)``, in lexicographic order. ``nbr(i, k)`` is the cell at
``i + o_k``; along a ``periodic`` axis indices wrap, along a ``zero`` axis a
neighbour outside the lattice reads as 0 and its synapse is never updated.

Neighbours are always computed from the offsets (never cached in a table that
could go stale).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch

__all__ = [
    "Stencil",
    "Geometry",
    "stencil",
    "radius",
    "parse_boundary",
    "NAMED_STENCILS",
    "BOUNDARIES",
    "geometry",
    "geometry_from_args",
    "in_lattice",
    "shift",
    "live_synapses",
]

BOUNDARIES = ("periodic", "zero")
NAMED_STENCILS = ("von_neumann", "moore18", "moore", "radius(r)")
_RADIUS_RE = re.compile(r"^radius\(\s*([0-9]*\.?[0-9]+)\s*\)$")


@dataclass(frozen=True)
class Stencil:
    """An ordered set of neighbour offsets.

    Attributes:
        name: ``"moore"``, ``"radius(2)"``, ... or ``"custom"``.
        offset_tuples: the K offsets ``(dz, dy, dx)`` in lexicographic order.
    """

    name: str
    offset_tuples: tuple

    @property
    def K(self) -> int:
        """Number of synapses per cell."""
        return len(self.offset_tuples)

    @property
    def offsets(self) -> torch.Tensor:
        """The offsets as an int64 tensor ``[K, 3]`` (columns dz, dy, dx)."""
        return torch.tensor(self.offset_tuples, dtype=torch.int64).reshape(-1, 3)

    @property
    def reach(self) -> tuple:
        """Largest |offset| along each axis (z, y, x): the halo width."""
        return tuple(max(abs(o[a]) for o in self.offset_tuples) for a in range(3))

    def __repr__(self) -> str:
        return f"Stencil({self.name!r}, K={self.K})"


def _sorted_offsets(pred, r: int) -> tuple:
    rng = range(-r, r + 1)
    return tuple(
        (dz, dy, dx)
        for dz in rng
        for dy in rng
        for dx in rng
        if (dz, dy, dx) != (0, 0, 0) and pred(dz, dy, dx)
    )


def radius(r: float) -> Stencil:
    """All offsets with ``0 < |o|₂ ≤ r``.

    Args:
        r: the radius, a positive finite number (``radius(1)`` is von Neumann).
    """
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise TypeError(f"radius: r must be a positive number, got {type(r).__name__} {r!r}")
    if not math.isfinite(r) or r < 1:
        raise ValueError(f"radius: r must be a finite number >= 1, got {r!r}")
    ri = int(math.floor(r))
    r2 = r * r + 1e-9
    name = f"radius({int(r) if float(r).is_integer() else r})"
    return Stencil(name, _sorted_offsets(lambda a, b, c: a * a + b * b + c * c <= r2, ri))


_NAMED = {
    "von_neumann": lambda: Stencil("von_neumann", _sorted_offsets(lambda a, b, c: abs(a) + abs(b) + abs(c) == 1, 1)),
    "moore18": lambda: Stencil("moore18", _sorted_offsets(lambda a, b, c: abs(a) + abs(b) + abs(c) <= 2, 1)),
    "moore": lambda: Stencil("moore", _sorted_offsets(lambda a, b, c: True, 1)),
}
_CACHE: dict = {}

StencilLike = Union[str, Stencil, Sequence[Sequence[int]]]


def stencil(spec: StencilLike) -> Stencil:
    """Return the :class:`Stencil` named by ``spec``.

    Args:
        spec: ``"von_neumann"`` (K=6), ``"moore18"`` (K=18), ``"moore"`` (K=26),
            ``"radius(r)"``, a :class:`Stencil`, or a sequence of ``(dz, dy, dx)``
            offsets (sorted and checked; becomes a ``"custom"`` stencil).

    Example:
        >>> import cellkern as ck
        >>> ck.stencil("moore").K
        26
    """
    if isinstance(spec, Stencil):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key in _CACHE:
            return _CACHE[key]
        if key in _NAMED:
            st = _NAMED[key]()
        else:
            m = _RADIUS_RE.match(key)
            if not m:
                raise ValueError(
                    f"stencil: expected one of {', '.join(NAMED_STENCILS)}, got {spec!r}"
                )
            st = radius(float(m.group(1)))
        _CACHE[key] = st
        return st
    if isinstance(spec, (list, tuple)) or isinstance(spec, torch.Tensor):
        offs = []
        for o in (spec.tolist() if isinstance(spec, torch.Tensor) else spec):
            if len(o) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in o):
                raise TypeError(f"stencil: each offset must be 3 ints (dz, dy, dx), got {o!r}")
            t = tuple(o)
            if t == (0, 0, 0):
                raise ValueError("stencil: offset (0, 0, 0) is not allowed (a cell is never its own synapse)")
            offs.append(t)
        if not offs:
            raise ValueError("stencil: expected at least one offset, got none")
        if len(set(offs)) != len(offs):
            raise ValueError(f"stencil: offsets must be distinct, got {offs!r}")
        return Stencil("custom", tuple(sorted(offs)))
    raise TypeError(
        f"stencil: expected a name ({', '.join(NAMED_STENCILS)}), a Stencil or a list of offsets, "
        f"got {type(spec).__name__}"
    )


BoundaryLike = Union[str, Sequence[str]]


def parse_boundary(boundary: BoundaryLike, arg: str = "boundary") -> tuple:
    """Normalise a boundary to a per-axis tuple ``(z, y, x)`` of names.

    Args:
        boundary: ``"periodic"``, ``"zero"`` or a 3-tuple of those per axis (z, y, x).

    Returns:
        A tuple of three strings.
    """
    if isinstance(boundary, str):
        b = boundary.strip().lower()
        if b not in BOUNDARIES:
            raise ValueError(f"{arg}: expected 'periodic', 'zero' or a 3-tuple of those (z, y, x), got {boundary!r}")
        return (b, b, b)
    if isinstance(boundary, (list, tuple)):
        if len(boundary) != 3:
            raise ValueError(f"{arg}: a per-axis boundary needs 3 entries (z, y, x), got {len(boundary)}: {boundary!r}")
        out = []
        for ax, b in zip("zyx", boundary):
            if not isinstance(b, str) or b.strip().lower() not in BOUNDARIES:
                raise ValueError(f"{arg}[{ax}]: expected 'periodic' or 'zero', got {b!r}")
            out.append(b.strip().lower())
        return tuple(out)
    raise TypeError(f"{arg}: expected a string or a 3-tuple of strings, got {type(boundary).__name__}")


class Geometry:
    """What a kernel needs to know about the lattice wiring: the stencil's
    offsets and which axes wrap. Hashable; holds per-device offset tables.
    """

    __slots__ = ("stencil", "boundary", "periodic", "op_args", "_tables")

    def __init__(self, st: Stencil, boundary: tuple):
        self.stencil = st
        self.boundary = boundary
        self.periodic = tuple(b == "periodic" for b in boundary)
        #: ``(offsets, periodic)`` as the ``cellkern::`` custom ops take them: the
        #: flat offset list ``[dz₀, dy₀, dx₀, …]`` and the per-axis wrap flags
        self.op_args = (tuple(v for o in st.offset_tuples for v in o), self.periodic)
        self._tables: dict = {}

    @property
    def K(self) -> int:
        return self.stencil.K

    @property
    def offsets(self) -> tuple:
        return self.stencil.offset_tuples

    def offsets_on(self, device, dtype=torch.int32) -> torch.Tensor:
        """The ``[K, 3]`` offset table on ``device`` (cached per device/dtype)."""
        key = (str(device), dtype)
        t = self._tables.get(key)
        if t is None:
            t = self.stencil.offsets.to(device=device, dtype=dtype).contiguous()
            self._tables[key] = t
        return t

    def __repr__(self) -> str:
        return f"Geometry({self.stencil!r}, boundary={self.boundary})"


_GEOMETRIES: dict = {}


def geometry(op: str, stencil_spec, boundary) -> Geometry:
    """The :class:`Geometry` of a stencil and a boundary, built and checked
    once per distinct (hashable) pair and cached, so that the per-call cost of
    the ops on small lattices stays low. Errors name ``op``."""
    key = None
    if isinstance(stencil_spec, (str, Stencil)) and isinstance(boundary, (str, tuple)):
        key = (stencil_spec, boundary)
        geom = _GEOMETRIES.get(key)
        if geom is not None:
            return geom
    try:
        st = stencil(stencil_spec)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{op}: {exc}") from None
    geom = Geometry(st, parse_boundary(boundary, arg=f"{op}: boundary"))
    if key is not None and len(_GEOMETRIES) < 256:
        _GEOMETRIES[key] = geom
    return geom


@functools.lru_cache(maxsize=256)
def geometry_from_args(offsets: tuple, periodic: tuple) -> Geometry:
    """The :class:`Geometry` of the custom ops' arguments (``Geometry.op_args``:
    the flat offset list and the per-axis wrap flags)."""
    offs = tuple(tuple(offsets[i:i + 3]) for i in range(0, len(offsets), 3))
    return Geometry(Stencil("custom", offs), tuple("periodic" if p else "zero" for p in periodic))


def in_lattice(dims, offset, periodic, device) -> torch.Tensor:
    """Bool ``[D, H, W]``: False where ``i + offset`` lies outside a zero boundary."""
    valid = torch.ones(tuple(dims), dtype=torch.bool, device=device)
    for a in range(3):
        if not periodic[a]:
            idx = torch.arange(dims[a], device=device) + offset[a]
            shape = [1, 1, 1]
            shape[a] = dims[a]
            valid = valid & ((idx >= 0) & (idx < dims[a])).view(shape)
    return valid


def shift(t: torch.Tensor, offset, periodic) -> tuple:
    """Read ``t`` at ``(z+dz, y+dy, x+dx)`` over its last three dims.

    Returns ``(shifted, valid)``: ``shifted[..., z, y, x] = t[..., z+dz, y+dy, x+dx]``
    (indices wrapped along periodic axes) and ``valid`` a bool ``[D, H, W]``
    that is False where the read position lies outside a ``zero`` boundary
    (there ``shifted`` is 0).
    """
    dims = t.shape[-3:]
    out = t
    for a in range(3):
        idx = torch.arange(dims[a], device=t.device) + offset[a]
        idx = torch.remainder(idx, dims[a]) if periodic[a] else idx.clamp(0, dims[a] - 1)
        out = out.index_select(t.dim() - 3 + a, idx)
    valid = in_lattice(dims, offset, periodic, t.device)
    return out * valid.to(out.dtype), valid


def live_synapses(mask, geom: Geometry, dims, device) -> torch.Tensor:
    """Bool ``[K, D, H, W]``: the synapses that may change (not pruned, and
    their neighbour inside the lattice)."""
    live = torch.stack([in_lattice(dims, o, geom.periodic, device) for o in geom.offsets])
    return live if mask is None else live & mask
