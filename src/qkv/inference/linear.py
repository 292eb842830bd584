"""Linear maps prepared once for the many products of decoding.

A decoding engine multiplies by the same weights at every step. On the CPU, where oneDNN works for the
weights' dtype (`qkv.kernels.onednn_linear_works`), each weight is stored once in oneDNN's own blocked
layout ("packed"), so no product has to rearrange it again, and a ReLU that follows is applied by the
same oneDNN call as each block of the output is computed. Several projections of one input (Q, K and V
of self-attention; K and V of the encoder output) are stacked into one matrix: one product instead of
three. Same results as ``F.linear`` up to summation order; other devices and dtypes call ``F.linear``.
Timings: benchmarks/README.md, "CPU kernels".

A prepared map holds copies of the weights: it does not follow later changes of the model's parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.kernels import FAST, onednn_linear_works, packing_works


class PreparedLinear:
    """x W^T + b (then a ReLU if `relu`) for x (..., d_in), with W (d_out, d_in) prepared once."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, relu: bool = False):
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.relu = relu
        self.onednn = (
            FAST
            and weight.device.type == "cpu"
            and weight.dtype in (torch.float32, torch.bfloat16)
            and onednn_linear_works(weight.dtype)
        )
        self.packed = self.weight
        if self.onednn and packing_works(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)

    @classmethod
    def stacked(cls, *linears: nn.Linear) -> PreparedLinear:
        """The projections `linears` of one input as one map: their outputs side by side."""
        weight = torch.cat([linear.weight for linear in linears])
        has_bias = linears[0].bias is not None
        bias = torch.cat([linear.bias for linear in linears]) if has_bias else None
        return cls(weight, bias)

    @classmethod
    def of(cls, linear: nn.Linear, relu: bool = False) -> PreparedLinear:
        return cls(linear.weight, linear.bias, relu)

    def __call__(self, x: Tensor) -> Tensor:
        if self.onednn and x.dtype == self.weight.dtype and not torch.is_autocast_enabled("cpu"):
            post_op = "relu" if self.relu else "none"
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, post_op, [], "")
        out = F.linear(x, self.weight, self.bias)
        return F.relu(out) if self.relu else out
