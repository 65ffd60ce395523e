"""Exact fast paths for `RelPosSelfAttention`: SDPA with a rel-pos bias, and a closed-form padded window.

At 128^3 input every windowed encoder block zero-pads the 8^3 token grid to one 14^3 window (2232 of 2744 tokens are
padding, and nothing masks them). The padding tokens are zero after ``norm1``, so each one's key and value is
``qkv(0)`` (the qkv bias; LoRA adds nothing to zeros), and only their relative-position logit terms differ. Those terms
are a sum of per-axis terms, so the padding's total softmax weight for a real query factorises into per-axis
log-sum-exps. :func:`padded_window_attention` attends to the ``n`` real keys plus ONE extra key ``k = qkv(0)`` whose
mask entry is the log of that total relative-position mass, and whose value ``v = qkv(0)`` then carries the padding's
whole contribution. This is an algebraic identity, not an approximation; outputs at padding positions are never formed
(the reference discards them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference_attention import windowed_attention
from .rel_pos import AttentionWeights, relative_position_table

Size3 = tuple[int, int, int]


def is_single_padded_window(size: Size3, window_size: int) -> bool:
    """True when padding ``size`` up to ``window_size`` gives exactly one window that contains some padding."""
    return all(s <= window_size for s in size) and any(s < window_size for s in size)


def _project(attn: AttentionWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``q, k, v`` as ``[B, heads, N, head_dim]`` for channels-last tokens ``x`` ``[B, D, H, W, C]``."""
    b, d, h, w, c = x.shape
    qkv = attn.qkv(x).reshape(b, d * h * w, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def _merge_heads(out: torch.Tensor, size: Size3) -> torch.Tensor:
    """``[B, heads, N, head_dim] -> [B, D, H, W, C]`` (heads concatenated in order, as the reference)."""
    b, nh, _, hd = out.shape
    return out.transpose(1, 2).reshape(b, *size, nh * hd)


def _rel_pos_bias(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, real: Size3, layout: str) -> torch.Tensor:
    """Relative-position logits ``[BH, N, N]`` between the real queries and the real keys (``real`` = grid size).

    ``"decomposed"``: ``a, b, c`` are ``[BH, d, h, w, S]`` indexed by the key's d / h / w coordinate.
    ``"sam-med3d"``: ``a`` is ``[BH, d, h, w, S]`` and ``b, c`` are ``[BH, d, h, S, S]`` (query line position, key w).
    """
    d, h, w = real
    n = d * h * w
    if layout == "decomposed":
        return (a[..., :d, None, None] + b[..., None, :h, None] + c[..., None, None, :w]).reshape(-1, n, n)
    # sum the two small query-line terms first ([BH, d, h, p, q, r]), then one 4-D broadcast add (contiguous result)
    bc = b[:, :, :, :d, None, :w] + c[:, :, :, None, :h, :w]
    return (a[..., :w].reshape(-1, w, 1, w) + bc.reshape(-1, 1, d * h, w)).view(-1, n, n)


def global_attention(attn: AttentionWeights, x: torch.Tensor) -> torch.Tensor:
    """Dense attention over all tokens of ``x`` via ``scaled_dot_product_attention`` with the rel-pos bias as mask.

    Same logits as the reference path (``(q * scale) @ k^T`` plus the relative terms); used for the global blocks, the
    MEA and every window that :func:`padded_window_attention` does not cover.
    """
    b, d, h, w, c = x.shape
    n, nh = d * h * w, attn.num_heads
    q, k, v = _project(attn, x)
    mask = None
    if attn.use_rel_pos:
        if attn.rel_pos_layout == "sam-med3d" and not d == h == w:
            raise ValueError(f"rel_pos_layout='sam-med3d' needs a cubic token grid, got {(d, h, w)}")
        rq = q.reshape(b * nh, d, h, w, -1)
        a = torch.einsum("bdhwc,dkc->bdhwk", rq, relative_position_table(d, d, attn.rel_pos_d))
        bt = torch.einsum("bdhwc,hkc->bdhwk", rq, relative_position_table(h, h, attn.rel_pos_h))
        ct = torch.einsum("bdhwc,wkc->bdhwk", rq, relative_position_table(w, w, attn.rel_pos_w))
        mask = _rel_pos_bias(a, bt, ct, (d, h, w), attn.rel_pos_layout).view(b, nh, n, n).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)
    return attn.proj(_merge_heads(out, (d, h, w)))


def _split_lse(x: torch.Tensor, n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Log-sum-exp of ``x`` over the first ``n`` entries of ``dim``, over the rest (``None`` if empty), and over all."""
    inside = torch.logsumexp(x.narrow(dim, 0, n), dim)
    if x.shape[dim] == n:
        return inside, None, inside
    outside = torch.logsumexp(x.narrow(dim, n, x.shape[dim] - n), dim)
    return inside, outside, torch.logaddexp(inside, outside)


def _lse_of(terms: list[torch.Tensor]) -> torch.Tensor:
    """Stable ``log(sum(exp(t)))`` over a list of same-shaped tensors."""
    return terms[0] if len(terms) == 1 else torch.logsumexp(torch.stack(terms), 0)


def _padding_log_mass_decomposed(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, real: Size3) -> torch.Tensor:
    """``log sum_{padding keys} exp(rel_d[p] + rel_h[q] + rel_w[r])`` per real query for the textbook layout.

    The padding set (window minus the real block) is split into disjoint boxes: ``p >= d``; ``p < d, q >= h``;
    ``p < d, q < h, r >= w``; each box's sum is a product of per-axis sums.
    """
    a_in, a_out, _ = _split_lse(a, real[0], -1)
    b_in, b_out, b_all = _split_lse(b, real[1], -1)
    c_in, c_out, c_all = _split_lse(c, real[2], -1)
    pieces = []
    if a_out is not None:
        pieces.append(a_out + b_all + c_all)
    if b_out is not None:
        pieces.append(a_in + b_out + c_all)
    if c_out is not None:
        pieces.append(a_in + b_in + c_out)
    return _lse_of(pieces)


def _padding_log_mass_sammed3d(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, real: Size3) -> torch.Tensor:
    """``log sum_{padding (p, q, r)} exp(a[r] + b[p, r] + c[q, r])`` per real query for SAM-Med3D's broadcasting.

    ``a`` ``[BH, d, h, w, S]`` (key r), ``b`` / ``c`` ``[BH, d, h, S, S]`` (key p / key q, then key r). For each ``r``
    the sum over ``(p, q)`` factorises; the padding set is ``r >= w`` (all p, q), or ``r < w`` with ``p >= d`` (all q)
    or with ``p < d, q >= h``.
    """
    d, h, w = real
    b_in, b_out, b_all = _split_lse(b, d, -2)
    c_in, c_out, c_all = _split_lse(c, h, -2)
    pieces = []
    if a.shape[-1] > w:
        pieces.append(a[..., w:] + (b_all + c_all)[:, :, :, None, w:])
    inner = ([] if b_out is None else [b_out + c_all]) + ([] if c_out is None else [b_in + c_out])
    if inner:
        pieces.append(a[..., :w] + _lse_of(inner)[:, :, :, None, :w])
    return torch.logsumexp(torch.cat(pieces, dim=-1), dim=-1)


def _window_rel_pos(
    attn: AttentionWeights, q: torch.Tensor, q_pad: torch.Tensor, real: Size3, window_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-key bias ``[BH, N, N]`` and padding log-mass ``[BH, N]`` (relative terms only) of one padded window."""
    d, h, w = real
    bh, hd = q.shape[0] * q.shape[1], q.shape[-1]
    s = window_size
    rq = q.reshape(bh, d, h, w, hd)
    tab_d, tab_h, tab_w = (relative_position_table(s, s, t) for t in (attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w))
    a = torch.einsum("bdhwc,dkc->bdhwk", rq, tab_d[:d])
    if attn.rel_pos_layout == "decomposed":
        b = torch.einsum("bdhwc,hkc->bdhwk", rq, tab_h[:h])
        c = torch.einsum("bdhwc,wkc->bdhwk", rq, tab_w[:w])
        log_mass = _padding_log_mass_decomposed(a, b, c, real)
    else:
        # rel_h / rel_w read the query tensor along its whole padded w line; past w those queries are qkv(0)'s q.
        pad = q_pad.repeat(q.shape[0], 1)[:, None, None, None, :].expand(bh, d, h, s - w, hd)
        line = torch.cat([rq, pad], dim=3)
        b = torch.einsum("bdhtc,hkc->bdhtk", line, tab_h[:h])
        c = torch.einsum("bdhtc,tkc->bdhtk", line, tab_w)
        log_mass = _padding_log_mass_sammed3d(a, b, c, real)
    return _rel_pos_bias(a, b, c, real, attn.rel_pos_layout), log_mass.reshape(bh, -1)


def padded_window_attention(attn: AttentionWeights, x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Exactly the reference windowed attention for real tokens ``x`` ``[B, d, h, w, C]`` zero-padded to ONE window.

    Returns ``[B, d, h, w, C]`` (the cropped reference output) without materialising the padding. Only valid when
    :func:`is_single_padded_window` holds (the only windowed case at 128^3); other window configurations (several
    windows, or no padding) must use the explicit padded computation (window partition plus :func:`global_attention`).
    """
    b, d, h, w, c = x.shape
    if not is_single_padded_window((d, h, w), window_size):
        raise ValueError(f"grid {(d, h, w)} with window {window_size} is not a single padded window")
    nh, hd, n = attn.num_heads, c // attn.num_heads, d * h * w
    q, k, v = _project(attn, x)
    q_pad, k_pad, v_pad = attn.qkv(x.new_zeros(1, c)).view(3, nh, hd).unbind(0)  # a padding token's q, k, v
    keys = torch.cat([k, k_pad[None, :, None].expand(b, nh, 1, hd)], dim=2)
    values = torch.cat([v, v_pad[None, :, None].expand(b, nh, 1, hd)], dim=2)
    if attn.use_rel_pos:
        bias, log_mass = _window_rel_pos(attn, q, q_pad, (d, h, w), window_size)
        mask = torch.cat([bias, log_mass[..., None]], dim=-1).view(b, nh, n, n + 1).to(q.dtype)  # dtype: autocast
    else:
        mask = q.new_zeros(1, 1, n, n + 1)
        mask[..., n] = math.log(window_size**3 - n)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scale)
    return attn.proj(_merge_heads(out, (d, h, w)))


def fast_windowed_attention(attn: AttentionWeights, x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Windowed attention: the closed form of :func:`padded_window_attention` where the grid pads to one window, else
    the explicit padded windows (:func:`reference_attention.windowed_attention`) attended by :func:`global_attention`.
    """
    if is_single_padded_window(tuple(x.shape[1:4]), window_size):
        return padded_window_attention(attn, x, window_size)
    return windowed_attention(attn, x, window_size, attend=global_attention)
