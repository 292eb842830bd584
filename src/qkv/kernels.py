"""PyTorch functions computed a faster way on the CPU: ``F.linear`` (also followed by a ReLU),
``F.dropout``, ``torch.topk`` (also as ``argmax``); and a scope, `frozen_weights`, in which weights are
prepared once for many products.

Same results (up to summation order for `linear`, a different draw of random numbers for `dropout`, and
which of equal values comes first for `topk`),
measured faster by ``benchmarks/cpu_kernels.py`` on this project's machine (AMD EPYC, Zen 5, AVX-512
with bf16) and with its libraries held to AVX2 (`qkv.hardware.AVX2_ENVIRONMENT`, as on a Zen 3): there
every kernel below was faster too, fp32 linear 1.03-1.55x (packed: 1.21-2.18x), topk 3.2-3.6x, argmax
of 32 rows 1.67x, dropout 2.9-4.0x. Everything else, and every other device, calls PyTorch's own
function. Set ``QKV_FAST_KERNELS=0`` in the environment before importing qkv to call PyTorch's
functions everywhere.

Nothing here assumes an instruction set: each oneDNN path is tried once per dtype, at its first use
(`onednn_linear_works`, `packing_works`), and where it fails or computes differently (bf16 on a CPU
without AVX-512 or AVX-NE-CONVERT, a build of PyTorch without oneDNN) PyTorch's own function runs
instead, with the same results.

**linear.** PyTorch computes fp32 matrix products on the CPU with MKL's sgemm, which is known to take
slower code paths on processors that are not Intel's; on Zen 5 it ran at half the speed of oneDNN, the
other library in every x86 build of PyTorch (``torch.ops.mkldnn``), which PyTorch already uses for bf16.
Two threads, fp32, decoding shapes of the small model at batch 32, beam 5:

    (160 x 256) @ (256 x 8000), the output projection     MKL 3.66 ms   oneDNN 1.81 ms
    (160 x 256) @ (256 x 1024), the first FFN matrix      MKL 0.42 ms   oneDNN 0.20 ms

oneDNN computes in fp32 too: its results differ from MKL's only in summation order (tested against
float64). Training takes it as well, through an autograd function whose two gradients are again oneDNN
linear maps (a (4096 x 256) @ (256 x 1024) product: 10.9 ms with MKL, 4.8 ms with oneDNN). Only fp32
on the CPU, outside autocast (which runs matrix products in bf16, on oneDNN already) and outside
torch.compile; and bf16 where no gradient is wanted.

**Packed weights.** oneDNN also has its own blocked layout for a weight matrix; given a weight in that
layout it skips rearranging the weight inside every product. Inside a `frozen_weights` block (every
search in `qkv.search` runs in one) each weight is packed once and reused for all the steps, with the
same results. (160 x 256) @ (256 x 8000) in fp32: 1.27 ms instead of 1.91 ms when repeated alone, 1.61
instead of 1.76 ms when alternating with other products as in a decoding step; a whole beam search of
the small model: 11% faster.

**dropout.** ``F.dropout`` on the CPU draws one Mersenne-Twister number per element (``bernoulli_``): a
fifth of a bf16 training step of the small model with dropout 0.3. Here one 64-bit draw gives four 16-bit
integers, and an element is kept when its integer is at or above the threshold for p; p is thereby
rounded to a multiple of 1/65536 (0.3 becomes 19661/65536 = 0.300003), and the kept elements are scaled
by exactly 1 / (1 - that p). Forward and backward of a (128, 32, 256) bf16 tensor, two threads:
``F.dropout`` 8.2 ms, this 2.4 ms.

**topk.** A beam search picks the best 2 x beam of beam x vocab scores per sentence at every step, and
``torch.topk`` on the CPU sorts its way through every element of a row. Here a row is cut into chunks,
the chunks' maxima (a vectorised reduction) say which k chunks can hold the k best values, and only
those k chunks are searched. (32 x 40000) scores, k = 10, two threads: ``torch.topk`` 0.44 ms, this
0.17 ms.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FAST = os.environ.get("QKV_FAST_KERNELS", "1") != "0"


def _probe(dtype: torch.dtype, packed: bool) -> bool:
    """Whether oneDNN's linear map, plain and with its ReLU post-op, with the weight as it is or packed,
    computes (x W^T + b) in `dtype` here, exactly as F.linear does on small integers."""
    x = torch.arange(-6, 6, dtype=torch.float32).view(3, 4)
    weight = torch.arange(-10, 10, dtype=torch.float32).view(5, 4) % 7 - 3
    bias = torch.arange(5, dtype=torch.float32) - 2
    expected = F.linear(x, weight, bias)
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    try:
        if packed:
            weight = torch.ops.mkldnn._reorder_linear_weight(weight)
        out = _onednn_linear(x, weight, bias)
        out_relu = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", [], "")
    except (AttributeError, RuntimeError):  # a build without it; a CPU or dtype oneDNN cannot do
        return False
    return torch.equal(out.float(), expected) and torch.equal(out_relu.float(), expected.relu())


@functools.cache
def onednn_linear_works(dtype: torch.dtype) -> bool:
    """Whether `linear` may take oneDNN's kernel for `dtype` on this CPU: checked once, at first use.
    bf16 needs instructions that an AVX2 CPU lacks (oneDNN: "could not create a primitive descriptor
    for the inner product forward propagation primitive"); there PyTorch's own function runs."""
    return FAST and torch.backends.mkldnn.is_available() and _probe(dtype, packed=False)


@functools.cache
def packing_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed weights work for `dtype` on this CPU: checked once, at first use."""
    return onednn_linear_works(dtype) and _probe(dtype, packed=True)


# ---------------------------------------------------------------------------------------------------
# Weights that do not change for a while (decoding)

_FROZEN: contextvars.ContextVar[dict | None] = contextvars.ContextVar("qkv_frozen", default=None)
# Whether the caller keeps the prepared weights beyond the block (it passed `prepared`).
_KEPT: contextvars.ContextVar[bool] = contextvars.ContextVar("qkv_frozen_kept", default=False)


@contextlib.contextmanager
def frozen_weights(prepared: dict | None = None):
    """Within this block the caller promises that no parameter changes (as during a search), so weights
    may be kept in forms prepared once: oneDNN's packed layout for `linear`, and the stacked Q/K/V
    matrices of `qkv.attention.MultiHeadAttention`. Leaving the block drops them. Nested blocks share
    the outermost one's.

    prepared: a dictionary to keep the prepared weights in, for a caller that opens several blocks
    over the same unchanged model (one per batch of a long file, say) and wants them prepared once for
    all: pass the same (at first empty) dictionary to each, and a new one once a parameter changed.
    Weights kept this way are packed for products of any number of rows, since they will serve many.

    A scope, not a check: an in-place update cannot be detected reliably (PyTorch's fused Adam changes
    parameters without bumping their version counters)."""
    if _FROZEN.get() is not None:
        yield
        return
    token = _FROZEN.set({} if prepared is None else prepared)
    kept = _KEPT.set(prepared is not None)
    try:
        yield
    finally:
        _KEPT.reset(kept)
        _FROZEN.reset(token)


def frozen_cache() -> dict | None:
    """The dictionary of prepared weights of the current `frozen_weights` block, or None outside one.
    Keys are chosen by the users; values should hold the source tensor, so its id stays unique.

    None while torch.compile traces: Dynamo cannot read a ContextVar, and the graph break it made there
    split every attention layer out of the compiled graph (14 graphs for the small model; compiled
    training ran at half the speed of compiled nn.Transformer on an H100). The compiler folds the
    weight stacking into its graph anyway."""
    if torch.compiler.is_compiling():
        return None
    return _FROZEN.get()


# Within one search, products of fewer rows gain too little to repay the packing. Packed weights that a
# caller keeps (`frozen_weights(prepared)`) repay it at any row count: a single row (batch 1, greedy)
# ran 1.2-2.1x faster packed, 5 rows (batch 1, beam 5) up to 2.8x (512 -> 8000, fp32: 414 -> 146 us).
PACK_MIN_ROWS = 16


def _packed(weight: Tensor, rows: int) -> Tensor:
    """`weight` in oneDNN's own blocked layout, prepared once per `frozen_weights` block, at its second
    use (a weight used once, as the encoder's, is not worth packing), with at least PACK_MIN_ROWS rows
    unless the caller keeps the prepared weights."""
    cache = _FROZEN.get()
    min_rows = 1 if _KEPT.get() else PACK_MIN_ROWS
    if cache is None or rows < min_rows or not packing_works(weight.dtype):
        return weight
    key = ("onednn", id(weight))
    entry = cache.get(key)
    if entry is None:
        cache[key] = (weight, None)  # seen once
        return weight
    if entry[1] is None:
        entry = cache[key] = (weight, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
    return entry[1]


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear(x, weight, ...)` takes oneDNN's kernel: fp32 on the CPU, and bf16 as well where
    no gradient is wanted (there PyTorch's own bf16 path is oneDNN already, minus the packed weights)."""
    if not (
        x.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")  # autocast would run it in bf16
        and not torch.compiler.is_compiling()  # let the compiler choose its own kernels
        and x.dtype == weight.dtype
    ):
        return False
    if x.dtype == torch.float32:
        return onednn_linear_works(x.dtype)
    return x.dtype == torch.bfloat16 and not _wants_grad(x, weight) and onednn_linear_works(x.dtype)


def _wants_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# The weight gradient g^T x as oneDNN's linear(g^T, x^T) must copy both operands transposed first;
# PyTorch's mm (MKL) reads them transposed where they are. Training shapes of the small model (4096
# tokens), two threads, ms, oneDNN against mm (`benchmarks/cpu_kernels.py`):
#                       d_in x d_out:  256 x 8000   256 x 1024   1024 x 256   256 x 768   256 x 256
#   AVX-512 (Zen 5)                     123 / 81     9.3 / 11.5   9.0 / 12.7   7.5 / 8.4   2.6 / 3.0
#   AVX2 (AVX2_ENVIRONMENT on Zen 5)    155 / 81    13.1 / 11.0  13.1 / 12.5   9.6 / 8.0   3.3 / 2.9
# So mm, except for gradients under 32 MB (copies that stay in cache) where ATen runs AVX-512 code.
WEIGHT_GRADIENT_ONEDNN = torch.backends.cpu.get_cpu_capability() == "AVX512"
WEIGHT_GRADIENT_ONEDNN_MAX = 8 << 20  # elements of g


def _weight_gradient(grad_2d: Tensor, x_2d: Tensor) -> Tensor:
    """dL/dW = g^T x: grad_2d (tokens, d_out), x_2d (tokens, d_in) -> (d_out, d_in)."""
    if WEIGHT_GRADIENT_ONEDNN and grad_2d.numel() < WEIGHT_GRADIENT_ONEDNN_MAX:
        return _onednn_linear(grad_2d.t(), x_2d.t(), None)
    return grad_2d.t().mm(x_2d)


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN's kernel forwards and backwards (autograd does not know the operator).

    dL/dx = g W is a linear map too, ``linear(g, W^T)``; dL/dW = g^T x is `_weight_gradient`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t(), None)
        grad_2d = grad.reshape(-1, grad.size(-1))  # (tokens, d_out)
        if ctx.needs_input_grad[1]:
            grad_weight = _weight_gradient(grad_2d, x.reshape(-1, x.size(-1)))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_2d.sum(dim=0)
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``: x (..., d_in), weight (d_out, d_in), bias (d_out,) -> (..., d_out)."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    if _wants_grad(x, weight, bias):
        return _OneDNNLinear.apply(x, weight, bias)
    return _onednn_linear(x, _packed(weight, _rows(x)), bias)


def _rows(x: Tensor) -> int:
    """The number of vectors in x (..., d_in): the rows of the product."""
    return x.numel() // max(x.size(-1), 1)


def linear_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.relu(F.linear(x, weight, bias))``. Where `linear` takes oneDNN without gradients (decoding),
    the ReLU is a post-op of the same oneDNN call, applied to each block of the output as it is
    computed: equal results, and no second pass over the output ((160 x 256) @ (256 x 1024), packed:
    0.182 against 0.190 ms, ``benchmarks/cpu_kernels.py``)."""
    if uses_onednn(x, weight) and not _wants_grad(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(
            x, _packed(weight, _rows(x)), bias, "relu", [], ""
        )
    return F.relu(linear(x, weight, bias))


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state_dict) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


# Chunk lengths `topk` may use, and the shortest row worth chunking.
_TOPK_CHUNKS = range(160, 31, -1)
_TOPK_MIN_ROW = 4096


def topk(
    x: Tensor, k: int, row_offsets: Tensor | None = None, rows_per_group: int = 1
) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=1)`` for a 2-D x: the k largest values of each row, largest first, and their
    indices. Where values are equal, which index comes first may differ from ``torch.topk``.

    With `row_offsets` (rows,) and `rows_per_group`: the k largest sums ``x[r, i] + row_offsets[r]``
    of each group of `rows_per_group` consecutive rows laid end to end, and their indices there
    (``(r % rows_per_group) * length + i``): ``(x + row_offsets[:, None]).view(-1, rows_per_group *
    length).topk(k, dim=1)`` without writing every sum. (A beam search's candidates: the beams'
    scores plus each next token's log-probability.)

    Why it is exact: each of the k chunks with the largest maxima holds a value at least as large as
    the k-th largest chunk maximum t, so the k-th largest value is at least t too; and a value that
    large lies in a chunk whose maximum is at least t. Rounding is monotonic, so the largest sum of a
    chunk is its largest value plus the row's offset."""
    rows, length = x.shape
    groups = rows // rows_per_group
    chunk = _topk_chunk(length, k, rows_per_group)
    if (
        not FAST
        or chunk is None
        or x.device.type != "cpu"
        or not x.is_contiguous()
        or torch.compiler.is_compiling()
    ):
        sums = x if row_offsets is None else x + row_offsets[:, None]
        return sums.reshape(groups, rows_per_group * length).topk(k, dim=1)
    n_chunks = length // chunk  # per row
    chunks = x.view(rows * n_chunks, chunk)
    maxima = chunks.view(rows, n_chunks, chunk).amax(dim=2)
    if row_offsets is not None:
        maxima += row_offsets[:, None]
    per_group = rows_per_group * n_chunks
    best_chunks = maxima.view(groups, per_group).topk(k, dim=1).indices  # (groups, k) in the group
    # Whole chunks as rows of `chunks`: index_select copies rows 3x faster than gather picks elements.
    chunk_ids = best_chunks + torch.arange(0, rows * n_chunks, per_group, device=x.device)[:, None]
    chunk_ids = chunk_ids.flatten()
    candidates = chunks.index_select(0, chunk_ids)  # (groups * k, chunk)
    if row_offsets is not None:
        row = torch.div(chunk_ids, n_chunks, rounding_mode="floor")
        candidates += row_offsets.index_select(0, row)[:, None]
    values, within = candidates.view(groups, k * chunk).topk(k, dim=1)
    chunk_of = best_chunks.gather(1, torch.div(within, chunk, rounding_mode="floor"))
    return values, chunk_of * chunk + within % chunk


# From this many rows on, `argmax` takes `topk`'s chunk maxima: PyTorch's argmax of a 2-D tensor on the
# CPU takes ~2.3 us a row of 8000 (71 us for 32 rows, against 40 us), but 6 against 22 us for one row.
ARGMAX_MIN_ROWS = 16


def argmax(x: Tensor) -> Tensor:
    """``x.argmax(dim=1)`` for a 2-D x (where values are equal, which index is returned may differ)."""
    if x.size(0) < ARGMAX_MIN_ROWS or x.device.type != "cpu":
        return x.argmax(dim=1)
    return topk(x, 1)[1][:, 0]


@functools.cache
def _topk_chunk(length: int, k: int, rows_per_group: int = 1) -> int | None:
    """The longest chunk length in _TOPK_CHUNKS that divides a row of `length` so that a group of
    `rows_per_group` rows has at least 4 k chunks (fewer would leave little to skip), or None: then
    `torch.topk` is as good."""
    if length * rows_per_group < _TOPK_MIN_ROW:
        return None
    for chunk in _TOPK_CHUNKS:
        if length % chunk == 0 and rows_per_group * (length // chunk) >= 4 * k:
            return chunk
    return None


_LEVELS = 1 << 16  # 16-bit integers per draw


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout``: zero each element with probability p and scale the others by 1 / (1 - p)."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout probability must be between 0 and 1, got {p}")
    if not training or p == 0:
        return x
    dropped_levels = round(p * _LEVELS)
    if (
        not FAST
        or x.device.type != "cpu"
        or dropped_levels == _LEVELS
        or torch.compiler.is_compiling()  # the compiler fuses its own dropout
    ):
        return F.dropout(x, p, training)
    n = x.numel()
    draws = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
    bits = draws.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
    keep = bits >= dropped_levels - _LEVELS // 2
    scale = _LEVELS / (_LEVELS - dropped_levels)
    if x.dtype == torch.float32:
        # One fp32 mask of 0 and the scale, made in one pass: forwards one product, and backwards
        # one (grad * mask) instead of a bool-to-float copy and two products. Same bits as below.
        zero, kept = (torch.scalar_tensor(v, dtype=x.dtype) for v in (0.0, scale))
        return x * torch.where(keep, kept, zero)
    # In bf16 the scale would be rounded in such a mask; a product with the scalar rounds only once.
    return x.mul(keep).mul_(scale)


class Dropout(nn.Dropout):
    """``nn.Dropout`` computed by `dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
