"""A decoder step's products by int8 weights, for the compiled int8 step (`qkv translate --precision
int8 --compile`, `qkv.inference.compiled`).

The eager int8 engine (`qkv.inference.linear`) multiplies by PyTorch's own quantised kernels (fbgemm on
x86), and at one sentence they are fast: the small benchmark model's 6 shapes of product at one row
took 111 µs from Python on an Intel Xeon (AMX), against 296 µs for oneDNN's fp32 on packed weights.
But the eager step around them is ~240 operator calls of Python and dispatch, which a compiled step
leaves out, and a compiled program cannot call those kernels: their packed weights are an object, not
a tensor a program can hold as a constant. So qkv's operator library (`qkv.inference.native`) keeps
the packed weights in the process under a key, a hash of the weights, and the program calls
`qkv::int8_linear(x, key, ...)` as a C function. Called from C++, the 6 products took 45 µs at one
row and 72 at five, while the same products in fp32 in an AOTInductor program took 235 and 309
(benchmarks/README.md, session 39).

The products are the eager int8 engine's own (the same packed weights, the input quantised the same
way), so the compiled int8 step computes what the eager int8 step computes, up to the summation order
of the rest (LayerNorms, attention) that Inductor fuses. The beam programs of many sentences take the
same products, and one sentence's encoder is a program too, with the projection of its output for
the decoder's cross-attention (`EncoderProducts`).

Where qkv's own int8 kernel is taken (`qkv.inference.rowwise_int8`: AMX or VNNI, each row quantised
on its own), the eager int8 engine takes it and so do the programs (`qkv::packed_int8_linear`, its
packed weights constants of the program, like the fp32 programs' weights): on the Intel Xeon, one
sentence with beam 5 of the small model 96.9 -> 122.0 sentences/s, 32 sentences 1.5-1.9x
(benchmarks/README.md, session 42). PyTorch's kernels through the key stay for AVX2 CPUs.

The process keeps a map's weights while an `Int8Linear` of them lives (engines of the same weights
share them): a long-lived process that prepares new engines, new weights each time, does not gather
old ones.
"""

from __future__ import annotations

import hashlib
import weakref

import torch
from torch import Tensor, nn

from qkv.inference import native
from qkv.inference.linear import PreparedLinear
from qkv.inference.packed_linear import DecoderProducts


class Int8Linear(nn.Module):
    """x W^T + b (then a ReLU) by the int8 weights of `prepared` (an int8 `PreparedLinear`): qkv's
    own int8 kernel where `prepared` takes it (`qkv.inference.rowwise_int8`), its packed weights
    shared; else PyTorch's, whose packed weights this process keeps for the programs that call
    them (`qkv::keep_int8_linear`)."""

    def __init__(self, prepared: PreparedLinear):
        super().__init__()
        if prepared.int8 is None and prepared.rowwise is None:
            raise ValueError("Int8Linear takes an int8 PreparedLinear")
        self.rowwise = prepared.rowwise
        self.out_features = prepared.weight.size(0)
        self.key = None
        if self.rowwise is None:
            self.key = weights_key(prepared)
            torch.ops.qkv.keep_int8_linear(self.key, prepared.int8)
            # Let go when this module goes, by a C call that no trace records
            # (`forget_int8_weights`); not at the process's exit, whose order of teardown is not
            # ours (the library may be gone by then, and so are the weights anyway).
            weakref.finalize(self, native.forget_int8_weights, self.key).atexit = False
            self.relu, self.reduce_range = int(prepared.relu), int(prepared.reduce_range)

    def forward(self, x: Tensor) -> Tensor:
        if self.rowwise is not None:
            return self.rowwise(x)
        return torch.ops.qkv.int8_linear(
            x, self.key, self.out_features, self.relu, self.reduce_range
        )


def weights_key(prepared: PreparedLinear) -> int:
    """The key of a map's int8 weights: a hash of the fp32 weights and bias they are made from (the
    same in every process, as a program kept on disk needs), 63 bits (an int64 of the program)."""
    digest = hashlib.blake2b(digest_size=8)
    for tensor in (prepared.weight, prepared.bias):
        if tensor is not None:
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().float().contiguous().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def int8_products(engine) -> DecoderProducts:
    """Every product of a decoder step by the int8 weights of `engine` (an int8 `DecodingEngine`:
    its packed weights, shared): `DecoderProducts`' layout, for the compiled steps."""
    layers = [
        (
            Int8Linear(self_attention.qkv),
            Int8Linear(self_attention.out),
            Int8Linear(cross_attention.q),
            Int8Linear(cross_attention.out),
            Int8Linear(feed_forward.linear1),
            Int8Linear(feed_forward.linear2),
        )
        for _, self_attention, cross_attention, feed_forward in engine.decoder
    ]
    return DecoderProducts(layers, Int8Linear(engine.output), int8=True)


class EncoderProducts(nn.Module):
    """Every product of the encoder by the int8 weights of `engine` (an int8 `DecodingEngine`): each
    layer's stacked Q/K/V, self-attention output and feed-forward's two (a ReLU fused into the first);
    and each decoder layer's cross-attention keys and values, for the first step. For the one-sentence
    encoder's program (`qkv.inference.compiled_encoder.StaticEncoder`)."""

    def __init__(self, engine):
        super().__init__()
        self.int8 = True
        encoder, decoder = engine.encoder, engine.decoder
        self.qkv = nn.ModuleList(Int8Linear(attention.qkv) for _, attention, _ in encoder)
        self.out = nn.ModuleList(Int8Linear(attention.out) for _, attention, _ in encoder)
        self.linear1 = nn.ModuleList(Int8Linear(ff.linear1) for _, _, ff in encoder)
        self.linear2 = nn.ModuleList(Int8Linear(ff.linear2) for _, _, ff in encoder)
        self.cross_kv = nn.ModuleList(Int8Linear(cross.kv) for _, _, cross, _ in decoder)

    def cross_keys_and_values(self, memory: Tensor) -> Tensor:
        """(sentences, src_len, d_model) encoder output -> every decoder layer's cross-attention
        keys, then values (sentences, src_len, layers * 2 * d_model): the layout
        `qkv.inference.static_cache.StaticCache.set_source` reads."""
        return torch.cat([kv(memory) for kv in self.cross_kv], dim=-1)
