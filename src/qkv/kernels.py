"""PyTorch functions computed a faster way on the CPU, for training: ``F.linear`` and ``F.dropout``,
as `Linear` and `Dropout` modules, which `use_fast_kernels` puts in a model in place of ``nn.Linear``
and ``nn.Dropout``; and the checks of which oneDNN paths work on this CPU, which the decoding engine
(`qkv.inference`) reads too.

Same results, up to summation order for `linear` and a different draw of random numbers for `dropout`.
Everything else, and every other device, calls PyTorch's own function; ``QKV_FAST_KERNELS=0`` in the
environment, before qkv is imported, calls PyTorch's functions everywhere. The timings behind each
choice are in benchmarks/README.md ("CPU kernels"), measured by ``benchmarks/cpu_kernels.py``.

Nothing here assumes an instruction set: each oneDNN path is tried once per dtype, at its first use
(`onednn_linear_works`, `packing_works`), and where it fails or computes differently (bf16 on a CPU
without AVX-512 or AVX-NE-CONVERT, a build of PyTorch without oneDNN) PyTorch's own function runs
instead, with the same results.

**linear.** PyTorch computes fp32 matrix products on the CPU with MKL's sgemm, which takes slower code
paths on processors that are not Intel's; oneDNN, the other library in every x86 build of PyTorch
(``torch.ops.mkldnn``, already PyTorch's choice for bf16), ran them up to twice as fast on AMD. oneDNN
computes in fp32 too: its results differ from MKL's only in summation order (tested against float64).
Training takes it through an autograd function whose input gradient is again a oneDNN linear map and
whose weight gradient is PyTorch's mm except where oneDNN measured faster (`_weight_gradient`). Only
fp32 on the CPU, outside autocast (which runs matrix products in bf16, on oneDNN already) and outside
torch.compile; and bf16 where no gradient is wanted.

**dropout.** ``F.dropout`` on the CPU draws one Mersenne-Twister number per element (``bernoulli_``).
Here one 64-bit draw gives four 16-bit integers, and an element is kept when its integer is at or above
the threshold for p; p is thereby rounded to a multiple of 1/65536 (0.3 becomes 19661/65536 =
0.300003), and the kept elements are scaled by exactly 1 / (1 - that p).
"""

from __future__ import annotations

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
# PyTorch's mm (MKL) reads them transposed where they are. mm measured faster, except for gradients
# under 32 MB (copies that stay in cache) where ATen runs AVX-512 code (benchmarks/README.md).
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
    return _onednn_linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same state_dict) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


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


def use_fast_kernels(model: nn.Module) -> nn.Module:
    """Make every ``nn.Linear`` of `model` compute with `linear`, and every ``nn.Dropout`` with
    `dropout`, in place; returns the model. Parameters, state_dict and results stay as they were (up to
    summation order and the draw of random numbers): only the class of each module changes (and the
    function attention's stacked projections call, `MultiHeadAttention.linear`), so the reference
    model in `qkv.model` stays plain and training chooses speed in one visible line."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
        elif type(module) is nn.Dropout:
            module.__class__ = Dropout
        elif getattr(module, "linear", None) is F.linear:
            module.linear = linear
    return model
