"""Compiled CPU loops for the sparse training kernels (numba), each one sweep over the (row, latent) pairs.

Why: on a CPU, torch builds these steps out of several passes — a comparison and ``nonzero`` over the whole
pre-activation block, a radix sort into column order, an ``embedding_bag``, an ``index_add`` — each reading
every pair or every pre-activation again. A loop that does one step in one sweep reads each once. Measured
2026-12-06 on one thread, batch 4,096, real layer-6 rows (benchmarks/sae_train.py, docs/benchmarks.md): a JumpReLU
step at working sparsity took 0.274 s instead of 0.337 s with torch's kernels at 4,096 latents, and 0.851 s
instead of 1.065 s at 16,384.

Every kernel takes float32, C-contiguous CPU arrays and computes what its torch counterpart in
``scope/dictionaries/sparse.py`` computes, up to the order of float additions; the tests compare them.
The column-major kernels write each latent's output from one loop iteration, so they run in parallel over
latents without races (numba's ``prange``; torch's thread count is passed on). Where the pairs are dense enough,
the three pair loops run in cache blocks of rows or latents (``_block``). The encoder's product runs in tiles of
rows and latents, each searched with 16-lane comparison masks while it is in cache (``encode``).

``ENABLED`` is False when numba is missing or ``SCOPE_CPU_KERNELS=0``; sparse.py then uses torch alone.
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    import numba
    from llvmlite import ir
    from numba import prange
    from numba.cpython.unsafe.numbers import trailing_zeros
    from numba.extending import intrinsic
except ImportError:  # the torch kernels do the same work, slower
    numba = None

ENABLED = numba is not None and os.environ.get("SCOPE_CPU_KERNELS", "1") != "0"

if numba is not None:
    if "NUMBA_THREADING_LAYER" not in os.environ:
        # torch brings its own OpenMP runtime; numba's own thread pool keeps a second one out of the process.
        numba.config.THREADING_LAYER = "workqueue"
    _jit = numba.njit(fastmath=True, cache=True, nogil=True, boundscheck=False)
    _pjit = numba.njit(fastmath=True, cache=True, nogil=True, boundscheck=False, parallel=True)
else:  # pragma: no cover - the decorators are never called without numba
    _jit = _pjit = lambda fn: fn
    prange = range


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the compiled kernels apply: enabled, and every tensor a float32 or integer CPU tensor."""
    return ENABLED and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.int64) for t in tensors)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


if numba is not None:
    @intrinsic
    def _at_or_above16(typingctx, a, i, b, j):
        """Bit k set where a[i + k] >= b[j + k], for k < 16 (1-D float32 arrays; no bounds check).

        One 16-lane comparison whose mask is read as an integer: LLVM makes it a vector compare and a mask move
        (AVX-512: vcmpps into a k register; elsewhere a few narrower compares). numba has no way to say this in
        Python, and its byte-mask loop took 4-5x longer (0.46 against 0.10 ns per pre-activation in L2).
        """
        def codegen(context, builder, signature, args):
            lanes = ir.VectorType(ir.FloatType(), 16)
            loaded = []
            for array, index, ty in ((args[0], args[1], signature.args[0]), (args[2], args[3], signature.args[2])):
                data = context.make_array(ty)(context, builder, array).data
                loaded.append(builder.load(builder.bitcast(builder.gep(data, [index]), lanes.as_pointer()), align=4))
            mask = builder.fcmp_ordered(">=", loaded[0], loaded[1])  # NaN compares False, as numpy's >= does
            return builder.zext(builder.bitcast(mask, ir.IntType(16)), ir.IntType(32))

        return numba.types.uint32(a, numba.types.intp, b, numba.types.intp), codegen


@_jit
def _search(block, shifted, floor, row0, col0, rows, cols, vals, n):  # pragma: no cover - compiled
    # 16 columns at a time: one vector comparison gives a bit mask, and only its set bits are visited (the last
    # group of a width that is not a multiple of 16 builds its mask one column at a time).
    # ``block`` (C-contiguous) holds columns col0.. of z.
    width = block.shape[1]
    flat = block.reshape(-1)
    for r in range(block.shape[0]):
        base = r * width
        for g in range(0, width, 16):
            if g + 16 <= width:
                m = _at_or_above16(flat, base + g, shifted, col0 + g)
            else:
                m = np.uint32(0)
                for c in range(g, width):
                    if flat[base + c] >= shifted[col0 + c]:
                        m |= np.uint32(1) << np.uint32(c - g)
            while m:
                c = g + trailing_zeros(m)
                m &= m - np.uint32(1)
                if n == rows.shape[0]:
                    return -1
                rows[n] = row0 + r
                cols[n] = col0 + c
                vals[n] = (flat[base + c] - shifted[col0 + c]) + floor[col0 + c]
                n += 1
    return n


@_jit
def _rows_in_order(rows, cols, vals, start, stop, row0, n_rows):  # pragma: no cover - compiled
    # The pairs start..stop came tile by tile: those of one tile are row-major and the tiles ascend in column, so a
    # stable counting sort by row alone (_column_offsets, on the rows) makes them row-major with ascending columns.
    order, _ = _column_offsets(rows[start:stop] - row0, n_rows)
    rows[start:stop] = rows[start:stop][order]
    cols[start:stop] = cols[start:stop][order]
    vals[start:stop] = vals[start:stop][order]


class PairBuffer:
    """Growing row-major (row, col, value) output of :func:`search` over the tiles of one batch."""

    def __init__(self, capacity: int):
        self.rows = np.empty(capacity, np.int64)
        self.cols = np.empty(capacity, np.int64)
        self.vals = np.empty(capacity, np.float32)
        self.n = 0

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.n
        return torch.from_numpy(self.rows[:n]), torch.from_numpy(self.cols[:n]), torch.from_numpy(self.vals[:n])


def search(block: torch.Tensor, shifted: torch.Tensor, floor: torch.Tensor, row0: int, out: PairBuffer,
           limit: int | None, col0: int = 0) -> bool:
    """Append the pairs of ``block`` (raw pre-activations of rows row0.., columns col0..) with block − shifted ≥ 0
    to ``out``, their value being block − shifted + floor; False once ``out`` would hold more than ``limit`` pairs."""
    b, s, f = _np(block), _np(shifted), _np(floor)
    while True:
        n = _search(b, s, f, row0, col0, out.rows, out.cols, out.vals, out.n)
        if n >= 0:
            out.n = n
            return limit is None or n <= limit
        if limit is not None and len(out.rows) > limit:
            return False
        grown = PairBuffer(2 * len(out.rows))  # a rare regrowth: redo this block into the larger buffer
        for name in ("rows", "cols", "vals"):
            getattr(grown, name)[:out.n] = getattr(out, name)[:out.n]
        out.rows, out.cols, out.vals = grown.rows, grown.cols, grown.vals


# Tiles of encode: the product x·W_enc runs tile by tile, each tile searched while it is in cache. Measured on one
# thread at d_in 640, batch 4,096, real pairs (2026-12-07; product and search, best of 5-8 alternating runs):
# 1,024 × 1,024 (4 MiB) took 145 ms at 4,096 latents and 561 ms at 16,384, against 131 and 547 ms for the product
# alone in one piece; 512 × 1,024 (2 MiB, this CPU's L2) took 149 and 615 ms, 1,024 × 256 155 and 621 ms. Smaller
# tiles slow the GEMM by more than the search gains from L2; the search itself costs 0.10 ns per pre-activation in
# L2 and 0.17 in L3.
TILE_ROWS = 1024
TILE_COLS = 1024


def encode(xin: torch.Tensor, W_enc: torch.Tensor, shifted: torch.Tensor, floor: torch.Tensor,
           column_ids: torch.Tensor | None, limit: int | None) -> tuple[PairBuffer, torch.Tensor | None] | None:
    """The row-major pairs where xin·W_enc − shifted ≥ 0 (values + ``floor``), and the columns ``column_ids`` of
    xin·W_enc − shifted whole; None once there are more than ``limit`` pairs.

    The product runs in tiles of TILE_ROWS × TILE_COLS, each searched while it is in cache, so the [batch × d_sae]
    pre-activations are never written whole; a row block's pairs, found tile by tile, are then put in row order.
    """
    n, width = xin.shape[0], W_enc.shape[1]
    out = PairBuffer(limit + 1 if limit is not None else 64 * n)
    tile_cols = min(TILE_COLS, width)
    flat = torch.empty(TILE_ROWS * tile_cols)
    columns = None
    if column_ids is not None:
        order = None  # the trainer's dead latents come ascending; each tile then fills one slice of ``columns``
        if column_ids.numel() > 1 and not bool((column_ids[1:] > column_ids[:-1]).all()):
            column_ids, order = column_ids.sort()
        columns = torch.empty(n, column_ids.shape[0])
        bounds = torch.searchsorted(column_ids, torch.arange(0, width + tile_cols, tile_cols)).tolist()
    for r0 in range(0, n, TILE_ROWS):
        xr = xin[r0:r0 + TILE_ROWS]
        start = out.n
        for t, c0 in enumerate(range(0, width, tile_cols)):
            c1 = min(c0 + tile_cols, width)
            tile = flat[:xr.shape[0] * (c1 - c0)].view(xr.shape[0], c1 - c0)
            torch.matmul(xr, W_enc[:, c0:c1], out=tile)
            if columns is not None and bounds[t + 1] > bounds[t]:
                ids = column_ids[bounds[t]:bounds[t + 1]]
                columns[r0:r0 + xr.shape[0], bounds[t]:bounds[t + 1]] = tile.index_select(1, ids - c0) - shifted[ids]
            if not search(tile, shifted, floor, r0, out, limit, c0):
                return None
        if width > tile_cols:
            _rows_in_order(out.rows, out.cols, out.vals, start, out.n, r0, xr.shape[0])
    if columns is not None and order is not None:
        columns = columns[:, order.argsort()]  # back in the caller's order of column_ids
    return out, columns


@_jit
def _nonzero(rows, cols, vals):  # pragma: no cover - compiled
    n = 0
    for p in range(vals.shape[0]):
        n += vals[p] != 0
    r = np.empty(n, np.int64)
    c = np.empty(n, np.int64)
    v = np.empty(n, np.float32)
    n = 0
    for p in range(vals.shape[0]):
        if vals[p] != 0:
            r[n] = rows[p]
            c[n] = cols[p]
            v[n] = vals[p]
            n += 1
    return r, c, v


def nonzero(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The pairs whose value is not zero, in their order: one sweep (torch's boolean indexing takes four)."""
    return tuple(torch.from_numpy(a) for a in _nonzero(_np(rows), _np(cols), _np(vals)))


@_jit
def _offsets(keys, n):  # pragma: no cover - compiled
    """Where each key's run starts in keys sorted ascending, and (last) their number: counts, then a prefix sum."""
    offsets = np.zeros(n + 1, np.int64)
    for p in range(keys.shape[0]):
        offsets[keys[p] + 1] += 1
    for i in range(n):
        offsets[i + 1] += offsets[i]
    return offsets


@_jit
def _column_offsets(cols, n_cols):  # pragma: no cover - compiled
    """Counting sort by column: the permutation into column-major order (stable) and each column's start."""
    offsets = _offsets(cols, n_cols)
    fill = offsets[:-1].copy()
    order = np.empty(cols.shape[0], np.int64)
    for p in range(cols.shape[0]):
        c = cols[p]
        order[fill[c]] = p
        fill[c] += 1
    return order, offsets


# Cache blocking. Each pair loop gathers a d_in-float row per pair from a matrix (x, ∂/∂x̂ or W_dec) that is larger
# than L2, so unblocked it reads about pairs × d_in × 4 bytes from L3 (0.7 GB per loop at batch 4,096 and L0 64).
# Cut into blocks of rows (or latents) that fit in L2, the gathers hit L2 and only the accumulator rows travel from L3,
# once per block. That pays while a block still holds several pairs per accumulator row: measured on one thread at
# d_in 640 (2 MiB L2) on synthetic pairs, 4,096 latents and L0 64, blocks of 512 rows took W_enc's gradient from 38
# to 24 ms and the decoder's backward from 39 to 29 ms; at 16,384 latents (2 pairs per block and latent) blocking made
# both slower. In real steps (L0 50) the three loops took 20-25 ms less (docs/benchmarks.md).
_BLOCK_BYTES = 1_310_720  # the gathered block: 512 rows of 640 floats, well within a 2 MiB L2
_MIN_PAIRS_PER_BLOCK = 4  # average pairs per (block, accumulator row) below which one block is cheaper


def _block(n_pairs: int, n_rows: int, n_cols: int, d: int, blocked: int) -> int:
    """Rows (or latents) per block of a pair loop over ``blocked`` of them; ``blocked`` itself for one block."""
    size = max(1, _BLOCK_BYTES // (4 * d))
    dense_enough = n_pairs * size >= _MIN_PAIRS_PER_BLOCK * n_rows * n_cols
    return size if dense_enough and size < blocked else max(1, blocked)


# Latents per chunk of _transpose_times: its output rows are written transposed 16 floats (one cache line) at a time.
_CHUNK = 16


@_pjit
def _transpose_times(rows, order, offsets, vals, dense, block, scratch, out, col_sums):  # pragma: no cover
    # Row block by row block (see _block); within a block, in parallel over chunks of _CHUNK latents. A chunk's
    # accumulator is a local array for one block, else its rows of ``scratch``; the last block writes it transposed.
    d = dense.shape[1]
    n_rows = dense.shape[0]
    n_cols = out.shape[1]
    next_pair = offsets[:-1].copy()  # each latent's first pair not yet summed (its rows ascend)
    for r0 in range(0, max(n_rows, 1), block):  # an empty batch still writes its zeros
        r1 = r0 + block
        for chunk in prange((n_cols + _CHUNK - 1) // _CHUNK):
            c0 = chunk * _CHUNK
            m = min(_CHUNK, n_cols - c0)
            if block >= n_rows:
                acc = np.zeros((_CHUNK, d), np.float32)
            else:
                acc = scratch[chunk]
                if r0 == 0:
                    acc[:] = 0.0
            for j in range(m):
                c = c0 + j
                total = np.float32(0.0)
                q = next_pair[c]
                end = offsets[c + 1]
                while q + 4 <= end and rows[order[q + 3]] < r1:  # four pairs per pass over the accumulator
                    p0, p1, p2, p3 = order[q], order[q + 1], order[q + 2], order[q + 3]
                    a0, a1, a2, a3 = rows[p0], rows[p1], rows[p2], rows[p3]
                    v0, v1, v2, v3 = vals[p0], vals[p1], vals[p2], vals[p3]
                    total += v0 + v1 + v2 + v3
                    for k in range(d):
                        acc[j, k] += v0 * dense[a0, k] + v1 * dense[a1, k] + v2 * dense[a2, k] + v3 * dense[a3, k]
                    q += 4
                while q < end and rows[order[q]] < r1:
                    p = order[q]
                    v = vals[p]
                    total += v
                    a = rows[p]
                    for k in range(d):
                        acc[j, k] += v * dense[a, k]
                    q += 1
                next_pair[c] = q
                col_sums[c] = total if r0 == 0 else col_sums[c] + total
            if r1 >= n_rows:
                for k in range(d):
                    for j in range(m):
                        out[k, c0 + j] = acc[j, k]


def transpose_times(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_cols: int,
                    dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(denseᵀ @ S, the column sums of S) for the sparse S[rows, cols] = vals with ``n_cols`` columns.

    The product comes out [d_in, n_cols], the layout of W_enc, so its gradient needs no transposing copy.
    """
    n_rows, d = dense.shape
    block = _block(rows.shape[0], n_rows, n_cols, d, n_rows)
    order, offsets = _column_offsets(_np(cols), n_cols)
    chunks = (n_cols + _CHUNK - 1) // _CHUNK
    scratch = np.empty((chunks if block < n_rows else 0, _CHUNK, d), np.float32)
    out = np.empty((d, n_cols), np.float32)
    sums = np.empty(n_cols, np.float32)
    _threads()
    _transpose_times(_np(rows), order, offsets, _np(vals), _np(dense), block, scratch, out, sums)
    return torch.from_numpy(out), torch.from_numpy(sums)


@_pjit
def _decode(row_offsets, cols, vals, W_dec, block, out):  # pragma: no cover - compiled
    # Latent block by latent block (see _block); within a block, in parallel over rows.
    d = W_dec.shape[1]
    next_pair = row_offsets[:-1].copy()  # each row's first pair not yet decoded (its latents ascend)
    for c_end in range(block, W_dec.shape[0] + block, block):
        for r in prange(out.shape[0]):
            p = next_pair[r]
            end = row_offsets[r + 1]
            while p + 4 <= end and cols[p + 3] < c_end:  # four pairs per pass over the output row
                c0, c1, c2, c3 = cols[p], cols[p + 1], cols[p + 2], cols[p + 3]
                v0, v1, v2, v3 = vals[p], vals[p + 1], vals[p + 2], vals[p + 3]
                for k in range(d):
                    out[r, k] += v0 * W_dec[c0, k] + v1 * W_dec[c1, k] + v2 * W_dec[c2, k] + v3 * W_dec[c3, k]
                p += 4
            while p < end and cols[p] < c_end:
                v = vals[p]
                c = cols[p]
                for k in range(d):
                    out[r, k] += v * W_dec[c, k]
                p += 1
            next_pair[r] = p


def decode(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor,
           batch: int) -> torch.Tensor:
    """x̂[b] = Σ over the row-major pairs (b, i) of vals · W_dec[i]."""
    n_cols, d = W_dec.shape
    block = _block(rows.shape[0], batch, n_cols, d, n_cols)
    out = np.zeros((batch, d), np.float32)
    _threads()
    _decode(_offsets(_np(rows), batch), _np(cols), _np(vals), _np(W_dec), block, out)
    return torch.from_numpy(out)


@_pjit
def _decode_backward(rows, order, offsets, vals, W_dec, grad, block, grad_vals, grad_W_dec):  # pragma: no cover
    # Row block by row block (see _block); within a block, in parallel over latents, four pairs of one latent at a
    # time: W_dec's row and its gradient's are read and written once for the four.
    d = W_dec.shape[1]
    next_pair = offsets[:-1].copy()  # each latent's first pair not yet done (its rows ascend)
    for r_end in range(block, grad.shape[0] + block, block):
        for c in prange(W_dec.shape[0]):
            q = next_pair[c]
            end = offsets[c + 1]
            while q + 4 <= end and rows[order[q + 3]] < r_end:
                p0, p1, p2, p3 = order[q], order[q + 1], order[q + 2], order[q + 3]
                a0, a1, a2, a3 = rows[p0], rows[p1], rows[p2], rows[p3]
                v0, v1, v2, v3 = vals[p0], vals[p1], vals[p2], vals[p3]
                s0 = s1 = s2 = s3 = np.float32(0.0)
                for k in range(d):
                    w = W_dec[c, k]
                    g0, g1, g2, g3 = grad[a0, k], grad[a1, k], grad[a2, k], grad[a3, k]
                    s0 += g0 * w
                    s1 += g1 * w
                    s2 += g2 * w
                    s3 += g3 * w
                    grad_W_dec[c, k] += v0 * g0 + v1 * g1 + v2 * g2 + v3 * g3
                grad_vals[p0], grad_vals[p1], grad_vals[p2], grad_vals[p3] = s0, s1, s2, s3
                q += 4
            while q < end and rows[order[q]] < r_end:
                p = order[q]
                a = rows[p]
                v = vals[p]
                s = np.float32(0.0)
                for k in range(d):
                    s += grad[a, k] * W_dec[c, k]
                    grad_W_dec[c, k] += v * grad[a, k]
                grad_vals[p] = s
                q += 1
            next_pair[c] = q


def decode_backward(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor,
                    grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂/∂vals, ∂/∂W_dec) of x̂ = decode(...) given ∂/∂x̂ = ``grad``, in one column-major sweep over the pairs."""
    n_cols, d = W_dec.shape
    block = _block(rows.shape[0], grad.shape[0], n_cols, d, grad.shape[0])
    order, offsets = _column_offsets(_np(cols), n_cols)
    grad_vals = np.empty(rows.shape[0], np.float32)
    grad_W_dec = np.zeros((n_cols, d), np.float32)
    _threads()
    _decode_backward(_np(rows), order, offsets, _np(vals), _np(W_dec), _np(grad), block, grad_vals, grad_W_dec)
    return torch.from_numpy(grad_vals), torch.from_numpy(grad_W_dec)
