"""Block-sparse flash attention in Pallas Mosaic GPU (``plgpu``), for Hopper.

Groundwork for a Mosaic GPU successor of ``pallas_gpu.py`` (Triton lowering, deprecated
in JAX 0.11). Same block layout (``layout.build_layout``), same per-part decomposition
and the same mask rule for partial blocks; the kernel itself is written the Mosaic GPU
way, like JAX's FlashAttention-3 (``jax/experimental/pallas/ops/gpu/attention_mgpu.py``):

* One program per (head, query tile, batch), ``plgpu.kernel`` grid ``(H, T/block_q, B)``.
  A program runs ``compute_wgs`` compute warpgroups, each owning ``block_q/compute_wgs``
  query rows (a multiple of 64: the wgmma M), plus one memory warpgroup.
* The memory warpgroup walks the layout's key-block list of the query tile
  (``part.fwd[qi]``: n_full, n_part, block ids; scalars read from GMEM) and streams
  K and V blocks with TMA into ``max_concurrent_steps`` SMEM slots; per slot a TMA
  barrier says "landed" and a "consumed" barrier (one arrival per compute warpgroup)
  says the slot may be refilled.
* A compute warpgroup: Q tile by TMA, then per listed key block S = Q K^T by wgmma
  (both operands in SMEM), the mask on partial blocks (positions computed from iota and
  the part's order, same rule as ``pallas_gpu._mask``), online softmax in base 2,
  P V by wgmma, and at the end o = acc / l and lse written back by TMA.
  The two compute warpgroups share the key stream, so the layout is built for the
  whole program tile (``block_q`` rows): a block that is empty for one warpgroup's rows
  but not the other's is masked to -inf by the first (rows stay exact, see _step).

P V has two forms. ``pv_from_registers=True`` (FA3, the GPU default) feeds P to wgmma
from registers and accumulates into the running accumulator in place
(``pl.run_state(...)(plgpu.ACC.init(alpha * acc))``). The Mosaic GPU *interpreter* of
JAX 0.11.2 supports neither a register LHS for wgmma nor ``run_state`` (see
docs/mosaic_gpu_notes.md), so ``pv_from_registers=False`` (the interpret default)
stores P to SMEM, runs wgmma on a fresh zero accumulator and adds alpha * acc in
registers. Only the latter is exercised by the CPU tests.

Parts of a head (merged strided: local + stride; merged fixed: block + summary) are one
kernel launch each on permuted / gathered q, k, v (the ``pallas_gpu`` "v1" scheme) and
are merged exactly through their log-sum-exps in XLA. Positions are not loaded: each
part's order is a closed form (natural, strided, or the gathered summary columns),
checked against the layout's ``q_pos`` / ``k_pos`` when the kernel is built.

Backward (``jax.custom_vjp`` per head group, see "backward" below): per part a dQ kernel
(program = query tile, streaming the tile's K, V blocks from ``part.fwd``) and a dK/dV
kernel (program = key tile, streaming Q, dO and (lse, delta) blocks from the transposed
lists ``part.bwd`` of a second layout with the dK/dV tile sizes). Every part uses the
merged lse and delta = rowsum(dO * O) - dlse, so the merge needs no backward; the
permutations are undone and gathered summary keys scatter-added in XLA. wgmma forms as
in the forward: SMEM operands with a fresh accumulator (interpret), or register
operands accumulating in place (``pv_from_registers``, GPU only).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import heapq
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from sparse_lm.attention.layout import (
    PAD_POSITION,
    GroupLayout,
    PartLayout,
    build_layout,
    head_ranges,
)
from sparse_lm.attention.part_order import from_order, merge, part_keys, scatter_keys, to_order
from sparse_lm.attention.patterns import LayerPattern, PatternError

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
WGMMA_M = 64  # rows of one warpgroup's wgmma: a compute warpgroup's tile is a multiple


def _plgpu():
    # Imported lazily: importing this module must not require Mosaic GPU.
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    interpret: bool
    compute_wgs: int
    max_concurrent_steps: int
    pv_from_registers: bool
    interpret_params: object = None  # a plgpu.InterpretGPUParams, or None for defaults
    # dK/dV kernel (_dkv_part), untimed (session 7): every read of a wgmma accumulator
    # waits for all the warpgroup's wgmmas, so a step's five matmuls ran one by one.
    # overlap_wgmma: S^T and dP^T issued together, the exponentials computed while dP^T
    # is in flight; on the GPU dV, dK (and the designated warpgroup's dq) issued
    # together too: three waits per step instead of five.
    overlap_wgmma: bool = False
    # max_registers: compute warpgroups raise their register limit to 232, the memory
    # warpgroup lowers its own to 40 (setmaxnreg, as JAX's FA3 kernel does).
    max_registers: bool = False
    # heavy_first: the tiles start from the end whose tiles have the most steps
    # (_launch_order); off: in ascending order, as before session 9.
    heavy_first: bool = True


# ---------------------------------------------------------------- positions of rows


@dataclasses.dataclass(frozen=True)
class _Positions:
    """Closed form of the original positions of a part's query and key rows.

    q_stride: 0 for the natural order, else l of the strided order (row r holds
      position (r % n) * l + r // n with n = T / l). Keys use the query order unless
      ``summary`` = (l, c, n_rows): key row r is the summary column
      (r // c) * l + lo + r % c for r < n_rows, padding (PAD_POSITION) after; ``lo``
      (= l - c - offset) is per head and passed to the kernel as an int32 array.
    """

    seq_len: int
    q_stride: int
    summary: tuple[int, int, int] | None

    # Host arrays (the layout check) use numpy, traced ones (the kernel) lax: truncating
    # division, exact for the non-negative rows here and cheaper than floor division.
    @staticmethod
    def _ops(r):
        if isinstance(r, np.ndarray):
            return np.floor_divide, np.remainder, np.where
        return lax.div, lax.rem, jnp.where

    def q(self, r):
        if not self.q_stride:
            return r
        div, rem, _ = self._ops(r)
        n = self.seq_len // self.q_stride
        return rem(r, n) * self.q_stride + div(r, n)

    def k(self, r, lo):
        if self.summary is None:
            return self.q(r)
        div, rem, where = self._ops(r)
        l, c, n_rows = self.summary  # noqa: E741
        return where(r < n_rows, div(r, c) * l + lo + rem(r, c), PAD_POSITION)


def _positions(part: PartLayout) -> tuple[_Positions, np.ndarray]:
    """The closed form of ``part``'s positions and the per-head summary starts ``lo``
    ([Hk] int32), checked against the layout's arrays."""
    t = part.seq_len
    q_stride = part.spec.l if part.spec.order == "strided" else 0
    summary = None
    lo = np.zeros((part.k_pos.shape[0],), np.int32)
    if part.k_index is not None:
        l, c = part.spec.summary  # noqa: E741
        summary = (l, c, (t // l) * c)
        lo = (part.k_pos[:, 0] % l).astype(np.int32)
    pos = _Positions(t, q_stride, summary)
    want_q = pos.q(np.arange(t))
    want_k = np.stack([pos.k(np.arange(part.kv_len), int(o)) for o in lo])
    if not (np.array_equal(want_q, part.q_pos) and np.array_equal(want_k, part.k_pos)):
        raise AssertionError(f"closed-form positions disagree with the layout of {part.spec}")
    return pos, lo


# ------------------------------------------------------------------------- the kernel


def _smem_transforms(dtype, minor: int):
    """Tiling + swizzle for a wgmma operand in SMEM whose minor dim has ``minor`` elems."""
    plgpu = _plgpu()
    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits, "wgmma operand")
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _stream(steps, n_slots, fetch, free_bars):
    """Memory warpgroup: ``fetch(t, slot)`` for t < steps, refilling a slot once every
    barrier of ``free_bars`` (one per stream, ``num_arrivals`` = compute warpgroups)
    has flipped for it; then drains the last phases (required by the interpreter)."""
    plgpu = _plgpu()
    for i in range(n_slots):
        pl.when(i < steps)(functools.partial(fetch, i, i))

    @pl.loop(0, jnp.maximum(steps - n_slots, 0))
    def _refill(j):
        slot = lax.rem(j, n_slots)
        # Every wait before the copies: a slot's barriers flip once per use, and the
        # compute warpgroups release the streams in order (K before V).
        for bar in free_bars:
            plgpu.barrier_wait(bar.at[slot])
        fetch(j + n_slots, slot)

    # Drain: observe the last release of every used slot. Free on the GPU (this warpgroup
    # is idle by now) and required by the interpreter, which rejects deallocating a
    # barrier whose completed phases a waiting thread missed.
    for i in range(n_slots):
        @pl.when(i < steps)
        def _drain():
            for bar in free_bars:
                plgpu.barrier_wait(bar.at[i])


def _stream_items(n_items, steps_of, fetcher, n_slots, free_bars):
    """Memory warpgroup of a persistent launch: the blocks of its items 0..n_items - 1
    (``steps_of(i)`` steps each, ``fetcher(i)(t, slot)`` fetching step t of item i) as
    one stream, the slots running on across items, so that the next item's first blocks
    load while the last item's final steps run; then the drain of ``_stream``."""
    plgpu = _plgpu()

    def fetch_item(i, g):
        fetch = fetcher(i)

        @pl.loop(0, steps_of(i))
        def _step(t_):
            j = g + t_  # this program's step count
            slot = lax.rem(j, n_slots)

            @pl.when(j >= n_slots)
            def _wait_free():
                # Every wait before the copies: a slot's barriers flip once per use, and
                # the compute warpgroups release them in order.
                for bar in free_bars:
                    plgpu.barrier_wait(bar.at[slot])

            fetch(t_, slot)

        return g + steps_of(i)

    total = lax.fori_loop(0, n_items, fetch_item, jnp.int32(0))
    for i in range(n_slots):
        @pl.when(i < total)
        def _drain():
            for bar in free_bars:
                plgpu.barrier_wait(bar.at[i])


def _wgmma_value(plgpu, shape, a, b):
    """a @ b into a fresh float32 accumulator (both operands in SMEM)."""

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _wgmma_pair(plgpu, shape, first, second, between):
    """``first`` and ``second`` ((a, b) pairs, SMEM operands): a @ b of each, issued back
    to back; ``between`` runs on the first product while the second is in flight.
    Returns (between(first product), second product)."""

    def body(r1, r2):
        plgpu.wgmma(r1, *first)
        plgpu.wgmma(r2, *second)
        # wgmma groups complete in order: wait_n=1 waits for the first only.
        y = between(plgpu.wgmma_accumulator_load(r1, wait_n=1))
        return y, r2[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))


def _accumulate(plgpu, acc, a, a_smem, b, in_place: bool):
    """acc + a @ b. ``in_place`` (GPU only): wgmma with a from registers into acc itself
    (``run_state``, as FA3); else a is stored to ``a_smem`` and added in registers."""
    if in_place:
        return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))
    a_smem[...] = a
    plgpu.commit_smem()
    return acc + _wgmma_value(plgpu, acc.shape, a_smem, b)


def _forward_scratch(plgpu, cfg: KernelConfig, dtype, out_dtype, rows: int, bk: int, d: int):
    """A forward's shared memory (q per warpgroup, K and V slots, P per warpgroup unless
    P goes from registers, o per warpgroup when its dtype differs from q's (else o is
    staged in q's buffer), lse per warpgroup) and its barriers (K, V landed; Q landed;
    K, V slot free)."""
    wgs, n_slots = cfg.compute_wgs, cfg.max_concurrent_steps
    qkv_tr = _smem_transforms(dtype, d)
    smem = (
        plgpu.SMEM((wgs, rows, d), dtype, transforms=qkv_tr),
        plgpu.SMEM((n_slots, bk, d), dtype, transforms=qkv_tr),
        plgpu.SMEM((n_slots, bk, d), dtype, transforms=qkv_tr),
        None if cfg.pv_from_registers
        else plgpu.SMEM((wgs, rows, bk), dtype, transforms=_smem_transforms(dtype, bk)),
        None if jnp.dtype(out_dtype) == jnp.dtype(dtype) else plgpu.SMEM((wgs, rows, d), out_dtype),
        plgpu.SMEM((wgs, rows), jnp.float32),
    )
    bars = (
        plgpu.Barrier(num_barriers=n_slots),  # K landed
        plgpu.Barrier(num_barriers=n_slots),  # V landed
        plgpu.Barrier(num_barriers=wgs),  # Q landed
        plgpu.Barrier(num_arrivals=wgs, num_barriers=n_slots),  # K slot free
        plgpu.Barrier(num_arrivals=wgs, num_barriers=n_slots),  # V slot free
    )
    return smem, bars


def _load_query_rows(plgpu, src, q_smem, bar, bk: int):
    """A forward's compute warpgroup: its query rows from ``src`` into ``q_smem``, and
    the (row, key column) index grids of its [rows, bk] score tiles."""
    plgpu.copy_gmem_to_smem(src, q_smem, bar)
    plgpu.barrier_wait(bar)
    rows = q_smem.shape[0]
    return tuple(plgpu.broadcasted_iota(jnp.int32, (rows, bk), axis, layout=plgpu.Layout.WGMMA)
                 for axis in (0, 1))


def _softmax_start(plgpu, rows: int, d: int):
    """The online softmax's starting (acc, m, l) in wgmma layouts."""
    layout = plgpu.Layout.WGMMA
    return (plgpu.layout_cast(jnp.zeros((rows, d), jnp.float32), layout),
            plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), layout.reduce(1)),
            plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), layout.reduce(1)))


def _softmax_step(s, scale2: float, acc, m_prev, l_prev):
    """One online-softmax step of raw scores ``s`` [rows, keys] (masked ones -inf) whose
    base-2 scores are ``s * scale2``: (p, acc rescaled, m, l), m and l in base 2. A row
    with no allowed key so far has max -inf: it is shifted by 0 instead.

    The scale is applied to the row max, not to the tile: p = exp2(s * scale2 - m) is
    then one fused multiply-add per score before the exponential, instead of a multiply
    of the whole tile and a subtraction (scale2 > 0, so the max commutes with it).
    Measured on an H200 (session 15): the merged forward 1.076 -> 1.040 ms at (8, 12288,
    8, 64). The same change made Triton's forward (``pallas_gpu._fwd_tile``) slower."""
    m_next = jnp.maximum(m_prev, s.max(axis=1) * scale2)
    m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp2(m_prev - m_shift)
    p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(m_shift, s.shape, [0]))
    l_next = alpha * l_prev + p.sum(axis=1)
    return p, acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), m_next, l_next


def _write_rows(plgpu, acc, m, l, o_smem, lse_smem, o_dst, lse_dst, out_dtype,  # noqa: E741
                wait: bool = True):
    """A forward's last step: o = acc / l (0 for an empty row) and its natural lse (-inf
    for an empty row), staged in shared memory and copied to ``o_dst``, ``lse_dst``.
    ``wait``: the copies are waited on here; else the staging tiles' earlier copies are
    waited on (for their reads) before they are overwritten, and the caller waits on
    these ones (a persistent program's next item runs meanwhile)."""
    if not wait:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    empty = l == 0.0
    l_safe = jnp.where(empty, 1.0, l)
    o_smem[...] = (acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])).astype(out_dtype)
    lse_smem[...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) * LN2)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_dst)
    plgpu.copy_smem_to_gmem(lse_smem, lse_dst)
    if wait:
        plgpu.wait_smem_to_gmem(0)


def _set_registers(plgpu, cfg: KernelConfig, compute: bool) -> None:
    """``max_registers``: the compute warpgroups raise their limit to 232, the memory
    warpgroup lowers its own to 40. Both or neither: setmaxnreg.inc waits until the
    block's register pool has room, so raising without the matching decrease hangs
    (it did, session 8, in merged_forward's first version on an H200)."""
    if cfg.max_registers and not cfg.interpret:
        if compute:
            plgpu.set_max_registers(232, action="increase")
        else:
            plgpu.set_max_registers(40, action="decrease")


def _launch_order(work: np.ndarray, h: int, b: int, tile_axis: str, heavy_first: bool):
    """(grid, grid names, reverse) of a launch over tiles whose step counts are ``work``.

    Blocks start in grid order, the first axis fastest: (heads, tiles, batch), so the
    programs running at once are the heads of neighbouring tiles of one batch, which
    stream the same rows through L2. In a causal-like part the work grows or shrinks
    along the tiles (the fixed pattern's summary part: query tile i visits ~i/4 key
    tiles, key tile j is seen by ~n - j query tiles), and a launch that starts its
    longest programs last ends in a tail where a few of them run alone: up to one
    longest program (33 steps of 128 keys at T=16,384) beyond an SM's even share
    (~270). With ``heavy_first``, where the later half of the tiles holds more steps,
    the tile axis runs backwards (``reverse``: the program at tile index i takes tile
    n - 1 - i), so the longest tiles start first and the short ones fill in at the end
    (longest-first scheduling).

    Measured on an H200 (session 9): the Mosaic merged forward reversed, 0.460 ->
    0.443 ms at (2, 16384, 8, 64). Putting the tile axis last instead, (heads, batch,
    tiles), made the dK/dV+dq kernel 5% slower (0.944 -> 0.995 ms; 3.58 -> 3.69 ms f+b
    at (8, 12288, 8, 64)): every batch's rows were in flight at once."""
    n = len(work)
    reverse = heavy_first and bool(work[n // 2:].sum() > work[: n - n // 2].sum())
    return (h, n, b), ("heads", tile_axis, "batch"), reverse


def _tile_work(*tabs: np.ndarray) -> np.ndarray:
    """Steps per tile of block tables (rows: n_full, n_partial, ids) run in one program."""
    return sum(np.asarray(t)[:, 0].astype(np.int64) + np.asarray(t)[:, 1] for t in tabs)


def _tile_index(tile_axis: str, n: int, reverse: bool):
    i = lax.axis_index(tile_axis)
    return n - 1 - i if reverse else i


def _program(tab_ref, tile_axis: str, reverse: bool = False):
    """This program's (head, tile, batch, warpgroup) indices, and from its row of the
    block table the number of full (unmasked) steps and of all steps."""
    tile = _tile_index(tile_axis, tab_ref.shape[0], reverse)
    n_full = tab_ref[tile, 0]
    return (lax.axis_index("heads"), tile, lax.axis_index("batch"), lax.axis_index("wg"),
            n_full, n_full + tab_ref[tile, 1])


def _name(kind: str, part: PartLayout) -> str:
    """mgpu_attn_<fwd|dq|dkv|dkvdq|dkvdq_qm>_<summary|strided|natural>: the kernel's
    name in profiles (dkvdq: the dK/dV kernel that also emits dq; dkvdq_qm: its
    query-major form, ``dkvdq_query_major``)."""
    return f"mgpu_attn_{kind}_{'summary' if part.spec.summary else part.spec.order}"


def _launch_params(plgpu, cfg: KernelConfig) -> dict:
    """The interpreter's parameters, or the compiler's."""
    if cfg.interpret:
        return dict(interpret=cfg.interpret_params or plgpu.InterpretGPUParams())
    return dict(compiler_params=plgpu.CompilerParams(approx_math=True))


def _launch(plgpu, entry, out_type, grid, grid_names, wgs, cfg, args, name: str):
    # The kernel's name in profiles is taken from the body's: one per kernel kind and
    # part kind, so a trace tells the forward, dQ and dK/dV of each part apart.
    entry.__name__ = entry.__qualname__ = name
    return plgpu.kernel(entry, out_type=out_type, grid=grid, grid_names=grid_names,
                        num_threads=wgs + 1, thread_name="wg", **_launch_params(plgpu, cfg))(*args)


def filled_after(x: jax.Array, shape, value: float, dtype=jnp.float32) -> jax.Array:
    """An array of ``shape`` filled with ``value`` that XLA cannot compute before ``x``.

    A broadcast of a constant has no operand, so XLA's scheduler may run it early: in
    the 30-layer enwik8 train step the zero dq buffers of the Mosaic dK/dV+dq kernel
    (200 MB per layer) were all alive at once, 36.8 -> 42.2 GiB peak (H200, session 8).
    Adding x's first element times zero ties the fill to x (XLA does not fold float
    x * 0, which is NaN for x = inf or NaN; the gradient would then be lost anyway)."""
    tie = (x.reshape(-1)[:1] * 0).astype(dtype).reshape((1,) * len(shape))
    return jnp.full(shape, value, dtype) + tie


def _launch_in_place(plgpu, entry, args, state, grid, grid_names, wgs, cfg, name: str):
    """``entry(*args, *state_refs)`` on the mesh; returns the final ``state`` arrays."""
    mesh = plgpu.Mesh(grid=grid, grid_names=grid_names, num_threads=wgs + 1,
                      thread_name="wg", kernel_name=name)

    def body(refs):
        @pl.core_map(mesh, **_launch_params(plgpu, cfg))
        def _():
            entry(*refs)

    return pl.run_state(body)((*args, *state))[len(args):]


def _one_kernel_per_signature(*static: str):
    """A kernel launcher behind ``jax.jit``, the arguments ``static`` (layouts, the
    configuration, dtypes, flags) static: within one program, calls with the same static
    arguments and operand shapes share one traced and lowered kernel.

    Mosaic GPU stamps every module it lowers with a unique name (``dump_basename``, a
    process-wide counter), and that name is part of the kernel's hash. Called directly,
    the 30 layers of a model that run the same kernel lowered to 30 modules that differed
    in that name only (checked on the lowered text: 30 distinct ``kernel_hash`` values),
    so nothing identified them as one kernel. Through the jit, the layers call one
    lowered module.

    Interpreted kernels (``cfg.interpret``) are called as they are. Jitted, they hung
    tests/test_mosaic_gpu.py's strided gradient test on the two-core test machine: each
    warpgroup of an interpreted kernel blocks a CPU thread at its barriers, and (the
    likely reason) a cached kernel is dispatched at once, no longer behind a compile,
    so two of them were in flight together."""

    def wrap(fn):
        jitted = jax.jit(fn, static_argnames=static)
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if signature.bind(*args, **kwargs).arguments["cfg"].interpret:
                return fn(*args, **kwargs)
            return jitted(*args, **kwargs)

        return call

    return wrap


@_one_kernel_per_signature("part", "cfg", "out_dtype")
def _part_forward(q, k, v, part: PartLayout, cfg: KernelConfig, out_dtype):
    """(o [B, T, H, D] out_dtype, lse [B, H, T] float32) of one part, in part order.

    q: [B, T, H, D]; k, v: [B, Tk, H, D] (gathered summary keys for a summary part).
    """
    plgpu = _plgpu()
    b, t, h, d = q.shape
    dtype = q.dtype
    bq, bk = part.block_q, part.block_k
    wgs = cfg.compute_wgs
    rows = bq // wgs  # query rows of one compute warpgroup
    n_slots = cfg.max_concurrent_steps
    rule = part.spec.rule
    grid, grid_names, reverse = _launch_order(_tile_work(part.fwd), h, b, "q_seq", cfg.heavy_first)
    pos, lo = _positions(part)
    per_head_lo = lo.shape[0] > 1
    scale2 = d**-0.5 * LOG2E  # scores in base 2

    def kernel(tab_ref, lo_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped):
        (q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem), bars = scoped
        k_ready, v_ready, q_ready, k_free, v_free = bars
        hi, qi, bi, wg, n_full, steps = _program(tab_ref, "q_seq", reverse)

        @pl.when(wg < wgs)
        def _compute():
            row0 = qi * bq + wg * rows
            qs = q_smem.at[wg]
            q_rows, k_cols = _load_query_rows(plgpu, q_ref.at[bi, pl.ds(row0, rows), hi], qs,
                                              q_ready.at[wg], bk)
            lo_h = lo_ref[hi] if per_head_lo else lo_ref[0]
            q_pos = pos.q(q_rows + row0)

            def step(t_, carry, masked: bool):
                acc, m_prev, l_prev = carry
                slot = lax.rem(t_, n_slots)
                plgpu.barrier_wait(k_ready.at[slot])
                s = _wgmma_value(plgpu, (rows, bk), qs, k_smem.at[slot].T)
                plgpu.barrier_arrive(k_free.at[slot])
                if masked:
                    kb = tab_ref[qi, 2 + t_]
                    k_pos = pos.k(k_cols + kb * bk, lo_h)
                    s = jnp.where(rule.in_kernel(q_pos, k_pos), s, -jnp.inf)
                p, acc, m_next, l_next = _softmax_step(s, scale2, acc, m_prev, l_prev)
                plgpu.barrier_wait(v_ready.at[slot])
                # FA3 (pv_from_registers, GPU only): P from registers into acc in place.
                acc = _accumulate(plgpu, acc, p.astype(dtype),
                                  None if cfg.pv_from_registers else p_smem.at[wg],
                                  v_smem.at[slot], cfg.pv_from_registers)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_next, l_next

            carry = _softmax_start(plgpu, rows, d)
            carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
            acc, m, l = lax.fori_loop(n_full, steps, functools.partial(step, masked=True),
                                      carry)
            _write_rows(plgpu, acc, m, l, o_smem.at[wg] if o_smem is not None else qs,
                        lse_smem.at[wg], o_ref.at[bi, pl.ds(row0, rows), hi],
                        lse_ref.at[bi, hi, pl.ds(row0, rows)], out_dtype)

        @pl.when(wg == wgs)
        def _memory():
            def fetch(t_, slot):
                kb = tab_ref[qi, 2 + t_]
                src = (bi, pl.ds(kb * bk, bk), hi)
                plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_ready.at[slot])

            _stream(steps, n_slots, fetch, (k_free, v_free))

    def entry(tab_ref, lo_ref, q_ref, k_ref, v_ref, o_ref, lse_ref):
        smem, bars = _forward_scratch(plgpu, cfg, dtype, out_dtype, rows, bk, d)
        pl.run_scoped(
            lambda *scoped: kernel(tab_ref, lo_ref, q_ref, k_ref, v_ref, o_ref, lse_ref,
                                   scoped),
            smem, bars, collective_axes="wg",
        )

    out_type = (jax.ShapeDtypeStruct((b, t, h, d), out_dtype),
                jax.ShapeDtypeStruct((b, h, t), jnp.float32))
    return _launch(plgpu, entry, out_type, grid, grid_names, wgs,
                   cfg, (jnp.asarray(part.fwd), jnp.asarray(lo), q, k, v), _name("fwd", part))


def _work_items(work: np.ndarray, h: int, b: int, heavy_first: bool) -> np.ndarray:
    """(head, tile, batch) of every program of a tile launch, int32 [tiles * h * b, 3], in
    the order the programs should start: one batch after the other, within it the tiles
    with the most steps first (``heavy_first``, longest-first scheduling; else in tile
    order), the heads fastest. That is the order of the (heads, tiles, batch) grids these
    kernels ran with before (``_launch_order``): the programs running at once are the
    heads of neighbouring tiles of one batch, which share keys (forward) or query rows
    (dK/dV) in L2; with every batch in flight at once the dK/dV+dq kernel ran 5% slower
    (session 9)."""
    tiles = np.argsort(-np.asarray(work), kind="stable") if heavy_first else np.arange(len(work))
    hh, tt, bb = np.meshgrid(np.arange(h), tiles, np.arange(b), indexing="ij")
    order = np.stack([hh, tt, bb], axis=-1).transpose(2, 1, 0, 3)  # [batch, tile, head, 3]
    return order.reshape(-1, 3).astype(np.int32)


def _resident_programs(cfg: KernelConfig, n_items: int) -> int:
    """Programs of a persistent launch: one per SM of the GPU (one such program fills an
    SM's registers), three in the interpreter (so that each runs several work items,
    as on the GPU), 132 (an H100's or H200's SMs) when lowering without a GPU."""
    if cfg.interpret:
        return min(3, n_items)
    gpus = [x for x in jax.devices() if x.platform == "gpu"] if jax.default_backend() == "gpu" else []
    sms = getattr(gpus[0], "core_count", None) if gpus else None
    return min(int(sms or 132), n_items)


def _persistent_schedule(cost: np.ndarray, n_programs: int) -> tuple[np.ndarray, np.ndarray]:
    """Which work items each program of a persistent launch runs, and in which order:
    (table [P, m] int32 of item indices, -1 after a program's last; counts [P] int32).

    Items are taken in the given order (``_work_items``: longest first) and each goes to
    the program with the least work so far (longest-processing-time-first, computed
    here on the host since every item's length is known): the programs end within about
    one item of each other. A fixed rotation (program i takes items i, i + P, ...) would
    give program 0 the longest item of every round: at (2, 16384, 8, 64) on 132
    programs, 284 steps against the last one's 252 (this schedule: 269 and 267; the
    mean is 267.6)."""
    load = [(0.0, p) for p in range(n_programs)]
    lists: list[list[int]] = [[] for _ in range(n_programs)]
    for w, c in enumerate(cost):
        total, p = heapq.heappop(load)
        lists[p].append(w)
        heapq.heappush(load, (total + float(c), p))
    m = max(map(len, lists))
    table = np.full((n_programs, m), -1, np.int32)
    for p, ws in enumerate(lists):
        table[p, :len(ws)] = ws
    return table, np.array([len(x) for x in lists], np.int32)


@_one_kernel_per_signature("own", "summary", "cfg", "out_dtype", "pingpong", "persistent")
def merged_forward(q, k, v, kg, vg, own: PartLayout, summary: PartLayout, cfg: KernelConfig,
                   out_dtype, pingpong: bool = True, persistent: bool = False):
    """(o [B, T, H, D] out_dtype, lse [B, H, T] float32) of a head group whose softmax
    runs over two parts at once (the fixed pattern's merged heads): ``own`` (keys k, v
    at their positions: the block part) and ``summary`` (gathered keys kg, vg), both in
    natural query order with the same query and key tiles. Each query tile's steps visit
    the own part's key blocks, then the summary part's, in one online softmax, which the
    memory warpgroup streams from the two sources in that order.

    The work items (head, query tile, batch) start batch by batch, longest tiles first
    (``_work_items``). Without ``persistent`` each is one program. With it, one program
    per SM walks its share of the items (which, in which order: ``_persistent_schedule``):
    the memory warpgroup streams K and V across the item boundaries without a break,
    a compute warpgroup loads the next item's query rows
    while it works on the current one (two query slots), and an item's output is stored
    while the next one runs (waited on only before its staging buffer is reused). What
    a program pays once per item otherwise (launch, the query and first key loads, the
    output store) is large next to the fixed pattern's short items: ~17 steps at
    T=16,384, against ~64 at T=65,536, where the forward runs ~20% faster per FLOP.

    ``pingpong`` (GPU only; the interpreter runs one thread at a time): the two compute
    warpgroups take turns on the tensor cores through a shared barrier, so that one's
    softmax runs while the other's matmuls do (FlashAttention-3's schedule; both have
    the same steps, so the turns pair up)."""
    plgpu = _plgpu()
    b, t, h, d = q.shape
    dtype = q.dtype
    bq, bk = own.block_q, own.block_k
    if (summary.block_q, summary.block_k) != (bq, bk) or own.spec.order != "natural" \
            or summary.spec.order != "natural" or own.k_index is not None:
        raise ValueError("merged_forward takes an own part and a gathered part in natural "
                         "order with the same tiles")
    if jnp.dtype(out_dtype) != jnp.dtype(dtype):
        raise ValueError("merged_forward writes o in the input dtype")
    wgs = cfg.compute_wgs
    rows = bq // wgs
    n_slots = cfg.max_concurrent_steps
    n_q = 2 if persistent else 1  # query slots: the next item's rows load during this one
    if merged_forward_smem(d, dtype, bq, bk, cfg, persistent) > SMEM_BUDGET:
        raise ValueError(f"merged_forward(persistent={persistent}) at head dim {d} needs "
                         f"{merged_forward_smem(d, dtype, bq, bk, cfg, persistent)} bytes of shared "
                         f"memory, over the {SMEM_BUDGET} available: use persistent=False or fewer "
                         "pipeline slots (max_concurrent_steps)")
    own_pos, _ = _positions(own)
    sum_pos, lo = _positions(summary)
    per_head_lo = lo.shape[0] > 1
    scale2 = d**-0.5 * LOG2E
    turns = pingpong and not cfg.interpret and wgs == 2
    work = _tile_work(own.fwd, summary.fwd)
    items = _work_items(work, h, b, cfg.heavy_first)
    n_items = len(items)
    n_programs = _resident_programs(cfg, n_items) if persistent else n_items
    # An item's cost for the schedule: its steps, plus about one step for what the
    # pipeline does not hide at an item's ends.
    sched, counts = _persistent_schedule(work[items[:, 1]] + 1, n_programs)

    def kernel(items_ref, sched_ref, counts_ref, own_tab, sum_tab, lo_ref, q_ref, k_ref, v_ref,
               kg_ref, vg_ref, o_ref, lse_ref, scoped):
        (q_smem, k_smem, v_smem, o_smem, p_smem, lse_smem), bars = scoped
        k_ready, v_ready, q_ready, k_free, v_free, turn = bars
        prog, wg = lax.axis_index("programs"), lax.axis_index("wg")
        mine = counts_ref[prog]  # this program's items

        def item(i):
            """(head, tile, batch, own steps, own + full summary steps, steps) of this
            program's i-th item."""
            w = sched_ref[prog, i]
            hi, qi, bi = items_ref[w, 0], items_ref[w, 1], items_ref[w, 2]
            n_own = own_tab[qi, 0] + own_tab[qi, 1]
            n_sum_full = sum_tab[qi, 0]
            return hi, qi, bi, n_own, n_own + n_sum_full, n_own + n_sum_full + sum_tab[qi, 1]

        def take_turn():
            if turns:
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(turn)

        @pl.when(wg < wgs)
        def _compute():
            _set_registers(plgpu, cfg, compute=True)
            q_rows = plgpu.broadcasted_iota(jnp.int32, (rows, bk), 0, layout=plgpu.Layout.WGMMA)
            k_cols = plgpu.broadcasted_iota(jnp.int32, (rows, bk), 1, layout=plgpu.Layout.WGMMA)

            def load_query(i):
                hi, qi, bi, *_ = item(i)
                slot = lax.rem(i, n_q)
                plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(qi * bq + wg * rows, rows), hi],
                                        q_smem.at[slot * wgs + wg], q_ready.at[slot * wgs + wg])

            def run_item(i, g):
                """Item i, whose first step is this program's g-th: returns g + steps."""
                hi, qi, bi, n_own, own_and_full, steps = item(i)
                slot_q = lax.rem(i, n_q) * wgs + wg
                qs = q_smem.at[slot_q]
                plgpu.barrier_wait(q_ready.at[slot_q])
                if persistent:  # the next item's rows into the other slot, free by now
                    pl.when(i + 1 < mine)(lambda: load_query(i + 1))
                row0 = qi * bq + wg * rows
                lo_h = lo_ref[hi] if per_head_lo else lo_ref[0]
                q_pos = q_rows + row0  # natural order

                def step(t_, carry, mask):
                    acc, m_prev, l_prev = carry
                    slot = lax.rem(g + t_, n_slots)
                    plgpu.barrier_wait(k_ready.at[slot])

                    def scores(acc_ref):
                        plgpu.wgmma(acc_ref, qs, k_smem.at[slot].T)
                        take_turn()  # the other warpgroup's softmax ends as this matmul runs
                        return acc_ref[...]

                    s = pl.run_scoped(scores, plgpu.ACC((rows, bk), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    if mask is not None:
                        s = jnp.where(mask(t_), s, -jnp.inf)
                    p, acc, m_next, l_next = _softmax_step(s, scale2, acc, m_prev, l_prev)
                    p16 = p.astype(dtype)
                    if turns:
                        acc, l_next, m_next, p16 = lax.optimization_barrier((acc, l_next, m_next, p16))
                        plgpu.barrier_arrive(turn)  # softmax done
                    plgpu.barrier_wait(v_ready.at[slot])
                    if turns:
                        plgpu.barrier_wait(turn)  # the tensor cores are this warpgroup's again
                    # FA3 (pv_from_registers, GPU only): P from registers into acc in place.
                    acc = _accumulate(plgpu, acc, p16, None if p_smem is None else p_smem.at[wg],
                                      v_smem.at[slot], cfg.pv_from_registers)
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m_next, l_next

                def own_mask(t_):
                    k_pos = own_pos.k(k_cols + own_tab[qi, 2 + t_] * bk, 0)
                    return own.spec.rule.in_kernel(q_pos, k_pos)

                def sum_mask(t_):
                    k_pos = sum_pos.k(k_cols + sum_tab[qi, 2 + t_ - n_own] * bk, lo_h)
                    return summary.spec.rule.in_kernel(q_pos, k_pos)

                carry = _softmax_start(plgpu, rows, d)
                # The own part's blocks are few (the diagonal): always masked.
                carry = lax.fori_loop(0, n_own, functools.partial(step, mask=own_mask), carry)
                carry = lax.fori_loop(n_own, own_and_full, functools.partial(step, mask=None), carry)
                acc, m, l = lax.fori_loop(own_and_full, steps,  # noqa: E741
                                          functools.partial(step, mask=sum_mask), carry)
                # Persistent: o has its own buffer; one item per program: o is staged in
                # the query rows' buffer. Waited on at the program's end.
                _write_rows(plgpu, acc, m, l, qs if o_smem is None else o_smem.at[wg],
                            lse_smem.at[wg], o_ref.at[bi, pl.ds(row0, rows), hi],
                            lse_ref.at[bi, hi, pl.ds(row0, rows)], out_dtype, wait=False)
                return g + steps

            pl.when(mine > 0)(lambda: load_query(0))
            if turns:
                pl.when(wg == 1)(take_turn)  # offset the two warpgroups by half a step
            lax.fori_loop(0, mine, run_item, jnp.int32(0))
            if turns:
                pl.when(wg == 0)(take_turn)
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _memory():
            _set_registers(plgpu, cfg, compute=False)

            def fetcher(i):
                """fetch(t, slot): item i's t-th K and V blocks (own part, then summary)."""
                hi, qi, bi, n_own, _, _ = item(i)

                def fetch(t_, slot):
                    def copy(kr, vr, kb):
                        src = (bi, pl.ds(kb * bk, bk), hi)
                        plgpu.copy_gmem_to_smem(kr.at[src], k_smem.at[slot], k_ready.at[slot])
                        plgpu.copy_gmem_to_smem(vr.at[src], v_smem.at[slot], v_ready.at[slot])

                    pl.when(t_ < n_own)(lambda: copy(k_ref, v_ref, own_tab[qi, 2 + t_]))
                    pl.when(t_ >= n_own)(lambda: copy(kg_ref, vg_ref, sum_tab[qi, 2 + t_ - n_own]))

                return fetch

            _stream_items(mine, lambda i: item(i)[5], fetcher, n_slots, (k_free, v_free))

    def entry(items_ref, sched_ref, counts_ref, own_tab, sum_tab, lo_ref, q_ref, k_ref, v_ref,
              kg_ref, vg_ref, o_ref, lse_ref):
        tr = _smem_transforms(dtype, d)
        smem = (
            plgpu.SMEM((n_q * wgs, rows, d), dtype, transforms=tr),  # query rows per slot, wg
            plgpu.SMEM((n_slots, bk, d), dtype, transforms=tr),
            plgpu.SMEM((n_slots, bk, d), dtype, transforms=tr),
            plgpu.SMEM((wgs, rows, d), dtype, transforms=tr) if persistent else None,  # o
            None if cfg.pv_from_registers  # the interpreter's P
            else plgpu.SMEM((wgs, rows, bk), dtype, transforms=_smem_transforms(dtype, bk)),
            plgpu.SMEM((wgs, rows), jnp.float32),
        )
        bars = (
            plgpu.Barrier(num_barriers=n_slots),  # K landed
            plgpu.Barrier(num_barriers=n_slots),  # V landed
            plgpu.Barrier(num_barriers=n_q * wgs),  # query rows landed
            plgpu.Barrier(num_arrivals=wgs, num_barriers=n_slots),  # K slot free
            plgpu.Barrier(num_arrivals=wgs, num_barriers=n_slots),  # V slot free
            plgpu.Barrier(num_arrivals=wgs),  # the turns (pingpong)
        )
        pl.run_scoped(
            lambda *scoped: kernel(items_ref, sched_ref, counts_ref, own_tab, sum_tab, lo_ref,
                                   q_ref, k_ref, v_ref, kg_ref, vg_ref, o_ref, lse_ref, scoped),
            smem, bars, collective_axes="wg",
        )

    out_type = (jax.ShapeDtypeStruct((b, t, h, d), out_dtype),
                jax.ShapeDtypeStruct((b, h, t), jnp.float32))
    args = (jnp.asarray(items), jnp.asarray(sched), jnp.asarray(counts), jnp.asarray(own.fwd),
            jnp.asarray(summary.fwd), jnp.asarray(lo), q, k, v, kg, vg)
    return _launch(plgpu, entry, out_type, (n_programs,), ("programs",), wgs, cfg, args,
                   "mgpu_attn_fwd_merged_persistent" if persistent else "mgpu_attn_fwd_merged")


# Shared memory per block on H100/H200 (227 KiB, what Mosaic GPU checks against when
# lowering), less a margin for barriers and alignment.
SMEM_BUDGET = 227 * 1024 - 4096


def merged_forward_smem(d: int, dtype, bq: int, bk: int, cfg: KernelConfig, persistent: bool) -> int:
    """Shared memory that ``merged_forward`` allocates (buffers only)."""
    size = jnp.dtype(dtype).itemsize
    total = ((2 if persistent else 1) * bq * d + 2 * cfg.max_concurrent_steps * bk * d) * size
    total += bq * d * size if persistent else 0  # o staging
    total += 0 if cfg.pv_from_registers else bq * bk * size
    return total + bq * 4


def dkv_smem(d: int, dtype, bq: int, bk: int, cfg: KernelConfig, out_dtype, with_dq: bool,
             persistent: bool) -> int:
    """Shared memory that ``_dkv_part`` allocates (buffers only)."""
    size, out_size = jnp.dtype(dtype).itemsize, jnp.dtype(out_dtype).itemsize
    s = cfg.max_concurrent_steps
    total = 2 * (2 if persistent else 1) * bk * d * size  # K, V tiles
    total += 2 * s * bq * d * size + s * 2 * bq * 4  # Q, dO, (lse, delta) blocks
    total += 0 if cfg.pv_from_registers and not with_dq else bk * bq * size  # P^T / dS^T
    total += 0 if out_size == size else bk * d * out_size  # dk, dv staging
    return total + (cfg.compute_wgs * bq * d * 4 if with_dq else 0)  # dq shares


def smem_bytes(d: int, dtype, part: PartLayout, cfg: KernelConfig, out_dtype) -> int:
    """Shared memory that ``_part_forward`` allocates (buffers only)."""
    wgs, rows = cfg.compute_wgs, part.block_q // cfg.compute_wgs
    size = jnp.dtype(dtype).itemsize
    total = wgs * rows * d * size + 2 * cfg.max_concurrent_steps * part.block_k * d * size
    if not cfg.pv_from_registers:
        total += wgs * rows * part.block_k * size
    if jnp.dtype(out_dtype) != jnp.dtype(dtype):
        total += wgs * rows * d * jnp.dtype(out_dtype).itemsize
    return total + wgs * rows * 4


def _part_out_dtype(d: int, dtype, part: PartLayout, cfg: KernelConfig, merged: bool):
    """Parts that are merged write float32, unless that staging tile does not fit in
    shared memory (e.g. D=128, block_k=128, 2 slots): then the input dtype, which costs
    one extra rounding of each part's output before the merge."""
    if merged and smem_bytes(d, dtype, part, cfg, jnp.float32) <= SMEM_BUDGET:
        return jnp.float32
    return dtype


def _group_forward(q, k, v, group: GroupLayout, cfg: KernelConfig):
    merged = len(group.parts) > 1
    outs = []
    d = q.shape[-1]
    for part in group.parts:
        out_dtype = _part_out_dtype(d, q.dtype, part, cfg, merged)
        need = smem_bytes(d, q.dtype, part, cfg, out_dtype)
        # The interpreter has no limit (and float32, interpret-only, doubles every tile).
        if need > SMEM_BUDGET and not cfg.interpret:
            raise PatternError(
                f"tiles need {need} bytes of shared memory, over the {SMEM_BUDGET} "
                f"available: lower block_k, block_q or max_concurrent_steps (D={d}, "
                f"block_q={part.block_q}, block_k={part.block_k}, "
                f"max_concurrent_steps={cfg.max_concurrent_steps}).")
        o, lse = _part_forward(to_order(q, part, 1), part_keys(k, part), part_keys(v, part), part,
                               cfg, out_dtype)
        outs.append((from_order(o, part, 1), from_order(lse, part, 2)))
    if not merged:
        return outs[0]
    o, lse = merge(outs)
    return o.astype(q.dtype), lse


# ------------------------------------------------------------------------- backward
#
# Two kernels per part, in the forward's style (one memory warpgroup streaming tiles by
# TMA into ``max_concurrent_steps`` slots, compute warpgroups running wgmma), fed by
# ``ld`` = [B, H, 2, T] float32: row 0 the final lse in base 2 (+inf for rows that see
# no key, so p = 0), row 1 delta = rowsum(dO * O) - dlse. Both are the *merged* values:
# for the union of a head's parts, dS = P (dP - delta) holds part by part, so the parts'
# backwards are independent and there is no merge backward.


@_one_kernel_per_signature("part", "cfg", "out_dtype")
def _dq_part(q, k, v, do, ld, part: PartLayout, cfg: KernelConfig, out_dtype):
    """dq [B, T, H, D] of one part, in part order (layout ``part``: the forward's)."""
    plgpu = _plgpu()
    b, t, h, d = q.shape
    dtype = q.dtype
    bq, bk = part.block_q, part.block_k
    wgs = cfg.compute_wgs
    rows = bq // wgs
    n_slots = cfg.max_concurrent_steps
    rule = part.spec.rule
    grid, grid_names, reverse = _launch_order(_tile_work(part.fwd), h, b, "q_seq", cfg.heavy_first)
    pos, lo = _positions(part)
    per_head_lo = lo.shape[0] > 1
    scale = d**-0.5
    scale2 = scale * LOG2E
    in_place = cfg.pv_from_registers

    def kernel(tab_ref, lo_ref, q_ref, k_ref, v_ref, do_ref, ld_ref, dq_ref, scoped):
        (q_smem, do_smem, ld_smem, k_smem, v_smem, ds_smem, out_smem), bars = scoped
        k_ready, v_ready, q_ready, do_ready, ld_ready, k_free, v_free = bars
        hi, qi, bi, wg, n_full, steps = _program(tab_ref, "q_seq", reverse)

        @pl.when(wg < wgs)
        def _compute():
            row0 = qi * bq + wg * rows
            qs, dos, lds = q_smem.at[wg], do_smem.at[wg], ld_smem.at[wg]
            src = (bi, pl.ds(row0, rows), hi)
            plgpu.copy_gmem_to_smem(q_ref.at[src], qs, q_ready.at[wg])
            plgpu.copy_gmem_to_smem(do_ref.at[src], dos, do_ready.at[wg])
            plgpu.copy_gmem_to_smem(ld_ref.at[bi, hi, :, pl.ds(row0, rows)], lds,
                                    ld_ready.at[wg])
            for bar in (q_ready, do_ready, ld_ready):
                plgpu.barrier_wait(bar.at[wg])
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            lse2 = plgpu.load(lds.at[0], layout=row_layout)
            delta = plgpu.load(lds.at[1], layout=row_layout)
            lo_h = lo_ref[hi] if per_head_lo else lo_ref[0]
            wgmma_layout = plgpu.Layout.WGMMA
            q_rows = plgpu.broadcasted_iota(jnp.int32, (rows, bk), 0, layout=wgmma_layout)
            k_cols = plgpu.broadcasted_iota(jnp.int32, (rows, bk), 1, layout=wgmma_layout)
            q_pos = pos.q(q_rows + row0)

            def step(t_, dq, masked: bool):
                slot = lax.rem(t_, n_slots)
                plgpu.barrier_wait(k_ready.at[slot])
                s = _wgmma_value(plgpu, (rows, bk), qs, k_smem.at[slot].T)
                p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(lse2, s.shape, [0]))
                if masked:
                    kb = tab_ref[qi, 2 + t_]
                    k_pos = pos.k(k_cols + kb * bk, lo_h)
                    p = jnp.where(rule.in_kernel(q_pos, k_pos), p, 0.0)
                plgpu.barrier_wait(v_ready.at[slot])
                dp = _wgmma_value(plgpu, (rows, bk), dos, v_smem.at[slot].T)
                plgpu.barrier_arrive(v_free.at[slot])
                ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                dq = _accumulate(plgpu, dq, ds.astype(dtype),
                                 None if in_place else ds_smem.at[wg], k_smem.at[slot],
                                 in_place)
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            dq = plgpu.layout_cast(jnp.zeros((rows, d), jnp.float32), wgmma_layout)
            dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), dq)
            dq = lax.fori_loop(n_full, steps, functools.partial(step, masked=True), dq)
            os_ = out_smem.at[wg] if out_smem is not None else qs
            os_[...] = (dq * scale).astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(os_, dq_ref.at[src])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _memory():
            def fetch(t_, slot):
                src = (bi, pl.ds(tab_ref[qi, 2 + t_] * bk, bk), hi)
                plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_ready.at[slot])

            _stream(steps, n_slots, fetch, (k_free, v_free))

    def entry(tab_ref, lo_ref, q_ref, k_ref, v_ref, do_ref, ld_ref, dq_ref):
        tr = _smem_transforms(dtype, d)
        smem = (
            plgpu.SMEM((wgs, rows, d), dtype, transforms=tr),  # Q
            plgpu.SMEM((wgs, rows, d), dtype, transforms=tr),  # dO
            plgpu.SMEM((wgs, 2, rows), jnp.float32),  # lse2, delta
            plgpu.SMEM((n_slots, bk, d), dtype, transforms=tr),  # K
            plgpu.SMEM((n_slots, bk, d), dtype, transforms=tr),  # V
            None if in_place
            else plgpu.SMEM((wgs, rows, bk), dtype, transforms=_smem_transforms(dtype, bk)),
            None if jnp.dtype(out_dtype) == jnp.dtype(dtype)
            else plgpu.SMEM((wgs, rows, d), out_dtype),
        )
        bars = (
            plgpu.Barrier(num_barriers=n_slots),  # K landed
            plgpu.Barrier(num_barriers=n_slots),  # V landed
            plgpu.Barrier(num_barriers=wgs),  # Q landed
            plgpu.Barrier(num_barriers=wgs),  # dO landed
            plgpu.Barrier(num_barriers=wgs),  # lse, delta landed
            plgpu.Barrier(num_arrivals=wgs, num_barriers=n_slots),  # K slot free
            plgpu.Barrier(num_arrivals=wgs, num_barriers=n_slots),  # V slot free
        )
        pl.run_scoped(
            lambda *scoped: kernel(tab_ref, lo_ref, q_ref, k_ref, v_ref, do_ref, ld_ref,
                                   dq_ref, scoped),
            smem, bars, collective_axes="wg")

    return _launch(plgpu, entry, jax.ShapeDtypeStruct((b, t, h, d), out_dtype),
                   grid, grid_names, wgs, cfg,
                   (jnp.asarray(part.fwd), jnp.asarray(lo), q, k, v, do, ld), _name("dq", part))


def _reduce_add(plgpu, cfg: KernelConfig, stage, ref, index, value) -> None:
    """ref[index] += value through the shared-memory tile ``stage``: a TMA bulk reduction
    on the GPU (once the stage's last copy has read it), a read-add-write in the
    interpreter, which has no TMA reduction."""
    if cfg.interpret:
        stage[...] = value
        ref[index] = ref[index] + stage[...]
    else:
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        stage[...] = value
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(stage, ref.at[index], reduction_op="add")


def _key_tile_setup(part: PartLayout, cfg: KernelConfig, h: int, b: int, d: int):
    """What a dK/dV kernel (one program per key tile) derives from its part: the launch
    grid, its axis names and order flag, the closed-form positions, the per-head summary
    starts ``lo``, and the softmax scale."""
    grid, grid_names, reverse = _launch_order(_tile_work(part.bwd), h, b, "k_seq", cfg.heavy_first)
    pos, lo = _positions(part)
    return grid, grid_names, reverse, pos, lo, d**-0.5


@_one_kernel_per_signature("part", "cfg", "out_dtype", "persistent")
def _dkv_part(q, k, v, do, ld, part: PartLayout, cfg: KernelConfig, out_dtype, dq0=None,
              persistent: bool = False):
    """(dk, dv) [B, Tk, H, D] of one part, in part key order (gathered rows for a summary
    part). ``part`` is the backward layout's: key tiles of ``block_k`` rows split over
    the compute warpgroups, query blocks of ``block_q`` rows streamed from ``part.bwd``.

    With ``dq0`` (float32 [B, T, H, D], the other parts' dq) it returns (dk, dv, dq):
    each step also computes its query block's dq from this key tile, dS K, and adds
    it to dq0 in place by a TMA bulk reduction (``cp.reduce.async.bulk ... add``) from
    shared memory, so S and dP are computed once for dq, dk and dv (5 block matmuls per
    pair instead of the split kernels' 7), FlashAttention-3's scheme. Float additions
    in arrival order: dq is not bitwise reproducible run to run.

    The compute warpgroups stage their dS^T in shared memory and one of them, in turn
    (step t: warpgroup t % wgs), computes the key tile's sum_w dS_w K_w and reduces it:
    one reduction of [block_q, D] float32 per step. Two barriers per warpgroup order
    the turns: ``dq_staged[w]`` (the others' dS^T is in place for w's turn) and
    ``dq_read[w]`` (w's matmul has read them: they may be overwritten). The turns also
    order the additions, which the interpreter needs: it has no TMA reduction, and a
    read-add-write of dq stands in. (Measured on an H200: the same speed as one
    reduction per warpgroup, whose read-add-writes race in the interpreter; with the
    reductions dropped the kernel was only 3% faster: they are not its bottleneck.)

    ``persistent``: one program per SM walks its share of the (head, key tile, batch)
    items (batch by batch, longest tiles first, assigned longest-processing-time-first
    on the host: ``_persistent_schedule``), as ``merged_forward``'s persistent form: the
    memory warpgroup streams the query blocks across items without a break, each
    compute warpgroup loads the next item's K and V rows into a second slot while it
    works on the current item, and an item's dk, dv stores and dq reductions are waited
    on only before their buffers are reused (once at the program's end for the writes).
    What a program pays once otherwise (launch, the K/V and first query loads, the
    pipeline's ramp, the waited stores) is spread over ~100-130 steps per key tile at
    T=12,288-16,384, where this kernel runs ~361 TF/s, against ~450 at T=65,536."""
    plgpu = _plgpu()
    b, t, h, d = q.shape
    tk = k.shape[1]
    dtype = q.dtype
    bq, bk = part.block_q, part.block_k
    wgs = cfg.compute_wgs
    rows = bk // wgs  # key rows of one compute warpgroup
    n_slots = cfg.max_concurrent_steps
    rule = part.spec.rule
    grid, grid_names, reverse, pos, lo, scale = _key_tile_setup(part, cfg, h, b, d)
    per_head_lo = lo.shape[0] > 1
    scale2 = scale * LOG2E
    in_place = cfg.pv_from_registers
    with_dq = dq0 is not None
    n_kv = 2 if persistent else 1  # K/V tile slots: the next item's load into the other
    if persistent:
        need = dkv_smem(d, dtype, bq, bk, cfg, out_dtype, with_dq, persistent)
        if need > SMEM_BUDGET:
            raise ValueError(f"_dkv_part(persistent=True) at head dim {d} needs {need} bytes of "
                             f"shared memory, over the {SMEM_BUDGET} available: use "
                             "persistent=False or fewer pipeline slots (max_concurrent_steps)")
        work = _tile_work(part.bwd)
        items = _work_items(work, h, b, cfg.heavy_first)
        n_programs = _resident_programs(cfg, len(items))
        # An item's cost: its steps, plus about one for what the pipeline does not hide.
        sched, counts = _persistent_schedule(work[items[:, 1]] + 1, n_programs)
        grid, grid_names = (n_programs,), ("programs",)

    def kernel(sched_refs, tab_ref, lo_ref, q_ref, k_ref, v_ref, do_ref, ld_ref, dk_ref, dv_ref,
               dq_ref, scoped):
        (k_smem, v_smem, q_smem, do_smem, ld_smem, t_smem, out_smem, dq_smem), bars = scoped
        q_ready, do_ready, ld_ready, k_ready, v_ready, free, dq_staged, dq_read = bars
        wg = lax.axis_index("wg")
        if persistent:
            items_ref, sched_ref, counts_ref = sched_refs
            prog = lax.axis_index("programs")
            mine = counts_ref[prog]  # this program's items

            def item(i):
                """(head, key tile, batch, full steps, steps) of this program's i-th item."""
                w = sched_ref[prog, i]
                ki = items_ref[w, 1]
                return (items_ref[w, 0], ki, items_ref[w, 2], tab_ref[ki, 0],
                        tab_ref[ki, 0] + tab_ref[ki, 1])
        else:
            hi0, ki0, bi0, _, full0, steps0 = _program(tab_ref, "k_seq", reverse)

            def item(i):
                del i  # one item per program
                return hi0, ki0, bi0, full0, steps0

        @pl.when(wg < wgs)
        def _compute():
            _set_registers(plgpu, cfg, compute=True)
            wgmma_layout = plgpu.Layout.WGMMA
            col_layout = wgmma_layout.reduce(0)
            k_rows = plgpu.broadcasted_iota(jnp.int32, (rows, bq), 0, layout=wgmma_layout)
            q_cols = plgpu.broadcasted_iota(jnp.int32, (rows, bq), 1, layout=wgmma_layout)
            ts = None if t_smem is None else t_smem.at[wg]

            def load_kv(i):
                """Item i's K and V rows of this warpgroup into its slot (i % n_kv)."""
                hi, ki, bi, _, _ = item(i)
                slot = lax.rem(i, n_kv) * wgs + wg
                src = (bi, pl.ds(ki * bk + wg * rows, rows), hi)
                plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot], k_ready.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot], v_ready.at[slot])

            if persistent:
                pl.when(mine > 0)(lambda: load_kv(0))
            else:
                load_kv(0)

            def run_item(i, g):
                """Item i, whose first step is this program's g-th: returns g + steps."""
                hi, ki, bi, n_full, steps = item(i)
                kv = lax.rem(i, n_kv) * wgs if persistent else 0  # this item's K/V slot
                ks, vs = k_smem.at[kv + wg], v_smem.at[kv + wg]
                plgpu.barrier_wait(k_ready.at[kv + wg])
                plgpu.barrier_wait(v_ready.at[kv + wg])
                if persistent:
                    # The other slot held the last item's tiles, which every read of
                    # has completed (the drain below); with them as the output's
                    # staging (no out_smem) their stores must have read them too.
                    @pl.when(i + 1 < mine)
                    def _prefetch():
                        if out_smem is None:
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        load_kv(i + 1)
                row0 = ki * bk + wg * rows
                src = (bi, pl.ds(row0, rows), hi)
                lo_h = lo_ref[hi] if per_head_lo else lo_ref[0]
                k_pos = pos.k(k_rows + row0, lo_h)

                def reduce_dq(t_, share):
                    """Adds ``share`` ([bq, D] float32, unscaled) to the query block's dq."""
                    rows_q = (bi, pl.ds(tab_ref[ki, 2 + t_] * bq, bq), hi)
                    _reduce_add(plgpu, cfg, dq_smem.at[wg], dq_ref, rows_q, share * scale)

                def wait_ts_free(t_):
                    """Before this step's first write to ts: the last step's designated
                    warpgroup has read it (its dq matmul)."""
                    if with_dq and wgs > 1:
                        prev = lax.rem(t_ + wgs - 1, wgs)

                        @pl.when((t_ > 0) & (wg != prev))
                        def _wait_read():
                            plgpu.barrier_wait(dq_read.at[prev])

                def stage_ds(t_, dst):
                    """dS^T into ts, announced to step t_'s designated warpgroup."""
                    if in_place:  # else the dV step has written ts already, after the wait
                        wait_ts_free(t_)
                    ts[...] = dst.astype(dtype)
                    plgpu.commit_smem()
                    turn = lax.rem(t_, wgs)
                    if wgs > 1:
                        @pl.when(wg != turn)
                        def _staged():
                            plgpu.barrier_arrive(dq_staged.at[turn])

                def reduce_turn(t_):
                    """Step t_'s designated warpgroup: sum_w dS_w K_w, reduced into dq."""
                    turn = lax.rem(t_, wgs)

                    @pl.when(wg == turn)
                    def _reduce():
                        if wgs > 1:
                            plgpu.barrier_wait(dq_staged.at[turn])

                        def body(acc_ref):
                            for w in range(wgs):  # dS_w K_w over warpgroup w's key rows
                                plgpu.wgmma(acc_ref, t_smem.at[w].transpose((1, 0)), k_smem.at[kv + w])
                            return acc_ref[...]

                        share = pl.run_scoped(body, plgpu.ACC((bq, d), jnp.float32))
                        if wgs > 1:
                            plgpu.barrier_arrive(dq_read.at[turn])  # the wgmma completed: all read
                        reduce_dq(t_, share)

                def add_dq(t_, dst):
                    stage_ds(t_, dst)
                    reduce_turn(t_)

                def step(t_, carry, masked: bool):
                    dk, dv = carry
                    slot = lax.rem(g + t_, n_slots)  # the slots run on across items

                    def probabilities(st):
                        plgpu.barrier_wait(ld_ready.at[slot])
                        lse2 = plgpu.load(ld_smem.at[slot, 0], layout=col_layout)
                        pt = jnp.exp2(st * scale2 - lax.broadcast_in_dim(lse2, st.shape, [1]))
                        if masked:
                            qb = tab_ref[ki, 2 + t_]
                            q_pos = pos.q(q_cols + qb * bq)
                            pt = jnp.where(rule.in_kernel(q_pos, k_pos), pt, 0.0)
                        return pt

                    plgpu.barrier_wait(q_ready.at[slot])
                    if cfg.overlap_wgmma:  # S^T and dP^T together; exp2 while dP^T runs
                        plgpu.barrier_wait(do_ready.at[slot])
                        pt, dpt = _wgmma_pair(plgpu, (rows, bq), (ks, q_smem.at[slot].T),
                                              (vs, do_smem.at[slot].T), probabilities)
                    else:
                        pt = probabilities(_wgmma_value(plgpu, (rows, bq), ks, q_smem.at[slot].T))
                        plgpu.barrier_wait(do_ready.at[slot])
                    delta = plgpu.load(ld_smem.at[slot, 1], layout=col_layout)
                    if cfg.overlap_wgmma and in_place:
                        # dV, dK and the designated warpgroup's dq in one accumulator scope:
                        # one wait for the three.
                        dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, [1]))
                        if with_dq:
                            stage_ds(t_, dst)

                        def matmuls(refs):
                            dv_ref_, dk_ref_ = refs
                            plgpu.wgmma(dv_ref_, pt.astype(dtype), do_smem.at[slot])
                            plgpu.wgmma(dk_ref_, dst.astype(dtype), q_smem.at[slot])
                            if with_dq:
                                reduce_turn(t_)

                        dv, dk = pl.run_state(matmuls)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
                        plgpu.barrier_arrive(free.at[slot])
                        return dk, dv
                    if with_dq and not in_place:
                        wait_ts_free(t_)  # the dV step stages P^T in ts
                    dv = _accumulate(plgpu, dv, pt.astype(dtype), ts, do_smem.at[slot], in_place)
                    if not cfg.overlap_wgmma:
                        dpt = _wgmma_value(plgpu, (rows, bq), vs, do_smem.at[slot].T)
                    dst = pt * (dpt - lax.broadcast_in_dim(delta, dpt.shape, [1]))
                    if with_dq:  # before dK: it stages dS^T in ts
                        add_dq(t_, dst)
                    if with_dq and not in_place:  # dK from the staged dS^T: no second store
                        # (the designated warpgroup may be reading it)
                        dk = dk + _wgmma_value(plgpu, dk.shape, ts, q_smem.at[slot])
                    else:  # ts is free again: the dV wgmma that read it has completed.
                        dk = _accumulate(plgpu, dk, dst.astype(dtype), ts, q_smem.at[slot], in_place)
                    plgpu.barrier_arrive(free.at[slot])
                    return dk, dv

                zero = plgpu.layout_cast(jnp.zeros((rows, d), jnp.float32), wgmma_layout)
                carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False),
                                      (zero, zero))
                dk, dv = lax.fori_loop(n_full, steps, functools.partial(step, masked=True),
                                       carry)
                if with_dq and not cfg.interpret and not persistent:
                    plgpu.wait_smem_to_gmem(0)  # the last reductions, before the program ends
                if with_dq and wgs > 1:
                    last = lax.rem(steps + wgs - 1, wgs)  # the last step's designated warpgroup

                    @pl.when((steps > 0) & (wg != last))
                    def _drain_read():  # before the K tile is overwritten or freed
                        plgpu.barrier_wait(dq_read.at[last])
                if out_smem is None:  # the K and V tiles are free: stage in place
                    ks[...] = (dk * scale).astype(out_dtype)
                    vs[...] = dv.astype(out_dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(ks, dk_ref.at[src])
                    plgpu.copy_smem_to_gmem(vs, dv_ref.at[src])
                    if not persistent:  # persistent: waited on before the slot's next load
                        plgpu.wait_smem_to_gmem(0)
                elif persistent:  # the staging tile's last store, waited on for its read only
                    os_ = out_smem.at[wg]
                    for value, dst_ref in ((dk * scale, dk_ref), (dv, dv_ref)):
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        os_[...] = value
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(os_, dst_ref.at[src])
                else:  # one float32 staging tile, used twice (saves shared memory)
                    os_ = out_smem.at[wg]
                    os_[...] = dk * scale
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(os_, dk_ref.at[src])
                    plgpu.wait_smem_to_gmem(0)
                    os_[...] = dv
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(os_, dv_ref.at[src])
                    plgpu.wait_smem_to_gmem(0)
                return g + steps

            if persistent:
                lax.fori_loop(0, mine, run_item, jnp.int32(0))
                plgpu.wait_smem_to_gmem(0)  # every item's stores and reductions written
            else:
                run_item(0, 0)

        @pl.when(wg == wgs)
        def _memory():
            _set_registers(plgpu, cfg, compute=False)

            def fetcher(i):
                """fetch(t, slot): item i's t-th query, dO and (lse, delta) blocks."""
                hi, ki, bi, _, _ = item(i)

                def fetch(t_, slot):
                    start = tab_ref[ki, 2 + t_] * bq
                    src = (bi, pl.ds(start, bq), hi)
                    plgpu.copy_gmem_to_smem(q_ref.at[src], q_smem.at[slot], q_ready.at[slot])
                    plgpu.copy_gmem_to_smem(do_ref.at[src], do_smem.at[slot], do_ready.at[slot])
                    plgpu.copy_gmem_to_smem(ld_ref.at[bi, hi, :, pl.ds(start, bq)],
                                            ld_smem.at[slot], ld_ready.at[slot])

                return fetch

            if persistent:
                _stream_items(mine, lambda i: item(i)[4], fetcher, n_slots, (free,))
            else:
                _stream(item(0)[4], n_slots, fetcher(0), (free,))

    def entry(*refs):
        sched_refs, refs = (refs[:3], refs[3:]) if persistent else ((), refs)
        tab_ref, lo_ref, q_ref, k_ref, v_ref, do_ref, ld_ref, dk_ref, dv_ref, *dq = refs
        tr = _smem_transforms(dtype, d)
        smem = (
            plgpu.SMEM((n_kv * wgs, rows, d), dtype, transforms=tr),  # K tiles
            plgpu.SMEM((n_kv * wgs, rows, d), dtype, transforms=tr),  # V tiles
            plgpu.SMEM((n_slots, bq, d), dtype, transforms=tr),  # Q blocks
            plgpu.SMEM((n_slots, bq, d), dtype, transforms=tr),  # dO blocks
            plgpu.SMEM((n_slots, 2, bq), jnp.float32),  # lse2, delta blocks
            None if in_place and not with_dq
            else plgpu.SMEM((wgs, rows, bq), dtype, transforms=_smem_transforms(dtype, bq)),
            None if jnp.dtype(out_dtype) == jnp.dtype(dtype)
            else plgpu.SMEM((wgs, rows, d), out_dtype),
            plgpu.SMEM((wgs, bq, d), jnp.float32) if with_dq else None,  # dq share staging
        )
        bars = (
            plgpu.Barrier(num_barriers=n_slots),  # Q landed
            plgpu.Barrier(num_barriers=n_slots),  # dO landed
            plgpu.Barrier(num_barriers=n_slots),  # lse, delta landed
            plgpu.Barrier(num_barriers=n_kv * wgs),  # K tile landed
            plgpu.Barrier(num_barriers=n_kv * wgs),  # V tile landed
            plgpu.Barrier(num_arrivals=wgs, num_barriers=n_slots),  # slot free
            # with dq, [w]: the others' dS^T is staged for warpgroup w's turn; w's dq
            # matmul has read them
            plgpu.Barrier(num_arrivals=wgs - 1, num_barriers=wgs) if with_dq and wgs > 1 else None,
            plgpu.Barrier(num_barriers=wgs) if with_dq and wgs > 1 else None,
        )
        pl.run_scoped(
            lambda *scoped: kernel(sched_refs, tab_ref, lo_ref, q_ref, k_ref, v_ref, do_ref,
                                   ld_ref, dk_ref, dv_ref, dq[0] if dq else None, scoped),
            smem, bars, collective_axes="wg")

    out = jax.ShapeDtypeStruct((b, tk, h, d), out_dtype)
    args = (jnp.asarray(part.bwd), jnp.asarray(lo), q, k, v, do, ld)
    if persistent:
        args = (jnp.asarray(items), jnp.asarray(sched), jnp.asarray(counts), *args)
    form = "_persistent" if persistent else ""
    if not with_dq:
        return _launch(plgpu, entry, (out, out), grid, grid_names, wgs, cfg, args,
                       _name("dkv" + form, part))
    # dq0 must be updated in place: plgpu.kernel cannot alias an input to an output, so
    # the kernel runs as a core_map over a mesh inside run_state, whose state (dk, dv
    # and dq here) starts from the given arrays and is returned.
    # dk, dv: every row is written, so any start will do, but constants that differ
    # from each other and from a zero dq0: one buffer passed as two states (XLA merges
    # equal constants) deadlocked the interpreter under jit.
    state = (filled_after(do, out.shape, 1.0, out.dtype), filled_after(do, out.shape, 2.0, out.dtype),
             dq0.astype(jnp.float32))
    return _launch_in_place(plgpu, entry, args, state, grid, grid_names, wgs, cfg,
                            _name("dkvdq" + form, part))


@_one_kernel_per_signature("part", "cfg", "out_dtype")
def dkvdq_query_major(q, k, v, do, ld, part: PartLayout, cfg: KernelConfig, out_dtype, dq0):
    """(dk, dv, dq) of one part, as ``_dkv_part(..., dq0=dq0)``, in FlashAttention-3's
    layout: each step is a [128 queries x 128 keys] tile, and each compute warpgroup
    takes 64 of the step's *query* rows for S, dP and dq (``_dkv_part`` splits the key
    rows and streams 64-row query blocks).

    Why (session 11): with the key-major split a step's matmuls are 64 x 64 x 64 and
    the lse, delta of the streamed queries are column vectors of the warpgroup's tile
    (~32 registers each); at 128-row query blocks that form spills (1,016 bytes,
    session 10). Here:
    - S_w = Q_w K^T and dP_w = dO_w V^T are 64 x 128 x 64 (N = 128, K and V from
      shared memory once per program), lse and delta are row vectors (2 registers);
    - dq_w = dS_w K is the warpgroup's own (64 query rows, A operand from registers on
      the GPU) and goes to dq by a TMA bulk reduction of its rows: the warpgroups
      never wait on each other for dq;
    - P and dS (bf16) are staged in shared memory, and the key tile's dV = P^T dO and
      dK = dS^T Q are split by *kind*: warpgroup 0 accumulates dV, warpgroup 1 dK,
      each a [128, D] float32 accumulator (64 registers, as dK and dV of 64 rows
      were). The one wait per step is for both warpgroups' P and dS.
    Registers per compute thread, peak: S and dP (64 each) + the dK or dV
    accumulator (64) + dq (32) while P, dS are packed to bf16.

    Measured (session 12, H200, fixed l=128 c=32 merged f+b, BENCHMARKS.md): correct
    (gradients within 1.4e-5 of the key-major kernel's) but slower: 1.69 against
    1.64 ms at (2, 16384, 8, 64), 3.74 against 3.58 at (8, 12288, 8, 64); ptxas spills
    800 bytes (232 registers after setmaxnreg). Hence opt-in
    (pallas_gpu.MOSAIC_DKVDQ_FORM), kept as the starting point for a form that fits.

    Barriers, per step: ``staged`` (both warpgroups' P and dS are in shared memory:
    dV, dK may read them), ``released`` (both dV/dK matmuls have completed: P and dS
    may be overwritten), ``free[slot]`` (the memory warpgroup may refill the slot).
    Query blocks arrive as two 64-row halves per stream (Q, dO, and the halves' lse,
    delta), each with its own barrier, so that no shared-memory view is sliced at a
    traced offset."""
    plgpu = _plgpu()
    b, t, h, d = q.shape
    tk = k.shape[1]
    dtype = q.dtype
    bq, bk = part.block_q, part.block_k
    wgs = cfg.compute_wgs
    if wgs != 2 or bq != wgs * WGMMA_M or bk % WGMMA_M:
        raise ValueError(f"dkvdq_query_major takes 2 compute warpgroups and {2 * WGMMA_M}-row "
                         f"query blocks (got {wgs}, block_q={bq}, block_k={bk})")
    rows = bq // wgs  # query rows of one compute warpgroup
    n_slots = cfg.max_concurrent_steps
    rule = part.spec.rule
    grid, grid_names, reverse, pos, lo, scale = _key_tile_setup(part, cfg, h, b, d)
    per_head_lo = lo.shape[0] > 1
    scale2 = scale * LOG2E
    # On the GPU: dq's dS from registers, dK and dV accumulated in place, S and dP issued
    # together. The interpreter has neither register operands nor run_state.
    fast = cfg.pv_from_registers and not cfg.interpret

    def kernel(tab_ref, lo_ref, q_ref, k_ref, v_ref, do_ref, ld_ref, dk_ref, dv_ref, dq_ref,
               scoped):
        (ks, vs, qdo_smem, ld_smem, pds_smem, dq_smem), bars = scoped
        kv_ready, qdo_ready, ld_ready, free, staged, released = bars

        def half(slot, stream, w):  # qdo_ready's index of a 64-row half (stream 0: Q, 1: dO)
            return (slot * 2 + stream) * wgs + w
        hi, ki, bi, wg, n_full, steps = _program(tab_ref, "k_seq", reverse)

        @pl.when(wg < wgs)
        def _compute():
            _set_registers(plgpu, cfg, compute=True)
            src = (bi, pl.ds(ki * bk, bk), hi)
            # Warpgroup 0 brings the K tile, 1 the V tile; both use both.
            pl.when(wg == 0)(lambda: plgpu.copy_gmem_to_smem(k_ref.at[src], ks, kv_ready.at[0]))
            pl.when(wg == 1)(lambda: plgpu.copy_gmem_to_smem(v_ref.at[src], vs, kv_ready.at[1]))
            plgpu.barrier_wait(kv_ready.at[0])
            plgpu.barrier_wait(kv_ready.at[1])
            lo_h = lo_ref[hi] if per_head_lo else lo_ref[0]
            wgmma_layout = plgpu.Layout.WGMMA
            row_layout = wgmma_layout.reduce(1)
            col_layout = wgmma_layout.reduce(0)

            def wait_rows(slot, w):
                plgpu.barrier_wait(qdo_ready.at[half(slot, 0, w)])
                plgpu.barrier_wait(qdo_ready.at[half(slot, 1, w)])

            def reduce_dq(qb, dq):
                """Adds this warpgroup's dq rows ([rows, D] float32, unscaled)."""
                rows_q = (bi, pl.ds(qb * bq + wg * rows, rows), hi)
                _reduce_add(plgpu, cfg, dq_smem.at[wg], dq_ref, rows_q, dq * scale)

            def probabilities(qb, slot, s, masked: bool):
                plgpu.barrier_wait(ld_ready.at[slot * wgs + wg])
                lse2 = plgpu.load(ld_smem.at[slot, wg, 0], layout=row_layout)
                p = jnp.exp2(s * scale2 - lax.broadcast_in_dim(lse2, s.shape, [0]))
                if masked:
                    # positions of the rows and of the columns as vectors, broadcast
                    # only at the comparison (2-D index grids: 1,140 bytes of spills
                    # against 800 and 1.72 against 1.69 ms, session 12 call 4)
                    q_idx = plgpu.broadcasted_iota(jnp.int32, (rows,), 0, layout=row_layout)
                    k_idx = plgpu.broadcasted_iota(jnp.int32, (bk,), 0, layout=col_layout)
                    q_pos = lax.broadcast_in_dim(pos.q(q_idx + (qb * bq + wg * rows)), s.shape, [0])
                    k_pos = lax.broadcast_in_dim(pos.k(k_idx + ki * bk, lo_h), s.shape, [1])
                    p = jnp.where(rule.in_kernel(q_pos, k_pos), p, 0.0)
                return p

            def step(t_, acc, masked: bool):
                slot = lax.rem(t_, n_slots)
                qb = tab_ref[ki, 2 + t_]  # the step's query block
                qs = qdo_smem.at[slot, 0, wg]
                dos = qdo_smem.at[slot, 1, wg]
                wait_rows(slot, wg)
                if fast:  # S and dP together; the exponentials while dP runs
                    p, dp = _wgmma_pair(plgpu, (rows, bk), (qs, ks.T), (dos, vs.T),
                                        lambda s: probabilities(qb, slot, s, masked))
                else:
                    p = probabilities(qb, slot, _wgmma_value(plgpu, (rows, bk), qs, ks.T), masked)
                    dp = _wgmma_value(plgpu, (rows, bk), dos, vs.T)
                delta = plgpu.load(ld_smem.at[slot, wg, 1], layout=row_layout)
                ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
                p16, ds16 = p.astype(dtype), ds.astype(dtype)

                @pl.when(t_ > 0)
                def _():  # the last step's dV and dK have read P and dS
                    plgpu.barrier_wait(released)

                pds_smem.at[0, wg][...] = p16
                pds_smem.at[1, wg][...] = ds16
                plgpu.commit_smem()
                plgpu.barrier_arrive(staged)
                wait_rows(slot, 1 - wg)  # dV, dK read the other warpgroup's rows too
                # warpgroup 0: dV += P^T dO, warpgroup 1: dK += dS^T Q, over both halves
                kind, other = pds_smem.at[wg], qdo_smem.at[slot, 1 - wg]

                if fast:
                    def matmuls(refs):
                        acc_ref, dq_ref_ = refs
                        # dq = dS K needs nobody else's rows. (dS from its staged copy
                        # instead: 1.99 against 1.73 ms, session 12 call 3.)
                        plgpu.wgmma(dq_ref_, ds16, ks)
                        plgpu.barrier_wait(staged)
                        for w in range(wgs):
                            plgpu.wgmma(acc_ref, kind.at[w].T, other.at[w])
                        # groups complete in order: wait for dq only
                        reduce_dq(qb, plgpu.wgmma_accumulator_load(dq_ref_, wait_n=wgs))

                    # (dq's accumulator as a second state, not a scope inside this one:
                    # the latter does not lower in JAX 0.11.2)
                    dq_zero = plgpu.layout_cast(jnp.zeros((rows, d), jnp.float32), wgmma_layout)
                    acc, _ = pl.run_state(matmuls)((plgpu.ACC.init(acc), plgpu.ACC.init(dq_zero)))
                else:
                    reduce_dq(qb, _wgmma_value(plgpu, (rows, d), pds_smem.at[1, wg], ks))
                    plgpu.barrier_wait(staged)

                    def both(acc_ref):
                        for w in range(wgs):
                            plgpu.wgmma(acc_ref, kind.at[w].T, other.at[w])
                        return acc_ref[...]

                    acc = acc + pl.run_scoped(both, plgpu.ACC((bk, d), jnp.float32))
                plgpu.barrier_arrive(released)
                plgpu.barrier_arrive(free.at[slot])
                return acc

            acc = plgpu.layout_cast(jnp.zeros((bk, d), jnp.float32), wgmma_layout)
            acc = lax.fori_loop(0, n_full, functools.partial(step, masked=False), acc)
            acc = lax.fori_loop(n_full, steps, functools.partial(step, masked=True), acc)

            @pl.when(steps > 0)
            def _drain():  # both warpgroups' last matmuls are done: K, V are free
                plgpu.barrier_wait(released)

            if not cfg.interpret:
                plgpu.wait_smem_to_gmem(0)  # the last reductions, before the staging reuse
            # Warpgroup 0 holds dV, 1 holds dK (still to be scaled), written 64 rows at a
            # time through the dq staging tile.
            factor = jnp.where(wg == 0, 1.0, scale).astype(jnp.float32)
            stage = dq_smem.at[wg]
            for r in range(0, bk, rows):
                stage[...] = (acc[r:r + rows] * factor).astype(out_dtype)
                plgpu.commit_smem()
                dst = (bi, pl.ds(ki * bk + r, rows), hi)
                pl.when(wg == 0)(lambda: plgpu.copy_smem_to_gmem(stage, dv_ref.at[dst]))
                pl.when(wg == 1)(lambda: plgpu.copy_smem_to_gmem(stage, dk_ref.at[dst]))
                plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == wgs)
        def _memory():
            _set_registers(plgpu, cfg, compute=False)

            def fetch(t_, slot):
                start = tab_ref[ki, 2 + t_] * bq
                for w in range(wgs):
                    rows_w = (bi, pl.ds(start + w * rows, rows), hi)
                    for stream, ref in enumerate((q_ref, do_ref)):
                        plgpu.copy_gmem_to_smem(ref.at[rows_w], qdo_smem.at[slot, stream, w],
                                                qdo_ready.at[half(slot, stream, w)])
                    plgpu.copy_gmem_to_smem(ld_ref.at[bi, hi, :, pl.ds(start + w * rows, rows)],
                                            ld_smem.at[slot, w], ld_ready.at[slot * wgs + w])

            _stream(steps, n_slots, fetch, (free,))

    def entry(tab_ref, lo_ref, q_ref, k_ref, v_ref, do_ref, ld_ref, dk_ref, dv_ref, dq_ref):
        tr = _smem_transforms(dtype, d)
        smem = (
            # K and V tiles: two buffers, not views of one (a view's constant index,
            # closed over by the in-place matmuls' run_state, does not lower)
            plgpu.SMEM((bk, d), dtype, transforms=tr),
            plgpu.SMEM((bk, d), dtype, transforms=tr),
            plgpu.SMEM((n_slots, 2, wgs, rows, d), dtype, transforms=tr),  # Q, dO halves
            plgpu.SMEM((n_slots, wgs, 2, rows), jnp.float32),  # lse2, delta halves
            plgpu.SMEM((2, wgs, rows, bk), dtype, transforms=_smem_transforms(dtype, bk)),  # P, dS
            plgpu.SMEM((wgs, rows, d), jnp.float32),  # dq staging (and dK, dV at the end)
        )
        bars = (
            plgpu.Barrier(num_barriers=2),  # K, V landed
            plgpu.Barrier(num_barriers=n_slots * 2 * wgs),  # Q, dO halves landed
            plgpu.Barrier(num_barriers=n_slots * wgs),  # lse, delta halves landed
            plgpu.Barrier(num_arrivals=wgs, num_barriers=n_slots),  # slot free
            plgpu.Barrier(num_arrivals=wgs),  # P, dS staged by both
            plgpu.Barrier(num_arrivals=wgs),  # dV, dK done reading them
        )
        pl.run_scoped(
            lambda *scoped: kernel(tab_ref, lo_ref, q_ref, k_ref, v_ref, do_ref, ld_ref,
                                   dk_ref, dv_ref, dq_ref, scoped),
            smem, bars, collective_axes="wg")

    if jnp.dtype(out_dtype) != jnp.dtype(jnp.float32):
        raise ValueError("dkvdq_query_major stages dk, dv in its float32 dq buffer: out_dtype float32")
    out = jax.ShapeDtypeStruct((b, tk, h, d), out_dtype)
    args = (jnp.asarray(part.bwd), jnp.asarray(lo), q, k, v, do, ld)
    state = (filled_after(do, out.shape, 1.0, out.dtype), filled_after(do, out.shape, 2.0, out.dtype),
             dq0.astype(jnp.float32))
    return _launch_in_place(plgpu, entry, args, state, grid, grid_names, wgs, cfg,
                            _name("dkvdq_qm", part))


def bwd_smem_bytes(d: int, dtype, dq_part: PartLayout, kv_part: PartLayout,
                   cfg: KernelConfig, out_dtype) -> tuple[int, int]:
    """Shared memory of (the dQ kernel, the dK/dV kernel), buffers only."""
    size = jnp.dtype(dtype).itemsize
    out_size = jnp.dtype(out_dtype).itemsize
    staged = jnp.dtype(out_dtype) != jnp.dtype(dtype)
    s = cfg.max_concurrent_steps
    bq = dq_part.block_q
    dq = 2 * bq * d * size + 2 * bq * 4 + 2 * s * dq_part.block_k * d * size
    dq += 0 if cfg.pv_from_registers else bq * dq_part.block_k * size
    dq += bq * d * out_size if staged else 0
    bk, bqs = kv_part.block_k, kv_part.block_q
    kv = 2 * bk * d * size + 2 * s * bqs * d * size + s * 2 * bqs * 4
    kv += 0 if cfg.pv_from_registers else bk * bqs * size
    kv += bk * d * out_size if staged else 0
    return dq, kv


def _group_backward(q, k, v, o, lse, do, dlse, group: GroupLayout, kv_group: GroupLayout,
                    cfg: KernelConfig):
    dtype = q.dtype
    d = q.shape[-1]
    do = do.astype(dtype)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    delta = jnp.swapaxes(delta, 1, 2) - dlse  # [B, Hg, T]
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)  # empty rows: p = 0
    single = len(group.parts) == 1 and group.parts[0].k_index is None
    dq = dk = dv = None
    for part, kv_part in zip(group.parts, kv_group.parts):
        out_dtype = dtype if single else _bwd_out_dtype(d, dtype, part, kv_part, cfg)
        need = bwd_smem_bytes(d, dtype, part, kv_part, cfg, out_dtype)
        if max(need) > SMEM_BUDGET and not cfg.interpret:
            raise PatternError(
                f"backward tiles need {need[0]} (dQ) and {need[1]} (dK/dV) bytes of shared "
                f"memory, over the {SMEM_BUDGET} available: lower block_k, block_q_dkv, "
                f"block_k_dkv or max_concurrent_steps (D={d}).")
        qp, dop = to_order(q, part, 1), to_order(do, part, 1)
        ld = jnp.stack([to_order(lse2, part, 2), to_order(delta, part, 2)], axis=2)
        dqp = _dq_part(qp, part_keys(k, part), part_keys(v, part), dop, ld, part, cfg, out_dtype)
        dqp = from_order(dqp, part, 1)
        # The dK/dV layout pads gathered keys to its own block_k: gather them again.
        kp, vp = (part_keys(k, kv_part), part_keys(v, kv_part)) if part.k_index is not None \
            else (part_keys(k, part), part_keys(v, part))
        dkp, dvp = _dkv_part(qp, kp, vp, dop, ld, kv_part, cfg, out_dtype)
        if single:
            dq, dk, dv = dqp, from_order(dkp, part, 1), from_order(dvp, part, 1)
            break
        dq = dqp.astype(jnp.float32) + (0.0 if dq is None else dq)
        if dk is None:
            dk = dv = jnp.zeros(k.shape, jnp.float32)
        if part.k_index is None:
            dk = dk + from_order(dkp, part, 1).astype(jnp.float32)
            dv = dv + from_order(dvp, part, 1).astype(jnp.float32)
        else:
            dk = scatter_keys(dk, dkp.astype(jnp.float32), kv_part)
            dv = scatter_keys(dv, dvp.astype(jnp.float32), kv_part)
    return dq.astype(dtype), dk.astype(dtype), dv.astype(dtype)


def _bwd_out_dtype(d, dtype, part, kv_part, cfg):
    """float32 partial gradients when parts are summed, unless their staging tile does
    not fit in shared memory (then the input dtype: one more rounding per part)."""
    if max(bwd_smem_bytes(d, dtype, part, kv_part, cfg, jnp.float32)) <= SMEM_BUDGET:
        return jnp.float32
    return dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_attention(q, k, v, group: GroupLayout, kv_group: GroupLayout, cfg: KernelConfig):
    """(o, lse) of one head group; differentiable (dq, dk, dv through the kernels above,
    the lse cotangent through delta)."""
    return _group_forward(q, k, v, group, cfg)


def _group_attention_fwd(q, k, v, group, kv_group, cfg):
    o, lse = _group_forward(q, k, v, group, cfg)
    return (o, lse), (q, k, v, o, lse)


def _group_attention_bwd(group, kv_group, cfg, res, cts):
    q, k, v, o, lse = res
    do, dlse = cts
    return _group_backward(q, k, v, o, lse, do, dlse, group, kv_group, cfg)


_group_attention.defvjp(_group_attention_fwd, _group_attention_bwd)


# ------------------------------------------------------------------------ entry point


def default_blocks(seq_len: int) -> tuple[int, int]:
    """(block_q, block_k): 128 query rows (two compute warpgroups of 64) x 64 keys."""
    return min(128, seq_len), 64


def check_config(q, k, v, pattern, block_q: int, block_k: int, compute_wgs: int,
                 interpret: bool) -> None:
    """Raises PatternError for what this kernel cannot take (shape, dtype, tiles)."""
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise PatternError(f"q, k, v must share one [B, T, H, D] shape, got {q.shape}, "
                           f"{k.shape}, {v.shape}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise PatternError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, "
                           f"{v.dtype}.")
    dtypes = (jnp.bfloat16, jnp.float16) + ((jnp.float32,) if interpret else ())
    if q.dtype not in dtypes:
        names = "bfloat16, float16 or float32" if interpret else "bfloat16 or float16"
        raise PatternError(
            f"the Mosaic GPU kernel takes {names} operands, got {q.dtype}; wgmma has no "
            "IEEE float32 (float32 would run as tf32), so float32 is accepted in interpret "
            "mode only.")
    b, t, h, d = q.shape
    if len(pattern) != h:
        raise PatternError(f"pattern has {len(pattern)} heads but q has {h}.")
    if d % 64 or d > 256:
        raise PatternError(f"head dim D={d} must be a multiple of 64 and at most 256 (the "
                           "wgmma K of Q K^T and N of P V); pad D.")
    if compute_wgs < 1 or block_q % (compute_wgs * WGMMA_M):
        raise PatternError(f"block_q={block_q} must be a multiple of {WGMMA_M} x "
                           f"compute_wgs={compute_wgs}: each compute warpgroup owns "
                           f"block_q / compute_wgs rows, a multiple of the wgmma M={WGMMA_M}.")
    if block_k % 64 or block_k > 256:
        raise PatternError(f"block_k={block_k} must be a multiple of 64 and at most 256 "
                           "(the N of Q K^T and the swizzled K of P V).")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pattern: LayerPattern,
    *,
    interpret=None,
    block_q: int | None = None,
    block_k: int | None = None,
    compute_wgs: int = 2,
    max_concurrent_steps: int = 2,
    pv_from_registers: bool | None = None,
    return_lse: bool = False,
    block_q_dkv: int | None = None,
    block_k_dkv: int | None = None,
    heavy_first: bool = True,
):
    """Block-sparse causal attention. q, k, v: [B, T, H, D] -> [B, T, H, D].

    Differentiable (``jax.custom_vjp`` per head group): the backward runs a dQ kernel
    per part over the forward's block lists and a dK/dV kernel per part over the
    transposed lists of a second layout with blocks (``block_q_dkv``, ``block_k_dkv``).

    Args:
      pattern: one entry per head (``PatternSpec.layer_pattern``); every pattern
        ``pallas_gpu`` takes (all components sets of ``layout.head_parts``).
      interpret: run in Mosaic GPU interpret mode on CPU: True (default
        ``plgpu.InterpretGPUParams()``), or an ``InterpretGPUParams`` (e.g. with
        ``detect_races=True``); None means: when the default backend is not a GPU.
      block_q: query rows per program (split over ``compute_wgs`` warpgroups of a
        multiple of 64 rows each); block_k: key rows per block (a multiple of 64).
      max_concurrent_steps: K/V SMEM slots of the TMA pipeline (>= 1).
      pv_from_registers: P V with P in registers (FA3; GPU only). None: not interpret.
      return_lse: also return the natural log-sum-exp [B, H, T] (float32); its
        cotangent is differentiated too.
      block_q_dkv: query rows per streamed block of the dK/dV kernel (a multiple of 64;
        default 64); block_k_dkv: key rows per dK/dV program, split over
        ``compute_wgs`` warpgroups (default 64 x compute_wgs). ``pv_from_registers``
        also selects the backward's in-place register-operand wgmma (GPU only).
      heavy_first: launch order (``KernelConfig.heavy_first``); results do not depend on it.

    Raises:
      PatternError (a ValueError) naming the constraint.
    """
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    interpret_params = None
    if not isinstance(interpret, bool):
        interpret_params, interpret = interpret, True
    if pv_from_registers is None:
        pv_from_registers = not interpret
    if interpret and pv_from_registers:
        raise PatternError("pv_from_registers=True needs a GPU: the Mosaic GPU interpreter "
                           "(JAX 0.11.2) has no wgmma with a register operand nor run_state.")
    t = q.shape[1] if q.ndim == 4 else 0
    dq_, dk_ = default_blocks(t)
    block_q = block_q or dq_
    block_k = block_k or dk_
    check_config(q, k, v, pattern, block_q, block_k, compute_wgs, bool(interpret))
    if max_concurrent_steps < 1:
        raise PatternError(f"max_concurrent_steps={max_concurrent_steps} must be >= 1.")
    block_q_dkv = block_q_dkv or min(64, t)
    block_k_dkv = block_k_dkv or min(WGMMA_M * compute_wgs, t)
    if block_q_dkv % 64 or block_q_dkv > 256:
        raise PatternError(f"block_q_dkv={block_q_dkv} must be a multiple of 64 and at most "
                           "256 (the N of K Q^T and the swizzled K of P^T dO).")
    if block_k_dkv % (compute_wgs * WGMMA_M):
        raise PatternError(f"block_k_dkv={block_k_dkv} must be a multiple of {WGMMA_M} x "
                           f"compute_wgs={compute_wgs}: each compute warpgroup of the dK/dV "
                           "kernel owns block_k_dkv / compute_wgs key rows.")
    pattern = tuple(tuple(hp) for hp in pattern)
    layout = build_layout(pattern, t, block_q, block_k)
    kv_layout = build_layout(pattern, t, block_q_dkv, block_k_dkv)
    cfg = KernelConfig(interpret=bool(interpret), interpret_params=interpret_params,
                       compute_wgs=compute_wgs,
                       max_concurrent_steps=max_concurrent_steps,
                       pv_from_registers=bool(pv_from_registers), heavy_first=heavy_first)
    h = q.shape[2]
    everyone = tuple(range(h))
    groups = list(zip(layout.groups, kv_layout.groups))
    assert all(g.heads == kg.heads for g, kg in groups)
    groups.sort(key=lambda gs: gs[0].heads[0])
    ranges = head_ranges([g for g, _ in groups], h)
    if len(groups) == 1 and layout.groups[0].heads == everyone:
        out, lse = _group_attention(q, k, v, *groups[0], cfg)
    elif ranges is not None:  # consecutive heads: slices in, one concatenate out
        outs = [_group_attention(*(x[:, :, r] for x in (q, k, v)), g, kg, cfg)
                for (g, kg), r in zip(groups, ranges)]
        out = jnp.concatenate([o for o, _ in outs], axis=2)
        lse = jnp.concatenate([ls for _, ls in outs], axis=1)
    else:
        out = jnp.zeros_like(q)
        lse = jnp.zeros((q.shape[0], h, t), jnp.float32)
        for group, kv_group in groups:
            idx = np.asarray(group.heads)
            o, ls = _group_attention(q[:, :, idx], k[:, :, idx], v[:, :, idx], group,
                                     kv_group, cfg)
            out = out.at[:, :, idx].set(o)
            lse = lse.at[:, idx].set(ls)
    return (out, lse) if return_lse else out
