"""Block-sparse flash attention in Pallas for GPU, forward and backward.

Work is laid out by ``layout.build_layout``: each head's allowed set is split into
disjoint parts, each part computed in an order where it visits few blocks (the stride
component in the column-major "strided" order, the fixed pattern's summary columns as a
gathered key sequence). Every part is one flash-attention kernel launch over its list
of key blocks per query block (full blocks unmasked, partial blocks masked from the
pairs' original positions), returning its output and log-sum-exp; the parts of a head
are merged exactly through their log-sum-exps.

Differentiation: each part is a ``jax.custom_vjp`` whose backward runs two Pallas
kernels (dQ over the forward block lists, dK/dV over the transposed lists). The
permutations, the summary gather and the log-sum-exp merge are plain JAX and are
differentiated by JAX, so no dense attention appears anywhere in either pass. The
cotangent of a part's log-sum-exp enters its backward through ``delta``: for
o = softmax(s) v and lse = logsumexp(s), ds = p * (do v^T - (rowsum(do * o) - dlse)).

Kernels use only generic Pallas operations (refs, ``pl.ds`` slices, ``dot_general``,
``fori_loop``), lowered through Triton on GPU and run by the Pallas interpreter on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from sparse_lm.attention import mosaic_gpu
from sparse_lm.attention.layout import (PAD_POSITION, GroupLayout, Layout, MaskRule, PartLayout,
                                        build_layout, head_ranges)
from sparse_lm.attention.part_order import (add_at_keys, from_order, merge, part_keys, scatter_keys,
                                            summary_slice, to_order)
from sparse_lm.attention.patterns import LayerPattern, PatternError

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float32)
DEFAULT_NUM_WARPS = 4


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Static launch parameters shared by the forward and backward kernels."""

    interpret: bool
    num_warps: int
    num_stages: int
    out_dtype: np.dtype  # dtype of a part's output (float32 when parts are merged)
    heavy_first: bool = True  # v2: launch the longest programs first (see _launch_order)
    colaunch: bool = True  # v2: natural-order parts of a tile in one launch (_launch_groups)
    narrow_chain: bool = True  # v2: partial results between launches in the input dtype
    column_bwd: bool = True  # v2: a strided part's dq, dk, dv in one kernel (_column_bwd_call)
    diag_bwd: bool = True  # v2: a diagonal-block part's dq, dk, dv in one kernel (_diag_bwd_call)
    delta_in_dq: bool = True  # v2: delta = rowsum(do * o) from the first dQ launch (_fused_bwd)
    mosaic_forward: bool = False  # v2: merged fixed heads' forward by Mosaic GPU (_fused_forward)
    mosaic_forward_persistent: bool = False  # ... one program per SM walking the tiles
    mosaic_summary_dkv: bool = False  # v2: gathered parts' dK/dV by Mosaic GPU (_mosaic_dkv_call)
    # v2: ... and their dq too, by TMA reductions (_fused_bwd): "off", "merged" (groups
    # whose summary part shares its softmax with an own part) or "all"
    mosaic_summary_dq: str = "off"
    # ... that kernel launched as one program per SM walking the key tiles (_mosaic_dkv_call)
    mosaic_dkvdq_persistent: bool = False

    def mosaic_dq(self, group: GroupLayout) -> bool:
        """Whether ``group``'s gathered parts get dK/dV and dq from the Mosaic kernel."""
        if self.mosaic_summary_dq == "all":
            return True
        return self.mosaic_summary_dq == "merged" and any(p.k_index is None for p in group.parts)

    def chain_dtype(self, dtype):
        """dtype of the partial o, dq, dk, dv one launch hands the next (see attention())."""
        return jnp.dtype(dtype) if self.narrow_chain else jnp.dtype(jnp.float32)


def _compiler_params(cfg: KernelConfig):
    if cfg.interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _dot(a: jax.Array, b: jax.Array, prec, trans_b: bool = False) -> jax.Array:
    """a @ b (or a @ b.T) with float32 accumulation."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _precision(dtype) -> lax.Precision | None:
    # float32 operands get IEEE float32 products (Triton's default would be tf32).
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


# --------------------------------------------------------------------------- forward
#
# The kernel bodies below serve both paths: v1 calls them directly, v2 (further down)
# through thin wrappers that pass the previous parts' partial results as ``init``.


def _run_tiles(tile, n_full, n_part, carry):
    """The block loop of a kernel: the n_full unmasked blocks, then the n_part masked."""
    carry = lax.fori_loop(0, n_full, functools.partial(tile, masked=False), carry)
    return lax.fori_loop(n_full, n_full + n_part, functools.partial(tile, masked=True), carry)


def _run_sources(tile_fn, sources, carry, **common):
    """The block loops of a query tile over each key source in turn, one state: a
    source is (tab_ref, kpos_ref, k_ref, v_ref, rule, block_k), the part's own first and
    then the co-launched parts' (v2 ``colaunch``)."""
    for tab_ref, kpos_ref, k_ref, v_ref, rule, block_k in sources:
        tile = functools.partial(tile_fn, tab_ref=tab_ref, kpos_ref=kpos_ref, k_ref=k_ref,
                                 v_ref=v_ref, rule=rule, block_k=block_k, **common)
        carry = _run_tiles(tile, tab_ref[0], tab_ref[1], carry)
    return carry


def _fwd_tile(t, carry, *, masked: bool, q, qpos, tab_ref, kpos_ref, k_ref, v_ref,
              rule: MaskRule, block_k: int, qk_scale: float, prec):
    """One online-softmax step over key block ``tab_ref[2 + t]`` of a query tile."""
    acc, m_prev, l_prev = carry
    start = pl.multiple_of(tab_ref[2 + t] * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    s = _dot(q, k, prec, trans_b=True) * qk_scale
    if masked:
        kpos = kpos_ref[pl.ds(start, block_k)]
        s = jnp.where(rule.in_kernel(qpos[:, None], kpos[None, :]), s, -jnp.inf)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
    # A row with no allowed key yet has max -inf; shifting by 0 keeps exp2 at 0.
    m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp2(m_prev - m_shift)
    p = jnp.exp2(s - m_shift[:, None])
    l_next = alpha * l_prev + jnp.sum(p, axis=1)
    pv = _dot(p.astype(v.dtype), v, prec)
    return alpha[:, None] * acc + pv, m_next, l_next


def _fwd_kernel(tab_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                rule: MaskRule, block_k: int, scale: float, init=None, extra=()):
    """``init`` (v2 only): refs (o0, lse0) of the previous parts, to resume from.
    ``extra`` (v2 ``colaunch``): more parts of the same query tile, as tuples (tab_ref,
    kpos_ref, k_ref, v_ref, rule, block_k), visited after the first in the same state."""
    q = q_ref[...]
    block_q = q.shape[0]
    prec = _precision(q.dtype)
    qpos = qpos_ref[...]
    qk_scale = scale * LOG2E  # scores in base 2: exp2 is the cheap instruction
    if init is not None:
        # The previous parts' normalised (o, lse) as a running state: acc / l = o and
        # m + log2(l) = lse in base 2. A row empty so far has lse = -inf: m = -inf, l = 0.
        o0_ref, lse0_ref = init
        lse0 = lse0_ref[...]
        empty0 = lse0 == -jnp.inf
        carry = (
            jnp.where(empty0[:, None], 0.0, o0_ref[...].astype(jnp.float32)),
            lse0 * LOG2E,
            jnp.where(empty0, 0.0, 1.0),
        )
    else:
        carry = (
            jnp.zeros((block_q, q.shape[1]), jnp.float32),
            jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32),
        )
    sources = ((tab_ref, kpos_ref, k_ref, v_ref, rule, block_k), *extra)
    acc, m, l = _run_sources(_fwd_tile, sources, carry, q=q, qpos=qpos, qk_scale=qk_scale,
                             prec=prec)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)


def _fwd_call(q, k, v, part: PartLayout, cfg: KernelConfig):
    b, t, h, d = q.shape
    tk = k.shape[1]
    bq, bk = part.block_q, part.block_k
    nq = t // bq
    hk = part.k_pos.shape[0]
    kernel = functools.partial(_fwd_kernel, rule=part.spec.rule, block_k=bk, scale=d**-0.5)
    tab = jnp.asarray(part.fwd)
    return pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=[
            pl.BlockSpec((None, tab.shape[1]), lambda i, j, n: (i, 0)),
            pl.BlockSpec((bq,), lambda i, j, n: (i,)),
            pl.BlockSpec((None, tk), (lambda i, j, n: (n, 0)) if hk > 1 else (lambda i, j, n: (0, 0))),
            pl.BlockSpec((None, bq, None, d), lambda i, j, n: (j, i, n, 0)),
            pl.BlockSpec((None, tk, None, d), lambda i, j, n: (j, 0, n, 0)),
            pl.BlockSpec((None, tk, None, d), lambda i, j, n: (j, 0, n, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, j, n: (j, i, n, 0)),
            pl.BlockSpec((None, None, bq), lambda i, j, n: (j, n, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, t, h, d), cfg.out_dtype),
            jax.ShapeDtypeStruct((b, h, t), jnp.float32),
        ],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="sparse_attn_fwd",
    )(tab, jnp.asarray(part.q_pos), jnp.asarray(part.k_pos), q, k, v)


# -------------------------------------------------------------------------- backward


def _dq_tile(t, dq, *, masked: bool, q, do, qpos, lse2, delta, tab_ref, kpos_ref, k_ref,
             v_ref, rule: MaskRule, block_k: int, qk_scale: float, prec):
    """dq of a query tile plus the contribution of key block ``tab_ref[2 + t]``."""
    start = pl.multiple_of(tab_ref[2 + t] * block_k, block_k)
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    s = _dot(q, k, prec, trans_b=True) * qk_scale
    p = jnp.exp2(s - lse2[:, None])
    if masked:
        kpos = kpos_ref[pl.ds(start, block_k)]
        p = jnp.where(rule.in_kernel(qpos[:, None], kpos[None, :]), p, 0.0)
    dp = _dot(do, v, prec, trans_b=True)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, prec)


def _dq_kernel(tab_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, *, rule: MaskRule, block_k: int, scale: float, dq0_ref=None, extra=(),
               delta_out_ref=None):
    """``dq0_ref`` (v2 only): the previous parts' dq, added to this part's. ``extra``
    (v2 ``colaunch``): more parts of the same query tile, as in ``_fwd_kernel``.
    ``delta_out_ref`` (v2 ``delta_in_dq``): ``delta_ref`` then holds the tile's o rows;
    delta = rowsum(do * o) is computed here and also written out for the later kernels."""
    q = q_ref[...]
    do = do_ref[...]
    prec = _precision(q.dtype)
    qpos = qpos_ref[...]
    lse2 = lse_ref[...] * LOG2E
    if delta_out_ref is None:
        delta = delta_ref[...]
    else:
        delta = jnp.sum(do.astype(jnp.float32) * delta_ref[...].astype(jnp.float32), axis=1)
        delta_out_ref[...] = delta
    sources = ((tab_ref, kpos_ref, k_ref, v_ref, rule, block_k), *extra)
    dq = _run_sources(_dq_tile, sources, jnp.zeros(q.shape, jnp.float32), q=q, do=do,
                      qpos=qpos, lse2=lse2, delta=delta, qk_scale=scale * LOG2E, prec=prec)
    dq = dq * scale
    if dq0_ref is not None:
        dq = dq + dq0_ref[...].astype(jnp.float32)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _pair_grads(k, v, kpos, q, do, lse2, delta, qpos, *, rule: MaskRule, qk_scale: float, prec):
    """Transposed probabilities and score gradients (keys x queries) of one block pair:
    pt = P^T and dst = dS^T, with dS = P (dP - delta). ``qpos`` None: no mask (a full
    block)."""
    st = _dot(k, q, prec, trans_b=True) * qk_scale
    pt = jnp.exp2(st - lse2[None, :])
    if qpos is not None:
        pt = jnp.where(rule.in_kernel(qpos[None, :], kpos[:, None]), pt, 0.0)
    dpt = _dot(v, do, prec, trans_b=True)
    return pt, pt * (dpt - delta[None, :])


def _pair_into(dk, dv, k, v, kpos, q, do, lse2, delta, qpos, *, rule: MaskRule,
               qk_scale: float, prec):
    """One block pair of a one-kernel backward: (dk + dS^T q, dv + P^T do, the pair's
    unscaled dq share dS K)."""
    pt, dst = _pair_grads(k, v, kpos, q, do, lse2, delta, qpos, rule=rule, qk_scale=qk_scale,
                          prec=prec)
    return (dk + _dot(dst.astype(q.dtype), q, prec), dv + _dot(pt.astype(do.dtype), do, prec),
            _dq_share(dst, k, prec))


def _dq_share(dst, k, prec):
    """A key block's share of its query block's dq (unscaled): (dS^T)^T K, [bq, D]."""
    return lax.dot_general(dst.astype(k.dtype), k, (((0,), (0,)), ((), ())), precision=prec,
                           preferred_element_type=jnp.float32)


def _dkv_tile(t, carry, *, masked: bool, k, v, kpos, tab_ref, qpos_ref, q_ref, do_ref,
              lse_ref, delta_ref, rule: MaskRule, block_q: int, qk_scale: float, prec):
    """(dk, dv) of a key tile plus the contribution of query block ``tab_ref[2 + t]``.

    Works on transposed scores (keys x queries) so that dK and dV are plain products.
    """
    dk, dv = carry
    start = pl.multiple_of(tab_ref[2 + t] * block_q, block_q)
    sl = pl.ds(start, block_q)
    q = q_ref[sl, :]
    do = do_ref[sl, :]
    qpos = qpos_ref[sl] if masked else None
    pt, dst = _pair_grads(k, v, kpos, q, do, lse_ref[sl] * LOG2E, delta_ref[sl], qpos,
                          rule=rule, qk_scale=qk_scale, prec=prec)
    dv = dv + _dot(pt.astype(do.dtype), do, prec)
    dk = dk + _dot(dst.astype(q.dtype), q, prec)
    return dk, dv


def _dkv_kernel(tab_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, *, rule: MaskRule, block_q: int, scale: float, dkv0_refs=None):
    """``dkv0_refs`` (v2 only): refs (dk0, dv0) of the previous parts, added to this part's."""
    k = k_ref[...]
    v = v_ref[...]
    prec = _precision(k.dtype)
    kpos = kpos_ref[...]
    qk_scale = scale * LOG2E
    tile = functools.partial(_dkv_tile, k=k, v=v, kpos=kpos, tab_ref=tab_ref,
                             qpos_ref=qpos_ref, q_ref=q_ref, do_ref=do_ref, lse_ref=lse_ref,
                             delta_ref=delta_ref, rule=rule, block_q=block_q,
                             qk_scale=qk_scale, prec=prec)
    n_full = tab_ref[0]
    n_part = tab_ref[1]
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = _run_tiles(tile, n_full, n_part, carry)
    dk = dk * scale
    if dkv0_refs is not None:
        dk0_ref, dv0_ref = dkv0_refs
        dk = dk + dk0_ref[...].astype(jnp.float32)
        dv = dv + dv0_ref[...].astype(jnp.float32)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _bwd_calls(q, k, v, do, lse, delta, part: PartLayout, cfg: KernelConfig):
    b, t, h, d = q.shape
    tk = k.shape[1]
    bq, bk = part.block_q, part.block_k
    hk = part.k_pos.shape[0]
    scale = d**-0.5
    kpos_map = (lambda i, j, n: (n, 0)) if hk > 1 else (lambda i, j, n: (0, 0))
    q_pos = jnp.asarray(part.q_pos)
    k_pos = jnp.asarray(part.k_pos)
    fwd_tab = jnp.asarray(part.fwd)
    bwd_tab = jnp.asarray(part.bwd)
    params = _compiler_params(cfg)

    dq = pl.pallas_call(
        functools.partial(_dq_kernel, rule=part.spec.rule, block_k=bk, scale=scale),
        grid=(t // bq, b, h),
        in_specs=[
            pl.BlockSpec((None, fwd_tab.shape[1]), lambda i, j, n: (i, 0)),
            pl.BlockSpec((bq,), lambda i, j, n: (i,)),
            pl.BlockSpec((None, tk), kpos_map),
            pl.BlockSpec((None, bq, None, d), lambda i, j, n: (j, i, n, 0)),
            pl.BlockSpec((None, tk, None, d), lambda i, j, n: (j, 0, n, 0)),
            pl.BlockSpec((None, tk, None, d), lambda i, j, n: (j, 0, n, 0)),
            pl.BlockSpec((None, bq, None, d), lambda i, j, n: (j, i, n, 0)),
            pl.BlockSpec((None, None, bq), lambda i, j, n: (j, n, i)),
            pl.BlockSpec((None, None, bq), lambda i, j, n: (j, n, i)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, d), lambda i, j, n: (j, i, n, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=cfg.interpret,
        compiler_params=params,
        name="sparse_attn_bwd_dq",
    )(fwd_tab, q_pos, k_pos, q, k, v, do, lse, delta)

    kblock_pos_map = (lambda i, j, n: (n, i)) if hk > 1 else (lambda i, j, n: (0, i))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, rule=part.spec.rule, block_q=bq, scale=scale),
        grid=(tk // bk, b, h),
        in_specs=[
            pl.BlockSpec((None, bwd_tab.shape[1]), lambda i, j, n: (i, 0)),
            pl.BlockSpec((t,), lambda i, j, n: (0,)),
            pl.BlockSpec((None, bk), kblock_pos_map),
            pl.BlockSpec((None, t, None, d), lambda i, j, n: (j, 0, n, 0)),
            pl.BlockSpec((None, bk, None, d), lambda i, j, n: (j, i, n, 0)),
            pl.BlockSpec((None, bk, None, d), lambda i, j, n: (j, i, n, 0)),
            pl.BlockSpec((None, t, None, d), lambda i, j, n: (j, 0, n, 0)),
            pl.BlockSpec((None, None, t), lambda i, j, n: (j, n, 0)),
            pl.BlockSpec((None, None, t), lambda i, j, n: (j, n, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, d), lambda i, j, n: (j, i, n, 0)),
            pl.BlockSpec((None, bk, None, d), lambda i, j, n: (j, i, n, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
        ],
        interpret=cfg.interpret,
        compiler_params=params,
        name="sparse_attn_bwd_dkv",
    )(bwd_tab, q_pos, k_pos, q, k, v, do, lse, delta)
    return dq, dk, dv


# ------------------------------------------------------------------ differentiable part


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _part_attention(q, k, v, part: PartLayout, cfg: KernelConfig):
    """(o, lse) of one part; q: [B, T, Hg, D], k and v: [B, Tk, Hg, D], in part order."""
    return _fwd_call(q, k, v, part, cfg)


def _part_fwd(q, k, v, part, cfg):
    o, lse = _fwd_call(q, k, v, part, cfg)
    return (o, lse), (q, k, v, o, lse)


def _part_bwd(part, cfg, res, cts):
    q, k, v, o, lse = res
    do, dlse = cts
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    delta = jnp.swapaxes(delta, 1, 2) - dlse  # [B, Hg, T]
    # Rows with no allowed key (lse = -inf) must give p = 0, not exp(+inf).
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    return _bwd_calls(q, k, v, do.astype(q.dtype), lse, delta, part, cfg)


_part_attention.defvjp(_part_fwd, _part_bwd)


def _group_attention(q, k, v, group: GroupLayout, cfg: KernelConfig, out_dtype):
    outs = []
    merged = len(group.parts) > 1
    part_cfg = dataclasses.replace(cfg, out_dtype=jnp.float32 if merged else out_dtype)
    for part in group.parts:
        o, lse = _part_attention(
            to_order(q, part, 1), part_keys(k, part), part_keys(v, part), part, part_cfg
        )
        outs.append((from_order(o, part, 1), from_order(lse, part, 2)))
    if not merged:
        return outs[0][0]
    return merge(outs)[0].astype(out_dtype)


# ------------------------------------------------------------- v2: fused parts (default)
#
# ``attention(..., fuse_parts=True)``, the default since it was measured on an H200
# (strided f+b at (2, 16384, 8, 64): 0.629 ms against v1's 0.869; fixed 2.182 against
# 2.232; BENCHMARKS.md). Differences from the path above (v1, ``fuse_parts=False``):
#
# * No materialised permutation: a strided part reads q, k, v (and writes o) through
#   BlockSpecs on the free [B, T/l, l, H, D] view. A strided query tile is bq rows of
#   one column c; its keys all lie in the same column (the rule is ``same_col``), so the
#   kernel sees the column's T/l rows as its key sequence, with the layout's key block
#   ids rebased to the column. Needs block_q and block_k to divide T/l; otherwise the
#   group takes the v1 path.
# * Parts are chained across launches in one online-softmax state: a part after the
#   first starts from the previous part's normalised (o, lse), read in its own row order
#   through the same BlockSpecs (the state (acc=o, m=lse, l=1) is an exact online-softmax
#   state). Intermediate outputs are in the input dtype (``narrow_chain``, the default;
#   float32 without it; the lse is always float32), the last part writes the input
#   dtype and the final lse. Parts that tile queries alike (the fixed pattern's block
#   and summary parts) share one launch and one state (``colaunch``, the default). The
#   strided pattern's parts cannot: the local part tiles queries in natural order, the
#   stride part by column, so no tile owns both parts' rows; across launches the state
#   is passed through HBM in the next part's order, which BlockSpecs make free.
# * One custom_vjp over the whole group: the backward uses the final lse and
#   delta = rowsum(do * o) for every part (dS = P (dP - delta) over the union of keys),
#   so there is no merge backward; dq, dk, dv are chained the same way (each part adds
#   the previous part's partial sums, in the chain's dtype as above, and the last
#   writes the input dtype). A summary part's gathered dk, dv are float32 and
#   scatter-added in XLA, in float32 (c/l of T).


class _Rows:
    """BlockSpecs addressing a part's rows, in the part's order, on free views.

    Natural order: the arrays as they are. Strided order: [B, T, H, D] viewed as
    [B, T/l, l, H, D] and [B, H, T] as [B, H, T/l, l]; strided row c*(T/l) + r is view
    row (r, c). Grid axis 0 walks ``per``-row tiles in the part's order.
    """

    def __init__(self, part: PartLayout, t: int):
        self.strided = part.spec.order == "strided"
        self.t = t
        if self.strided:
            self.l = part.spec.l
            self.n = t // self.l

    @staticmethod
    def fits(part: PartLayout, t: int) -> bool:
        if part.spec.order != "strided":
            return True
        n = t // part.spec.l
        return (n % part.block_q == 0 and n % part.block_k == 0 and part.k_index is None
                and part.k_pos.shape[0] == 1)

    # Views of whole arrays (reshapes of contiguous dims: no copy).
    def view(self, x):
        if not self.strided:
            return x
        b, t, h, d = x.shape
        return x.reshape(b, self.n, self.l, h, d)

    def lview(self, x):
        if not self.strided:
            return x
        b, h, t = x.shape
        return x.reshape(b, h, self.n, self.l)

    def unview(self, x):
        if not self.strided:
            return x
        if x.ndim == 5:
            b, n, l, h, d = x.shape  # noqa: E741
            return x.reshape(b, n * l, h, d)
        b, h, n, l = x.shape  # noqa: E741
        return x.reshape(b, h, n * l)

    def _col(self, i, per):
        return i // (self.n // per), i % (self.n // per)

    # BlockSpecs (grid (tiles of `per` rows, B, H)).
    def tile(self, per: int, d: int):
        if not self.strided:
            return pl.BlockSpec((None, per, None, d), lambda i, j, n: (j, i, n, 0))
        return pl.BlockSpec((None, per, None, None, d),
                            lambda i, j, n: (j, self._col(i, per)[1], self._col(i, per)[0], n, 0))

    def column(self, per: int, d: int, length: int | None = None):
        """The whole key/query sequence a ``per``-row tile's partners lie in."""
        if not self.strided:
            length = length or self.t
            return pl.BlockSpec((None, length, None, d), lambda i, j, n: (j, 0, n, 0))
        return pl.BlockSpec((None, self.n, None, None, d),
                            lambda i, j, n: (j, 0, self._col(i, per)[0], n, 0))

    def ltile(self, per: int):
        if not self.strided:
            return pl.BlockSpec((None, None, per), lambda i, j, n: (j, n, i))
        return pl.BlockSpec((None, None, per, None),
                            lambda i, j, n: (j, n, self._col(i, per)[1], self._col(i, per)[0]))

    def lcolumn(self, per: int):
        if not self.strided:
            return pl.BlockSpec((None, None, self.t), lambda i, j, n: (j, n, 0))
        return pl.BlockSpec((None, None, self.n, None),
                            lambda i, j, n: (j, n, 0, self._col(i, per)[0]))

    def pos_column(self, per: int):
        """Positions (strided order, [T]) of the column of a ``per``-row tile."""
        if not self.strided:
            return pl.BlockSpec((self.t,), lambda i, j, n: (0,))
        return pl.BlockSpec((self.n,), lambda i, j, n: (self._col(i, per)[0],))

    def kpos_column(self, per: int, part: PartLayout):
        hk, tk = part.k_pos.shape
        if not self.strided:
            return pl.BlockSpec((None, tk), (lambda i, j, n: (n, 0)) if hk > 1
                                else (lambda i, j, n: (0, 0)))
        return pl.BlockSpec((None, self.n), lambda i, j, n: (0, self._col(i, per)[0]))

    def rebase(self, tab: np.ndarray, per: int, other: int) -> np.ndarray:
        """Block ids of a table (rows: ``per``-row tiles, ids: ``other``-row blocks)
        relative to the row's column; checks every listed block is in that column."""
        if not self.strided:
            return tab
        tab = tab.copy()
        rows_per_col, ids_per_col = self.n // per, self.n // other
        for r in range(tab.shape[0]):
            cnt = int(tab[r, 0] + tab[r, 1])
            ids = tab[r, 2 : 2 + cnt] - (r // rows_per_col) * ids_per_col
            if ids.size and (ids.min() < 0 or ids.max() >= ids_per_col):
                raise AssertionError("strided part visits a block outside the column")
            tab[r, 2 : 2 + cnt] = ids
        return tab


def _launch_order(tab: np.ndarray | list[np.ndarray], b: int, h: int, heavy_first: bool):
    """(grid, remap) of a v2 launch over the rows of ``tab`` (one per program tile).

    Triton starts programs in grid order, axis 0 fastest. With the tile axis first
    (``(n, b, h)``) a causal-like part whose work grows along the tiles (the fixed
    pattern's summary columns: query tile i visits ~i/4 key blocks, key tile i is seen
    by ~n - i query tiles) starts its longest programs last, and the launch ends with a
    tail in which a few long programs run alone. With ``heavy_first`` such a part puts
    the tile axis last, ``(h, b, n)``, and runs it from the heavy end, so every head's
    longest tiles start first and the short ones fill in at the end (longest-first
    scheduling). Parts of nearly even work (local, strided) keep ``(n, b, h)``, whose
    neighbouring programs share K/V in L2. ``remap`` rewrites a BlockSpec written for
    ``(i, j, n)`` = (tile, batch, head) to the chosen grid.
    """
    tabs = tab if isinstance(tab, list) else [tab]  # co-launched parts: their work adds up
    n = tabs[0].shape[0]
    work = sum(t[:, 0].astype(np.int64) + t[:, 1] for t in tabs)
    if not heavy_first or n < 2 or work.max() <= 1.25 * max(work.mean(), 1.0):
        return (n, b, h), lambda spec: spec
    reverse = work[n // 2:].sum() > work[: n - n // 2].sum()

    def remap(spec):
        old = spec.index_map
        if reverse:
            new = lambda hh, bb, ii: old(n - 1 - ii, bb, hh)  # noqa: E731
        else:
            new = lambda hh, bb, ii: old(ii, bb, hh)  # noqa: E731
        return dataclasses.replace(spec, index_map=new)

    return (h, b, n), remap


def _extra_refs(refs, extra: tuple):
    """Splits (tab, kpos, k, v) refs of the co-launched parts off the front of ``refs``."""
    n = 4 * len(extra)
    srcs = tuple((*refs[4 * i : 4 * i + 4], rule, bk) for i, (rule, bk) in enumerate(extra))
    return srcs, refs[n:]


def _fwd_kernel_v2(tab_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, *refs,
                   rule: MaskRule, block_k: int, scale: float, has_init: bool,
                   extra: tuple = ()):
    """The v1 kernel body; the co-launched parts' refs (``extra``: their (rule,
    block_k)) come first, then with has_init refs (o0, lse0), then the outputs."""
    srcs, refs = _extra_refs(refs, extra)
    init, outs = (refs[:2], refs[2:]) if has_init else (None, refs)
    _fwd_kernel(tab_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, *outs, rule=rule,
                block_k=block_k, scale=scale, init=init, extra=srcs)


def _query_tile_inputs(rows: _Rows, tab, q, k, v, part: PartLayout):
    """BlockSpecs and arrays of the inputs that the v2 forward and dq kernels share: the
    block table, query and key positions, the q tile and the k, v rows it may visit."""
    bq, d, tk = part.block_q, q.shape[-1], k.shape[1]
    in_specs = [
        pl.BlockSpec((None, tab.shape[1]), lambda i, j, n: (i, 0)),
        pl.BlockSpec((bq,), lambda i, j, n: (i,)),
        rows.kpos_column(bq, part),
        rows.tile(bq, d),
        rows.column(bq, d, tk),
        rows.column(bq, d, tk),
    ]
    args = [tab, jnp.asarray(part.q_pos), jnp.asarray(part.k_pos),
            rows.view(q), rows.view(k), rows.view(v)]
    return in_specs, args


def _extra_inputs(rows: _Rows, extra, d: int):
    """BlockSpecs and arrays of co-launched parts ``extra`` = [(k, v, part)]: each part's
    block table, key positions and k, v (natural query order, the first part's tiles)."""
    in_specs, args = [], []
    for k, v, part in extra:
        assert part.spec.order != "strided", "co-launched parts use the natural query order"
        tab = jnp.asarray(part.fwd)
        in_specs += [pl.BlockSpec((None, tab.shape[1]), lambda i, j, n: (i, 0)),
                     rows.kpos_column(part.block_q, part),
                     rows.column(part.block_q, d, k.shape[1]),
                     rows.column(part.block_q, d, k.shape[1])]
        args += [tab, jnp.asarray(part.k_pos), k, v]
    return in_specs, args, tuple((p.spec.rule, p.block_k) for _, _, p in extra)


def _fwd_call_v2(q, k, v, init, part: PartLayout, cfg: KernelConfig, out_dtype, extra=()):
    """One part (plus co-launched ``extra`` = [(k, v, part)] of the same query tiles),
    starting from ``init`` = (o, lse) of the previous parts or None.

    q, k, v, o: [B, T, H, D] in natural order (k, v: [B, Tk, H, D] gathered for a
    summary part); lse: [B, H, T]. Returns (o [B, T, H, D] out_dtype, lse [B, H, T]).
    """
    b, t, h, d = q.shape
    bq, bk = part.block_q, part.block_k
    rows = _Rows(part, t)
    tab = jnp.asarray(rows.rebase(part.fwd, bq, bk))
    in_specs, args = _query_tile_inputs(rows, tab, q, k, v, part)
    x_specs, x_args, x_static = _extra_inputs(rows, extra, d)
    in_specs += x_specs
    args += x_args
    kernel = functools.partial(_fwd_kernel_v2, rule=part.spec.rule, block_k=bk,
                               scale=d**-0.5, has_init=init is not None, extra=x_static)
    if init is not None:
        in_specs += [rows.tile(bq, d), rows.ltile(bq)]
        args += [rows.view(init[0]), rows.lview(init[1])]
    grid, remap = _launch_order([part.fwd] + [p.fwd for _, _, p in extra], b, h,
                                cfg.heavy_first)
    o, lse = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[remap(sp) for sp in in_specs],
        out_specs=[remap(rows.tile(bq, d)), remap(rows.ltile(bq))],
        out_shape=[
            jax.ShapeDtypeStruct(rows.view(q).shape, out_dtype),
            jax.ShapeDtypeStruct((b, h, rows.n, rows.l) if rows.strided else (b, h, t),
                                 jnp.float32),
        ],
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="sparse_attn_fwd_v2",
    )(*args)
    return rows.unview(o), rows.unview(lse)


def _dq_kernel_v2(tab_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                  delta_ref, *refs, rule: MaskRule, block_k: int, scale: float,
                  has_init: bool, extra: tuple = (), delta_out: bool = False):
    """The v1 kernel body; the co-launched parts' refs come first, then with has_init
    ref dq0, then the output dq, then with ``delta_out`` the output delta (``delta_ref``
    is then the o tile)."""
    srcs, refs = _extra_refs(refs, extra)
    delta_out_ref = refs[-1] if delta_out else None
    refs = refs[:-1] if delta_out else refs
    dq0_ref, dq_ref = refs if has_init else (None, *refs)
    _dq_kernel(tab_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               dq_ref, rule=rule, block_k=block_k, scale=scale, dq0_ref=dq0_ref, extra=srcs,
               delta_out_ref=delta_out_ref)


def _dkv_kernel_v2(tab_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                   delta_ref, *refs, rule: MaskRule, block_q: int, scale: float,
                   has_init: bool):
    """The v1 kernel body; with has_init, refs (dk0, dv0) come before the outputs."""
    dkv0_refs, (dk_ref, dv_ref) = (refs[:2], refs[2:]) if has_init else (None, refs)
    _dkv_kernel(tab_ref, qpos_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, rule=rule, block_q=block_q, scale=scale, dkv0_refs=dkv0_refs)


def _dq_call_v2(q, k, v, do, lse, delta, dq0, part: PartLayout, cfg: KernelConfig, out_dtype,
                extra=(), o=None):
    """(dq, delta) of one part (plus co-launched ``extra`` = [(k, v, part)]), dq added to
    ``dq0``. ``delta`` None: the kernel computes delta = rowsum(do * o) [B, H, T] float32
    itself from ``o`` (every query row lies in one of its tiles); else it is passed on."""
    b, t, h, d = q.shape
    bq, bk = part.block_q, part.block_k
    rows = _Rows(part, t)
    tab = jnp.asarray(rows.rebase(part.fwd, bq, bk))
    in_specs, args = _query_tile_inputs(rows, tab, q, k, v, part)
    delta_out = delta is None
    in_specs += [rows.tile(bq, d), rows.ltile(bq), rows.tile(bq, d) if delta_out else rows.ltile(bq)]
    args += [rows.view(do), rows.lview(lse), rows.view(o) if delta_out else rows.lview(delta)]
    x_specs, x_args, x_static = _extra_inputs(rows, extra, d)
    in_specs += x_specs
    args += x_args
    if dq0 is not None:
        in_specs.append(rows.tile(bq, d))
        args.append(rows.view(dq0))
    grid, remap = _launch_order([part.fwd] + [p.fwd for _, _, p in extra], b, h,
                                cfg.heavy_first)
    out_specs = [remap(rows.tile(bq, d))]
    out_shape = [jax.ShapeDtypeStruct(rows.view(q).shape, out_dtype)]
    if delta_out:
        out_specs.append(remap(rows.ltile(bq)))
        out_shape.append(jax.ShapeDtypeStruct(rows.lview(lse).shape, jnp.float32))
    outs = pl.pallas_call(
        functools.partial(_dq_kernel_v2, rule=part.spec.rule, block_k=bk, scale=d**-0.5,
                          has_init=dq0 is not None, extra=x_static, delta_out=delta_out),
        grid=grid,
        in_specs=[remap(sp) for sp in in_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="sparse_attn_bwd_dq_v2",
    )(*args)
    return rows.unview(outs[0]), rows.unview(outs[1]) if delta_out else delta


def _dkv_call_v2(q, k, v, do, lse, delta, dkv0, part: PartLayout, cfg: KernelConfig,
                 out_dtype):
    """(dk, dv) of one part, plus ``dkv0`` = the previous parts' (dk, dv) or None."""
    b, t, h, d = q.shape
    tk = k.shape[1]
    bq, bk = part.block_q, part.block_k
    hk = part.k_pos.shape[0]
    rows = _Rows(part, t)
    tab = jnp.asarray(rows.rebase(part.bwd, bk, bq))
    kblock_pos_map = (lambda i, j, n: (n, i)) if hk > 1 else (lambda i, j, n: (0, i))
    ktile = rows.tile(bk, d)  # natural: also right for gathered keys (their own length)
    in_specs = [
        pl.BlockSpec((None, tab.shape[1]), lambda i, j, n: (i, 0)),
        rows.pos_column(bk),
        pl.BlockSpec((None, bk), kblock_pos_map),
        rows.column(bk, d),
        ktile,
        ktile,
        rows.column(bk, d),
        rows.lcolumn(bk),
        rows.lcolumn(bk),
    ]
    args = [tab, jnp.asarray(part.q_pos), jnp.asarray(part.k_pos), rows.view(q),
            rows.view(k), rows.view(v), rows.view(do), rows.lview(lse), rows.lview(delta)]
    if dkv0 is not None:
        in_specs += [ktile, ktile]
        args += [rows.view(dkv0[0]), rows.view(dkv0[1])]
    kshape = rows.view(k).shape
    out_specs = [ktile, ktile]
    out_shape = [jax.ShapeDtypeStruct(kshape, out_dtype), jax.ShapeDtypeStruct(kshape, out_dtype)]
    grid, remap = _launch_order(part.bwd, b, h, cfg.heavy_first)
    outs = pl.pallas_call(
        functools.partial(_dkv_kernel_v2, rule=part.spec.rule, block_q=bq, scale=d**-0.5,
                          has_init=dkv0 is not None),
        grid=grid,
        in_specs=[remap(sp) for sp in in_specs],
        out_specs=[remap(sp) for sp in out_specs],
        out_shape=out_shape,
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name="sparse_attn_bwd_dkv_v2",
    )(*args)
    return rows.unview(outs[0]), rows.unview(outs[1])


# A strided part's query rows and key rows all lie in one column of T/l rows, so one
# program can own a whole column and compute its dq, dk and dv together (v2
# ``column_bwd``): every block pair's S, P and dP once, for 5 block matmuls instead of
# the split kernels' 7, no atomics, and one read of q, k, v, do. The cost is registers:
# dq stays live for every query tile a later key tile still reaches, so only columns of
# a few tiles qualify (COLUMN_BWD_MAX_TILES), and only head dims up to
# COLUMN_BWD_MAX_HEAD_DIM: on an H200 at (2, 16384, 8, D), strided l=128, it took f+b
# from 0.549 to 0.522 ms at D=64 but from 0.970 to 1.052 ms at D=128, where dk, dv and
# a dq of [64, 128] float32 crowd the registers (BENCHMARKS.md, session 5).
COLUMN_BWD_MAX_TILES = 2
COLUMN_BWD_MAX_HEAD_DIM = 64


def _column_schedule(part: PartLayout, t: int, d: int) -> tuple | None:
    """((query tile, masked), ...) per key tile of a column, when the part is strided,
    takes the v2 path, has at most COLUMN_BWD_MAX_TILES tiles per column, a head dim of
    at most COLUMN_BWD_MAX_HEAD_DIM, and every column has the same block structure;
    else None (the split kernels then run)."""
    if part.spec.order != "strided" or not _Rows.fits(part, t) or d > COLUMN_BWD_MAX_HEAD_DIM:
        return None
    rows = _Rows(part, t)
    bq, bk = part.block_q, part.block_k
    if max(rows.n // bq, rows.n // bk) > COLUMN_BWD_MAX_TILES:
        return None
    tab = rows.rebase(part.bwd, bk, bq)
    per_col = tab.reshape(-1, rows.n // bk, tab.shape[1])
    width = 2 + int((per_col[..., 0] + per_col[..., 1]).max())
    if not (per_col[..., :width] == per_col[:1, :, :width]).all():
        return None
    schedule = []
    for row in per_col[0]:
        n_full, n_part = int(row[0]), int(row[1])
        ids = row[2 : 2 + n_full + n_part]
        schedule.append(tuple((int(i), m >= n_full) for m, i in enumerate(ids)))
    return tuple(schedule)


def _init_and_grads(refs, has_init: bool):
    """The trailing refs of a one-kernel backward: ((dq0, dk0, dv0) or Nones, (dq, dk, dv))."""
    return (refs[:3], refs[3:]) if has_init else ((None,) * 3, refs)


def _store(ref, ref0, sl, x):
    """Stores the float32 ``x`` (plus the previous parts' ``ref0`` rows, when chained)."""
    if ref0 is not None:
        x = x + ref0[sl, :].astype(jnp.float32)
    ref[sl, :] = x.astype(ref.dtype)


def _column_bwd_kernel(qpos_ref, kpos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                       *refs, schedule: tuple, rule: MaskRule, block_q: int, block_k: int,
                       scale: float, has_init: bool):
    """dq, dk, dv of one column of a strided part (its T/l rows: q, k, v, do, lse, delta,
    positions); with has_init the previous parts' (dq0, dk0, dv0) come before the
    outputs and are added. ``schedule``: per key tile, its (query tile, masked) pairs."""
    (dq0_ref, dk0_ref, dv0_ref), (dq_ref, dk_ref, dv_ref) = _init_and_grads(refs, has_init)
    prec = _precision(q_ref.dtype)
    qk_scale = scale * LOG2E
    d = q_ref.shape[-1]
    last_use = {i: j for j, pairs in enumerate(schedule) for i, _ in pairs}

    dq: dict[int, jax.Array] = {}
    for j, pairs in enumerate(schedule):
        ks = pl.ds(j * block_k, block_k)
        k, v, kpos = k_ref[ks, :], v_ref[ks, :], kpos_ref[ks]
        dk = jnp.zeros((block_k, d), jnp.float32)
        dv = jnp.zeros((block_k, d), jnp.float32)
        for i, masked in pairs:
            qs = pl.ds(i * block_q, block_q)
            q, do = q_ref[qs, :], do_ref[qs, :]
            dk, dv, share = _pair_into(dk, dv, k, v, kpos, q, do, lse_ref[qs] * LOG2E,
                                       delta_ref[qs], qpos_ref[qs] if masked else None,
                                       rule=rule, qk_scale=qk_scale, prec=prec)
            dq[i] = dq[i] + share if i in dq else share
            if last_use[i] == j:  # no later key tile reaches query tile i: store, free
                _store(dq_ref, dq0_ref, qs, dq.pop(i) * scale)
        _store(dk_ref, dk0_ref, ks, dk * scale)
        _store(dv_ref, dv0_ref, ks, dv)
    for i in range(q_ref.shape[0] // block_q):
        if i not in last_use:  # a query tile no key of this part reaches
            _store(dq_ref, dq0_ref, pl.ds(i * block_q, block_q), jnp.zeros((block_q, d), jnp.float32))


def _column_bwd_call(q, k, v, do, lse, delta, init, part: PartLayout, cfg: KernelConfig,
                     out_dtype, schedule: tuple):
    """(dq, dk, dv) of a strided part, one program per column, plus ``init`` = the
    previous parts' (dq, dk, dv) or None. Arrays in natural order, [B, T, H, D]."""
    b, t, h, d = q.shape
    rows = _Rows(part, t)
    col, lcol = rows.column(rows.n, d), rows.lcolumn(rows.n)
    in_specs = [rows.pos_column(rows.n), rows.kpos_column(rows.n, part), col, col, col, col,
                lcol, lcol]
    args = [jnp.asarray(part.q_pos), jnp.asarray(part.k_pos), rows.view(q), rows.view(k),
            rows.view(v), rows.view(do), rows.lview(lse), rows.lview(delta)]
    if init is not None:
        in_specs += [col] * 3
        args += [rows.view(x) for x in init]
    kernel = functools.partial(_column_bwd_kernel, schedule=schedule, rule=part.spec.rule,
                               block_q=part.block_q, block_k=part.block_k, scale=d**-0.5,
                               has_init=init is not None)
    outs = _three_grads_call(kernel, (rows.l, b, h), in_specs, col, rows.view(q).shape,
                             out_dtype, args, cfg, "sparse_attn_bwd_column_v2")
    return tuple(rows.unview(x) for x in outs)


def _three_grads_call(kernel, grid, in_specs, out_spec, shape, out_dtype, args,
                      cfg: KernelConfig, name: str):
    """A one-kernel backward's launch: outputs dq, dk, dv alike (spec, shape, dtype)."""
    return tuple(pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=[out_spec] * 3,
        out_shape=[jax.ShapeDtypeStruct(shape, out_dtype)] * 3,
        interpret=cfg.interpret,
        compiler_params=_compiler_params(cfg),
        name=name,
    )(*args))


# A natural-order part that never leaves its diagonal block of L rows (the fixed
# pattern's own-block part: rule ``same_block`` with g = L) has no pair between two
# blocks, so one program per block can compute that block's dq, dk and dv together
# (v2 ``diag_bwd``): S, P and dP once per pair (5 block matmuls instead of the split
# kernels' 7), one read of q, k, v, do, no atomics, one launch instead of two. The same
# program finishes the gradients of a merged fixed head (``_fused_bwd``): it adds the
# summary part's float32 dq (from the Mosaic dK/dV kernel) and the summary columns'
# dk, dv to its own and writes the input dtype, so the XLA passes that did that (a
# float32 -> bf16 convert of dq, a concatenating row add of dk and dv: 0.07 of the
# 1.69 ms at (2, 16384, 8, 64) on an H200) go away. Registers bound it like the column
# kernel: every query tile of the block keeps a float32 dq (DIAG_BWD_MAX_TILES tiles,
# head dims up to DIAG_BWD_MAX_HEAD_DIM).
DIAG_BWD_MAX_TILES = 2
DIAG_BWD_MAX_HEAD_DIM = 64
# Launch parameters of that kernel: query tile rows (None: the part's block_q), the
# largest key tile (key tiles are cut only where the summary rows begin and end, so a
# block of 128 with c = 32 has key tiles of 64, 32 and 32 rows), warps (None: the
# config's).
DIAG_BWD_TILES = dict(block_q=None, max_block_k=64, num_warps=None)


def _pow2_pieces(start: int, stop: int, largest: int) -> list[tuple[int, int]]:
    """[start, stop) as (start, size) pieces of powers of two, each aligned to its size
    and at most ``largest``: Triton tiles are powers of two."""
    pieces = []
    while start < stop:
        size = largest
        while size > 1 and (start % size or start + size > stop):
            size //= 2
        pieces.append((start, size))
        start += size
    return pieces


def _diag_schedule(part: PartLayout, t: int, d: int, summary: tuple | None = None):
    """(L, block_q, schedule) of a part confined to diagonal blocks of L rows,
    ``schedule`` = ((key row, key rows, ((query tile, masked), ...)), ...) per key tile
    of a block; None when the part is not such a part (natural order, own keys at their
    positions, rule ``same_block``), the block holds more than DIAG_BWD_MAX_TILES query
    tiles, the head dim exceeds DIAG_BWD_MAX_HEAD_DIM, or a tile would have fewer than
    16 rows.

    ``summary`` = (l, lo, c): the summary columns whose dk, dv the kernel adds
    (``part_order.summary_slice``): the block's rows [lo, lo + c), so key tiles are cut
    at lo and lo + c.
    """
    rule = part.spec.rule
    if (part.spec.order != "natural" or part.k_index is not None or rule.group != "same_block"
            or d > DIAG_BWD_MAX_HEAD_DIM or part.k_pos.shape[0] != 1):
        return None
    big = rule.g
    if t % big or not (np.array_equal(part.q_pos, np.arange(t))
                       and np.array_equal(part.k_pos[0], np.arange(t))):
        return None
    bq = min(DIAG_BWD_TILES["block_q"] or part.block_q, big)
    if big % bq or big // bq > DIAG_BWD_MAX_TILES or bq < 16:
        return None
    cuts = {0, big}
    if summary is not None:
        l, lo, c = summary  # noqa: E741
        if l != big:
            return None
        cuts |= {lo, lo + c}
    cuts = sorted(cuts)
    keys = [piece for a, b in zip(cuts, cuts[1:])
            for piece in _pow2_pieces(a, b, DIAG_BWD_TILES["max_block_k"])]
    # 16-bit operands take tiles of 16 rows or more (tensor cores); so does float32 here.
    if min(size for _, size in keys) < 16:
        return None
    pos = np.arange(big)
    allowed = rule.allowed(pos[:, None], pos[None, :])  # [query, key] within one block
    schedule = []
    for start, size in keys:
        pairs = []
        for i in range(big // bq):
            tile = allowed[i * bq : (i + 1) * bq, start : start + size]
            if tile.any():
                pairs.append((i, not bool(tile.all())))
        schedule.append((start, size, tuple(pairs)))
    return big, bq, tuple(schedule)


def _diag_bwd_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, schedule: tuple,
                     rule: MaskRule, big: int, block_q: int, scale: float,
                     has_dq0: bool, has_dkv0: bool, summary: tuple | None):
    """dq, dk, dv of one diagonal block of ``big`` rows (q, k, v, do: [big, D]; lse,
    delta: [big]). ``has_dq0``: a dq0 ref (any dtype) follows, added to dq;
    ``has_dkv0``: then dk0, dv0 refs, added to dk, dv. ``summary`` (lo, c): refs of the
    summary columns' float32 dk, dv ([c, D]) follow, added to the block's rows
    [lo, lo + c). Then the outputs dq, dk, dv."""
    refs = list(refs)
    dq0_ref = refs.pop(0) if has_dq0 else None
    dk0_ref, dv0_ref = (refs.pop(0), refs.pop(0)) if has_dkv0 else (None, None)
    sk_ref, sv_ref = (refs.pop(0), refs.pop(0)) if summary is not None else (None, None)
    dq_ref, dk_ref, dv_ref = refs
    prec = _precision(q_ref.dtype)
    qk_scale = scale * LOG2E
    d = q_ref.shape[-1]
    base = pl.program_id(0) * big  # positions of this block's first row
    last_use = {i: j for j, (_, _, pairs) in enumerate(schedule) for i, _ in pairs}

    dq: dict[int, jax.Array] = {}
    for j, (start, size, pairs) in enumerate(schedule):
        ks = pl.ds(start, size)
        k, v = k_ref[ks, :], v_ref[ks, :]
        kpos = base + start + lax.broadcasted_iota(jnp.int32, (size,), 0)
        dk = jnp.zeros((size, d), jnp.float32)
        dv = jnp.zeros((size, d), jnp.float32)
        for i, masked in pairs:
            qs = pl.ds(i * block_q, block_q)
            q, do = q_ref[qs, :], do_ref[qs, :]
            qpos = (base + i * block_q + lax.broadcasted_iota(jnp.int32, (block_q,), 0)
                    if masked else None)
            dk, dv, share = _pair_into(dk, dv, k, v, kpos, q, do, lse_ref[qs] * LOG2E,
                                       delta_ref[qs], qpos, rule=rule, qk_scale=qk_scale,
                                       prec=prec)
            dq[i] = dq[i] + share if i in dq else share
            if last_use[i] == j:  # no later key tile reaches query tile i: store, free
                _store(dq_ref, dq0_ref, qs, dq.pop(i) * scale)
        dk = dk * scale
        if summary is not None and summary[0] <= start < summary[0] + summary[1]:
            rows = pl.ds(start - summary[0], size)  # the cuts keep the tile inside them
            dk = dk + sk_ref[rows, :]
            dv = dv + sv_ref[rows, :]
        _store(dk_ref, dk0_ref, ks, dk)
        _store(dv_ref, dv0_ref, ks, dv)
    for i in range(big // block_q):
        if i not in last_use:  # a query tile no key of this block reaches
            _store(dq_ref, dq0_ref, pl.ds(i * block_q, block_q), jnp.zeros((block_q, d), jnp.float32))


def _diag_bwd_call(q, k, v, do, lse, delta, part: PartLayout, cfg: KernelConfig, out_dtype,
                   schedule: tuple, dq0=None, dkv0=None, summary=None):
    """(dq, dk, dv) [B, T, H, D] of a part confined to diagonal blocks, one program per
    block, ``schedule`` from ``_diag_schedule``. ``dq0`` and ``dkv0`` = (dk0, dv0): the
    other parts' dq and dk, dv (any dtype, [B, T, H, D]), added. ``summary`` = (dk_g, dv_g, lo, c): the gathered summary
    columns' float32 dk, dv ([B, Tk, H, D], c rows per block in block order, then
    padding), added at the block rows [lo, lo + c)."""
    big, bq, sched = schedule
    b, t, h, d = q.shape
    blk = pl.BlockSpec((None, big, None, d), lambda i, j, n: (j, i, n, 0))
    lblk = pl.BlockSpec((None, None, big), lambda i, j, n: (j, n, i))
    in_specs = [blk] * 4 + [lblk] * 2
    args = [q, k, v, do, lse, delta]
    if dq0 is not None:
        in_specs.append(blk)
        args.append(dq0)
    if dkv0 is not None:
        in_specs += [blk, blk]
        args += list(dkv0)
    if summary is not None:
        dkg, dvg, lo, c = summary
        rows = pl.BlockSpec((None, c, None, d), lambda i, j, n: (j, i, n, 0))
        in_specs += [rows, rows]
        args += [dkg, dvg]
        summary = (lo, c)
    kernel = functools.partial(_diag_bwd_kernel, schedule=sched, rule=part.spec.rule, big=big,
                               block_q=bq, scale=d**-0.5, has_dq0=dq0 is not None,
                               has_dkv0=dkv0 is not None, summary=summary)
    if DIAG_BWD_TILES["num_warps"]:
        cfg = dataclasses.replace(cfg, num_warps=DIAG_BWD_TILES["num_warps"])
    return _three_grads_call(kernel, (t // big, b, h), in_specs, blk, q.shape, out_dtype, args,
                             cfg, "sparse_attn_bwd_diag_v2")


def _diag_bwd_chained(q, k, v, do, lse, delta, init, part: PartLayout, cfg: KernelConfig,
                      out_dtype, schedule: tuple):
    """``_diag_bwd_call`` as a one-kernel backward of ``_fused_bwd`` (``init``: the
    previous parts' (dq, dk, dv) or None)."""
    dq0, dkv0 = (None, None) if init is None else (init[0], init[1:])
    return _diag_bwd_call(q, k, v, do, lse, delta, part, cfg, out_dtype, schedule, dq0=dq0,
                          dkv0=dkv0)


# mosaic_summary_dkv: the gathered (summary) parts' dK/dV from the Mosaic GPU kernel
# (mosaic_gpu._dkv_part: TMA-streamed query blocks, wgmma, two compute warpgroups of 64
# key rows), measured 632 vs 816 us against the Triton kernel of the time at
# (2, 16384, 8, 64) fixed (BENCHMARKS.md, session 3), inside this chain, whose other
# kernels stay. Its tiles: 64 query rows, 128 key rows (MOSAIC_DKV_TILES). wgmma takes
# 16-bit operands, and at D=128 that kernel was the slower one (3,220 vs 2,573 us), so
# it applies to bf16 at head dim 64 only (_mosaic_dkv_applies). mosaic_summary_dq (the
# default for merged heads) is the same kernel also emitting the part's dq.
MOSAIC_DKV_TILES = (64, 128)
# The form of that kernel where it also emits dq: "key_major" (mosaic_gpu._dkv_part,
# the warpgroups split the key tile, 64-row query blocks streamed: MOSAIC_DKV_TILES) or
# "query_major" (mosaic_gpu.dkvdq_query_major, FlashAttention-3's layout: 128 x 128
# steps whose query rows the warpgroups split; tiles MOSAIC_DKVDQ_QM_TILES). Key-major
# by default: query-major was slower on an H200 (fixed merged f+b 1.69 against 1.64 ms
# at (2, 16384, 8, 64), 3.74 against 3.58 at (8, 12288, 8, 64); session 12), its
# registers spill.
MOSAIC_DKVDQ_FORM = "key_major"
MOSAIC_DKVDQ_QM_TILES = (128, 128)
# mosaic_gpu.KernelConfig's scheduling knobs for that kernel (see there). Both on: on an
# H200, fixed merged f+b at (2, 16384, 8, 64) 1.761 ms with both off, 1.697 with
# max_registers alone, 1.769 with overlap_wgmma alone, 1.687 with both (the kernel
# 1.027 -> 0.943 ms); at (8, 12288, 8, 64) 3.868 / 3.745 / 3.904 / 3.727 ms
# (BENCHMARKS.md, session 8).
MOSAIC_DKV_OPTIONS = dict(overlap_wgmma=True, max_registers=True)


def _hopper_or_newer(interpret: bool) -> bool:
    """Whether Mosaic GPU kernels (wgmma, TMA: compute capability 9.0 or newer) can run:
    always in the interpreter; a host without a GPU lowering for one (tests, AOT) has no
    capability to read and is taken at its word."""
    if interpret:
        return True
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return cc is None or float(cc) >= 9.0


def _mosaic_dkv_tiles(with_dq: bool) -> tuple[int, int]:
    """(block_q, block_k) of the Mosaic dK/dV kernel's layout, with or without dq."""
    if MOSAIC_DKVDQ_FORM not in ("key_major", "query_major"):
        raise ValueError(f"MOSAIC_DKVDQ_FORM={MOSAIC_DKVDQ_FORM!r}: use 'key_major' or 'query_major'")
    return MOSAIC_DKVDQ_QM_TILES if with_dq and MOSAIC_DKVDQ_FORM == "query_major" else MOSAIC_DKV_TILES


def _mosaic_dkv_applies(dtype, t: int, d: int, interpret: bool) -> bool:
    bq, bk = (max(a, b) for a, b in zip(_mosaic_dkv_tiles(False), _mosaic_dkv_tiles(True)))
    return (jnp.dtype(dtype).itemsize == 2 and d == 64 and t % bk == 0 and t % bq == 0
            and _hopper_or_newer(interpret))


def _mosaic_config(cfg: KernelConfig, **options) -> mosaic_gpu.KernelConfig:
    """A Mosaic kernel's launch inside this chain: two compute warpgroups, P from
    registers on the GPU (the interpreter lacks that form), the chain's launch order,
    ``options`` as given."""
    return mosaic_gpu.KernelConfig(interpret=cfg.interpret, compute_wgs=2,
                                   pv_from_registers=not cfg.interpret,
                                   heavy_first=cfg.heavy_first, **options)


def _mosaic_dkv_call(q, k, v, do, lse, delta, part: PartLayout, cfg: KernelConfig, dq0=None):
    """(dk, dv) float32 of a gathered part's keys (``part`` laid out at
    MOSAIC_DKV_TILES); lse natural, +inf for empty rows; delta [B, Hg, T]. With ``dq0``
    (float32 [B, T, Hg, D]) also dq0 plus the part's dq (``mosaic_summary_dq``)."""
    mcfg = _mosaic_config(cfg, max_concurrent_steps=2, **MOSAIC_DKV_OPTIONS)
    ld = jnp.stack([lse * LOG2E, delta], axis=2)  # [B, Hg, 2, T]: the kernel's lse2, delta
    if dq0 is not None and (part.block_q, part.block_k) == MOSAIC_DKVDQ_QM_TILES \
            and MOSAIC_DKVDQ_FORM == "query_major":
        return mosaic_gpu.dkvdq_query_major(q, k, v, do, ld, part, mcfg, jnp.float32, dq0)
    # Persistent where its second K/V slot fits in shared memory (D=64 at these tiles).
    persistent = (dq0 is not None and cfg.mosaic_dkvdq_persistent and mosaic_gpu.dkv_smem(
        q.shape[-1], q.dtype, part.block_q, part.block_k, mcfg, jnp.float32, True, True)
        <= mosaic_gpu.SMEM_BUDGET)
    return mosaic_gpu._dkv_part(q, k, v, do, ld, part, mcfg, jnp.float32, dq0=dq0,
                                persistent=persistent)


def _part_kv(k, v, part: PartLayout):
    """The part's keys and values: gathered summary rows, or k, v as they are."""
    if part.k_index is None:
        return k, v
    return part_keys(k, part), part_keys(v, part)


def _launch_groups(parts, colaunch: bool) -> list[list[PartLayout]]:
    """Parts in launches. Without ``colaunch`` one launch per part, chained through HBM.
    With it, consecutive parts that tile queries alike (natural order, same block_q: the
    fixed pattern's block and summary parts) share one launch: each query tile visits
    both parts' key blocks in one online-softmax state, which saves the small part's
    launches and the partial state between them."""
    launches: list[list[PartLayout]] = []
    for part in parts:
        prev = launches[-1][0] if launches else None
        if (colaunch and prev is not None and part.spec.order != "strided"
                and prev.spec.order != "strided" and prev.block_q == part.block_q):
            launches[-1].append(part)
        else:
            launches.append([part])
    return launches


def _fused_forward(q, k, v, group: GroupLayout, cfg: KernelConfig):
    if cfg.mosaic_forward and group.fwd_parts is not None:
        own, summary = group.fwd_parts
        opts = dict(MOSAIC_FWD_OPTIONS)
        pingpong = opts.pop("pingpong")
        mcfg = _mosaic_config(cfg, **opts)
        # Persistent where its second query slot and output buffer fit (checked in
        # attention(): D=64 at the default slots), else one program per tile.
        persistent = cfg.mosaic_forward_persistent
        return mosaic_gpu.merged_forward(q, k, v, part_keys(k, summary), part_keys(v, summary),
                                         own, summary, mcfg, q.dtype, pingpong=pingpong,
                                         persistent=persistent)
    state = None
    launches = _launch_groups(group.parts, cfg.colaunch)
    for p, (part, *rest) in enumerate(launches):
        out_dtype = q.dtype if p == len(launches) - 1 else cfg.chain_dtype(q.dtype)
        extra = [(*_part_kv(k, v, x), x) for x in rest]
        state = _fwd_call_v2(q, *_part_kv(k, v, part), state, part, cfg, out_dtype, extra)
    return state


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused_group(q, k, v, group: GroupLayout, cfg: KernelConfig):
    """Attention of one head group, all parts chained; q, k, v: [B, T, Hg, D]."""
    return _fused_forward(q, k, v, group, cfg)[0]


def _fused_fwd(q, k, v, group, cfg):
    o, lse = _fused_forward(q, k, v, group, cfg)
    return o, (q, k, v, o, lse)


def _fused_bwd(group, cfg, res, do):
    q, k, v, o, lse = res
    dtype = q.dtype
    do = do.astype(dtype)
    # One delta and one lse for every part: the softmax is over the union of the parts.
    delta = None  # delta_in_dq: from the first dQ launch below

    def xla_delta():
        return jnp.swapaxes(jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1), 1, 2)

    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # empty rows: p = 0, not exp(+inf)
    own = [p for p in group.parts if p.k_index is None]
    gathered = [p for p in group.parts if p.k_index is not None]
    # mosaic_summary_dq: the gathered (summary) parts, compute-bound, get their dq from
    # the Mosaic GPU dK/dV kernel (one S and dP per block instead of two), added by TMA
    # bulk reductions of whole tiles into a float32 dq (arrival order: not bitwise
    # reproducible run to run); the other parts keep the dQ kernel.
    mosaic_dq = bool(gathered) and cfg.mosaic_dq(group)
    t, d = q.shape[1], q.shape[-1]
    # summary_dkv_block_q, mosaic_summary_dkv: the dK/dV kernel's own layout of the
    # same parts (the same gathered keys at other tiles: 128-row query tiles, or
    # Mosaic GPU's 64 x 128).
    dkv_parts = dict(zip(map(id, group.parts), group.dkv_parts or group.parts))
    if mosaic_dq and cfg.diag_bwd and len(own) == 1 and len(gathered) == 1:
        # The merged fixed head: the Mosaic kernel first (summary dk, dv and dq, the
        # latter into zeros), then one diag_bwd program per block adds the block part's
        # gradients to them and writes the input dtype: no dQ launch, no XLA convert or
        # row add.
        summary = dkv_parts[id(gathered[0])]
        sl = summary_slice(summary)
        schedule = None if sl is None else _diag_schedule(own[0], t, d, summary=sl)
        if schedule is not None:
            delta = xla_delta()
            kg, vg = part_keys(k, summary), part_keys(v, summary)
            dkg, dvg, dq = _mosaic_dkv_call(q, kg, vg, do, lse, delta, summary, cfg,
                                            dq0=mosaic_gpu.filled_after(do, q.shape, 0.0))
            return _diag_bwd_call(q, k, v, do, lse, delta, own[0], cfg, dtype, schedule, dq0=dq,
                                  summary=(dkg, dvg, sl[1], sl[2]))
    # diag_bwd: parts confined to diagonal blocks, column_bwd: strided parts whose
    # columns qualify, get dq, dk, dv from one kernel, run after the other parts (chained
    # sums: the order does not matter). Each is (call, part, schedule), diagonal blocks
    # first. No part qualifies for both (natural order against strided), so each runs in
    # one such kernel at most.
    one_kernel = []
    if cfg.diag_bwd and not gathered:
        one_kernel += [(_diag_bwd_chained, p, sch) for p in group.parts
                       if (sch := _diag_schedule(p, t, d))]
    if cfg.column_bwd and not gathered:
        one_kernel += [(_column_bwd_call, p, sch) for p in group.parts
                       if (sch := _column_schedule(p, t, d))]
    in_one = {id(p) for _, p, _ in one_kernel}  # identity: layouts hold arrays, no ==
    dq_parts = [p for p in (own if mosaic_dq else group.parts) if id(p) not in in_one]
    dq = None
    launches = _launch_groups(dq_parts, cfg.colaunch)
    # delta_in_dq: the first dQ launch visits every query row once (its tiles cover T),
    # so it computes delta from its own do and o rows and hands it to the later kernels.
    # The XLA pass over do and o it replaces took 0.020 of 0.521 ms (strided, (2, 16384,
    # 8, 64), H200); the dQ kernel's extra o read costs back ~0.012 of it.
    if not (cfg.delta_in_dq and launches):
        delta = xla_delta()
    for n, (part, *rest) in enumerate(launches):
        if n < len(launches) - 1 or one_kernel:
            dq_dtype = cfg.chain_dtype(dtype)
        else:  # mosaic_summary_dq: the float32 dq the Mosaic kernel adds into
            dq_dtype = jnp.float32 if mosaic_dq else dtype
        extra = [(*_part_kv(k, v, x), x) for x in rest]
        dq, delta = _dq_call_v2(q, *_part_kv(k, v, part), do, lse, delta, dq, part, cfg,
                                dq_dtype, extra, o=o)
    dkv = None
    own_split = [p for p in own if id(p) not in in_one]
    for n, part in enumerate(own_split):
        last = n == len(own_split) - 1 and not gathered and not one_kernel
        dkv = _dkv_call_v2(q, k, v, do, lse, delta, dkv, part, cfg,
                           dtype if last else cfg.chain_dtype(dtype))
    for n, (call, part, schedule) in enumerate(one_kernel):
        init = None if dq is None else (dq, *dkv)
        out = dtype if n == len(one_kernel) - 1 else cfg.chain_dtype(dtype)
        dq, *dkv = call(q, k, v, do, lse, delta, init, part, cfg, out, schedule)
    if gathered:
        # One gathered part (the fixed pattern): its float32 dk, dv rows are added to the
        # own parts' dk, dv at those rows only (add_at_keys). Several: float32 sums of
        # all, rounded once at the end.
        row_add = len(gathered) == 1
        if dkv is None:
            dkv = (jnp.zeros(k.shape, dtype if row_add else jnp.float32),) * 2
        dk, dv = dkv if row_add else (x.astype(jnp.float32) for x in dkv)
        if mosaic_dq and dq is None:
            dq = jnp.zeros(q.shape, jnp.float32)
        add = add_at_keys if row_add else scatter_keys
        for part in gathered:
            part = dkv_parts[id(part)]
            kg, vg = part_keys(k, part), part_keys(v, part)
            if mosaic_dq:
                dkg, dvg, dq = _mosaic_dkv_call(q, kg, vg, do, lse, delta, part, cfg, dq0=dq)
            elif cfg.mosaic_summary_dkv:
                dkg, dvg = _mosaic_dkv_call(q, kg, vg, do, lse, delta, part, cfg)
            else:
                dkg, dvg = _dkv_call_v2(q, kg, vg, do, lse, delta, None, part, cfg, jnp.float32)
            dk, dv = add(dk, dkg, part), add(dv, dvg, part)
        dkv = (dk.astype(dtype), dv.astype(dtype))
    return (dq.astype(dtype), *dkv)


_fused_group.defvjp(_fused_fwd, _fused_bwd)


def _group_attention_v2(q, k, v, group: GroupLayout, cfg: KernelConfig, out_dtype):
    t = q.shape[1]
    if not all(_Rows.fits(p, t) for p in group.parts):
        # Blocks larger than a column (T/l rows): the v1 path (materialised order).
        return _group_attention(q, k, v, group, cfg, out_dtype)
    return _fused_group(q, k, v, group, cfg)


# ------------------------------------------------------------------------ entry point


@functools.lru_cache(maxsize=64)
def _with_dkv_tiles(layout: Layout, pattern: LayerPattern, block_q: int,
                    block_k: int = 0, merged_only: bool = False) -> Layout:
    """``layout`` whose groups with gathered parts also carry those parts laid out with
    ``block_q`` x ``block_k`` tiles (``GroupLayout.dkv_parts``; block_k 0: the layout's)
    for their dK/dV kernel; ``merged_only``: only groups that also have own parts
    (``KernelConfig.mosaic_dq``'s "merged"). Cached like ``build_layout`` (``layout`` is
    one of its cached objects)."""
    t = layout.seq_len
    if block_q < 16 or block_q & (block_q - 1) or t % block_q:
        raise PatternError(f"summary_dkv_block_q={block_q} must be a power of two >= 16 "
                           f"dividing T={t}; 0 keeps block_q={layout.block_q}.")
    other = build_layout(pattern, t, block_q, block_k or layout.block_k)
    groups = []
    for group, kv_group in zip(layout.groups, other.groups, strict=True):
        assert group.heads == kv_group.heads and len(group.parts) == len(kv_group.parts)
        own = any(p.k_index is None for p in group.parts)
        if any(p.k_index is not None for p in group.parts) and (own or not merged_only):
            for p, kp in zip(group.parts, kv_group.parts):
                # The same gathered keys (padded to each layout's own key tiles).
                assert (p.k_index is None) == (kp.k_index is None)
                assert p.k_index is None or np.array_equal(
                    p.k_index[p.k_pos != PAD_POSITION], kp.k_index[kp.k_pos != PAD_POSITION])
            group = dataclasses.replace(group, dkv_parts=kv_group.parts)
        groups.append(group)
    return dataclasses.replace(layout, groups=tuple(groups))


# mosaic_forward: the merged fixed heads' forward (block and summary parts in one online
# softmax) from one Mosaic GPU kernel (mosaic_gpu.merged_forward: 128 query rows per
# program, two compute warpgroups taking turns on the tensor cores, 128-row key tiles),
# instead of Triton's 64 x 64 forward (0.438 ms at (2, 16384, 8, 64) on an H200, 322
# TF/s; cuDNN's forward ~443). Timed in session 9 on an H200 (BENCHMARKS.md, "Session
# 9"): forward 0.443 vs Triton's 0.470 ms at (2, 16384, 8, 64), 1.076 vs 1.141 at
# (8, 12288, 8, 64), 2.76 vs 3.44 at (1, 65536, 8, 64); f+b 1.5%, 1% and 6% faster.
# Session 15, with the scale folded into the exponent's FMA, same call: forward 0.428 vs
# Triton's 0.471 ms at (2, 16384, 8, 64), 1.040 vs 1.145 at (8, 12288, 8, 64); f+b 2.6%
# and ~4% faster. Off by default: the 30-layer enwik8 step was not faster with it in
# session 14 (265.9 vs 264.3 ms, another machine), it compiled in 212 s against 117 s
# (before each layer stopped lowering its own copy of the kernel: see
# mosaic_gpu._one_kernel_per_signature), and D=128 is untimed on a GPU.
# mosaic_forward_persistent (one program per SM walking the tiles, merged_forward's
# persistent) is written against the forward's lower per-FLOP rate at short query tiles
# (~318 TF/s at T=16,384, 17 steps per tile, against ~400 at T=65,536, 65 steps); it
# passes the interpreter and CUDA lowering and is untimed.
MOSAIC_FWD_TILES = (128, 128)
# Its launch options: the warpgroups' turns (mosaic_gpu.merged_forward's pingpong: 0.492
# -> 0.466 ms at (2, 16384, 8, 64), 1.146 -> 1.088 at (8, 12288, 8, 64) before the
# longest-first launch order), TMA pipeline slots, setmaxnreg (mosaic_gpu.KernelConfig).
MOSAIC_FWD_OPTIONS = dict(pingpong=True, max_concurrent_steps=2, max_registers=True)


def _mosaic_forward_persistent_fits(d: int, dtype, interpret: bool) -> bool:
    """Whether the persistent Mosaic forward's buffers (two query slots, the output's
    own staging tile) fit in shared memory at MOSAIC_FWD_TILES and MOSAIC_FWD_OPTIONS."""
    opts = {k: v for k, v in MOSAIC_FWD_OPTIONS.items() if k != "pingpong"}
    mcfg = mosaic_gpu.KernelConfig(interpret=interpret, compute_wgs=2,
                                   pv_from_registers=not interpret, **opts)
    return mosaic_gpu.merged_forward_smem(d, dtype, *MOSAIC_FWD_TILES, mcfg, True) <= mosaic_gpu.SMEM_BUDGET


def _mosaic_forward_applies(dtype, t: int, d: int, interpret: bool) -> bool:
    bq, bk = MOSAIC_FWD_TILES
    return (jnp.dtype(dtype).itemsize == 2 and d in (64, 128) and t % bq == 0 and t % bk == 0
            and _hopper_or_newer(interpret))


@functools.lru_cache(maxsize=64)
def _with_fwd_tiles(layout: Layout, pattern: LayerPattern) -> Layout:
    """``layout`` whose merged groups (exactly an own part and a gathered part, natural
    order) also carry those parts at MOSAIC_FWD_TILES (``GroupLayout.fwd_parts``)."""
    other = build_layout(pattern, layout.seq_len, *MOSAIC_FWD_TILES)
    groups = []
    for group, fwd_group in zip(layout.groups, other.groups, strict=True):
        kinds = [p.k_index is None for p in fwd_group.parts]
        if (kinds == [True, False] and all(p.spec.order == "natural" for p in fwd_group.parts)
                and fwd_group.parts[1].spec.summary is not None):
            group = dataclasses.replace(group, fwd_parts=fwd_group.parts)
        groups.append(group)
    return dataclasses.replace(layout, groups=tuple(groups))


def default_blocks(seq_len: int, head_dim: int, pattern: LayerPattern = ()) -> tuple[int, int]:
    """Block sizes used when none are given: 64 x 64 (or the length if shorter), or
    32 x 32 where that lets a strided part take the v2 path.

    v2 reads a strided part column by column, so its tiles must divide the T/l rows of
    a column: at T=12,288 with l=128 (96 rows) 64-row tiles cannot, 32-row ones can.
    """
    b = min(64, seq_len)
    for l in sorted({c.l for head in pattern for c in head if c.kind == "stride"}):  # noqa: E741
        rows = seq_len // l
        if rows % b and rows % 32 == 0:
            b = 32
    return b, b


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pattern: LayerPattern,
    *,
    interpret: bool | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    fuse_parts: bool = True,
    heavy_first: bool = True,
    colaunch: bool = True,
    narrow_chain: bool = True,
    column_bwd: bool = True,
    diag_bwd: bool = True,
    delta_in_dq: bool = True,
    mosaic_forward: bool = False,
    mosaic_forward_persistent: bool = False,
    summary_dkv_block_q: int = 0,
    mosaic_summary_dkv: bool = False,
    mosaic_summary_dq: bool | None = None,
    mosaic_dkvdq_persistent: bool = False,
) -> jax.Array:
    """Block-sparse causal attention. q, k, v: [B, T, H, D] -> [B, T, H, D].

    Args:
      pattern: one entry per head (``PatternSpec.layer_pattern``).
      interpret: run the Pallas interpreter; None means: when the default backend is
        not a GPU.
      block_q, block_k: query and key tile rows (powers of two >= 16 dividing T).
      num_warps, num_stages: Triton launch parameters on GPU (default 4 warps, 2 stages:
        the best measured at head dims 64 and 128 on an H200).
      fuse_parts: the v2 path (see "v2: fused parts" above, the default): strided parts
        read and write through BlockSpecs on the free [B, T/l, l, H, D] view, parts
        chained in one online-softmax state, no log-sum-exp merge forward or backward.
        Groups whose strided blocks do not divide T/l take the v1 path (False), which
        permutes q, k, v and merges the parts' outputs in XLA.
      heavy_first, colaunch, narrow_chain, column_bwd, diag_bwd, delta_in_dq,
        mosaic_forward, mosaic_forward_persistent, summary_dkv_block_q, mosaic_summary_dkv, mosaic_summary_dq: options of the v2
        path only; groups that take the v1 path (``fuse_parts=False``, or strided blocks
        that do not divide T/l) run without them.
      heavy_first: v2 launch order: parts of uneven work per tile (summary columns)
        start their longest programs first (``_launch_order``, and the Mosaic kernels'
        ``mosaic_gpu._launch_order``). Same results either way up to the order of dq's
        float additions in the Mosaic dK/dV+dq kernel; False gives the plain
        tile-major order.
      colaunch: v2: parts that tile queries alike (the fixed pattern's own-block and
        summary parts) run in one forward and one dQ launch, each query tile visiting
        both parts' key blocks in one state, instead of one launch per part chained
        through partial results. Same results up to float rounding order. On by
        default: fixed f+b 2.00 -> 1.89 ms at (2, 16384, 8, 64) on an H200.
      narrow_chain: v2: the partial o, dq, dk, dv that one launch hands the next are
        stored in the input dtype (bf16) instead of float32: half the bytes of the
        chain, for one more bf16 rounding of each partial (the lse stays float32;
        float32 inputs keep a float32 chain). On by default: strided f+b 0.616 ->
        0.543 ms at (2, 16384, 8, 64) on an H200; False gives the float32 chain.
      column_bwd: v2: a strided part whose columns (T/l rows) span at most
        ``COLUMN_BWD_MAX_TILES`` tiles, at head dims up to ``COLUMN_BWD_MAX_HEAD_DIM``,
        gets dq, dk and dv from one kernel, one program per column (5 block matmuls per
        pair instead of 7, one read of q, k, v, do), instead of a dQ and a dK/dV launch,
        in head groups without gathered (summary) parts (no pattern mixes the two).
        Same results up to float rounding order. On by default: strided f+b 0.549 ->
        0.522 ms at (2, 16384, 8, 64) on an H200 (at D=128 it was slower, hence the
        head-dim limit); False keeps the split kernels everywhere.
      diag_bwd: v2: a part that stays inside diagonal blocks of L rows (the fixed
        pattern's own-block part, L = l) gets dq, dk and dv from one kernel, one program
        per block (5 block matmuls per pair instead of 7, no atomics), when a block
        holds at most ``DIAG_BWD_MAX_TILES`` query tiles and the head dim is at most
        ``DIAG_BWD_MAX_HEAD_DIM``: in head groups without gathered parts (the block
        heads of multihead and interleaved layers), and in merged fixed heads where
        ``mosaic_summary_dq`` applies, where the same program also adds the summary
        part's dq, dk and dv (from the Mosaic kernel, run first) and writes the input
        dtype, replacing a dQ launch, a dK/dV launch and two XLA passes. Same results
        up to float rounding order. On by default; False keeps the split kernels.
      delta_in_dq: v2: the backward's delta = rowsum(do * o) (one per query row, for
        every part) computed by the first dQ launch, which reads each query row once,
        from its do tile and the o tile it then also reads, and written out for the
        later kernels, instead of by an XLA pass over do and o. Groups whose backward
        has no dQ launch keep the XLA pass: merged fixed heads with
        ``mosaic_summary_dq`` (its kernel and ``diag_bwd``), and groups whose parts all
        take ``diag_bwd`` or ``column_bwd``. Same results up to float rounding order.
        On by default: on an H200 (means of two timings, one process), f+b 0.521 ->
        0.512 ms strided at (2, 16384, 8, 64), 1.324 -> 1.305 ms at (1, 65536, 8, 64),
        fixed multihead 1.062 -> 1.052 ms (D=64) and 1.867 -> 1.846 ms (D=128)
        (BENCHMARKS.md, "Session 10"); False gives the XLA pass.
      mosaic_forward: v2: the forward of merged fixed heads (one online softmax over the
        block and summary parts) from one Mosaic GPU kernel with 128-row query tiles,
        two compute warpgroups taking turns on the tensor cores (FlashAttention-3's
        ping-pong), instead of Triton's; bf16 at head dims 64 and 128, T a multiple of
        128, Hopper or newer (elsewhere Triton's runs). Same results up to float
        rounding order. Off by default: f+b 1-6% faster on an H200 (most at T=65,536),
        but untimed at D=128 and slower to compile (see MOSAIC_FWD_TILES).
      mosaic_forward_persistent: with ``mosaic_forward``: that kernel launched as one
        program per SM, each walking its share of the (head, query tile, batch) items,
        longest first, with the key stream unbroken across items and the next item's
        query rows loaded during the current one (``mosaic_gpu.merged_forward``'s
        ``persistent``): what a program pays once (launch, first loads, the output
        store) is large next to the fixed pattern's short query tiles (~17 steps at
        T=16,384). Where its buffers do not fit in shared memory (D=128) the
        per-tile launch runs. Same results up to float rounding order. Off by
        default: passes the interpreter and CUDA lowering, not yet timed on a GPU.
        Without ``mosaic_forward`` it is an error.
      summary_dkv_block_q: v2: query tile rows of the gathered (summary) parts' dK/dV
        kernel, when it should differ from ``block_q`` (0: ``block_q``). A sweep on an
        H200 found that kernel alone faster with 128-row query tiles (763 vs 825 µs at
        (2, 16384, 8, 64)) while every other kernel prefers 64 (BENCHMARKS.md, session
        3), but in the full chain 128 was slower: fixed f+b 2.065 vs 1.916 ms at D=64,
        4.146 vs 3.379 ms at D=128 (BENCHMARKS.md, session 6). Off by default.
      mosaic_summary_dkv: v2: the gathered (summary) parts' dK/dV from the Mosaic GPU
        kernel (``mosaic_gpu``; wgmma, TMA) at its own 64 x 128 tiles, the rest of the
        chain unchanged; bf16 at head dim 64 with T a multiple of 128, on Hopper or
        newer, only (elsewhere the Triton kernel runs). Same results up to float
        rounding order. In the chain (H200, fixed merged f+b, dq from Triton): 1.764 vs
        1.850 ms at (2, 16384, 8, 64), but for summary heads alone (multihead) 1.871 vs
        1.819 ms, and ``mosaic_summary_dq`` (which includes it) is faster still for
        merged heads; off by default. Excludes ``summary_dkv_block_q``.
      mosaic_summary_dq: v2: the Mosaic GPU dK/dV kernel of ``mosaic_summary_dkv`` that
        also computes the gathered parts' dq (5 block matmuls per pair instead of 7),
        adding each step's [64, D] tile into a float32 dq by a TMA bulk reduction,
        FlashAttention-3's scheme; the dQ launch then covers the other parts only.
        Additions in arrival order: dq is not bitwise reproducible run to run (False
        gives reproducible gradients). None (the default): on for head groups whose
        summary part shares one softmax with the block part (``combine="merged"``),
        where the Mosaic kernel applies (as ``mosaic_summary_dkv``) and
        ``summary_dkv_block_q`` is not set. Measured on an H200, fixed
        l=128 c=32 merged f+b: 1.76 vs 1.85 ms at (2, 16384, 8, 64), 3.90 vs 4.55 ms at
        (8, 12288, 8, 64); for a group of summary heads alone (multihead) it was slower
        (1.95 vs 1.82 ms), hence "merged" only (BENCHMARKS.md, session 7). True: every
        group with summary parts, where the Mosaic kernel applies (elsewhere, as for
        None, Triton's kernels run).
      mosaic_dkvdq_persistent: where ``mosaic_summary_dq`` applies: that kernel launched
        as one program per SM, each walking its share of the (head, key tile, batch)
        items with the query stream unbroken across items and the next item's K and V
        rows loaded during the current one (``mosaic_gpu._dkv_part``'s
        ``persistent``), against its per-FLOP rate at T=16,384 (~361 TF/s, ~130 steps
        per key tile) below that at T=65,536 (~450). Same results up to the order of
        dq's float additions. Off by default: passes the interpreter and CUDA lowering,
        not yet timed on a GPU.

    Raises:
      PatternError (a ValueError) naming the constraint, for shapes, dtypes, block
      sizes or strides the kernel cannot take.
    """
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise PatternError(f"q, k, v must share one [B, T, H, D] shape, got {q.shape}, "
                           f"{k.shape}, {v.shape}.")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise PatternError(f"q, k, v must all be bfloat16 or all float32, got {q.dtype}, "
                           f"{k.dtype}, {v.dtype}.")
    b, t, h, d = q.shape
    if len(pattern) != h:
        raise PatternError(f"pattern has {len(pattern)} heads but q has {h}.")
    if d < 16 or d > 256 or d & (d - 1):
        raise PatternError(f"head dim D={d} must be a power of two in [16, 256] (the "
                           "kernel's tiles span the whole head dim); pad D, e.g. to "
                           f"{max(16, 1 << (d - 1).bit_length())}.")
    dq_, dk_ = default_blocks(t, d, pattern if fuse_parts else ())
    block_q = block_q or dq_
    block_k = block_k or dk_
    pattern = tuple(tuple(hp) for hp in pattern)
    layout: Layout = build_layout(pattern, t, block_q, block_k)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    # Where it cannot apply (float32, D != 64, T not a multiple of its tiles, no gathered
    # parts, a GPU older than Hopper) the Triton kernel runs, as column_bwd does.
    gathered = any(p.k_index is not None for g in layout.groups for p in g.parts)
    mosaic = gathered and fuse_parts and _mosaic_dkv_applies(q.dtype, t, d, bool(interpret))
    if mosaic and (mosaic_summary_dkv or mosaic_summary_dq) and summary_dkv_block_q:
        raise PatternError("mosaic_summary_dkv and mosaic_summary_dq replace the summary "
                           "dK/dV kernel that summary_dkv_block_q configures: set only one "
                           "(mosaic_summary_dq=False turns the default off).")
    if not mosaic or mosaic_summary_dq is False:
        dq_mode = "off"
    elif mosaic_summary_dq:
        dq_mode = "all"
    else:  # None: the default, unless another option configures that kernel
        dq_mode = "off" if summary_dkv_block_q else "merged"
    mosaic_summary_dkv = mosaic and mosaic_summary_dkv
    # The gathered parts' dK/dV kernel at its own tiles, where it wants other ones.
    # (With both mosaic_summary_dkv and the query-major form, groups without dq take the
    # key-major kernel at the query-major tiles.)
    if mosaic_summary_dkv or dq_mode == "all":
        layout = _with_dkv_tiles(layout, pattern, *_mosaic_dkv_tiles(dq_mode != "off"))
    elif dq_mode == "merged":
        layout = _with_dkv_tiles(layout, pattern, *_mosaic_dkv_tiles(True), merged_only=True)
    elif summary_dkv_block_q and summary_dkv_block_q != block_q:
        layout = _with_dkv_tiles(layout, pattern, summary_dkv_block_q)
    if mosaic_forward_persistent and not mosaic_forward:
        raise PatternError("mosaic_forward_persistent is a launch form of the Mosaic forward: "
                           "set mosaic_forward=True too, or leave it off.")
    mosaic_forward = (mosaic_forward and gathered and fuse_parts
                      and _mosaic_forward_applies(q.dtype, t, d, bool(interpret)))
    mosaic_forward_persistent = (mosaic_forward and mosaic_forward_persistent
                                 and _mosaic_forward_persistent_fits(d, q.dtype, bool(interpret)))
    if mosaic_forward:
        layout = _with_fwd_tiles(layout, pattern)
    cfg = KernelConfig(
        interpret=bool(interpret),
        # 4 warps at every head dim: at D=128 8 warps measured 2.1x slower (fixed f+b
        # 7.22 vs 3.41 ms at (2, 16384, 8, 128), H200, tune_attention.py; BENCHMARKS.md).
        num_warps=num_warps or DEFAULT_NUM_WARPS,
        num_stages=num_stages,
        out_dtype=q.dtype,
        heavy_first=heavy_first,
        colaunch=colaunch,
        narrow_chain=narrow_chain,
        column_bwd=column_bwd,
        diag_bwd=diag_bwd,
        delta_in_dq=delta_in_dq,
        mosaic_forward=mosaic_forward,
        mosaic_forward_persistent=mosaic_forward_persistent,
        mosaic_summary_dkv=mosaic_summary_dkv,
        mosaic_summary_dq=dq_mode,
        mosaic_dkvdq_persistent=mosaic_dkvdq_persistent and dq_mode != "off",
    )
    group_attention = _group_attention_v2 if fuse_parts else _group_attention
    everyone = tuple(range(h))
    if len(layout.groups) == 1 and layout.groups[0].heads == everyone:
        return group_attention(q, k, v, layout.groups[0], cfg, q.dtype)
    groups = sorted(layout.groups, key=lambda g: g.heads[0])
    ranges = head_ranges(groups, h)
    if ranges is not None:  # consecutive heads: slices in, one concatenate out
        return jnp.concatenate([group_attention(*(x[:, :, r] for x in (q, k, v)), g, cfg, q.dtype)
                                for g, r in zip(groups, ranges)], axis=2)
    out = jnp.zeros_like(q)
    for group in layout.groups:
        idx = np.asarray(group.heads)
        o = group_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], group, cfg, q.dtype)
        out = out.at[:, :, idx].set(o)
    return out
