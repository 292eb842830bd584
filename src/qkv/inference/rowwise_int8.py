"""qkv's own int8 product (`qkv::packed_int8_linear`, rowwise_int8.cpp): each row of the input quantised
on its own, the products by Intel's AMX tiles or by VNNI's dot products.

PyTorch's dynamic int8 product (fbgemm's, `qkv.inference.linear`) quantises each call's whole input
with one scale, packs it into fbgemm's blocks and shares the work among the threads: ~14 µs before
any arithmetic, while one sentence's step multiplies 1-5 rows (greedy, beam 5) by each weight. The
small benchmark model's 19 products were ~180 µs of a ~355 µs compiled step on an Intel Xeon (AMX)
at two threads (session 41). qkv's kernel packs the weights once (int8, one scale per output
feature; 16 features x 4 inputs a 64-byte row, the layout of both VNNI's vectors and AMX's weight
tiles), quantises each row to bytes over its own range (x ~ scale u + min, 0..255), and sums:

- with AMX (Intel Sapphire Rapids and later), from 3 rows: tiles of 16 rows x 64 features, 64 inputs
  a step (`tdpbusd`);
- with AVX512-VNNI (AMD Zen 4/5, Intel since Ice Lake; and AMX's 1-2 rows): 6 rows x 64 features in
  registers (`vpdpbusd`);
- with AVX2 alone (AMD Zen 3, Intel before Ice Lake): pairs of 7-bit products (`vpmaddubsw`), the
  input quantised to 0..127. On the Intel Xeon held to AVX2, fbgemm too (`FBGEMM_ENABLE_INSTRUCTIONS`,
  `qkv.hardware.AVX2_ENVIRONMENT`), 1.04-4.5x fbgemm's AVX2 kernels at every shape of the benchmark
  models from 1 to 160 rows, with less error (benchmarks/README.md, session 43).

Each product alone from Python, 2 threads, best of 5, on the Intel Xeon (AMX), against fbgemm
(benchmarks/README.md, session 42): 5 x 256 x 256 4.8 µs against 15.3, 5 x 256 x 8000 16.5 against
41.6, 1 x 256 x 768 4.3 against 15.5; 160 x 256 x 8000 273 against 734, 160 x 2048 x 512 120 against
391. VNNI alone (`QKV_INT8_AMX=0`, as a CPU without AMX): 1.5-5.3x fbgemm at 1-5 rows, 1.05-1.46x at
160, 1.09-3.28x at 1,024 (session 43). AMX and VNNI make the same integer sums and the same
arithmetic after them: the same products.

A row quantised on its own does not depend on the other rows, so a sentence's int8 products are the
same alone and in a batch (fbgemm's one scale made its scores differ by up to 0.2 on a random model),
and the error is about half of fbgemm's (random products: 0.9-1.2% of the product's norm against
1.3-2.3%).

The eager int8 engine (`qkv.inference.linear.PreparedLinear`) and the compiled int8 programs
(`qkv.inference.int8_products`) both take it wherever it is not `unavailable`, so the compiled engine
gives the eager one's results.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkv.inference import native


def unavailable(say=None) -> str | None:
    """None if the int8 products take qkv's kernel here (wherever qkv's operators load: x86-64 with
    AVX2 at least), else why not (one line); the operators are built at their first use (~10 s,
    once per machine; `say` told)."""
    return native.load(say)


class RowwiseInt8Linear(nn.Module):
    """x W^T + b (then a ReLU if `relu`) for x (..., d_in) by `qkv::packed_int8_linear`, W (d_out,
    d_in) quantised and packed once (a copy: it does not follow later changes of the weight)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, relu: bool = False):
        super().__init__()
        weight = weight.detach().float()
        bias = None if bias is None else bias.detach().float()
        packed, params = torch.ops.qkv.pack_int8_linear(weight, bias)
        # Buffers, so that a program holds them as constants; not in the state dict, which has
        # the weights they are made from.
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("params", params, persistent=False)
        self.out_features, self.relu = weight.size(0), int(relu)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.qkv.packed_int8_linear(
            x, self.packed, self.params, self.out_features, self.relu
        )
