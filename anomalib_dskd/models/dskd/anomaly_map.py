"""Contextual affinity (DSKD Eq. 3-7), its memory-bounded computation, and the Eq. 8 score fusion.

Contextual affinity. For one scale with teacher features ``F_T`` and student features ``F_S``
(``(B, C, h, w)``, ``N = h * w`` positions), position ``i`` gets two distributions over all
positions ``j``:

* ``P_T[i, j] = softmax_j(cos(f_T,i, f_T,j) / T)`` (Eq. 3-4),
* ``P_S[i, j] = softmax_j(cos(f_S,i, f_T,j) / T)`` - the student's row is compared with the
  *teacher's* map (Eq. 5), which is what makes the optimisation of each student vector
  independent of the other student vectors,

and ``KL_i = T^2 * KL(P_T[i] || P_S[i])`` (Eq. 6) is both the loss term (averaged over ``i``,
Eq. 7) and the global student's anomaly score at ``i`` (Sec. 3.5).

Memory. The affinities are ``N x N`` per image and scale (4096 x 4096 at 64x64 features). They
are computed for ``chunk_size`` query positions at a time, so the extra memory is
``O(B * chunk_size * N)``. Because ``KL_i`` depends on the student only through its own row
``s_i`` (the keys are teacher vectors), its gradient is block-diagonal:
``dKL_i / ds_i = T * (Q[i] - P[i]) @ t`` with ``Q = P_S``. :class:`ChunkedAffinityKL` computes
that row gradient in the same chunked pass as the forward and keeps only it (``B x N x C``, the
size of the features) for backward, instead of letting autograd keep every chunk's ``N``-wide
intermediates (which would bring back the ``O(B * N^2)`` memory that chunking was meant to avoid).

Speed. On a CPU the ``N x N`` blocks are the cost, so each is touched three times only (form the
logits with one product, exponentiate in place, reduce with one product against ``[t, 1]``); the
teacher's symmetric block matrix is formed above the diagonal only; keys are contiguous (2.6x
faster products than a transposed view) and the exponential is ``exp2`` on base-2 logits (2x
faster than ``exp``). With MobileNetV2 features at 256x256 (batch 8, one thread, CPU time) the loss
and its gradient take 0.6 s (1.3 s before the last two changes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.checkpoint import checkpoint

from anomalib_dskd.components.rd import UpsampleSmooth, cosine_distance_maps

#: student map / loss kinds
PIXEL = "pixel"
AFFINITY = "affinity"
MAP_KINDS = (PIXEL, AFFINITY)
#: RD's loss (official code, anomalib's ``ReverseDistillationLoss``): cosine of each image's whole flattened
#: feature maps. A loss kind only: the student trained with it is scored with the cosine-distance map.
FLATTEN = "flatten"
LOSS_KINDS = (PIXEL, FLATTEN, AFFINITY)


def map_kind_of(loss: str) -> str:
    """The anomaly map that goes with a student's loss: ``"flatten"`` and ``"pixel"`` -> cosine distance."""
    if loss not in LOSS_KINDS:
        msg = f"loss must be one of {LOSS_KINDS}, got {loss!r}."
        raise ValueError(msg)
    return PIXEL if loss == FLATTEN else loss

_EPS = 1e-8
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)


def flatten_normalise(features: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w)`` features -> ``(B, h*w, C)`` unit-length rows (cosine = dot product)."""
    return F.normalize(features.flatten(2).transpose(1, 2), dim=-1, eps=_EPS)


#: from this temperature on, exp(cos / T) is used unshifted (|cos / T| <= 20: no overflow or underflow in
#: float32); below it each row is shifted by its maximum (two more passes over the block)
_FIXED_SHIFT_MIN_TEMPERATURE = 0.05


def _affinity_block(
    teacher_rows: torch.Tensor,
    student_rows: torch.Tensor,
    teacher_keys: torch.Tensor,
    teacher_ext: torch.Tensor,
    temperature: float,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``T^2 KL(P_T || P_S)`` for a block of query rows and, optionally, its gradient w.r.t. the rows.

    Args:
        teacher_rows / student_rows: ``(B, n, C)`` unit rows of the queried positions.
        teacher_keys: ``(B, C, N)`` unit teacher vectors of all positions (transposed).
        teacher_ext: ``(B, N, C + 1)``: the teacher vectors with a column of ones appended, so
            that one matrix product gives both ``sum_j e_ij t_j`` and ``sum_j e_ij``.

    Written to touch each ``n x N`` block as few times as possible (it dominates the cost):
    with ``a = cos / T``, ``e = exp(a)``, ``P t = (e_T t) / sum e_T``::

        KL_i   = T^2 [ (t_i - s_i) . (P t)_i / T - log(sum_j e_T,ij / sum_j e_S,ij) ]
        dKL_i/ds_i = T [ (Q t)_i - (P t)_i ]

    (``sum_j p_ij a_ij = t_i . (P t)_i / T`` for either row vector). Cosines lie in ``[-1, 1]``,
    so for ``T >= 0.05`` the exponents stay within ``[-20, 20]`` and need no shift (the softmax
    is shift-invariant); below that each row is shifted by its maximum (the shifts enter the
    log ratio).
    """
    inverse = 1.0 / temperature
    channels = teacher_rows.shape[-1]
    fixed = temperature >= _FIXED_SHIFT_MIN_TEMPERATURE
    exp_t, shift_t = _shifted_exp(teacher_rows, teacher_keys, inverse, fixed)
    exp_s, shift_s = _shifted_exp(student_rows, teacher_keys, inverse, fixed)
    weighted_t = torch.matmul(exp_t, teacher_ext)  # (B, n, C + 1)
    sum_t = weighted_t[..., channels]
    pt = weighted_t[..., :channels] / sum_t.unsqueeze(-1)
    if need_grad:
        weighted_s = torch.matmul(exp_s, teacher_ext)
        sum_s = weighted_s[..., channels]
        qt = weighted_s[..., :channels] / sum_s.unsqueeze(-1)
    else:
        sum_s = exp_s.sum(-1)
        qt = None
    log_ratio = torch.log(sum_t / sum_s)
    if not fixed:
        log_ratio = log_ratio + shift_t - shift_s
    kl = ((teacher_rows - student_rows) * pt).sum(-1) * temperature - log_ratio * temperature**2
    grad = (qt - pt) * temperature if qt is not None else None
    return kl, grad


def _shifted_exp(
    rows: torch.Tensor, keys: torch.Tensor, inverse: float, fixed: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``exp(rows @ keys / T)`` unshifted (``fixed``) or shifted by each row's maximum (returned)."""
    if fixed:
        return torch.matmul(rows * inverse, keys).exp_(), None
    logits = torch.matmul(rows * inverse, keys)
    shift = logits.amax(dim=-1)
    return logits.sub_(shift.unsqueeze(-1)).exp_(), shift


def _extended_keys(teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys (B, C, N), ext (B, N, C + 1))`` from unit teacher rows ``(B, N, C)``."""
    ones = teacher.new_ones(teacher.shape[0], teacher.shape[1], 1)
    return teacher.transpose(1, 2), torch.cat([teacher, ones], dim=-1)


def _exp_logits(
    rows: torch.Tensor, keys: torch.Tensor, inverse: float, shifted: bool, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``exp(rows @ keys / T)`` for a block, optionally shifted by each row's maximum.

    Returns ``(e, shift)``, the shift in natural-log units (``None`` when unshifted). In eager
    mode the logits are formed in base 2 (the ``1 / ln 2`` folded into the small ``rows``) and
    ``exp2`` is used: same values, about twice as fast as ``exp`` on CPU. Exported graphs use
    ``exp`` (ONNX has no base-2 exponential). ``out``: a reusable block buffer of the result's
    shape (eager mode only): a fresh multi-MiB block per chunk costs page faults when the allocator
    returns it to the OS in between (measured: 56 instead of 25 ms for the 64x64 scale of one image).
    """
    if torch.compiler.is_compiling():
        return _shifted_exp(rows, keys, inverse, fixed=not shifted)
    size = (*rows.shape[:-1], keys.shape[-1])
    if out is not None and out.shape == size and out.dtype == rows.dtype:
        logits = torch.matmul(rows * (inverse * _LOG2E), keys, out=out)
    else:
        logits = torch.matmul(rows * (inverse * _LOG2E), keys)
    if not shifted:
        return logits.exp2_(), None
    shift = logits.amax(dim=-1)
    return logits.sub_(shift.unsqueeze(-1)).exp2_(), shift * _LN2


def _block_buffer(like: torch.Tensor, rows: int, cols: int) -> torch.Tensor | None:
    """A ``(B, rows, cols)`` block reused by every full chunk of a loop (eager mode; ``None`` when tracing)."""
    if torch.compiler.is_compiling():
        return None
    return like.new_empty(like.shape[0], min(rows, like.shape[1]), cols)


def _teacher_block_size(chunk_size: int, num: int) -> int:
    """Side of the square teacher blocks: about ``sqrt(chunk * N)``, so a block holds no more than a
    ``chunk x N`` student block (same memory bound) while keeping the number of blocks small."""
    return min(num, max(chunk_size, math.isqrt(chunk_size * num)))


def _teacher_context(
    teacher: torch.Tensor, ext_t: torch.Tensor, keys: torch.Tensor, temperature: float, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Teacher-only terms of every row: ``(P t (B, N, C), sum_j e_T,ij (B, N), shift or None)``.

    ``e_T = exp(t t^T / T)`` is symmetric, so only the blocks on and above the diagonal are formed;
    each off-diagonal block serves its rows and (transposed) its columns - half the teacher's
    exponentials. Below ``T = 0.05`` each row is shifted by its own maximum, which breaks the
    symmetry: full rows then.

    Args:
        teacher: ``(B, N, C)`` unit rows.
        ext_t: ``(B, C + 1, N)``: ``[t, 1]`` transposed and contiguous; ``ext_t @ e^T`` gives
            ``sum_j e_ij t_j`` and ``sum_j e_ij`` for every row ``i`` of a block in one product.
        keys: ``(B, C, N)`` contiguous ``t`` transposed.
    """
    num, channels = teacher.shape[1], teacher.shape[2]
    inverse = 1.0 / temperature
    shift: torch.Tensor | None = None
    if temperature >= _FIXED_SHIFT_MIN_TEMPERATURE:
        side = _teacher_block_size(chunk_size, num)
        starts = list(range(0, num, side))
        pending: dict[int, list[torch.Tensor]] = {start: [] for start in starts}
        buffer = _block_buffer(teacher, side, side)
        for index, row in enumerate(starts):
            rows = teacher[:, row : row + side]
            for col in starts[index:]:
                block, _ = _exp_logits(rows, keys[:, :, col : col + side], inverse, shifted=False, out=buffer)
                pending[row].append(torch.matmul(ext_t[:, :, col : col + side], block.transpose(1, 2)))
                if col != row:
                    pending[col].append(torch.matmul(ext_t[:, :, row : row + side], block))
        weighted = torch.cat([torch.stack(pending[start]).sum(0) for start in starts], dim=2)  # (B, C+1, N)
    else:
        pieces, shifts = [], []
        buffer = _block_buffer(teacher, chunk_size, num)
        for row in range(0, num, chunk_size):
            block, row_shift = _exp_logits(teacher[:, row : row + chunk_size], keys, inverse, shifted=True, out=buffer)
            pieces.append(torch.matmul(ext_t, block.transpose(1, 2)))
            shifts.append(row_shift)
        weighted = torch.cat(pieces, dim=2)
        shift = torch.cat(shifts, dim=1)
    total = weighted[:, channels]
    return (weighted[:, :channels] / total.unsqueeze(1)).transpose(1, 2), total, shift


def _student_block(
    student_rows: torch.Tensor,
    teacher_rows: torch.Tensor,
    context: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    keys: torch.Tensor,
    ext_t: torch.Tensor,
    temperature: float,
    need_grad: bool,
    buffer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KL (and row gradient) of a block of student rows, given the teacher terms of those rows.

    Same formulas as :func:`_affinity_block`; ``context`` is :func:`_teacher_context` sliced to the rows.
    """
    pt, sum_t, shift_t = context
    channels = student_rows.shape[-1]
    shifted = shift_t is not None
    exp_s, shift_s = _exp_logits(student_rows, keys, 1.0 / temperature, shifted, out=buffer)
    if need_grad:
        weighted_s = torch.matmul(ext_t, exp_s.transpose(1, 2))  # (B, C + 1, n)
        sum_s = weighted_s[:, channels]
        qt = (weighted_s[:, :channels] / sum_s.unsqueeze(1)).transpose(1, 2)
    else:
        sum_s = exp_s.sum(-1)
        qt = None
    log_ratio = torch.log(sum_t / sum_s)
    if shifted:
        log_ratio = log_ratio + shift_t - shift_s
    kl = ((teacher_rows - student_rows) * pt).sum(-1) * temperature - log_ratio * temperature**2
    grad = (qt - pt) * temperature if qt is not None else None
    return kl, grad


def _chunked_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, chunk_size: int, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row KL ``(B, N)`` and, if asked, ``dKL_i/ds_i`` ``(B, N, C)``, chunk by chunk (no autograd graph)."""
    num = student.shape[1]
    keys = teacher.transpose(1, 2).contiguous()
    ext_t = torch.cat([keys, keys.new_ones(keys.shape[0], 1, num)], dim=1)
    pt, sum_t, shift_t = _teacher_context(teacher, ext_t, keys, temperature, chunk_size)
    kl_pieces, grad_pieces = [], []
    buffer = _block_buffer(student, chunk_size, num)
    for start in range(0, num, chunk_size):
        rows = slice(start, start + chunk_size)
        context = (pt[:, rows], sum_t[:, rows], None if shift_t is None else shift_t[:, rows])
        block_kl, block_grad = _student_block(
            student[:, rows], teacher[:, rows], context, keys, ext_t, temperature, need_grad, buffer
        )
        kl_pieces.append(block_kl)
        if block_grad is not None:
            grad_pieces.append(block_grad)
    return torch.cat(kl_pieces, dim=1), (torch.cat(grad_pieces, dim=1) if need_grad else None)


def affinity_kl_direct(
    teacher: torch.Tensor,
    student: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position ``T^2 KL(P_T || P_S)`` in one piece (the reference form; ``O(B N^2)`` memory).

    Written with ``log_softmax`` exactly as Eq. 4-6 read. Returns ``(B, h, w)``.
    """
    batch, _, height, width = teacher.shape
    t = flatten_normalise(teacher)
    s = flatten_normalise(student)
    keys = t.transpose(1, 2)
    log_p = torch.log_softmax(torch.matmul(t, keys) / temperature, dim=-1)
    log_q = torch.log_softmax(torch.matmul(s, keys) / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2
    return kl.reshape(batch, height, width)


class ChunkedAffinityKL(torch.autograd.Function):
    """Per-position affinity KL over chunks of query rows, with the row gradient kept, not the graph.

    ``apply(student_rows, teacher_rows, temperature, chunk_size) -> (B, N)``. Inputs are unit rows
    (:func:`flatten_normalise`); the teacher is a constant target (no gradient). ``KL_i`` depends
    on the student only through ``s_i``, so the Jacobian is block-diagonal and the forward pass
    can store ``dKL_i/ds_i`` (``B x N x C``); backward scales it by the incoming gradient.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        student: torch.Tensor,
        teacher: torch.Tensor,
        temperature: float,
        chunk_size: int,
    ) -> torch.Tensor:
        need_grad = bool(ctx.needs_input_grad[0])
        kl, row_grad = _chunked_kl(student, teacher, temperature, chunk_size, need_grad)
        if row_grad is None:
            row_grad = student.new_empty(0)
        ctx.save_for_backward(row_grad)
        return kl

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_kl: torch.Tensor) -> tuple:  # type: ignore[override]
        (row_grad,) = ctx.saved_tensors
        grad_student = row_grad * grad_kl.unsqueeze(-1) if ctx.needs_input_grad[0] else None
        return grad_student, None, None, None


def pooled_affinity_kl(
    teacher: torch.Tensor,
    student: torch.Tensor,
    key_pool: int,
    temperature: float = 1.0,
    chunk_size: int | None = 512,
) -> torch.Tensor:
    """Eq. 6 with the keys pooled: every query position, ``N / key_pool^2`` keys. ``(B, h, w)``.

    An inference-time approximation of :func:`affinity_kl` (a deviation from the paper, off by
    default; see ``docs/models/dskd.md`` for its measured error and effect). The keys ``j`` are
    the means of the unit teacher vectors over ``key_pool x key_pool`` cells (not re-normalised),
    so a query's logit to a cell is the *mean* of its exact logits to the cell's positions, and
    ``log sum_{j in cell} exp(a_ij)`` is replaced by ``log(key_pool^2) + mean_j a_ij``. The
    constant cancels in the softmax. The error of each cell's term is
    ``log mean_j exp(a_ij - mean a) in [0, (max_j a_ij - min_j a_ij) / T]``, about half the
    variance of the cell's logits: small where neighbouring teacher vectors agree. Both the
    teacher's and the student's distributions are approximated the same way (the student's
    logits use the same pooled teacher keys, Eq. 5), so much of it cancels in the KL. Queries
    stay at full resolution: the map keeps its size and outline. Cost: ``N^2 / key_pool^2``
    exponentials for each of teacher and student (exact: ``N^2 / 2`` + ``N^2``).

    Args:
        teacher: teacher features ``(B, C, h, w)``; ``h`` and ``w`` multiples of ``key_pool``.
        student: student features, same shape.
        key_pool: side of the pooled cells (``1`` = exact, :func:`affinity_kl`).
        temperature: softmax temperature ``T``.
        chunk_size: query positions per chunk (memory ``O(B * chunk * N / key_pool^2)``).
    """
    if key_pool == 1:
        return affinity_kl(teacher, student, temperature, chunk_size)
    if key_pool < 1:
        msg = f"key_pool must be a positive integer, got {key_pool}."
        raise ValueError(msg)
    if teacher.shape != student.shape:
        msg = f"teacher and student features must have the same shape, got {tuple(teacher.shape)} and {tuple(student.shape)}."
        raise ValueError(msg)
    batch, channels, height, width = teacher.shape
    if height % key_pool or width % key_pool:
        msg = (
            f"key_pool={key_pool} must divide the feature grid {height}x{width}; choose a divisor or 1 (exact)."
        )
        raise ValueError(msg)
    num = height * width
    chunk = num if not chunk_size or chunk_size <= 0 else min(int(chunk_size), num)
    if torch.compiler.is_compiling():
        chunk = max(chunk, -(-num // 4))  # a small exported graph (see affinity_kl)
    t = flatten_normalise(teacher)
    s = flatten_normalise(student)
    unit_map = t.transpose(1, 2).reshape(batch, channels, height, width)
    keys = F.avg_pool2d(unit_map, key_pool).flatten(2).contiguous()  # (B, C, M): mean unit vectors
    ext = torch.cat([keys.transpose(1, 2), keys.new_ones(batch, keys.shape[-1], 1)], dim=-1)  # (B, M, C + 1)
    pieces = [
        _affinity_block(t[:, i : i + chunk], s[:, i : i + chunk], keys, ext, temperature, need_grad=False)[0]
        for i in range(0, num, chunk)
    ]
    return torch.cat(pieces, dim=1).reshape(batch, height, width)


def affinity_kl(
    teacher: torch.Tensor,
    student: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = 512,
) -> torch.Tensor:
    """Per-position contextual-affinity KL (Eq. 6) of one scale, ``(B, h, w)``.

    Args:
        teacher: teacher features ``(B, C, h, w)``.
        student: student features, same shape.
        temperature: softmax temperature ``T`` (paper: 1).
        chunk_size: query positions per chunk; ``None`` or ``<= 0`` = all positions in one chunk
            (the ``N x N`` blocks at once). Equal to :func:`affinity_kl_direct` up to float rounding.

    With a gradient to the student (training) the chunks run in :class:`ChunkedAffinityKL`,
    which keeps only a features-sized row gradient for backward. If the teacher features need a
    gradient too, each chunk is checkpointed instead (same memory bound, recomputed in backward).
    Without gradient (inference, export) the chunks are plain tensor operations.
    """
    if teacher.shape != student.shape:
        msg = f"teacher and student features must have the same shape, got {tuple(teacher.shape)} and {tuple(student.shape)}."
        raise ValueError(msg)
    if temperature <= 0:
        msg = f"temperature must be positive, got {temperature}."
        raise ValueError(msg)
    batch, _, height, width = teacher.shape
    num = height * width
    chunk = num if not chunk_size or chunk_size <= 0 else min(int(chunk_size), num)
    if torch.compiler.is_compiling():
        # Exporting (ONNX / OpenVINO) or compiling: the Python loops unroll into the graph; 16 chunks
        # (136 teacher blocks) at 64 x 64 features make thousands of nodes and minutes of export.
        # At most 4 chunks per scale (10 symmetric teacher blocks) keep the graph small.
        chunk = max(chunk, -(-num // 4))
    t = flatten_normalise(teacher)
    s = flatten_normalise(student)
    grad_mode = torch.is_grad_enabled()
    if grad_mode and teacher.requires_grad:
        keys, ext = _extended_keys(t)
        pieces = [
            checkpoint(_kl_only, t[:, i : i + chunk], s[:, i : i + chunk], keys, ext, temperature, use_reentrant=False)
            for i in range(0, num, chunk)
        ]
        kl = torch.cat(pieces, dim=1)
    elif grad_mode and s.requires_grad:
        kl = ChunkedAffinityKL.apply(s, t, float(temperature), chunk)
    else:  # inference / export: plain ops, chunked
        kl = _chunked_kl(s, t, temperature, chunk, need_grad=False)[0]
    return kl.reshape(batch, height, width)


def _kl_only(
    teacher_rows: torch.Tensor, student_rows: torch.Tensor, keys: torch.Tensor, ext: torch.Tensor, temperature: float
) -> torch.Tensor:
    return _affinity_block(teacher_rows, student_rows, keys, ext, temperature, need_grad=False)[0]


def affinity_kl_maps(
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    temperature: float = 1.0,
    chunk_size: int | None = 512,
    key_pools: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Per-scale affinity KL maps, each ``(B, 1, h_l, w_l)`` (the global student's ``M_glo^l``).

    ``key_pools``: per scale, the key pooling of :func:`pooled_affinity_kl` (``None`` = exact everywhere).
    """
    pools = list(key_pools) if key_pools is not None else [1] * len(teacher_features)
    return [
        pooled_affinity_kl(teacher, student, pool, temperature, chunk_size).unsqueeze(1)
        for teacher, student, pool in zip(teacher_features, student_features, pools, strict=True)
    ]


def student_score_maps(
    kind: str,
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    temperature: float = 1.0,
    chunk_size: int | None = 512,
    key_pools: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Per-scale maps of one student: cosine distance (``"pixel"``, Eq. 1) or affinity KL (``"affinity"``, Eq. 6)."""
    if kind == PIXEL:
        return cosine_distance_maps(teacher_features, student_features)
    if kind == AFFINITY:
        return affinity_kl_maps(teacher_features, student_features, temperature, chunk_size, key_pools)
    msg = f"map kind must be one of {MAP_KINDS}, got {kind!r}."
    raise ValueError(msg)


class DskdScoreFusion(nn.Module):
    """Eq. 8: standardise each student's map with its statistics, add, smooth; score = maximum.

    ``M = (M_loc - mu_loc) / sigma_loc + (M_glo - mu_glo) / sigma_glo``, then a Gaussian filter
    (sigma 4, as RD), then the image score is the maximum of the filtered map. The statistics are
    buffers of the owning model (``mean`` / ``std`` per student, float64) so they are saved in
    checkpoints and constant-folded into exported graphs.

    Each student's map comes either at the output size or as its per-scale maps (before upsampling):
    upsampling, adding and smoothing then run as :class:`~anomalib_dskd.components.rd.UpsampleSmooth`'s
    matrix products, and no map is formed at full size before the last product. The operator is linear
    and preserves constants (normalised kernel, reflect padding, bilinear weights summing to 1), so
    ``smooth((M - mu) / sigma) = (smooth(M) - mu) / sigma`` and ``blur(M) = blur(z_loc) + blur(z_glo)``
    exactly: :meth:`forward` returns the smoothed per-student maps too, and they add up to the final map.

    Args:
        sigma: Gaussian sigma in pixels; ``0`` disables smoothing.
    """

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.smooth = UpsampleSmooth(sigma=sigma)  # the output size comes with each call

    def forward(
        self,
        maps: Sequence[torch.Tensor | Sequence[torch.Tensor]],
        means: Sequence[torch.Tensor],
        stds: Sequence[torch.Tensor],
        size: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return ``(anomaly_map, [smoothed standardised map per student])``, maps ``(B, 1, H, W)``.

        Args:
            maps: per student, a ``(B, 1, H, W)`` map or the list of its per-scale maps ``(B, 1, h_l, w_l)``.
            means / stds: per student, Eq. 8's statistics.
            size: output ``(H, W)``; default: the size of the first full-size map given.
        """
        if size is None:
            full = [entry for entry in maps if isinstance(entry, torch.Tensor)]
            if not full:
                msg = "DskdScoreFusion needs the output size when every student's map comes as per-scale maps."
                raise ValueError(msg)
            size = tuple(full[0].shape[-2:])
        parts = []
        for entry, mean, std in zip(maps, means, stds, strict=True):
            scale_maps = [entry] if isinstance(entry, torch.Tensor) else list(entry)
            smoothed = self.smooth(scale_maps, size)
            parts.append((smoothed - mean.to(smoothed.dtype)) / std.to(smoothed.dtype))
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total, parts


def upsampled_student_map(
    kind: str,
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    image_size: tuple[int, int],
    temperature: float = 1.0,
    chunk_size: int | None = 512,
    key_pools: Sequence[int] | None = None,
) -> torch.Tensor:
    """One student's ``M = sum_l upsample(M^l)`` at the input size, ``(B, 1, H, W)`` (before standardisation)."""
    maps = student_score_maps(kind, teacher_features, student_features, temperature, chunk_size, key_pools)
    return UpsampleSmooth(image_size, sigma=0)(maps)
