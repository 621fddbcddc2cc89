"""LayerNorm over whole samples as Triton kernels: the forward and the backward of native_layer_norm, for rows of
hundreds of thousands of values, optionally with the LeakyReLU that follows it fused in.

PyTorch's own kernels give each row (here: each sample, C*H*W values) one thread block. A GAN batch has 128 rows
of up to 200,704 values, so a few blocks stream the whole tensor and the GPU's memory bandwidth is mostly idle.
Here every row is cut into chunks: a kernel writes per-chunk partial sums, a few small torch operations combine
them into each row's statistics, and a second kernel does the elementwise work in one pass. The column sums of
the weight and bias gradients are taken over groups of rows the same way.

    y, mean, rstd = forward(x, shape, weight, bias, eps)                      # as torch.native_layer_norm
    gx, gw, gb = backward(g, x, shape, mean, rstd, weight, bias, mask)      # as aten.native_layer_norm_backward
    dg, dx, dw = double_backward(a, a_w, a_b, g, x, gx, shape, mean, rstd, weight, bias, need)  # backward's derivative

With row_kernels=True given to each, the few numbers per row (the statistics combined from the chunks' partial
sums, and the double backward's scalars) are computed by one small Triton kernel instead of a dozen small torch
operations: the same formulas in fewer launches.

With slope=s given to each, the kernels compute leaky_relu(layer_norm(x), s) and its derivatives instead: the forward
writes the activated output, and the backward kernels, given the gradient g of that output, take the LeakyReLU's
factor (1 where the normalized y = xh * w + b is positive, else s) from x, w and b as they read them. That saves the
activation's own passes over the tensor: its forward, its backward, and in the double backward its derivative (the
factor again) and the zeros autograd adds for its input.

x and g are contiguous; a channels_last activation is passed as its NHWC view (layer_norm.LayerNorm does that), whose
per-sample statistics are the same. Sums are taken in float32 (float64 for float64 inputs, which the gradient
checks use). With TRITON_INTERPRET=1 set before this module is imported, the kernels run on the CPU (the tests).
"""
import functools
import math

import torch
import triton
import triton.language as tl

CHUNK = 4096  # values of one row a program reduces or writes
ROW_GROUP = 16  # rows a program sums for the weight and bias gradients


@triton.jit
def _row_chunk(d, BLOCK: tl.constexpr):
    """(row, chunk, cols, inside, at): this program's chunk of its row; at, the chunk's offsets in the tensor."""
    row, chunk = tl.program_id(0), tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    return row, chunk, cols, cols < d, row.to(tl.int64) * d + cols


@triton.jit
def _group_row(group, i, n, d, cols, inside, ROWS: tl.constexpr):
    """(row, valid, at) of the i-th row of a group of ROWS rows: past the last row, valid is all false and row
    the last one (its loads are masked)."""
    row = group * ROWS + i
    last = tl.minimum(row, n - 1)
    return last, inside & (row < n), last.to(tl.int64) * d + cols


@triton.jit
def _load(ptr, offsets, inside, ACC: tl.constexpr):
    return tl.load(ptr + offsets, mask=inside, other=0.0).to(ACC)


@triton.jit
def _normalized(x_ptr, mean_ptr, rstd_ptr, row, at, inside, ACC: tl.constexpr):
    """xh = (x - mean) * rstd over the chunk."""
    return (_load(x_ptr, at, inside, ACC) - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row)


@triton.jit
def _leaky_relu_factor(xh, w_ptr, b_ptr, slope_ptr, cols, inside, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       ACC: tl.constexpr):
    """The LeakyReLU's derivative at y = xh * w + b, computed as the forward computes y: 1 where y > 0, else the
    slope (read from a tensor of the sums' dtype: a float argument would be rounded to float32)."""
    y = xh
    if HAS_W:
        y = y * _load(w_ptr, cols, inside, ACC)
    if HAS_B:
        y = y + _load(b_ptr, cols, inside, ACC)
    return tl.where(y > 0, 1.0, tl.load(slope_ptr).to(ACC))


@triton.jit
def _output_grad(g_ptr, xh, w_ptr, b_ptr, slope_ptr, at, cols, inside, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                 ACT: tl.constexpr, ACC: tl.constexpr):
    """The gradient of the LayerNorm's output: g, or with ACT g times the LeakyReLU's derivative."""
    g = _load(g_ptr, at, inside, ACC)
    if ACT:
        g = g * _leaky_relu_factor(xh, w_ptr, b_ptr, slope_ptr, cols, inside, HAS_W, HAS_B, ACC)
    return g


@triton.jit
def _chunk_moments(x_ptr, part_ptr, d, chunks, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """part[row, chunk] = (sum, sum of squared deviations from the chunk's own mean) of one chunk of one row."""
    row, chunk, cols, inside, at = _row_chunk(d, BLOCK)
    x = _load(x_ptr, at, inside, ACC)
    count = tl.minimum(d - chunk * BLOCK, BLOCK)
    total = tl.sum(x, axis=0)
    dev = tl.where(inside, x - total / count, 0.0)
    out = part_ptr + (row * chunks + chunk) * 2
    tl.store(out, total)
    tl.store(out + 1, tl.sum(dev * dev, axis=0))


@triton.jit
def _normalize(x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, slope_ptr, y_ptr, d, HAS_W: tl.constexpr,
               HAS_B: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """y = (x - mean) * rstd * w + b over one chunk of one row; with ACT, leaky_relu(y)."""
    row, chunk, cols, inside, at = _row_chunk(d, BLOCK)
    x = _load(x_ptr, at, inside, ACC)
    y = (x - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row)
    if HAS_W:
        y = y * _load(w_ptr, cols, inside, ACC)
    if HAS_B:
        y = y + _load(b_ptr, cols, inside, ACC)
    if ACT:
        y = tl.where(y > 0, y, y * tl.load(slope_ptr).to(ACC))
    tl.store(y_ptr + at, y.to(y_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _chunk_grad_sums(g_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, slope_ptr, part_ptr, d, chunks,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr,
                     ACC: tl.constexpr):
    """part[row, chunk] = (sum of gh, sum of gh * xh) over one chunk, gh = g * w and xh the normalized x."""
    row, chunk, cols, inside, at = _row_chunk(d, BLOCK)
    xh = _normalized(x_ptr, mean_ptr, rstd_ptr, row, at, inside, ACC)
    gh = _output_grad(g_ptr, xh, w_ptr, b_ptr, slope_ptr, at, cols, inside, HAS_W, HAS_B, ACT, ACC)
    if HAS_W:
        gh = gh * _load(w_ptr, cols, inside, ACC)
    out = part_ptr + (row * chunks + chunk) * 2
    tl.store(out, tl.sum(gh, axis=0))
    tl.store(out + 1, tl.sum(gh * xh, axis=0))


@triton.jit
def _input_grad(g_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, slope_ptr, sums_ptr, gx_ptr, d, HAS_W: tl.constexpr,
                HAS_B: tl.constexpr, ACT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """gx = rstd * (gh - a - xh * c), a and c the row's means of gh and gh * xh (sums holds the row's sums)."""
    row, chunk, cols, inside, at = _row_chunk(d, BLOCK)
    rstd = tl.load(rstd_ptr + row)
    xh = _normalized(x_ptr, mean_ptr, rstd_ptr, row, at, inside, ACC)
    gh = _output_grad(g_ptr, xh, w_ptr, b_ptr, slope_ptr, at, cols, inside, HAS_W, HAS_B, ACT, ACC)
    if HAS_W:
        gh = gh * _load(w_ptr, cols, inside, ACC)
    gx = rstd * (gh - tl.load(sums_ptr + row * 2) / d - xh * (tl.load(sums_ptr + row * 2 + 1) / d))
    tl.store(gx_ptr + at, gx.to(gx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _column_sums(g_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, slope_ptr, gw_ptr, gb_ptr, n, d,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                 ACC: tl.constexpr):
    """gw[group, cols] = sum of g * xh and gb[group, cols] = sum of g over one group of ROWS rows."""
    group = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < d
    sum_gxh = tl.zeros([BLOCK], dtype=ACC)
    sum_g = tl.zeros([BLOCK], dtype=ACC)
    for i in range(ROWS):
        row, valid, at = _group_row(group, i, n, d, cols, inside, ROWS)
        xh = _normalized(x_ptr, mean_ptr, rstd_ptr, row, at, valid, ACC)
        g = _output_grad(g_ptr, xh, w_ptr, b_ptr, slope_ptr, at, cols, valid, HAS_W, HAS_B, ACT, ACC)
        sum_gxh += g * xh
        sum_g += g
    tl.store(gw_ptr + group * d + cols, sum_gxh, mask=inside)
    tl.store(gb_ptr + group * d + cols, sum_g, mask=inside)


@triton.jit
def _row_moments(part_ptr, eps_ptr, mean_ptr, rstd_ptr, d, chunks, block, CHUNKS: tl.constexpr, ACC: tl.constexpr):
    """mean and rstd of one row from its chunks' (sum, squared deviations), combined as forward's torch operations
    combine them."""
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS)
    inside = c < chunks
    at = part_ptr + (row * chunks + c) * 2
    sums = tl.load(at, mask=inside, other=0.0).to(ACC)
    squares = tl.load(at + 1, mask=inside, other=0.0).to(ACC)
    counts = tl.where(inside, tl.minimum(d - c * block, block), 1).to(ACC)
    mean = tl.sum(sums, axis=0) / d
    deviation = tl.where(inside, sums / counts - mean, 0.0)
    m2 = tl.sum(squares, axis=0) + tl.sum(counts * deviation * deviation, axis=0)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, 1.0 / tl.sqrt(m2 / d + tl.load(eps_ptr).to(ACC)))


def _acc_dtype(x):
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def _layout(x, shape):
    """(rows, values per row, block, chunks) of x normalized over its last len(shape) dims."""
    d = math.prod(shape)
    block = min(CHUNK, triton.next_power_of_2(d))
    return x.numel() // d, d, block, triton.cdiv(d, block)


def _stats_shape(x, shape):
    return x.shape[:x.dim() - len(shape)] + (1,) * len(shape)


@functools.lru_cache(maxsize=None)
def _constant(value, dtype, device):
    """A one-value tensor, made once per value, dtype and device (by a graphed step's eager calls, before its
    capture): a float argument of a kernel would be rounded to float32."""
    return torch.full((1,), value, dtype=dtype, device=device)


def _pointers(x, weight, bias, slope):
    """The kernels' (w, b, slope) pointers: an absent one stands in as x, its kernel branch compiled out."""
    slope_t = x if slope is None else _constant(slope, _acc_dtype(x)[0], x.device)
    return weight if weight is not None else x, bias if bias is not None else x, slope_t


def _row_statistics(part, d, block, eps, row_kernels):
    """(mean, rstd) of each row from its chunks' (sum, squared deviations) in part (rows, chunks, 2): Chan's
    combination of the chunks' means and squared deviations, no cancellation for large means."""
    n, chunks, _ = part.shape
    if row_kernels:
        mean, rstd = torch.empty(2, n, device=part.device, dtype=part.dtype)
        _row_moments[(n,)](part, _constant(eps, part.dtype, part.device), mean, rstd, d, chunks, block,
                           CHUNKS=triton.next_power_of_2(chunks), ACC=_acc_dtype(part)[1])
        return mean, rstd
    # Values per chunk: block, and what is left in the last (made on the device: a CUDA graph may capture this)
    counts = (d - block * torch.arange(chunks, device=part.device, dtype=part.dtype)).clamp_(max=block)
    sums, squares = part.unbind(2)
    mean = sums.sum(1, keepdim=True) / d
    m2 = squares.sum(1) + (counts * (sums / counts - mean) ** 2).sum(1)
    return mean.view(n), torch.rsqrt(m2 / d + eps)


def forward(x, shape, weight, bias, eps, slope=None, row_kernels=False):
    """(y, mean, rstd) as torch.native_layer_norm(x, shape, weight, bias, eps), y activated by
    leaky_relu(y, slope) when a slope is given; x contiguous."""
    x, weight, bias = (None if t is None else t.contiguous() for t in (x, weight, bias))
    n, d, block, chunks = _layout(x, shape)
    acc, acc_tl = _acc_dtype(x)
    part = torch.empty(n, chunks, 2, device=x.device, dtype=acc)
    _chunk_moments[(n, chunks)](x, part, d, chunks, BLOCK=block, ACC=acc_tl)
    mean, rstd = _row_statistics(part, d, block, eps, row_kernels)
    y = torch.empty_like(x)
    w, b, slope_t = _pointers(x, weight, bias, slope)
    _normalize[(n, chunks)](x, w, b, mean, rstd, slope_t, y, d, HAS_W=weight is not None, HAS_B=bias is not None,
                            ACT=slope is not None, BLOCK=block, ACC=acc_tl)
    stats = _stats_shape(x, shape)
    return y, mean.view(stats), rstd.view(stats)


def backward(g, x, shape, mean, rstd, weight, bias, mask, slope=None, row_kernels=False):
    """(gx, gw, gb) as aten.native_layer_norm_backward: the gradients that mask asks for, else None. With a slope, g
    is the gradient of the activated output, as forward(..., slope) made it. row_kernels changes nothing here: the
    rows' sums are one operation either way."""
    n, d, block, chunks = _layout(x, shape)
    acc, acc_tl = _acc_dtype(x)
    g, x = g.contiguous(), x.contiguous()
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    mean, rstd = mean.reshape(n), rstd.reshape(n)
    w, b, slope_t = _pointers(x, weight, bias, slope)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=slope is not None, ACC=acc_tl)
    gx = gw = gb = None
    if mask[0]:
        part = torch.empty(n, chunks, 2, device=x.device, dtype=acc)
        _chunk_grad_sums[(n, chunks)](g, x, w, b, mean, rstd, slope_t, part, d, chunks, BLOCK=block, **flags)
        gx = torch.empty_like(x)
        _input_grad[(n, chunks)](g, x, w, b, mean, rstd, slope_t, part.sum(1), gx, d, BLOCK=block, **flags)
    if (mask[1] and weight is not None) or (mask[2] and bias is not None):
        groups, col_block = triton.cdiv(n, ROW_GROUP), min(1024, block)
        sums_gw = torch.empty(groups, d, device=x.device, dtype=acc)
        sums_gb = torch.empty(groups, d, device=x.device, dtype=acc)
        _column_sums[(triton.cdiv(d, col_block), groups)](g, x, w, b, mean, rstd, slope_t, sums_gw, sums_gb, n, d,
                                                          ROWS=ROW_GROUP, BLOCK=col_block, **flags)
        if mask[1] and weight is not None:
            gw = sums_gw.sum(0).view(weight.shape).to(weight.dtype)
        if mask[2] and bias is not None:
            gb = sums_gb.sum(0).view(bias.shape).to(bias.dtype)
    return gx, gw, gb


# ---------------------------------------------------------------------------------------------------------
# The derivative of the backward (the gradient penalty's double backward), in three passes instead of about 20:
# with xh the normalized x, gh = g * w, <.> a row's mean and a, a_w the gradients arriving for gx and gw:
#   q  = rstd * (a - <a> - xh <a xh>)                         dg = q * w + xh * a_w (+ a_b)      dw = sum of g * q
#   u  = -rstd <gh xh> a - rstd <a xh> gh + g a_w             dx = rstd * (u - <u> - xh <u xh>) - rstd <a gx> xh

@triton.jit
def _chunk_double_sums(a_ptr, g_ptr, x_ptr, gx_ptr, w_ptr, b_ptr, aw_ptr, mean_ptr, rstd_ptr, slope_ptr, part_ptr, d,
                       chunks, HAS_A: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_AW: tl.constexpr,
                       ACT: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """part[row, chunk] = sums over one chunk of a, a xh, gh, gh xh, a gx, g a_w, g a_w xh (0 where absent)."""
    row, chunk, cols, inside, at = _row_chunk(d, BLOCK)
    xh = _normalized(x_ptr, mean_ptr, rstd_ptr, row, at, inside, ACC)
    g = _output_grad(g_ptr, xh, w_ptr, b_ptr, slope_ptr, at, cols, inside, HAS_W, HAS_B, ACT, ACC)
    out = part_ptr + (row * chunks + chunk) * 7
    if HAS_A:
        a = _load(a_ptr, at, inside, ACC)
        gh = g
        if HAS_W:
            gh = g * _load(w_ptr, cols, inside, ACC)
        tl.store(out, tl.sum(a, axis=0))
        tl.store(out + 1, tl.sum(a * xh, axis=0))
        tl.store(out + 2, tl.sum(gh, axis=0))
        tl.store(out + 3, tl.sum(gh * xh, axis=0))
        tl.store(out + 4, tl.sum(a * _load(gx_ptr, at, inside, ACC), axis=0))
    if HAS_AW:
        gaw = g * _load(aw_ptr, cols, inside, ACC)
        tl.store(out + 5, tl.sum(gaw, axis=0))
        tl.store(out + 6, tl.sum(gaw * xh, axis=0))


@triton.jit
def _double_grads(a_ptr, g_ptr, x_ptr, w_ptr, b_ptr, aw_ptr, ab_ptr, mean_ptr, rstd_ptr, slope_ptr, row_ptr, dx_ptr,
                  dg_ptr, d, HAS_A: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_AW: tl.constexpr,
                  HAS_AB: tl.constexpr, ACT: tl.constexpr, WANT_DX: tl.constexpr, WANT_DG: tl.constexpr,
                  BLOCK: tl.constexpr, ACC: tl.constexpr):
    """dx and dg over one chunk of one row; row_ptr holds the row's <a>, <a xh>, s1, s2, <u>, <u xh>, <a gx>. With
    ACT, g is the activated output's gradient times the LeakyReLU's factor, and dg goes back through that factor
    (which is constant in x where it has a derivative)."""
    row, chunk, cols, inside, at = _row_chunk(d, BLOCK)
    rstd = tl.load(rstd_ptr + row)
    xh = _normalized(x_ptr, mean_ptr, rstd_ptr, row, at, inside, ACC)
    g = _load(g_ptr, at, inside, ACC)
    if ACT:
        factor = _leaky_relu_factor(xh, w_ptr, b_ptr, slope_ptr, cols, inside, HAS_W, HAS_B, ACC)
        g = g * factor
    stats = row_ptr + row * 7
    w = tl.full([BLOCK], 1.0, ACC)
    if HAS_W:
        w = _load(w_ptr, cols, inside, ACC)
    u = tl.zeros([BLOCK], dtype=ACC)
    dg = tl.zeros([BLOCK], dtype=ACC)
    if HAS_A:
        a = _load(a_ptr, at, inside, ACC)
        dg = rstd * (a - tl.load(stats) - xh * tl.load(stats + 1)) * w
        u = tl.load(stats + 2) * a + tl.load(stats + 3) * g * w
    if HAS_AW:
        a_w = _load(aw_ptr, cols, inside, ACC)
        u += g * a_w
        dg += xh * a_w
    if HAS_AB:
        dg += _load(ab_ptr, cols, inside, ACC)
    if WANT_DX:
        dx = rstd * (u - tl.load(stats + 4) - xh * tl.load(stats + 5) - xh * tl.load(stats + 6))
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=inside)
    if WANT_DG:
        if ACT:
            dg = dg * factor
        tl.store(dg_ptr + at, dg.to(dg_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _column_double_sums(a_ptr, g_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, slope_ptr, row_ptr, dw_ptr, n, d,
                        HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK: tl.constexpr, ACC: tl.constexpr):
    """dw[group, cols] = sum of g * q over one group of rows, q = rstd * (a - <a> - xh <a xh>)."""
    group = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < d
    total = tl.zeros([BLOCK], dtype=ACC)
    for i in range(ROWS):
        row, valid, at = _group_row(group, i, n, d, cols, inside, ROWS)
        rstd = tl.load(rstd_ptr + row)
        xh = _normalized(x_ptr, mean_ptr, rstd_ptr, row, at, valid, ACC)
        a = _load(a_ptr, at, valid, ACC)
        g = _output_grad(g_ptr, xh, w_ptr, b_ptr, slope_ptr, at, cols, valid, HAS_W, HAS_B, ACT, ACC)
        q = rstd * (a - tl.load(row_ptr + row * 7) - xh * tl.load(row_ptr + row * 7 + 1))
        total += g * q
    tl.store(dw_ptr + group * d + cols, total, mask=inside)


@triton.jit
def _double_scalars(part_ptr, rstd_ptr, rows_ptr, d, chunks, CHUNKS: tl.constexpr, ACC: tl.constexpr):
    """rows[row] = <a>, <a xh>, s1, s2, <u>, <u xh>, <a gx> from the row's chunk sums, as _double_row_scalars's torch
    operations compute them."""
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS)
    inside = c < chunks
    at = part_ptr + (row * chunks + c) * 7
    s_a = tl.sum(tl.load(at, mask=inside, other=0.0).to(ACC), axis=0) / d
    s_axh = tl.sum(tl.load(at + 1, mask=inside, other=0.0).to(ACC), axis=0) / d
    s_gh = tl.sum(tl.load(at + 2, mask=inside, other=0.0).to(ACC), axis=0) / d
    s_ghxh = tl.sum(tl.load(at + 3, mask=inside, other=0.0).to(ACC), axis=0) / d
    s_agx = tl.sum(tl.load(at + 4, mask=inside, other=0.0).to(ACC), axis=0) / d
    s_gaw = tl.sum(tl.load(at + 5, mask=inside, other=0.0).to(ACC), axis=0) / d
    s_gawxh = tl.sum(tl.load(at + 6, mask=inside, other=0.0).to(ACC), axis=0) / d
    rstd = tl.load(rstd_ptr + row)
    s1, s2 = -rstd * s_ghxh, -rstd * s_axh
    out = rows_ptr + row * 7
    tl.store(out, s_a)
    tl.store(out + 1, s_axh)
    tl.store(out + 2, s1)
    tl.store(out + 3, s2)
    tl.store(out + 4, s1 * s_a + s2 * s_gh + s_gaw)
    tl.store(out + 5, s1 * s_axh + s2 * s_ghxh + s_gawxh)
    tl.store(out + 6, s_agx)


def _double_row_scalars(part, rstd, d, row_kernels):
    """Each row's scalars for the double backward's elementwise pass, (rows, 7): <a>, <a xh>, s1, s2, <u>, <u xh>,
    <a gx>, from the chunks' sums in part (rows, chunks, 7)."""
    n, chunks, _ = part.shape
    if row_kernels:
        rows = torch.empty(n, 7, device=part.device, dtype=part.dtype)
        _double_scalars[(n,)](part, rstd, rows, d, chunks, CHUNKS=triton.next_power_of_2(chunks),
                              ACC=_acc_dtype(part)[1])
        return rows
    s_a, s_axh, s_gh, s_ghxh, s_agx, s_gaw, s_gawxh = (part.sum(1) / d).unbind(1)
    s1, s2 = -rstd * s_ghxh, -rstd * s_axh
    u_mean = s1 * s_a + s2 * s_gh + s_gaw
    u_xh = s1 * s_axh + s2 * s_ghxh + s_gawxh
    return torch.stack([s_a, s_axh, s1, s2, u_mean, u_xh, s_agx], 1).contiguous()


def double_backward(a, a_w, a_b, g, x, gx, shape, mean, rstd, weight, bias, need, slope=None, row_kernels=False):
    """(dg, dx, dw): the derivative of backward's (gx, gw, gb) taken along (a, a_w, a_b) (each may be None), with
    respect to g, x and weight, for those that need asks for (else None). weight and bias may be None; with a slope,
    that of backward(..., slope) (bias then enters through the LeakyReLU's factor, which has no derivative)."""
    n, d, block, chunks = _layout(x, shape)
    acc, acc_tl = _acc_dtype(x)
    a, g, x, gx = (None if t is None else t.contiguous() for t in (a, g, x, gx))
    weight, bias, a_w, a_b = (None if t is None else t.contiguous() for t in (weight, bias, a_w, a_b))
    mean, rstd = mean.reshape(n).to(acc), rstd.reshape(n).to(acc)
    any_ptr = x  # stands for an absent tensor: its kernel branch is compiled out
    w, b, slope_t = _pointers(x, weight, bias, slope)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=slope is not None, ACC=acc_tl)
    part = torch.zeros(n, chunks, 7, device=x.device, dtype=acc)
    _chunk_double_sums[(n, chunks)](any_ptr if a is None else a, g, x, any_ptr if gx is None else gx, w, b,
                                    any_ptr if a_w is None else a_w, mean, rstd, slope_t, part, d, chunks,
                                    HAS_A=a is not None, HAS_AW=a_w is not None, BLOCK=block, **flags)
    rows = _double_row_scalars(part, rstd, d, row_kernels)
    dx = torch.empty_like(x) if need[1] else None
    dg = torch.empty_like(g) if need[0] else None
    _double_grads[(n, chunks)](any_ptr if a is None else a, g, x, w, b, any_ptr if a_w is None else a_w,
                               any_ptr if a_b is None else a_b, mean, rstd, slope_t, rows, any_ptr if dx is None else dx,
                               any_ptr if dg is None else dg, d, HAS_A=a is not None, HAS_AW=a_w is not None,
                               HAS_AB=a_b is not None, WANT_DX=dx is not None, WANT_DG=dg is not None, BLOCK=block,
                               **flags)
    dw = None
    if need[2] and weight is not None and a is not None:
        groups, col_block = triton.cdiv(n, ROW_GROUP), min(1024, block)
        sums = torch.empty(groups, d, device=x.device, dtype=acc)
        _column_double_sums[(triton.cdiv(d, col_block), groups)](a, g, x, w, b, mean, rstd, slope_t, rows, sums, n, d,
                                                                 ROWS=ROW_GROUP, BLOCK=col_block, **flags)
        dw = sums.sum(0).view(weight.shape).to(weight.dtype)
    return dg, dx, dw
