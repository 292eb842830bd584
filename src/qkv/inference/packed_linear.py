"""A decoder step's products by qkv's own kernel (`qkv::packed_linear`, operators.cpp), for the
compiled steps on an AVX2 CPU (`StaticDecoderStep` of every size, `SharedBeamStep`), every
`StaticDecoderStep` on an AVX-512 one (`SharedBeamStep` too on PyTorch 2.8: `serves`; else where
as measured, `measures_beams`); and for one
sentence's encoder program on both (`EncoderProducts`).

A decoding step multiplies few rows by each weight: 1-32 greedy, up to 160 in a beam program.
oneDNN, which Inductor and the eager engine call for these products, prepares every call for a
general product; with so few rows that costs more than the arithmetic of the small weights. qkv's
kernel packs each weight once into panels of 16 output features and computes 6 rows x 16 features
at a time in registers, the threads sharing the panels, each block asking memory for the weights
that come next (a step reads each weight once, more than the caches hold). Held to AVX2 on a Zen 4,
each product alone (weights in the cache, best of 5): 32 x 256 x 768 68-70 µs against oneDNN's
101-154, 32 x 256 x 256 26 against 48, 32 x 256 x 8000 844-880 against 973-1012 (benchmarks/README.md,
session 33); the base model's 37 products of a 32-row step in a row, from memory, 11.7-12.9 ms before
the weights were asked for ahead, 9.4-10.3 after (session 34). Same results as `F.linear` up to
summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.inference import inductor_hooks, native


class PackedLinear(nn.Module):
    """x W^T + b (then a ReLU if `relu`) for x (..., d_in), W (d_out, d_in) packed once by
    `qkv::pack_linear` (a copy: it does not follow later changes of the weight)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, relu: bool = False):
        super().__init__()
        weight = weight.detach().float()
        bias = weight.new_zeros(weight.size(0)) if bias is None else bias.detach().float()
        # A buffer, so that a program holds it as a constant; not in the state dict, which has the
        # weights it is made from.
        self.register_buffer("packed", torch.ops.qkv.pack_linear(weight, bias), persistent=False)
        self.out_features, self.relu = weight.size(0), int(relu)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.qkv.packed_linear(x, self.packed, self.out_features, self.relu)


class ScreenedRows(nn.Module):
    """A greedy step's next tokens of two rows or more from the output product without every logit
    (`qkv::screened_best_rows`): qkv's int8 product (`qkv.inference.rowwise_int8`: each row
    quantised on its own, the weights to int8) knows each logit within a bound, and the few tokens it
    leaves get their exact logits, each a dot product with the feature's fp32 weights. For the
    greedy programs of many rows, whatever their other products (`StaticDecoderStep.screen`)."""

    screens = True  # as `ScreenedOutput`'s

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        weight = weight.detach().float().contiguous()
        bias = weight.new_zeros(weight.size(0)) if bias is None else bias.detach().float()
        self.out_features = weight.size(0)
        # The weight as it is (each feature's weights side by side: a candidate reads its own),
        # its int8 product's packing, and each feature's sum of |int8 weights| (its bound). Buffers,
        # so that a program holds them as constants; not in the state dict, which has the weights.
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias.contiguous(), persistent=False)
        q, params = torch.ops.qkv.pack_int8_linear(weight, bias)
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("params", params, persistent=False)
        l1 = q.abs().to(torch.int32).sum(dim=(1, 3)).flatten()[: self.out_features]
        self.register_buffer("l1", l1.float(), persistent=False)

    def best(self, x: Tensor, banned_bias: Tensor) -> Tensor:
        """x (rows, d_in) -> (rows,) each row's token of the largest logit + banned_bias, the first
        of equals."""
        return torch.ops.qkv.screened_best_rows(
            x, self.weight, self.bias, self.q, self.params, self.l1, banned_bias
        )


class ScreenedOutput(PackedLinear):
    """The output product, and a greedy step's next tokens from it without every logit: at one row
    (`qkv::screened_best`) an int8 copy of the weight (a quarter of its bytes) multiplied by the fp32
    row screens the vocabulary, and the few tokens it leaves get their exact logits as `forward`
    computes them; at more, `ScreenedRows`. `screens` False: `best` is not used (the step computes
    every logit)."""

    def __init__(
        self, weight: Tensor, bias: Tensor | None = None, rows: ScreenedRows | None = None
    ):
        """rows: the same weight's `ScreenedRows` where one is made already (shared), else a new
        one."""
        super().__init__(weight, bias)
        q, scales = torch.ops.qkv.pack_screen(weight.detach().float())
        self.register_buffer("screen_q", q, persistent=False)
        self.register_buffer("screen_scales", scales, persistent=False)
        self.rows = ScreenedRows(weight, bias) if rows is None else rows
        self.screens = True

    def best(self, x: Tensor, banned_bias: Tensor) -> Tensor:
        """x (rows, d_in) -> (rows,) each row's token of the largest logit + banned_bias, the first
        of equals."""
        if x.size(0) > 1:
            return self.rows.best(x, banned_bias)
        return torch.ops.qkv.screened_best(
            x, self.packed, self.screen_q, self.screen_scales, banned_bias
        )


class DecoderProducts(nn.Module):
    """Every product of a decoder step: for each layer, self-attention's stacked Q/K/V and output,
    cross-attention's Q and output, the feed-forward's two (a ReLU fused into the first); and the
    output projection. By qkv's kernel (`of_step`), or int8 ones (`qkv.inference.int8_products`)."""

    def __init__(self, layers: list[tuple[nn.Module, ...]], output: nn.Module, int8: bool = False):
        super().__init__()
        self.int8 = int8  # int8 products: a program of another kind (`aoti.program_key`)
        self.qkv, self.self_out, self.cross_q, self.cross_out = (nn.ModuleList() for _ in range(4))
        self.linear1, self.linear2 = nn.ModuleList(), nn.ModuleList()
        lists = self.qkv, self.self_out, self.cross_q, self.cross_out, self.linear1, self.linear2
        for products in layers:
            for products_of_a_kind, product in zip(lists, products, strict=True):
                products_of_a_kind.append(product)
        self.output = output

    @classmethod
    def of_step(cls, step: nn.Module, rows: ScreenedRows | None = None) -> DecoderProducts:
        """The products of a compiled step's model, packed for qkv's kernel, from its stacked
        Q/K/V weights; `rows`: its output's `ScreenedRows`, if made already."""
        layers = [
            tuple(PackedLinear(*linear) for linear in layer) for layer in decoder_linears(step)
        ]
        output = step.model.output
        return cls(layers, ScreenedOutput(output.weight, output.bias, rows))

    def in_step_order(self) -> list[nn.Module]:
        """Every product in the order a step calls them: each layer's six, then the output's."""
        lists = self.qkv, self.self_out, self.cross_q, self.cross_out, self.linear1, self.linear2
        return [*(products[i] for i in range(len(self.qkv)) for products in lists), self.output]


def decoder_linears(step: nn.Module) -> list[list[tuple[Tensor, Tensor | None, bool]]]:
    """For each decoder layer of a compiled step's model, its products as (weight, bias, whether a
    ReLU is fused into the product), in `DecoderProducts`' order: self-attention's stacked Q/K/V
    (the step's `qkv_weights`) and output, cross-attention's Q and output, the feed-forward's two."""
    layers = []
    for i, layer in enumerate(step.model.decoder.layers):
        attention, cross, feed_forward = layer.self_attn, layer.cross_attn, layer.feed_forward
        linear1, linear2 = feed_forward.linear1, feed_forward.linear2
        layers.append(
            [
                (step.qkv_weights[i], step.qkv_biases[i] if len(step.qkv_biases) else None, False),
                (attention.out_proj.weight, attention.out_proj.bias, False),
                (cross.q_proj.weight, cross.q_proj.bias, False),
                (cross.out_proj.weight, cross.out_proj.bias, False),
                (linear1.weight, linear1.bias, feed_forward.activation is F.relu),
                (linear2.weight, linear2.bias, False),
            ]
        )
    return layers


class EncoderProducts(nn.Module):
    """Every product of one sentence's encoder program (`qkv.inference.compiled_encoder`) by qkv's
    kernel: each layer's stacked Q/K/V, self-attention output and feed-forward's two (a ReLU fused
    into the first), and every decoder layer's cross-attention keys and values as one product (the
    layout `StaticCache.set_source` reads). Inductor's products of a sentence's ~16 rows keep their
    sums in memory as a decoder step's of a few rows do (`FEW_ROWS_ON`); oneDNN's are no faster
    there. The programs alone, taking turns with 32 MB read between calls (the rest of a search
    evicts their weights), on an Intel Xeon (AMX): the small benchmark model's 1.36 -> 0.82 ms as
    the CPU comes (oneDNN's 1.28), 1.21 -> 0.88 held to AVX2; the base model's 11.7 -> 8.0 ms
    (benchmarks/README.md, session 46)."""

    int8 = False  # fp32 products: a program of its own kind (`aoti.program_key`)

    def __init__(self, encoder: nn.Module):
        """From a `StaticEncoder`'s stacked Q/K/V and cross-attention weights, and its model's."""
        super().__init__()
        layers = encoder.model.encoder.layers
        biases = encoder.qkv_biases
        self.qkv = nn.ModuleList(
            PackedLinear(weight, biases[i] if len(biases) else None)
            for i, weight in enumerate(encoder.qkv_weights)
        )
        self.out = nn.ModuleList(of(layer.self_attn.out_proj) for layer in layers)
        relus = [layer.feed_forward.activation is F.relu for layer in layers]
        self.linear1 = nn.ModuleList(
            of(layer.feed_forward.linear1, relu) for layer, relu in zip(layers, relus, strict=True)
        )
        self.linear2 = nn.ModuleList(of(layer.feed_forward.linear2) for layer in layers)
        self.cross_kv = PackedLinear(encoder.cross_kv_weight, encoder.cross_kv_bias)

    def cross_keys_and_values(self, memory: Tensor) -> Tensor:
        """(sentences, src_len, d_model) -> (sentences, src_len, layers * 2 * d_model)."""
        return self.cross_kv(memory)


def encoder_products(encoder: nn.Module, say=None) -> EncoderProducts | None:
    """qkv's products for one sentence's fp32 encoder program (a `StaticEncoder`) where they load
    (`unavailable`: AVX2 and AVX-512), else None (Inductor's)."""
    return EncoderProducts(encoder) if unavailable(encoder.model, say) is None else None


def of(linear: nn.Linear, relu: bool = False) -> PackedLinear:
    return PackedLinear(linear.weight, linear.bias, relu)


def projections(products: DecoderProducts | None, i: int, layer: nn.Module, step: nn.Module):
    """Decoder layer i's attention products, qkv's (`products`) or PyTorch's (None): self-attention's
    Q, K and V as one (the step's stacked `qkv_weights`) and its output, cross-attention's Q and
    output."""
    if products is not None:
        return products.qkv[i], products.self_out[i], products.cross_q[i], products.cross_out[i]
    weight = step.qkv_weights[i]
    bias = step.qkv_biases[i] if len(step.qkv_biases) else None
    attention, cross = layer.self_attn, layer.cross_attn
    return (lambda h: F.linear(h, weight, bias)), attention.out_proj, cross.q_proj, cross.out_proj


def feed_forward(products: DecoderProducts | None, i: int, layer: nn.Module, h: Tensor) -> Tensor:
    """Decoder layer i's feed-forward formula, without its dropout (in any mode)."""
    formula = layer.feed_forward
    if products is None:
        return formula.linear2(formula.activation(formula.linear1(h)))
    hidden = products.linear1[i](h)
    if formula.activation is not F.relu:  # a ReLU is in the product already
        hidden = formula.activation(hidden)
    return products.linear2[i](hidden)


# ATen capabilities where every compiled step takes qkv's products, the beam programs of many sentences
# (`qkv.inference.beam_program`) too.
NATIVE_PRODUCTS_ON = ("AVX2",)
# ...and where only the programs of `FROM_ROWS` rows or more (greedy on many sentences) take them, not
# the beam programs. qkv's kernel is AVX2's: at a beam program's 160 rows (beam 5 on 32 sentences)
# the products are bound by arithmetic, and oneDNN's AVX-512 products do twice as much of it a cycle
# (the small model's search 1.14-1.16x the time with qkv's, the base 1.25x; on 4 sentences, 20 rows,
# 0.86x). At 8-32 rows what counts is reading the weights and what each call costs around its
# arithmetic: greedy on 8, 16 and 32 sentences 0.68x, 0.87x and 1.00x the time (base), 0.89-0.90x,
# 0.83-0.84x and 0.89-0.90x (small), two engines taking turns on an Intel Xeon (AMX) as it comes,
# whose two 512-bit units a core do twice AVX2's multiply-adds, as a Zen 5's (session 54; session 34
# measured the products alone on a Zen 4, whose AVX-512 runs as two halves: 0.81-0.92x). On that
# Zen 4 (session 55): greedy on 8 and 32 sentences 0.75x and 0.85-0.87x (small), 0.89-0.90x on 32
# (base); the beam program on 32 sentences 0.94-0.96x with qkv's (small), against the Xeon's
# 1.14-1.16x, and ATen's capability cannot tell them apart: there the beam programs take qkv's only
# as measured while compiling (`MEASURED_ON`). But where this PyTorch's Inductor would
# leave the beam program's products to MKL unpacked (2.8, `inductor_hooks.packs_products_of_any_rows`),
# the beam program takes qkv's here, unmeasured: on the Zen 4, beam 5 on 32 sentences 0.76-0.78x the
# time (small) and 0.85-0.86x (base) (session 58).
MANY_ROWS_ON = ("AVX512",)
# ...and where it is one of these, the beam programs of many sentences take qkv's products unless
# oneDNN's measure clearly faster at the program's rows, each product of a step in its order
# (`qkv.inference.product_choice`): a Zen 4 (AVX-512 as two 256-bit halves) and an Intel Xeon (whole
# 512-bit units) both report AVX512, and went opposite ways.
MEASURED_ON = ("AVX512",)
# Programs of this many rows or more are the many rows of `NATIVE_PRODUCTS_ON` and `MANY_ROWS_ON`. In
# session 33 fewer rows kept Inductor's own products, measured while compiling, which its 5-row
# blocks made faster there (`inductor_hooks.AVX2_ROW_BLOCK`; `FEW_ROWS_ON` below, since). Whole searches with
# qkv's products against Inductor's or oneDNN's, small model, held to AVX2 on a Zen 4, two engines
# taking turns: greedy 0.86x the time on 16 sentences, 0.97x on 8, 0.91-0.93x on 32; but 1.24x on
# one sentence, 1.03x on 2 and 5, and 1.11x with beam 5 on one (benchmarks/README.md, session 33).
# One row has had a loop of its own since (`ONE_ROW_ON`).
FROM_ROWS = 8
# ...but where ATen's capability is one of these, the programs of `FEW_ROWS` to `FROM_ROWS` - 1 rows
# take them too (one sentence's beams, greedy on 2-5 sentences). Inductor's AVX-512 products of a few
# rows keep their sums in memory: GCC stores each of the 10-15 accumulators at every step of the depth
# (`objdump` of the base model's 5-row program), so they ran at ~40 GFLOP/s, twice a one-row
# product's time for the same weights. Whole searches with qkv's products, two engines taking turns
# on an Intel Xeon (AMX) as it comes: 0.80x the time (small, beam 5, one sentence), 0.85x and 0.95x
# (greedy on 4 and 2 sentences); the base model 0.53x, 0.55x, 0.80x. One row keeps Inductor's (1.09x
# and 0.98x) (benchmarks/README.md, session 45). On AVX2, Inductor's 5-row blocks (`inductor_hooks.AVX2_ROW_BLOCK`)
# beat this kernel before it asked for its weights ahead (session 33, Zen 4: beam 5 on one sentence
# 1.11x the time with qkv's); since, the same Xeon held to AVX2 took 0.52-0.57x the time with qkv's
# (base, beam 5, one sentence), 0.67-0.70x and 0.77-0.80x (greedy on 4 and 2 sentences); the small
# model 0.93x, 0.93-0.96x, 0.99-1.00x (session 54). A Zen 4 held to AVX2: small beam 5 on one
# sentence 0.86-0.94x, greedy on 4 sentences 0.90-0.92x; base beam 5 on one 1.03-1.06x (session 55).
FEW_ROWS_ON = ("AVX512", "AVX2")
FEW_ROWS = 2
# ...and where it is one of these, the programs of one row (greedy on one sentence), by the kernel's
# one-row loop (four pairs of sums, the weights asked for 4 KB ahead). Inductor's one-row products
# keep 16 features (two 8-wide registers) a block on AVX2 and read ~44 GB/s at two threads on an
# Intel Xeon held to AVX2 (32 features, ~50 GB/s, on AVX-512). Whole greedy searches of one
# sentence with qkv's one-row products, two engines taking turns with CTranslate2 on that Xeon held
# to AVX2: the base model 0.85x the time, the small 0.98x; as it comes (AVX-512) 1.00-1.02x
# (benchmarks/README.md, session 47). With qkv's products the one-row greedy program also screens the
# output product (`ScreenedOutput`, a quarter of its bytes): greedy searches of one sentence, small
# model 0.82-0.84x the time and base 0.90-0.91x held to AVX2; as the CPU comes (AVX-512), against
# Inductor's one-row products, which cannot screen, 0.83-0.84x and 0.90-0.91x (session 48).
ONE_ROW_ON = ("AVX2", "AVX512")


def serves(rows: int | None) -> bool:
    """Whether a program of `rows` rows (None: beams on many sentences, `qkv.inference.beam_program`)
    takes qkv's products on this CPU, where they load (`unavailable`)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if rows is None:
        return capability in NATIVE_PRODUCTS_ON or (
            capability in MANY_ROWS_ON and not inductor_hooks.packs_products_of_any_rows()
        )
    if rows >= FROM_ROWS:
        return capability in NATIVE_PRODUCTS_ON + MANY_ROWS_ON
    if rows == 1:
        return capability in ONE_ROW_ON
    return rows >= FEW_ROWS and capability in FEW_ROWS_ON


def measures_beams() -> bool:
    """Whether the beam programs of many sentences take qkv's products only as they measure against
    oneDNN's while compiling (`MEASURED_ON`), not taking them by `serves(None)` already."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability in MEASURED_ON and not serves(None)


def unavailable(model: nn.Module, say=None) -> str | None:
    """None if a compiled step of `model` can take qkv's products here, else why not (one line): an
    fp32 model on the CPU, ATen's capability in `NATIVE_PRODUCTS_ON`, `MANY_ROWS_ON`, `FEW_ROWS_ON` or
    `ONE_ROW_ON`, and qkv's operators loaded (built at their first use, `say` told). Which programs
    take them: `serves`."""
    weight = model.output.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return "qkv's products are for fp32 on the CPU"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in NATIVE_PRODUCTS_ON + MANY_ROWS_ON + FEW_ROWS_ON + ONE_ROW_ON:
        return f"qkv's products are for AVX2 and AVX-512; oneDNN's serve {capability}"
    return native.load(say)
