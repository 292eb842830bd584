"""Which products a beam program of many sentences takes where ATen's capability cannot say:
qkv's kernel or oneDNN's, measured on this CPU while the program is compiled.

At a beam program's rows (beam 5 on 32 sentences: 160) the products are bound by arithmetic. qkv's
kernel computes with AVX2's 256-bit vectors, oneDNN's with AVX-512's. An Intel Xeon's 512-bit units
(a Zen 5's too) do twice AVX2's multiply-adds a cycle, and there oneDNN's won: beam 5 on 32 sentences
took 1.14-1.16x the time with qkv's (small model), 1.25x (base); on 16 sentences 1.07-1.09x (small)
(benchmarks/README.md, session 54). A Zen 4 runs each 512-bit operation as two 256-bit halves, and
there qkv's won: on 32 sentences 0.91x the time (small), but 1.04x (base); on 16 and 8 sentences
0.925x and 0.85x (base) (session 59). Both report ATen's capability AVX512.

So the step's products, in its order, are timed both ways at the program's largest rows, and qkv's
are taken unless oneDNN's are clearly faster (`TAKEN_BELOW`). Where a search took 1.14x the time
with qkv's products, the products alone (what differs between the two programs) took more than
1.14x oneDNN's time. On the Zen 4, at 160 rows, they took 0.93-0.97x (small) and 0.98-1.02x (base):
even for the base model, whose searches of 8 and 16 sentences gained by qkv's. The measuring takes
~0.3 s of a ~27 s compile for the small benchmark model, ~1.4 s of ~43 s for the base.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from qkv.inference import packed_linear
from qkv.inference.packed_linear import DecoderProducts

# qkv's products are taken where their time is below this multiple of oneDNN's (`takes_qkvs`)
TAKEN_BELOW = 1.05
# Timed rounds of each kind, taking turns (the median counts), after one of each untimed
ROUNDS = 15


def takes_qkvs(step: nn.Module, products: DecoderProducts, rows: int) -> tuple[bool, float]:
    """Whether a program of `step` (a `SharedBeamStep`) at `rows` rows takes `products` (qkv's)
    rather than oneDNN's, and the ratio that says so: `time_ratio`, below `TAKEN_BELOW`. A reading
    at or over the line is read twice more, and the median of the three counts: on the Zen 4 a
    trained small model read 0.93-0.99 in 11 readings (5 of them in fresh processes), but 1.05 or
    more once, as the first run of `benchmarks/real_batches.py` compiled (session 59)."""
    readings = [time_ratio(step, products, rows)]
    if readings[0] >= TAKEN_BELOW:
        readings += [time_ratio(step, products, rows) for _ in range(2)]
    ratio = statistics.median(readings)
    return ratio < TAKEN_BELOW, ratio


def time_ratio(step: nn.Module, products: DecoderProducts, rows: int) -> float:
    """qkv's products' time / oneDNN's for one decoder position of `rows` rows: every product of
    the step in its order (each layer's six, then the output's), on random inputs, so that each
    product's weights come from where a step finds them, not warm from its own last call."""
    maps = linears(step)
    ours, theirs = products.in_step_order(), [onednn_product(*m, rows=rows) for m in maps]
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(rows, weight.size(1), generator=generator) for weight, _, _ in maps]
    times: dict[str, list[float]] = {"qkv": [], "onednn": []}
    with torch.inference_mode():
        for round_ in range(ROUNDS + 1):
            for kind, functions in (("qkv", ours), ("onednn", theirs)):
                started = time.perf_counter()
                for function, x in zip(functions, inputs, strict=True):
                    function(x)
                if round_:  # the first round of each warms the caches and threads: not counted
                    times[kind].append(time.perf_counter() - started)
    return statistics.median(times["qkv"]) / statistics.median(times["onednn"])


def linears(step: nn.Module) -> list[tuple[Tensor, Tensor | None, bool]]:
    """(weight, bias, whether a ReLU is fused into the product) of each product of `step` (a
    `SharedBeamStep`), in `DecoderProducts.in_step_order`'s order."""
    output = step.model.output
    layers = packed_linear.decoder_linears(step)
    return [*(linear for layer in layers for linear in layer), (output.weight, output.bias, False)]


def onednn_product(
    weight: Tensor, bias: Tensor | None, relu: bool, rows: int
) -> Callable[[Tensor], Tensor]:
    """x W^T + b (then a ReLU if `relu`) as a compiled program calls oneDNN for it: the weight
    packed for `rows` rows (Inductor's hint), `_linear_pointwise`."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float(), rows)
    bias = None if bias is None else bias.detach().float()
    post_op = "relu" if relu else "none"
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, post_op, [], "")
