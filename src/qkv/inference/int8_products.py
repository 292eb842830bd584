"""A decoder step's products by int8 weights, for the compiled int8 step (`qkv translate --precision
int8 --compile`, `qkv.inference.compiled`).

The eager int8 engine's products are fast, but the eager step around them is ~240 operator calls of
Python and dispatch, which a compiled step leaves out. The compiled int8 programs call the eager
engine's own int8 product, qkv's (`qkv::packed_int8_linear`, `qkv.inference.rowwise_int8`), as a C
function, its packed weights constants of the program like the fp32 programs' weights: the same
packed weights, the same arithmetic, so the compiled int8 step computes what the eager int8 step
computes, up to the summation order of the rest (LayerNorms, attention) that Inductor fuses. The beam
programs of many sentences take the same products, and one sentence's encoder is a program too, with
the projection of its output for the decoder's cross-attention (`EncoderProducts`).

On the Intel Xeon, one sentence with beam 5 of the small model 96.9 -> 122.0 sentences/s against the
programs that called PyTorch's kernels (fbgemm's, whose packed weights are an object a program cannot
hold, kept in the process under a key: sessions 40-42), 32 sentences 1.5-1.9x (benchmarks/README.md,
session 42). Since qkv's product runs wherever its operators load (AVX2 included, session 43), and
the compiled int8 step needs them, those keyed programs are gone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qkv.inference.linear import PreparedLinear
from qkv.inference.packed_linear import DecoderProducts
from qkv.inference.rowwise_int8 import RowwiseInt8Linear


def int8_map(prepared: PreparedLinear) -> RowwiseInt8Linear:
    """The int8 map of `prepared` (an int8 `PreparedLinear`) as a module a program holds: its
    `RowwiseInt8Linear`, the packed weights shared with the eager engine's."""
    if prepared.rowwise is None:
        raise ValueError(
            "int8_map takes an int8 PreparedLinear with qkv's own int8 product "
            "(qkv.inference.rowwise_int8; its operators load here)"
        )
    return prepared.rowwise


def int8_products(engine) -> DecoderProducts:
    """Every product of a decoder step by the int8 weights of `engine` (an int8 `DecodingEngine`:
    its packed weights, shared): `DecoderProducts`' layout, for the compiled steps."""
    layers = [
        (
            int8_map(self_attention.qkv),
            int8_map(self_attention.out),
            int8_map(cross_attention.q),
            int8_map(cross_attention.out),
            int8_map(feed_forward.linear1),
            int8_map(feed_forward.linear2),
        )
        for _, self_attention, cross_attention, feed_forward in engine.decoder
    ]
    return DecoderProducts(layers, int8_map(engine.output), int8=True)


class EncoderProducts(nn.Module):
    """Every product of the encoder by the int8 weights of `engine` (an int8 `DecodingEngine`): each
    layer's stacked Q/K/V, self-attention output and feed-forward's two (a ReLU fused into the first);
    and each decoder layer's cross-attention keys and values, for the first step. For the one-sentence
    encoder's program (`qkv.inference.compiled_encoder.StaticEncoder`)."""

    def __init__(self, engine):
        super().__init__()
        self.int8 = True
        encoder, decoder = engine.encoder, engine.decoder
        self.qkv = nn.ModuleList(int8_map(attention.qkv) for _, attention, _ in encoder)
        self.out = nn.ModuleList(int8_map(attention.out) for _, attention, _ in encoder)
        self.linear1 = nn.ModuleList(int8_map(ff.linear1) for _, _, ff in encoder)
        self.linear2 = nn.ModuleList(int8_map(ff.linear2) for _, _, ff in encoder)
        self.cross_kv = nn.ModuleList(int8_map(cross.kv) for _, _, cross, _ in decoder)

    def cross_keys_and_values(self, memory: Tensor) -> Tensor:
        """(sentences, src_len, d_model) encoder output -> every decoder layer's cross-attention
        keys, then values (sentences, src_len, layers * 2 * d_model): the layout
        `qkv.inference.static_cache.StaticCache.set_source` reads."""
        return torch.cat([kv(memory) for kv in self.cross_kv], dim=-1)
