"""Sparse training kernels: gradients only where codes can be non-zero.

A dictionary with L0 ≈ 50 of 16k latents spends most of a plain training step multiplying zeros:
decoding, the gradient of the codes, and the gradients of W_dec and W_enc are all dense
[batch × d_sae] products. Given the (row, latent) pairs that matter — the active codes, plus for
JumpReLU the pairs inside the threshold window whose pseudo-derivative is non-zero — these
functions compute the same values and gradients from those pairs alone:

* :class:`GatheredPre` — pre-activations z at the pairs; backward gives W_enc and b_enc their
  gradients through a sparse ``[d_sae × batch] @ [batch × d_in]`` product (the encoder's forward
  matmul stays dense: every pre-activation must be seen to know which are active), and a b_dec
  subtracted from the input its gradient from one matrix-vector product.
* :func:`encode_pairs` — JumpReLU's encoder product block by block (on a CPU, tiles of rows and latents), each
  block searched for the pairs at or above the thresholds while it is in cache, so the dense
  pre-activations are never written whole.
* :class:`SparseDecode` — x̂ = Σ f·W_dec over the pairs (``embedding_bag``); backward gives the
  codes' gradient by a sampled dense-dense product and W_dec's by a sparse product.

On a CPU the search, the decoder's forward and backward and W_enc's gradient run as compiled loops
(``scope/dictionaries/cpu_kernels.py``), one sweep each, and decoding and W_enc's gradient skip the pairs whose
value is zero (JumpReLU's window pairs below θ); the torch code here is their reference and the GPU path.
The plain eager path (``loss(..., sparse=False)``) stays as the reference of both; tests compare them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _csr(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """CSR matrix from row-major sorted (row, col) pairs."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # torch's "beta" notice; the indices are valid by construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)


def _nonzero(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The pairs whose value is not zero (still row-major): zero entries add nothing to a product.

    On a CPU the compiled loop does it in one sweep (a boolean index is a ``nonzero`` and three gathers)."""
    if (loops := _cpu_loops(rows, cols, vals)) is not None:
        return loops.nonzero(rows, cols, vals)
    keep = vals != 0
    if bool(keep.all()):
        return rows, cols, vals
    return rows[keep], cols[keep], vals[keep]


def _column_order(cols: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The permutation that puts row-major pairs in column-major order (rows stay ascending in a column).

    A stable sort by column alone does it; on small integer types torch sorts by radix, which on CPU
    is two orders of magnitude faster than sorting the int64 key ``col · n_rows + row``.
    """
    small = torch.int16 if n_cols <= torch.iinfo(torch.int16).max else torch.int32
    return torch.sort(cols.to(small), stable=True).indices


def _transpose_times(rows, cols, vals, n_rows: int, n_cols: int, dense: torch.Tensor) -> torch.Tensor:
    """Sᵀ @ dense for the sparse S[rows, cols] = vals of shape [n_rows, n_cols] (row-major pairs).

    Row i of the result sums ``vals · dense[row]`` over the pairs of column i: one ``embedding_bag``.
    """
    order = _column_order(cols, n_cols)
    offsets = torch.zeros(n_cols, dtype=torch.long, device=rows.device)
    offsets[1:] = torch.bincount(cols, minlength=n_cols).cumsum(0)[:-1]
    return F.embedding_bag(rows[order], dense, offsets, mode="sum", per_sample_weights=vals[order].to(dense.dtype))


class GatheredPre(torch.autograd.Function):
    """z[rows, cols] where z = (x − shift) W_enc + b_enc was computed without autograd: ``values`` holds them.

    ``x`` is the encoder input with ``shift`` already taken off (no gradient flows into it); ``shift``
    (b_dec, for dictionaries that subtract it from the input, or None) gets its gradient from the
    column sums of the pair gradients, −W_enc · Σ_pairs g, so no [batch × d_in] product is needed.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, values, rows, cols, shift=None):
        ctx.save_for_backward(x, W_enc, rows, cols)
        return values

    @staticmethod
    def backward(ctx, grad):
        x, W_enc, rows, cols = ctx.saved_tensors
        grad = grad.to(x.dtype)
        if (loops := _cpu_loops(x, W_enc, grad)) is not None:
            rows, cols, grad = _nonzero(rows, cols, grad)  # JumpReLU's inactive window pairs: no gradient to z
            grad_W_enc, grad_b_enc = loops.transpose_times(rows, cols, grad, W_enc.shape[1], x)
        else:
            grad_b_enc = torch.zeros(W_enc.shape[1], dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
            rows, cols, grad = _nonzero(rows, cols, grad)
            grad_W_enc = _transpose_times(rows, cols, grad, x.shape[0], W_enc.shape[1], x).T
        grad_shift = -(W_enc @ grad_b_enc) if ctx.needs_input_grad[6] else None
        return None, grad_W_enc, grad_b_enc, None, None, None, grad_shift


# Rows per block of encode_pairs on a CPU: measured on one thread at d_in 640, a 256-row block keeps the GEMM
# as fast as one over the whole batch (64 rows cost 1.4x at 16,384 latents) while its pre-activations stay in
# cache. A GPU takes the batch as one block: each block's nonzero waits for the device.
BLOCK_ROWS = 256
# Latents per group in a CPU block's search (_at_or_above_zero): 16 and 32 measured within run-to-run noise of
# each other at 4,096 and 16,384 latents (benchmarks/sae_train.py, docs/benchmarks.md).
SEARCH_GROUP = 16


def _cpu_loops(*tensors: torch.Tensor):
    """The module of compiled CPU loops when they apply to ``tensors``, else None.

    Imported on first use: importing numba costs about 0.3 s, which commands that never train should not pay,
    and a GPU never needs it.
    """
    if any(t.device.type != "cpu" for t in tensors):
        return None
    from scope.dictionaries import cpu_kernels

    return cpu_kernels if cpu_kernels.usable(*tensors) else None


@dataclass
class Pairs:
    """Row-major (row, col) pairs, their pre-activations, and the pre-activations of some whole columns."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    columns: torch.Tensor | None  # [batch, len(column_ids)], or None when none were asked for


def _at_or_above_zero(block: torch.Tensor) -> torch.Tensor:
    """Ascending flat indices (row · width + col) of the entries ≥ 0 of a [rows, width] block.

    On a CPU a comparison over the whole block and ``nonzero`` over its mask cost, per element, more than a third
    of the product that wrote the block (they are not vectorised for a boolean result). Instead the block is read
    once for the maxima of groups of ``SEARCH_GROUP`` latents spaced width/SEARCH_GROUP apart, a reduction over a
    middle dimension that torch vectorises along the last; only the members of the (row, group) pairs whose
    maximum is ≥ 0, about L0 of them per row, are compared one by one, and a sort restores row-major order.
    """
    rows, width = block.shape
    if block.device.type != "cpu" or width % SEARCH_GROUP:
        return (block.view(-1) >= 0).nonzero().squeeze(1)
    n = width // SEARCH_GROUP
    hit = (block.view(rows, SEARCH_GROUP, n).amax(1) >= 0).view(-1).nonzero().squeeze(1)  # row · n + group
    row = hit // n
    members = (hit + row * (width - n)).unsqueeze(1) + torch.arange(0, width, n)  # row · width + group + i · n
    members = members.view(-1)
    return members[block.view(-1).take(members) >= 0].sort().values


@torch.no_grad()
def encode_pairs(xin: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, floor: torch.Tensor,
                 column_ids: torch.Tensor | None = None, max_pairs: int | None = None) -> Pairs | None:
    """The pairs where z = xin W_enc + b_enc ≥ ``floor`` (one value per latent), without autograd.

    The encoder product runs in blocks; each block is searched for z ≥ floor, that is z − (floor − b_enc) ≥ 0,
    while it is in cache (the pairs' z is that difference plus ``floor``), so the [batch × d_sae] pre-activations
    are never written whole. On a CPU with the compiled loops the blocks are tiles of rows and latents
    (``cpu_kernels.encode``); otherwise blocks of rows searched by torch. ``column_ids`` also returns those columns
    of z whole (AuxK ranks the dead latents' pre-activations). None as soon as there are more than ``max_pairs``
    pairs: the caller's dense path is cheaper then.
    """
    floor = floor.float()
    shifted = floor - b_enc.float()
    width = W_enc.shape[1]
    if (loops := _cpu_loops(xin, W_enc)) is not None:
        found = loops.encode(xin, W_enc, shifted, floor, column_ids, max_pairs)
        if found is None:
            return None
        out, columns = found
        whole = None if columns is None else columns + floor[column_ids]
        return Pairs(*out.tensors(), whole)
    rows, cols, values, columns, found = [], [], [], [], 0
    step = BLOCK_ROWS if xin.device.type == "cpu" else max(1, xin.shape[0])
    for start in range(0, xin.shape[0], step):
        block = (xin[start:start + step] @ W_enc).float()
        if column_ids is not None:
            columns.append(block.index_select(1, column_ids).sub_(shifted[column_ids]))
        block.sub_(shifted)
        flat = _at_or_above_zero(block)
        found += flat.shape[0]
        if max_pairs is not None and found > max_pairs:
            return None
        r = flat // width
        rows.append(r + start)
        cols.append(flat - r * width)
        values.append(block.view(-1)[flat])
    whole = None if column_ids is None else torch.cat(columns) + floor[column_ids]
    cols_all = torch.cat(cols)
    return Pairs(torch.cat(rows), cols_all, torch.cat(values) + floor[cols_all], whole)


class SparseDecode(torch.autograd.Function):
    """x̂[b] = Σ over pairs (b, i) of f · W_dec[i]  (without b_dec)."""

    @staticmethod
    def forward(ctx, vals, W_dec, rows, cols, batch):
        ctx.save_for_backward(vals, W_dec, rows, cols)
        ctx.batch = batch
        rows, cols, vals = _nonzero(rows, cols, vals)  # JumpReLU's window pairs below θ decode to nothing
        if (loops := _cpu_loops(vals, W_dec)) is not None:
            return loops.decode(rows, cols, vals, W_dec, batch)
        offsets = torch.zeros(batch, dtype=torch.long, device=rows.device)
        offsets[1:] = torch.bincount(rows, minlength=batch).cumsum(0)[:-1]
        return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals.to(W_dec.dtype))

    @staticmethod
    def backward(ctx, grad):
        vals, W_dec, rows, cols = ctx.saved_tensors
        grad = grad.contiguous().to(W_dec.dtype)
        if (loops := _cpu_loops(vals, W_dec, grad)) is not None:
            grad_vals, grad_W_dec = loops.decode_backward(rows, cols, vals, W_dec, grad)
            return grad_vals, grad_W_dec, None, None, None
        mask = _csr(rows, cols, torch.ones_like(vals, dtype=W_dec.dtype), (ctx.batch, W_dec.shape[0]))
        grad_vals = torch.sparse.sampled_addmm(mask, grad, W_dec.T, beta=0.0).values()  # θ needs it at every pair
        rows, cols, vals = _nonzero(rows, cols, vals)
        grad_W_dec = _transpose_times(rows, cols, vals.to(W_dec.dtype), ctx.batch, W_dec.shape[0], grad)
        return grad_vals.to(vals.dtype), grad_W_dec, None, None, None


def pairs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major (row, col) indices of a boolean [batch, d_sae] mask."""
    idx = mask.nonzero()
    return idx[:, 0], idx[:, 1]
