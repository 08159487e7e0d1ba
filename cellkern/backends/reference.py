"""The reference backend: SPEC §2 written in plain torch.

This is the ground truth of every test. It is written to be read, not to be
fast, and it is never edited to match a kernel. Every function here has the
same name and signature in every backend (see ``cellkern/backends/__init__.py``
for the contract). All arithmetic happens in float32 (float64 for float64
inputs); results are cast back to the dtype of ``s`` (``w`` for ``dw``).

The forward functions are differentiable torch code, so
``torch.autograd`` through them is an independent check of the explicit
gradient formulas in the backward functions.
"""
from __future__ import annotations

import torch

from ..contract import ACTIVATIONS, accumulation_dtype
from ..stencil import Geometry, in_lattice, live_synapses, shift

#: the kernels take w in a lower precision than s (see ops.forms.weights_for)
MIXED_WEIGHTS = True


def _effective_weight(w: torch.Tensor, mask, k: int, valid: torch.Tensor, acc) -> torch.Tensor:
    """m[k] · w[k], zero where the neighbour lies outside a zero boundary."""
    wk = w[k].to(acc) * valid.to(acc)
    if mask is not None:
        wk = wk * mask[k].to(acc)
    return wk


def _stencil_sum(sa, w, mask, geom: Geometry):
    """``Σ_k m[k,i] · w[k,i] · sa[b,c,nbr(i,k)]`` in the dtype of ``sa``."""
    a = torch.zeros(sa.shape, dtype=sa.dtype, device=sa.device)
    for k, o in enumerate(geom.offsets):
        s_nbr, valid = shift(sa, o, geom.periodic)
        a = a + _effective_weight(w, mask, k, valid, sa.dtype) * s_nbr
    return a


def aggregate_forward(s, w, mask, geom: Geometry):
    """``a[b,c,i] = Σ_k m[k,i] · w[k,i] · s[b,c,nbr(i,k)]``."""
    return _stencil_sum(s.to(accumulation_dtype(s.dtype)), w, mask, geom).to(s.dtype)


def aggregate_transposed(g, w, mask, geom: Geometry):
    """``ds[b,c,j] = Σ_k m[k,j-o_k] · w[k,j-o_k] · g[b,c,j-o_k]`` (fp32/fp64 result).

    The transposed stencil is again a gather, at ``-o_k``: the cell ``i = j - o_k``
    has ``j`` as its k-th neighbour, so it sends ``w[k,i]·g[i]`` back to ``j``.
    """
    acc = accumulation_dtype(g.dtype)
    ga = g.to(acc)
    ds = torch.zeros(g.shape, dtype=acc, device=g.device)
    for k, o in enumerate(geom.offsets):
        valid = in_lattice(g.shape[-3:], o, geom.periodic, g.device)
        contrib = _effective_weight(w, mask, k, valid, acc) * ga  # at the post cell i
        back, _ = shift(contrib, tuple(-v for v in o), geom.periodic)
        ds = ds + back
    return ds


def weight_grad(g, s, mask, geom: Geometry, dtype):
    """``dw[k,i] = m[k,i] · Σ_{b,c} g[b,c,i] · s[b,c,nbr(i,k)]`` (0 outside a zero boundary)."""
    acc = accumulation_dtype(g.dtype)
    ga, sa = g.to(acc), s.to(acc)
    K = geom.K
    dw = torch.zeros((K,) + tuple(s.shape[-3:]), dtype=acc, device=s.device)
    for k, o in enumerate(geom.offsets):
        s_nbr, valid = shift(sa, o, geom.periodic)
        d = (ga * s_nbr).sum(dim=(0, 1)) * valid.to(acc)
        if mask is not None:
            d = d * mask[k].to(acc)
        dw[k] = d
    return dw.to(dtype)


def aggregate_backward(g, s, w, mask, geom: Geometry, need_s: bool, need_w: bool):
    ds = aggregate_transposed(g, w, mask, geom).to(s.dtype) if need_s else None
    dw = weight_grad(g, s, mask, geom, w.dtype) if need_w else None
    return ds, dw


def activate(u, activation: str):
    """φ(u) for φ in identity / tanh / relu / sigmoid / triangle.

    ``triangle`` mixes the channels of a cell (dim 1 of ``u``, SPEC §11):
    ``φ(u)[o] = relu(u[o] − mean_c u[c])``.
    """
    if activation == "triangle":
        return torch.relu(u - u.mean(dim=1, keepdim=True))
    if activation == "identity":
        return u
    if activation == "tanh":
        return torch.tanh(u)
    if activation == "relu":
        return torch.relu(u)
    if activation == "sigmoid":
        return torch.sigmoid(u)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def activate_vjp(g, u, activation: str):
    """``gᵀ·∂φ/∂u`` at ``u``: ``g·φ'(u)`` for the elementwise activations; for
    ``triangle``, with ``r[o] = (u[o] > mean_c u[c])``,
    ``du[c] = r[c]·g[c] − mean_o (r[o]·g[o])`` (over dim 1)."""
    if activation == "triangle":
        rg = g * (u > u.mean(dim=1, keepdim=True)).to(u.dtype)
        return rg - rg.mean(dim=1, keepdim=True)
    return g * activate_grad(u, activation)


def activate_grad(u, activation: str):
    """φ'(u) of an elementwise φ; relu'(0) = 0 as in torch."""
    if activation == "identity":
        return torch.ones_like(u)
    if activation == "tanh":
        t = torch.tanh(u)
        return 1 - t * t
    if activation == "relu":
        return (u > 0).to(u.dtype)
    if activation == "sigmoid":
        sg = torch.sigmoid(u)
        return sg * (1 - sg)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def propagate_forward(s, w, mask, x, bias, geom: Geometry, leak: float, activation: str, save_u: bool):
    """``s' = (1-α)·s + α·φ(u)``, ``u = aggregate(s, w, mask) + x + bias``.

    Returns ``(s', u)``; ``u`` (fp32, fp64 for fp64 input) only when ``save_u``.
    ``x`` is None or shaped like ``s``; ``bias`` None or ``[C, D, H, W]``.
    """
    sa = s.to(accumulation_dtype(s.dtype))
    return _cell_update(s, sa, _stencil_sum(sa, w, mask, geom), x, bias, leak, activation, save_u)


def _cell_update(s, sa, u, x, bias, leak, activation, save_u):
    """``(1-α)·s + α·φ(u + x + bias)`` in the dtype of ``s``, and ``u + x + bias``."""
    acc = sa.dtype
    if x is not None:
        u = u + x.to(acc)
    if bias is not None:
        u = u + bias.to(acc)
    out = (1.0 - leak) * sa + leak * activate(u, activation)
    return out.to(s.dtype), (u if save_u else None)


def propagate_backward(g, s, w, mask, u, geom: Geometry, leak: float, activation: str,
                       need_s: bool, need_w: bool, need_u: bool):
    """Gradients of ``propagate`` given the upstream ``g`` and the saved ``u``.

    ``du = α · gᵀ·∂φ/∂u`` (``g · α · φ'(u)`` for an elementwise φ; the
    gradient of x and, summed over b, of bias);
    ``ds = (1-α)·g + aggregate_transposed(du)``; ``dw = weight_grad(du, s)``.
    Returns ``(ds, dw, du)`` with ``du`` in the dtype of ``u``.
    """
    acc = u.dtype
    du = leak * activate_vjp(g.to(acc), u, activation)
    ds = dw = None
    if need_s:
        ds = ((1.0 - leak) * g.to(acc) + aggregate_transposed(du, w, mask, geom)).to(s.dtype)
    if need_w:
        dw = weight_grad(du, s, mask, geom, w.dtype)
    return ds, dw, (du if need_u else None)


# ---- the ELL form (SPEC §5): slot j of cell i holds offset idx[j, i] (255 = empty) ----


def neighbour_index(geom: Geometry, dims, device) -> tuple:
    """``(nbr, valid)``, both ``[K, N]``: the linear index of ``nbr(i, k)``
    (wrapped along periodic axes) and False where it lies outside a zero boundary."""
    D, H, W = dims
    z, y, x = torch.meshgrid(torch.arange(D, device=device), torch.arange(H, device=device),
                             torch.arange(W, device=device), indexing="ij")
    nbr, valid = [], []
    for o in geom.offsets:
        ok = torch.ones((D, H, W), dtype=torch.bool, device=device)
        pos = []
        for a, (c, n) in enumerate(zip((z, y, x), (D, H, W))):
            c = c + o[a]
            if geom.periodic[a]:
                c = torch.remainder(c, n)
            else:
                ok = ok & (c >= 0) & (c < n)
                c = c.clamp(0, n - 1)
            pos.append(c)
        nbr.append(((pos[0] * H + pos[1]) * W + pos[2]).flatten())
        valid.append(ok.flatten())
    return torch.stack(nbr), torch.stack(valid)


def _ell_sum(sa, w_ell, idx, geom: Geometry):
    """``Σ_j w_ell[j,i] · sa[b,c,nbr(i, idx[j,i])]`` over the live slots, in the dtype of ``sa``."""
    B, C = sa.shape[:2]
    dims = tuple(sa.shape[2:])
    flat = sa.reshape(B, C, -1)
    nbr, valid = neighbour_index(geom, dims, sa.device)
    a = torch.zeros_like(flat)
    for j in range(w_ell.shape[0]):
        k = idx[j].flatten().to(torch.int64)
        live = k != 255
        kk = k.clamp(max=geom.K - 1).unsqueeze(0)
        n = nbr.gather(0, kk)[0]
        wj = torch.where(live & valid.gather(0, kk)[0], w_ell[j].flatten().to(sa.dtype), 0)
        a = a + wj * flat[:, :, n]
    return a.view(sa.shape)


def aggregate_forward_ell(s, w_ell, idx, geom: Geometry):
    """``a[b,c,i] = Σ_j w_ell[j,i] · s[b,c,nbr(i, idx[j,i])]`` (empty slots add nothing)."""
    return _ell_sum(s.to(accumulation_dtype(s.dtype)), w_ell, idx, geom).to(s.dtype)


def propagate_forward_ell(s, w_ell, idx, x, bias, geom: Geometry, leak: float, activation: str, save_u: bool):
    """:func:`propagate_forward` with the aggregate of :func:`aggregate_forward_ell`."""
    sa = s.to(accumulation_dtype(s.dtype))
    return _cell_update(s, sa, _ell_sum(sa, w_ell, idx, geom), x, bias, leak, activation, save_u)


# ---- plasticity (SPEC §3–§4): in place on w, no autograd ----
#
# One function, plasticity_, is the whole fused step of SPEC §4 written as the
# sequence the SPEC gives; the separate rules (stdp_, bcm_) are that function
# with the other parts switched off (see cellkern.ops.plasticity).


def _plasticity_dtype(w, state):
    """fp64 when weights or state are fp64, else fp32."""
    return torch.float64 if torch.float64 in (w.dtype, state) else torch.float32


def _neighbour_mean(y, geom: Geometry):
    """``mean_k y[b, nbr(i,k)]`` (0 for neighbours outside a zero boundary)."""
    total = torch.zeros_like(y)
    for o in geom.offsets:
        total = total + shift(y, o, geom.periodic)[0]
    return total / geom.K


def lateral_inhibition(y, beta: float, geom: Geometry):
    """``y'[b,i] = relu(y[b,i] − β·mean_k y[b,nbr(i,k)])`` in the dtype of ``y``."""
    ya = y.to(accumulation_dtype(y.dtype))
    return torch.relu(ya - beta * _neighbour_mean(ya, geom)).to(y.dtype)


def local_winners(y, threshold: float, geom: Geometry):
    """``win[b,i] = y[b,i] > θ_act and y[b,i] ≥ max_k y[b,nbr(i,k)]`` (bool)."""
    ya = y.to(accumulation_dtype(y.dtype))
    nmax = torch.stack([shift(ya, o, geom.periodic)[0] for o in geom.offsets]).amax(0)
    return (ya > threshold) & (ya >= nmax)


def _stdp_terms(wa, z, xp, xq, geom: Geometry, p):
    """Per sample and synapse: ``A₊·F₊(w)·x_pre[b,nbr]·z[b,i] − A₋·F₋(w)·z[b,nbr]·x_post[b,i]``,
    with η already in ``p.a_plus``/``p.a_minus``; ``[B, K, D, H, W]``."""
    out = []
    for k, o in enumerate(geom.offsets):
        fp = (p.w_max - wa[k]) if p.multiplicative else 1.0
        fm = (wa[k] - p.w_min) if p.multiplicative else 1.0
        xp_nbr = shift(xp, o, geom.periodic)[0]
        z_nbr = shift(z, o, geom.periodic)[0]
        out.append(p.a_plus * fp * xp_nbr * z - p.a_minus * fm * z_nbr * xq)
    return torch.stack(out, dim=1)


def _bcm_terms(wa, yp, theta, geom: Geometry, p):
    """Per sample and synapse: ``η·y[b,i]·(y[b,i] − θ[i])·y[b,nbr] − ε·w``; ``[B, K, D, H, W]``."""
    post = yp * (yp - theta)
    out = []
    for k, o in enumerate(geom.offsets):
        y_nbr = shift(yp, o, geom.periodic)[0]
        out.append(p.bcm_lr * post * y_nbr - p.bcm_decay * wa[k])
    return torch.stack(out, dim=1)


def plasticity_(w, mask, geom: Geometry, p, y, spikes, x_pre, x_post, theta, gate, lr):
    """The fused plasticity step of SPEC §4, in place on ``w``, the traces and θ.

    In order: inhibition (y → y') → winners → spikes z = (y' > θ_act) (or the
    given ``spikes``) → per-sample STDP + BCM terms on y' and z, summed →
    gate (winners × ``gate``) → batch mean → × ``lr`` per cell → normalise
    (Σ_k |w| of every cell with a winner back to its value before) → clamp
    to [w_min, w_max] — all on live synapses only (not masked, neighbour
    inside the lattice); then traces (decay, + z) and θ.
    """
    dims = tuple(w.shape[1:])
    state_dtype = next(t.dtype for t in (y, spikes, x_pre, theta) if t is not None)
    acc = _plasticity_dtype(w, state_dtype)
    wa = w.to(acc)
    yp = None
    if y is not None:
        yp = y.to(acc)
        if p.competition:
            yp = torch.relu(yp - p.beta * _neighbour_mean(yp, geom))
    B = (yp if yp is not None else spikes).shape[0]
    g = torch.ones((B,) + dims, dtype=acc, device=w.device)
    if p.competition:
        g = g * local_winners(yp, p.threshold, geom).to(acc)
    if gate is not None:
        g = g * gate.to(acc)
    z = spikes.to(acc) if spikes is not None else (yp > p.threshold).to(acc)

    terms = torch.zeros((B,) + tuple(w.shape), dtype=acc, device=w.device)
    if p.stdp:
        xp = x_pre.to(acc) * p.decay_pre  # decay first
        xq = x_post.to(acc) * p.decay_post
        terms = terms + _stdp_terms(wa, z, xp, xq, geom, p)
    if p.bcm:
        terms = terms + _bcm_terms(wa, yp, theta.to(acc), geom, p)
    dw = (g.unsqueeze(1) * terms).mean(0)
    if lr is not None:
        dw = dw * lr.to(acc)

    live = live_synapses(mask, geom, dims, w.device)
    new = torch.where(live, wa + dw, wa)
    if p.normalize:
        updated = (g > 0).any(0)
        before = torch.where(live, wa.abs(), 0).sum(0)  # a masked NaN stays out
        after = torch.where(live, new.abs(), 0).sum(0)
        ok = updated & (after > 0)
        scale = torch.where(ok, before / torch.where(ok, after, torch.ones_like(after)), torch.ones_like(after))
        new = torch.where(live, new * scale, new)
    new = torch.where(live, new.clamp(p.w_min, p.w_max), wa)
    w.copy_(new)

    if p.stdp:  # spikes are added after the pairing
        x_pre.copy_(xp + z)
        x_post.copy_(xq + z)
    if p.bcm:  # θ moves after Δw
        ta = theta.to(acc)
        theta.copy_((ta + ((yp * yp).mean(0) - ta) / p.tau_theta).clamp(p.theta_min, p.theta_max))


def heterosynaptic_normalize_(w, mask, geom: Geometry, target, where):
    """Scale the live synapses of each cell (where ``where``, default all) so
    that ``Σ_k |w[k,i]| = target[i]``; cells whose live Σ|w| is 0 stay as they are."""
    dims = tuple(w.shape[1:])
    acc = _plasticity_dtype(w, target.dtype)
    wa = w.to(acc)
    live = live_synapses(mask, geom, dims, w.device)
    total = torch.where(live, wa.abs(), 0).sum(0)
    ok = total > 0
    if where is not None:
        ok = ok & where
    scale = torch.where(ok, target.to(acc) / torch.where(ok, total, torch.ones_like(total)), torch.ones_like(total))
    w.copy_(torch.where(live, wa * scale, wa))


# ---- the mixing form (SPEC §11): w [K, C_out, C_in, D, H, W], mask [K, D, H, W] ----
#
# W[k,o,c,i] carries channel c of nbr(i,k) into channel o of cell i. The
# shared form is the special case W[k,o,c,i] = δ_oc · w[k,i].

#: this backend has the mixing-form functions below
MIXING = True


def _mixing_sum(sa, w, mask, geom: Geometry):
    """``Σ_k m[k,i] · Σ_c W[k,o,c,i] · sa[b,c,nbr(i,k)]`` in the dtype of ``sa``, ``[B, C_out, D, H, W]``."""
    a = torch.zeros((sa.shape[0], w.shape[1]) + tuple(sa.shape[2:]), dtype=sa.dtype, device=sa.device)
    for k, o in enumerate(geom.offsets):
        s_nbr, valid = shift(sa, o, geom.periodic)
        a = a + torch.einsum("ocdhw,bcdhw->bodhw", _effective_weight(w, mask, k, valid, sa.dtype), s_nbr)
    return a


def mixing_aggregate_forward(s, w, mask, geom: Geometry):
    """``a[b,o,i] = Σ_k m[k,i] · Σ_c W[k,o,c,i] · s[b,c,nbr(i,k)]``, ``[B, C_out, D, H, W]`` in the dtype of ``s``."""
    return _mixing_sum(s.to(accumulation_dtype(s.dtype)), w, mask, geom).to(s.dtype)


def mixing_aggregate_transposed(g, w, mask, geom: Geometry):
    """``ds[b,c,j] = Σ_k m[k,j−o_k] · Σ_o W[k,o,c,j−o_k] · g[b,o,j−o_k]`` (fp32/fp64, ``[B, C_in, D, H, W]``).

    As in the shared form the transpose is a gather at ``−o_k``: the post cell
    ``i = j − o_k`` mixes ``g`` back through ``Wᵀ`` and sends it to ``j``.
    """
    acc = accumulation_dtype(g.dtype)
    ga = g.to(acc)
    ds = torch.zeros((g.shape[0], w.shape[2]) + tuple(g.shape[2:]), dtype=acc, device=g.device)
    for k, o in enumerate(geom.offsets):
        valid = in_lattice(g.shape[-3:], o, geom.periodic, g.device)
        contrib = torch.einsum("ocdhw,bodhw->bcdhw", _effective_weight(w, mask, k, valid, acc), ga)
        ds = ds + shift(contrib, tuple(-v for v in o), geom.periodic)[0]
    return ds


def mixing_weight_grad(g, s, mask, geom: Geometry, dtype):
    """``dW[k,o,c,i] = m[k,i] · Σ_b g[b,o,i] · s[b,c,nbr(i,k)]`` (0 outside a zero boundary), in ``dtype``."""
    acc = accumulation_dtype(g.dtype)
    ga, sa = g.to(acc), s.to(acc)
    dw = torch.zeros((geom.K, g.shape[1], s.shape[1]) + tuple(s.shape[2:]), dtype=acc, device=s.device)
    for k, o in enumerate(geom.offsets):
        s_nbr, valid = shift(sa, o, geom.periodic)
        d = torch.einsum("bodhw,bcdhw->ocdhw", ga, s_nbr) * valid.to(acc)
        if mask is not None:
            d = d * mask[k].to(acc)
        dw[k] = d
    return dw.to(dtype)


def mixing_aggregate_backward(g, s, w, mask, geom: Geometry, need_s: bool, need_w: bool):
    """``(ds, dw)`` of :func:`mixing_aggregate_forward` for the upstream ``g`` ``[B, C_out, D, H, W]``."""
    ds = mixing_aggregate_transposed(g, w, mask, geom).to(s.dtype) if need_s else None
    dw = mixing_weight_grad(g, s, mask, geom, w.dtype) if need_w else None
    return ds, dw


def mixing_propagate_forward(s, w, mask, x, bias, geom: Geometry, leak: float, activation: str, save_u: bool):
    """``s' = (1-α)·s + α·φ(u)``, ``u = mixing_aggregate(s, W, mask) + x + bias`` (C_out = C_in).

    Returns ``(s', u)`` as :func:`propagate_forward` does.
    """
    sa = s.to(accumulation_dtype(s.dtype))
    return _cell_update(s, sa, _mixing_sum(sa, w, mask, geom), x, bias, leak, activation, save_u)


def mixing_propagate_backward(g, s, w, mask, u, geom: Geometry, leak: float, activation: str,
                              need_s: bool, need_w: bool, need_u: bool):
    """Gradients of :func:`mixing_propagate_forward`: ``du = α · gᵀ·∂φ/∂u``,
    ``ds = (1-α)·g + mixing_aggregate_transposed(du)``, ``dW = mixing_weight_grad(du, s)``."""
    du = leak * activate_vjp(g.to(u.dtype), u, activation)
    ds = dw = None
    if need_s:
        ds = ((1.0 - leak) * g.to(u.dtype) + mixing_aggregate_transposed(du, w, mask, geom)).to(s.dtype)
    if need_w:
        dw = mixing_weight_grad(du, s, mask, geom, w.dtype)
    return ds, dw, (du if need_u else None)


def winner_probabilities(u, beta, tau: float):
    """``p[b,o,i] = softmax_o((u[b,o,i] + β[o,i]) / τ)``; for ``τ = 0`` the
    one-hot of ``argmax_o (u + β)`` (ties to the lowest ``o``)."""
    v = u + beta.to(u.dtype)
    if tau == 0:
        return torch.zeros_like(v).scatter_(1, v.argmax(dim=1, keepdim=True), 1.0)
    return torch.softmax(v / tau, dim=1)


def competitive_hebbian_(w, s, beta, mask, geom: Geometry, eta: float, tau: float, eta_beta: float, wins: bool):
    """The competitive Hebbian step of SPEC §11, in place on ``w`` and ``beta``.

    ``u = mixing_aggregate(s, W, mask)`` (fp32, fp64 when ``w`` or ``s`` is fp64),
    ``p = softmax_o((u + β)/τ)``,
    ``ΔW[k,o,c,i] = η/n[o,i] · Σ_b p[b,o,i] · (s[b,c,nbr(i,k)] − u[b,o,i] · W[k,o,c,i])``
    on live synapses (not masked, neighbour inside the lattice), with
    ``n = 1 + Σ_b p`` when ``wins`` else ``n = B``; then
    ``β[o,i] ← β[o,i] − η_β · (mean_b p[b,o,i] − 1/C_out)``.
    """
    acc = _plasticity_dtype(w, s.dtype)
    wa, sa = w.to(acc), s.to(acc)
    B, C_out = s.shape[0], w.shape[1]
    u = _mixing_sum(sa, wa, mask, geom)
    p = winner_probabilities(u, beta, tau)
    n = 1.0 + p.sum(0) if wins else torch.full_like(p[0], float(B))
    live = live_synapses(mask, geom, tuple(s.shape[2:]), w.device)
    pu = (p * u).sum(0)  # Σ_b p·u, [C_out, D, H, W]
    new = torch.empty_like(wa)
    for k, o in enumerate(geom.offsets):
        s_nbr = shift(sa, o, geom.periodic)[0]
        hebb = torch.einsum("bodhw,bcdhw->ocdhw", p, s_nbr)  # Σ_b p[b,o,i]·s[b,c,nbr(i,k)]
        dwk = eta / n.unsqueeze(1) * (hebb - pu.unsqueeze(1) * wa[k])
        new[k] = torch.where(live[k], wa[k] + dwk, wa[k])
    w.copy_(new)
    beta.copy_(beta - eta_beta * (p.mean(0).to(beta.dtype) - 1.0 / C_out))
