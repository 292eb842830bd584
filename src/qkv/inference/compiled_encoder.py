"""The encoder of one sentence as a compiled program, which also projects the encoder output into every
decoder layer's cross-attention keys and values (what the first decoder step needs).

At one sentence the eager encoder is ~60 small operator calls around its 12 products, and it runs
when the products' weights have left the processor's cache (the search before it read everything
else): held to AVX2, the small benchmark model's encoder and projection took 1.7 ms of a 20-token
greedy search of ~7 ms, against 1.1 ms for this program (AOTInductor with the decoder step's options:
`qkv.inference.aoti`). From two sentences on the program's products lose to oneDNN's packed ones
(2 sentences 1.1x, 4 sentences 0.93x, 32 sentences 0.57x), so larger batches take the eager
encoder. The source length is dynamic: one program serves every sentence up to the model's `max_len`.

The program is compiled at its first use (~10-30 s for a small model) and kept beside the decoder
step's programs (`encoder-1-sentence-KEY.pt2`, the key as theirs: `aoti.program_key`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.inference import aoti
from qkv.inference.engine import _merge_heads, attention_with_bias
from qkv.inference.linear import PreparedLinear
from qkv.model import Transformer


def positions_table(positions: nn.Module) -> Tensor:
    """(max_len, d_model): the sinusoids, or the learned position embeddings."""
    table = getattr(positions, "table", None)
    return table if table is not None else positions.embedding.weight


def frozen_stack(linears: list[nn.Linear]) -> tuple[nn.Parameter, nn.Parameter | None]:
    """The linear maps of one input as one (a frozen copy): weights stacked, biases joined."""
    weight = nn.Parameter(torch.cat([p.weight.detach() for p in linears]), requires_grad=False)
    if linears[0].bias is None:
        return weight, None
    bias = torch.cat([p.bias.detach() for p in linears])
    return weight, nn.Parameter(bias, requires_grad=False)


def residual(layer, norm, y: Tensor, sublayer_out: Tensor) -> Tensor:
    """Post-LN: norm(y + f(y)); pre-LN: y + f(norm(y)) (the norm was applied to f's input)."""
    return y + sublayer_out if layer.norm_first else norm(y + sublayer_out)


def stacked_self_attention(layers) -> tuple[nn.ParameterList, nn.ParameterList]:
    """Each layer's self-attention Q, K and V as one product: its weights stacked, and its biases
    (none where the projections have none), frozen copies."""
    weights, biases = nn.ParameterList(), nn.ParameterList()
    for layer in layers:
        attention = layer.self_attn
        weight, bias = frozen_stack([attention.q_proj, attention.k_proj, attention.v_proj])
        weights.append(weight)
        if bias is not None:
            biases.append(bias)
    return weights, biases


class StaticEncoder(nn.Module):
    """`DecodingEngine.encode` of one sentence, with the same formulas, and the stacked projection
    of its output for every decoder layer's cross-attention, as one graph for the compiler."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.n_heads = model.config.n_heads
        self.pad_id = model.config.pad_id
        self.positions = positions_table(model.src_positions)
        self.qkv_weights, self.qkv_biases = stacked_self_attention(model.encoder.layers)
        cross = [layer.cross_attn for layer in model.decoder.layers]
        # each layer's keys, then its values: the layout `StaticCache.set_source` reads
        self.cross_kv_weight, self.cross_kv_bias = frozen_stack(
            [p for attention in cross for p in (attention.k_proj, attention.v_proj)]
        )

    def forward(self, src_ids: Tensor) -> tuple[Tensor, Tensor]:
        """src_ids (1, src_len) -> the encoder output (1, src_len, d_model) and its projection for
        cross-attention (1, src_len, layers * 2 * d_model). The source must have a real token."""
        model, n_heads = self.model, self.n_heads
        batch, src_len = src_ids.shape
        x = model.src_embed(src_ids) + self.positions[:src_len][None]
        # (batch, 1, 1, src_len): 0 for a real token, -inf for padding
        bias = torch.where(src_ids == self.pad_id, -math.inf, 0.0).view(batch, 1, 1, src_len)
        for i, layer in enumerate(model.encoder.layers):
            h = layer.norm1(x) if layer.norm_first else x
            qkv_bias = self.qkv_biases[i] if len(self.qkv_biases) else None
            projected = F.linear(h, self.qkv_weights[i], qkv_bias)
            # 3 x (batch, heads, src_len, d_head)
            q, k, v = (
                projected.view(batch, src_len, 3, n_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            )
            attended = layer.self_attn.out_proj(_merge_heads(attention_with_bias(q, k, v, bias)))
            x = residual(layer, layer.norm1, x, attended)
            h = layer.norm2(x) if layer.norm_first else x
            feed_forward = (
                layer.feed_forward
            )  # its formula, without its dropout (whatever the mode)
            out = feed_forward.linear2(feed_forward.activation(feed_forward.linear1(h)))
            x = residual(layer, layer.norm2, x, out)
        memory = model.encoder.final_norm(x)
        return memory, F.linear(memory, self.cross_kv_weight, self.cross_kv_bias)


class SourceEncoder:
    """What the compiled engine does with a source before its first step: `takes(src_ids)` says
    whether the compiled `StaticEncoder` encodes this batch, and a call runs it (loading the program
    from `cache_dir` or compiling it there at the first call; `say`, if given, is told; a failure
    raises, and the engine keeps to the eager encoder: `unavailable`). `cross_kv(memory)` is the
    stacked cross-attention keys and values of an encoder output: the program's own projection of
    the memory it returned last, else one product for every layer.

    Memory: stacked copies of the encoder's Q/K/V weights and of the decoder's cross-attention K/V
    weights (the program is compiled from them; 5 x d_model^2 a layer), and a packed copy of the
    latter for the product."""

    def __init__(self, model: Transformer, cache_dir: Path, say=None):
        self.module = StaticEncoder(model).eval()
        self.cache_dir, self.say = cache_dir, say
        self.program = None
        self.unavailable: str | None = None  # why the program failed, once it has
        self.compile_seconds: float | None = None  # to compile or load it
        self._key: str | None = None
        # One call instead of one per layer (at one sentence, 104 -> 73 µs for the small model held
        # to AVX2); a packed copy of those weights (1.5 MB for the small model) beside the eager
        # step's own.
        self.projection = PreparedLinear(self.module.cross_kv_weight, self.module.cross_kv_bias)
        self._last: tuple[Tensor, Tensor] | None = None  # the program's memory, and its projection

    def takes(self, src_ids: Tensor) -> bool:
        """One sentence, with at least one real token (a row of -inf would be NaN), no longer than
        the positions the model has (the eager encoder says what is wrong with a longer one)."""
        if (
            self.unavailable
            or src_ids.size(0) != 1
            or not 0 < src_ids.size(1) <= len(self.module.positions)
        ):
            return False
        return bool((src_ids != self.module.pad_id).any())

    @property
    def package_path(self) -> Path:
        if self._key is None:
            self._key = aoti.program_key(self.module)
        return self.cache_dir / f"encoder-1-sentence-{self._key}.pt2"

    def __call__(self, src_ids: Tensor) -> tuple[Tensor, Tensor]:
        if self.program is None:
            started = time.perf_counter()
            self.program = aoti.load_or_compile(
                self.package_path,
                lambda path: compile_encoder(self.module, src_ids, path),
                "the encoder for one sentence",
                self.say,
            )
            self.compile_seconds = time.perf_counter() - started
        memory, projected = self.program(src_ids.contiguous())
        self._last = memory, projected
        return memory

    def cross_kv(self, memory: Tensor) -> Tensor:
        """(sentences, src_len, d_model) -> (sentences, src_len, layers * 2 * d_model)."""
        last, self._last = self._last, None
        if last is not None and last[0] is memory:
            return last[1]
        return self.projection(memory)


def compile_encoder(encoder: StaticEncoder, src_ids: Tensor, path: Path) -> None:
    """Export the encoder for one sentence of any length from 1 to its `max_len`, and compile it
    with AOTInductor into the package `path` (`qkv.inference.aoti`)."""
    max_len = encoder.positions.size(0)
    # An example of two tokens: an example of one would fix the length at 1.
    example = src_ids[:, :1].expand(1, 2).clone() if src_ids.size(1) < 2 else src_ids[:, :2]
    src_len = torch.export.Dim("src_len", min=1, max=max_len)
    aoti.export_and_package(encoder, (example,), {"src_ids": {1: src_len}}, path)
