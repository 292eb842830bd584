"""Linear maps prepared once for the many products of decoding.

A decoding engine multiplies by the same weights at every step. On the CPU, where oneDNN works for the
weights' dtype (`qkv.kernels.onednn_linear_works`), each weight is stored once in oneDNN's own blocked
layout ("packed"), so no product has to rearrange it again, and a ReLU that follows is applied by the
same oneDNN call as each block of the output is computed. Several projections of one input (Q, K and V
of self-attention; K and V of the encoder output) are stacked into one matrix: one product instead of
three. Same results as ``F.linear`` up to summation order; other devices and dtypes call ``F.linear``.
Timings: benchmarks/README.md, "CPU kernels".

With ``int8=True`` (`qkv translate --precision int8`) the weights are stored in int8, one scale per
output feature (symmetric), and each product quantises its input on the fly, one scale per call
("dynamic"): PyTorch's own quantised kernels (fbgemm or oneDNN on x86, qnnpack on Arm), where
`int8_works()`; elsewhere the map stays fp32, and `Int8Unavailable` says why. Where the engine PyTorch
starts with fails its check, the first of its other engines that passes takes over for the process
(`int8_engine_switch` says which): PyTorch 2.13's aarch64 wheel starts with 'x86', whose fbgemm
kernels stop there with "unknown architecure", while its 'qnnpack' and 'onednn' run (checked on an
emulated aarch64, benchmarks/README.md session 52). Where qkv's own int8
kernel serves (`qkv.inference.rowwise_int8`: wherever qkv's operators load, AMX, VNNI or AVX2), the
products take it instead, each row of the input quantised with a scale of its own.

A prepared map holds copies of the weights: it does not follow later changes of the model's parameters.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.inference import rowwise_int8
from qkv.kernels import FAST, onednn_linear_works, packing_works


class Int8Unavailable(RuntimeError):
    """PyTorch's quantised linear kernels do not run here (no quantised engine, an unsupported CPU)."""


def _quantised_weight(weight: Tensor) -> Tensor:
    """(d_out, d_in) fp32 -> int8 with one symmetric scale per output feature (row)."""
    scales = weight.abs().amax(dim=1).clamp_min(1e-8) / 127
    zero_points = torch.zeros(weight.size(0), dtype=torch.long)
    with warnings.catch_warnings():  # PyTorch marks its quantised tensors for a later replacement
        warnings.filterwarnings("ignore", message=".*quantized tensor creation.*")
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        return torch.quantize_per_channel(
            weight.float(), scales.float(), zero_points, 0, torch.qint8
        )


def _reduce_range() -> bool:
    """fbgemm's x86 kernels add pairs of u8 x s8 products in 16 bits: 7-bit inputs cannot overflow."""
    return torch.backends.quantized.engine in ("x86", "fbgemm")


# The engines tried, in this order, where the one PyTorch starts with fails: qnnpack is Arm's own
ENGINE_PREFERENCE = ("qnnpack", "onednn", "x86", "fbgemm")
# What changed the quantised engine, and why (`int8_engine_switch`), or None
_switch: str | None = None


@functools.cache
def int8_works() -> str | None:
    """None if PyTorch's quantised linear kernels run on this machine (checked once, on a small
    product against fp32), else why not. Where the engine in use fails and another passes, that
    one becomes the process's engine (`torch.backends.quantized.engine`)."""
    global _switch
    engine = torch.backends.quantized.engine
    why = _engine_fails(engine)
    if why is None:
        return None
    for other in ENGINE_PREFERENCE:
        if other == engine or other not in torch.backends.quantized.supported_engines:
            continue
        torch.backends.quantized.engine = other
        if _engine_fails(other) is None:
            _switch = f"int8 by PyTorch's quantised engine {other!r}: {why}"
            return None
    torch.backends.quantized.engine = engine
    return why


def int8_engine_switch() -> str | None:
    """One line, where `int8_works` put another quantised engine in place of the one PyTorch
    started with: which, and why."""
    return _switch


def _engine_fails(engine: str) -> str | None:
    """None if `engine` (the engine in use) computes a small int8 product close to fp32's, else
    why not."""
    if engine == "none":
        return "this PyTorch build has no quantised engine"
    # Fixed inputs: the verdict must not change from one process to the next.
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(16, 32, generator=generator), torch.randn(3, 32, generator=generator)
    try:
        packed = torch.ops.quantized.linear_prepack(_quantised_weight(weight), None)
        out = torch.ops.quantized.linear_dynamic(x, packed, _reduce_range())
    except (RuntimeError, NotImplementedError) as error:
        return f"PyTorch's quantised engine {engine!r} failed here: {str(error).splitlines()[0]}"
    if not _int8_product_is_close(out, F.linear(x, weight)):
        return f"PyTorch's quantised engine {engine!r} gave wrong products here"
    return None


def _int8_product_is_close(int8_product: Tensor, fp32_product: Tensor) -> bool:
    """Whether an int8 product is the fp32 one up to quantisation error.

    Measured over the whole product, not element by element: an element near zero may be off by
    more than itself, while the error over all of them stays at 1-2% of the product's norm
    (2.2% at worst in 3000 random 3 x 32 by 32 x 16 products, 7-bit inputs); a broken kernel
    is off by about as much as the product itself.
    """
    error = (int8_product.float() - fp32_product.float()).norm()
    return bool(error <= 0.05 * fp32_product.float().norm())


class PreparedLinear:
    """x W^T + b (then a ReLU if `relu`) for x (..., d_in), with W (d_out, d_in) prepared once."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None = None, relu: bool = False, int8: bool = False
    ):
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.relu = relu
        self.int8 = None  # the int8 weights, packed for PyTorch's quantised kernels
        self.rowwise = None  # or for qkv's own (`rowwise_int8`), where it serves
        if int8:
            if weight.device.type != "cpu" or weight.dtype != torch.float32:
                raise Int8Unavailable("int8 runs on the CPU, from fp32 weights")
            if rowwise_int8.unavailable() is None:
                self.rowwise = rowwise_int8.RowwiseInt8Linear(self.weight, self.bias, relu)
            elif (why := int8_works()) is not None:
                raise Int8Unavailable(why)
            else:
                bias = None if self.bias is None else self.bias.float()
                self.int8 = torch.ops.quantized.linear_prepack(_quantised_weight(self.weight), bias)
                self.reduce_range = _reduce_range()
        self.onednn = (
            FAST
            and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16)
            and onednn_linear_works(weight.dtype)
        )
        self.packed = self.weight
        if self.onednn and packing_works(weight.dtype) and not int8:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)

    @classmethod
    def stacked(cls, *linears: nn.Linear, int8: bool = False) -> PreparedLinear:
        """The projections `linears` of one input as one map: their outputs side by side."""
        weight = torch.cat([linear.weight for linear in linears])
        has_bias = linears[0].bias is not None
        bias = torch.cat([linear.bias for linear in linears]) if has_bias else None
        return cls(weight, bias, int8=int8)

    @classmethod
    def of(cls, linear: nn.Linear, relu: bool = False, int8: bool = False) -> PreparedLinear:
        return cls(linear.weight, linear.bias, relu, int8)

    def __call__(self, x: Tensor) -> Tensor:
        if self.rowwise is not None:
            return self.rowwise(x)
        if self.int8 is not None:
            quantized = torch.ops.quantized
            product = quantized.linear_relu_dynamic if self.relu else quantized.linear_dynamic
            return product(x, self.int8, self.reduce_range)
        if self.onednn and x.dtype == self.weight.dtype and not torch.is_autocast_enabled("cpu"):
            post_op = "relu" if self.relu else "none"
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, post_op, [], "")
        out = F.linear(x, self.weight, self.bias)
        return F.relu(out) if self.relu else out
