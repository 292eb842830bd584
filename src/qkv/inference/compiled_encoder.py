"""The encoder as a compiled program: of one sentence, with the projection of its output into every
decoder layer's cross-attention keys and values (what the first decoder step needs); of many, alone.

At one sentence the eager encoder is ~60 small operator calls around its 12 products, and it runs
when the products' weights have left the processor's cache (the search before it read everything
else): held to AVX2, the small benchmark model's encoder and projection took 1.7 ms of a 20-token
greedy search of ~7 ms, against 1.1 ms for this program (AOTInductor with the decoder step's options:
`qkv.inference.aoti`). With those options, whose products are Inductor's own at one sentence, the
program lost to the eager encoder from four sentences on (2 sentences 1.1x, 4 sentences 0.93x, 32
sentences 0.57x): batches of two sentences or more take a program of their own, whose products are
oneDNN's (`aoti.library_options`), the eager encoder's, with everything around them fused by
Inductor (held to AVX2 on a Zen 4, the small benchmark model, 16 tokens a sentence: 2 sentences
1.58x the eager encoder, 8 1.27x, 32 1.16x, 128 1.08x; the base model at 32 1.06x;
benchmarks/README.md, session 28). That one does not project: a beam search's first step projects
for its own cache, and a greedy search's projection is one product after it
(`SourceEncoder.cross_kv`). Where qkv's operators load (AVX2, AVX-512), one sentence's program
multiplies by qkv's kernel instead (`packed_linear.EncoderProducts`: Inductor's products of its ~16
rows kept their sums in memory; the small model's program 1.36 -> 0.82 ms on an Intel Xeon).
It is taken where the beam program is (`buckets.WIDE_VECTORS`, measured there). The source length,
and the batch's size, are dynamic: one program serves every sentence, and one every batch.

Each program is compiled at its first use (~10-30 s for a small model) and kept beside the decoder
step's programs (`encoder-1-sentence-KEY.pt2`, `encoder-sentences-KEY.pt2`, the key as theirs:
`aoti.program_key`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.inference import aoti
from qkv.inference.digests import TensorDigests
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
    """`DecodingEngine.encode`, with the same formulas, and with `project` the stacked projection
    of its output for every decoder layer's cross-attention, as one graph for the compiler."""

    def __init__(
        self,
        model: Transformer,
        project: bool = True,
        like: StaticEncoder | None = None,
        products: nn.Module | None = None,
    ):
        super().__init__()
        self.model = model
        self.project = project
        self.n_heads = model.config.n_heads
        self.pad_id = model.config.pad_id
        self.positions = positions_table(model.src_positions)
        self.take_products(products)
        if like is not None:  # another encoder of the same model: its stacked copies, not new ones
            self.qkv_weights, self.qkv_biases = like.qkv_weights, like.qkv_biases
            self.cross_kv_weight, self.cross_kv_bias = like.cross_kv_weight, like.cross_kv_bias
            return
        self.qkv_weights, self.qkv_biases = stacked_self_attention(model.encoder.layers)
        cross = [layer.cross_attn for layer in model.decoder.layers]
        # each layer's keys, then its values: the layout `StaticCache.set_source` reads
        self.cross_kv_weight, self.cross_kv_bias = frozen_stack(
            [p for attention in cross for p in (attention.k_proj, attention.v_proj)]
        )

    def take_products(self, products: nn.Module | None) -> None:
        """Compute with `products`: int8 ones (`qkv.inference.int8_products.EncoderProducts`),
        qkv's fp32 ones (`qkv.inference.packed_linear.EncoderProducts`), or None: PyTorch's."""
        self.products = products
        self.int8 = bool(getattr(products, "int8", False))  # another program (`aoti.program_key`)
        # It calls qkv's own operators: their source is in the key too.
        self.native = products is not None

    def forward(self, src_ids: Tensor) -> tuple[Tensor, ...]:
        """src_ids (batch, src_len) -> the encoder output (batch, src_len, d_model) and, with
        `project`, its projection for cross-attention (batch, src_len, layers * 2 * d_model). Every
        source must have a real token."""
        model, n_heads = self.model, self.n_heads
        batch, src_len = src_ids.shape
        x = model.src_embed(src_ids) + self.positions[:src_len][None]
        # (batch, 1, 1, src_len): 0 for a real token, -inf for padding
        bias = torch.where(src_ids == self.pad_id, -math.inf, 0.0).view(batch, 1, 1, src_len)
        for i, layer in enumerate(model.encoder.layers):
            h = layer.norm1(x) if layer.norm_first else x
            projected = self._qkv(i, h)
            # 3 x (batch, heads, src_len, d_head)
            q, k, v = (
                projected.view(batch, src_len, 3, n_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            )
            products = self.products
            out_proj = layer.self_attn.out_proj if products is None else products.out[i]
            attended = out_proj(_merge_heads(attention_with_bias(q, k, v, bias)))
            x = residual(layer, layer.norm1, x, attended)
            h = layer.norm2(x) if layer.norm_first else x
            x = residual(layer, layer.norm2, x, self._feed_forward(i, layer.feed_forward, h))
        memory = model.encoder.final_norm(x)
        if not self.project:
            return (memory,)
        if self.products is not None:
            return memory, self.products.cross_keys_and_values(memory)
        return memory, F.linear(memory, self.cross_kv_weight, self.cross_kv_bias)

    def _qkv(self, i: int, h: Tensor) -> Tensor:
        """Layer i's self-attention Q, K and V of h, side by side."""
        if self.products is not None:
            return self.products.qkv[i](h)
        qkv_bias = self.qkv_biases[i] if len(self.qkv_biases) else None
        return F.linear(h, self.qkv_weights[i], qkv_bias)

    def _feed_forward(self, i: int, formula: nn.Module, h: Tensor) -> Tensor:
        """Layer i's feed-forward formula, without its dropout (whatever the mode)."""
        if self.products is None:
            return formula.linear2(formula.activation(formula.linear1(h)))
        hidden = self.products.linear1[i](h)
        if formula.activation is not F.relu:  # a ReLU is in the product already
            hidden = formula.activation(hidden)
        return self.products.linear2[i](hidden)


class SourceEncoder:
    """What the compiled engine does with a source before its first step: `takes(src_ids)` says
    whether a compiled `StaticEncoder` encodes this batch (one sentence's, with the projection; or,
    with `batches`, the one of many sentences), and a call runs it (loading the program from
    `cache_dir` or compiling it there at its first call; `say`, if given, is told; a failure raises,
    and the engine keeps to the eager encoder: `unavailable`). `cross_kv(memory)` is the stacked
    cross-attention keys and values of an encoder output: the one-sentence program's own projection
    of the memory it returned last, else one product for every layer.

    Memory: stacked copies of the encoder's Q/K/V weights and of the decoder's cross-attention K/V
    weights (the programs are compiled from them; 5 x d_model^2 a layer), and a packed copy of the
    latter for the product; with qkv's products (`own_products`), a packed copy of every weight the
    one-sentence program multiplies by."""

    def __init__(
        self,
        model: Transformer,
        cache_dir: Path,
        say=None,
        batches: bool = False,
        products: nn.Module | None = None,
        digests: TensorDigests | None = None,
        own_products: Callable[[StaticEncoder], nn.Module | None] | None = None,
    ):
        self.module = StaticEncoder(model, products=products).eval()
        # For fp32: the products one sentence's program takes, made from its module when the key is
        # first asked for (qkv's, `packed_linear.EncoderProducts`, call its operators, built at
        # their first use); None where PyTorch's serve.
        self._own_products = own_products
        # the weights' digests (`aoti.program_key`), shared with the engine's other programs
        self.digests = digests
        self.batch_module = StaticEncoder(model, project=False, like=self.module).eval()
        self.cache_dir, self.say, self.batches = cache_dir, say, batches
        self.program = None  # one sentence's
        self.batch_program = None  # many sentences'
        self.unavailable: str | None = None  # why a program failed, once one has
        self.compile_seconds: float | None = None  # to compile or load one sentence's
        self._key: str | None = None
        # One call instead of one per layer (at one sentence, 104 -> 73 µs for the small model held
        # to AVX2); a packed copy of those weights (1.5 MB for the small model) beside the eager
        # step's own.
        self.projection = (
            PreparedLinear(self.module.cross_kv_weight, self.module.cross_kv_bias)
            if products is None
            else products.cross_keys_and_values  # int8: the eager int8 engine's
        )
        self._last: tuple[Tensor, Tensor] | None = None  # the program's memory, and its projection

    def takes(self, src_ids: Tensor) -> bool:
        """One sentence, or with `batches` several, each with at least one real token (a row of
        -inf would be NaN), no longer than the positions the model has (the eager encoder says what
        is wrong with a longer one)."""
        sentences, src_len = src_ids.shape
        if (
            self.unavailable
            or not 0 < src_len <= len(self.module.positions)
            or not (sentences == 1 or (sentences > 1 and self.batches))
        ):
            return False
        if sentences == 1:  # one copy to the host, not three operators (cold ones, ~300 µs)
            return any(token != self.module.pad_id for token in src_ids.tolist()[0])
        return bool((src_ids != self.module.pad_id).any(dim=1).all())

    @property
    def package_path(self) -> Path:
        return self.cache_dir / f"encoder-1-sentence-{self.key}.pt2"

    @property
    def batch_package_path(self) -> Path:
        return self.cache_dir / f"encoder-sentences-{self.key}.pt2"

    @property
    def key(self) -> str:
        if self._key is None:
            if self._own_products is not None:
                self.module.take_products(self._own_products(self.module))
                self._own_products = None
            self._key = aoti.program_key(self.module, self.digests)
        return self._key

    def __call__(self, src_ids: Tensor) -> Tensor:
        if src_ids.size(0) > 1:
            if self.batch_program is None:
                self.batch_program = aoti.load_or_compile(
                    self.batch_package_path,
                    lambda path: compile_batch_encoder(self.batch_module, path),
                    "the encoder for many sentences",
                    self.say,
                )
            return self.batch_program(src_ids.contiguous())[0]
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


def compile_batch_encoder(encoder: StaticEncoder, path: Path) -> None:
    """Export the encoder without the projection for any number of sentences of any length up to
    its `max_len`, and compile it with oneDNN's products into the package `path`. The example is
    32 sentences of 16 tokens (fewer where the model has fewer positions), whatever batch comes
    first: Inductor decides which loops run on every thread from the example's sizes (a batch of
    two short sentences would leave them on one)."""
    max_len = encoder.positions.size(0)
    token = (encoder.pad_id + 1) % encoder.model.config.src_vocab_size  # any but the padding
    example = torch.full((32, max(2, min(16, max_len))), token, dtype=torch.long)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    src_len = torch.export.Dim("src_len", min=1, max=max_len)
    dynamic_shapes = {"src_ids": {0: batch, 1: src_len}}
    aoti.export_and_package(encoder, (example,), dynamic_shapes, path, aoti.library_options())
