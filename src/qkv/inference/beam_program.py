"""Beam search on many sentences as one compiled program a step, over the eager engine's own cache.

Beam 5 on 32 sentences is 160 decoder rows. The programs of `qkv.inference.compiled` give each row
its own slots (`StaticCache`) and gather a beam's history from the rows its ancestors wrote: at 160
rows that lost to the eager step (0.83-0.90x). This program reads `BeamCache` as the eager step does:
the beams of a sentence share its slots, and an additive mask of each beam's history (`ancestry`)
keeps each beam to its own. Nothing is gathered, nothing moves when beams are reordered:

- the inputs are each layer's key and value buffers as the cache holds them (sentences, heads,
  capacity slots, d_head), and the mask of the history, (sentences, 1, beams, slots written): the
  program reads only the slots written (a slice inside, no copy), and attends to the open position's
  own new key and value without writing them. It returns each layer's projection of the position
  (queries, keys and values) for the cache to write after the call (`BeamCache.write_position`);
- where qkv's own operators build (`qkv.inference.native`), the program calls one for each layer's
  self-attention: it reads only each beam's own slots, where PyTorch's operators read all of a
  sentence's and mask four in five of them out (`attend_with_new_together`, its formula); the
  log-softmax after the program is qkv's too (a faster exponential);
- the number of sentences, the capacity, the slots written and the source length are dynamic: one
  program per beam width serves every batch, and every step as its sentences finish. Its products
  are qkv's kernel's on AVX2 (`packed_linear.serves`), on AVX-512 unless oneDNN's measure clearly
  faster while compiling (`BeamPrograms._measured_choice`), else oneDNN's (`aoti.library_options`;
  Inductor's for small weights on AVX2 were 0.979x, benchmarks/README.md, session 27);
- it returns the logits, which a log-softmax overwrites in place (inside the
  program, Inductor's log-softmax took the same time: 12.72 against 12.57 ms a step of 32
  sentences held to AVX2 on a Zen 4, and wrote a second rows x vocabulary tensor).

Beam 5, the small benchmark model, program / eager step, whole searches taking turns, held to AVX2
on a Zen 4: 8 sentences 1.13x, 32 sentences 1.01-1.09x, 128 sentences 0.98-1.00x (as the CPU comes,
32 sentences 1.05-1.10x; benchmarks/README.md, session 23): so it takes batches of up to
`MAX_SENTENCES` live sentences, larger ones once enough have finished. The first step (one row per
sentence), a search with a source of no token, and one sentence (its 5 rows are
`qkv.inference.compiled`'s) take the eager step; so does every CPU outside `buckets.WIDE_VECTORS`
(not measured there). A package per beam width (`decoder-beam-step-B-beams-KEY.pt2`) beside the
other programs, compiled at first use (~25 s for the small benchmark model).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from qkv.inference import aoti, native, product_choice
from qkv.inference.beam_cache import BeamCache
from qkv.inference.compiled_encoder import positions_table, residual, stacked_self_attention
from qkv.inference.digests import TensorDigests
from qkv.inference.engine import _merge_heads, log_softmax, without
from qkv.inference.packed_linear import DecoderProducts, feed_forward, projections
from qkv.inference.static_cache import position_input, softmax_with_new
from qkv.model import Transformer

# Beyond this many live sentences the eager step takes the position: the program was even with it at
# 128 sentences and 0.96x on a file's batches of ~200 (held to AVX2), faster at 8-32 (1.01-1.13x).
# As a batch's sentences finish, the program takes over on the same cache.
MAX_SENTENCES = 32


class SharedBeamStep(nn.Module):
    """One decoder position of `beams` rows per sentence over `BeamCache`'s layout: what
    `DecodingEngine.step` and `next_log_probs` compute, with the same formulas, as one graph."""

    def __init__(self, model: Transformer, like: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.n_heads = model.config.n_heads
        self.positions = positions_table(model.tgt_positions)
        if like is not None:  # another step of the same model: its stacked copies, not new ones
            self.qkv_weights, self.qkv_biases = like.qkv_weights, like.qkv_biases
        else:
            self.qkv_weights, self.qkv_biases = stacked_self_attention(model.decoder.layers)
        # Self-attention and the log-softmax by qkv's own operators (`qkv.inference.native`); else
        # by PyTorch's. `BeamPrograms` sets it once they are loaded.
        self.native = False
        # Every product by qkv's kernel (`qkv.inference.packed_linear`), or None: PyTorch's
        self.products: DecoderProducts | None = None

    def forward(
        self,
        tokens: Tensor,
        position: Tensor,
        keys: list[Tensor],
        values: list[Tensor],
        history_bias: Tensor,
        cross_keys: list[Tensor],
        cross_values: list[Tensor],
        cross_bias: Tensor,
    ) -> tuple[Tensor, ...]:
        """tokens (sentences, beams) at `position` (0-d) -> the next token's logits (sentences x
        beams, vocab) and each layer's self-attention projection of this position (sentences x
        beams, 1, 3 * d_model: queries, keys, values), whose keys and values the cache keeps
        (`split_heads`, `BeamCache.write_position`).

        keys[i], values[i] (sentences, heads, capacity, d_head): layer i's buffers, of which the
        first history_bias.size(-1) slots are written; history_bias (sentences, 1, beams, slots
        written): 0 in each beam's history, -inf elsewhere. cross_keys[i], cross_values[i]
        (sentences, heads, src_len, d_head) and cross_bias (sentences, 1, 1, src_len): the
        encoder's."""
        model, n_heads = self.model, self.n_heads
        sentences, beams = tokens.shape
        rows = sentences * beams
        written = history_bias.size(-1)
        at = position.view(1)
        y = model.tgt_embed(tokens.reshape(rows, 1)) + self.positions.index_select(0, at)[None]
        projected = []  # each layer's queries, keys and values: the cache keeps the last two
        for i, layer in enumerate(model.decoder.layers):
            qkv_proj, self_out, cross_q, cross_out = projections(self.products, i, layer, self)
            h = layer.norm1(y) if layer.norm_first else y
            projected.append(qkv_proj(h))  # (rows, 1, 3 * d_model)
            if self.native:
                args = (projected[i], keys[i], values[i], history_bias)
                attended = torch.ops.qkv.beam_self_attention(*args)  # (rows, 1, d_model)
            else:
                q, k, v = split_heads(projected[i], sentences, n_heads)
                history_k, history_v = keys[i][:, :, :written], values[i][:, :, :written]
                attended = attend_with_new_together(q, history_k, history_v, history_bias, k, v)
                attended = attended.reshape(rows, 1, -1)  # (sentences, beams, d_model) -> rows
            y = residual(layer, layer.norm1, y, self_out(attended))
            h = layer.norm2(y) if layer.norm_first else y
            q = cross_q(h).view(sentences, beams, n_heads, -1).transpose(1, 2)
            attended = attend_together(q, cross_keys[i], cross_values[i], cross_bias)
            attended = attended.reshape(rows, 1, -1)
            y = residual(layer, layer.norm2, y, cross_out(attended))
            h = layer.norm3(y) if layer.norm_first else y
            y = residual(layer, layer.norm3, y, feed_forward(self.products, i, layer, h))
        output = self.products.output if self.products is not None else model.output
        return output(model.decoder.final_norm(y))[:, 0], *projected  # (rows, vocab) logits


def split_heads(projected: Tensor, sentences: int, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """A layer's queries, keys and values of every beam, (sentences x beams, 1, 3 * d_model) ->
    each (sentences, heads, beams, d_head)."""
    qkv = projected.view(sentences, -1, 3, n_heads, projected.size(-1) // (3 * n_heads))
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _scores(q: Tensor, k: Tensor) -> Tensor:
    """(sentences, heads, beams, d_head) queries, (sentences, heads, slots, d_head) keys -> Q K^T /
    sqrt(d_k), (sentences, heads, beams, slots), as a broadcast product and a sum (see
    `attend_together`)."""
    return (q[:, :, :, None, :] * k[:, :, None, :, :]).sum(dim=-1).mul(1.0 / math.sqrt(q.size(-1)))


def _weighted(weights: Tensor, v: Tensor) -> Tensor:
    """(sentences, heads, beams, slots) weights, (sentences, heads, slots, d_head) values -> their
    weighted sums (sentences, heads, beams, d_head), as a broadcast product and a sum."""
    return (weights[..., None] * v[:, :, None, :, :]).sum(dim=-2)


def attend_together(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """softmax(Q K^T / sqrt(d_k) + bias) V for a sentence's beams together, (sentences, heads,
    beams, d_head) queries against (sentences, heads, slots, d_head) keys and values, bias
    broadcast to (sentences, heads, beams, slots) -> (sentences, beams, d_model).

    The engine's formula (`qkv.inference.engine.attention_with_bias`), with its two products
    written as broadcast products and sums: Inductor then computes them in its own loops, fused
    with the softmax into the layer's other kernels. As batched products (`torch.matmul`) the
    program called PyTorch's `bmm` twice an attention, each 128 products of 5 rows (32 sentences x
    4 heads) for which MKL copies both operands into its own layout first: attention was 17% of
    the program's time, and this way a search of 32 sentences was 1.009-1.111x faster, held to
    AVX2 on a Zen 4 (benchmarks/README.md, session 28)."""
    weights = _scores(q, k).add(bias).softmax(dim=-1)
    return _merge_heads(_weighted(weights, v))


def attend_with_new_together(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, new_k: Tensor, new_v: Tensor
) -> Tensor:
    """`attend_together` to the keys k and values v written so far (masked by bias) and to each
    beam's own new key and value (sentences, heads, beams, d_head), which are not in k and v yet
    (`qkv.inference.static_cache.attend_with_new`'s split softmax, `softmax_with_new`)."""
    scale = 1.0 / math.sqrt(q.size(-1))
    scores = _scores(q, k).add(bias)  # (sentences, heads, beams, written)
    new_score = (q * new_k).sum(dim=-1, keepdim=True).mul(scale)  # (sentences, heads, beams, 1)
    weights, new_weight, total = softmax_with_new(scores, new_score)
    return _merge_heads((_weighted(weights, v) + new_weight * new_v) / total)


def compile_package(step: SharedBeamStep, arguments: tuple, path: Path) -> None:
    """Export the step for arguments like these (any number of sentences, capacity, slots written
    and source length) and compile it with AOTInductor into the package `path`."""
    n_layers = len(arguments[2])
    sentences = torch.export.Dim("sentences", min=1, max=1 << 16)
    capacity = torch.export.Dim("capacity", min=1, max=1 << 20)
    written = torch.export.Dim("written", min=1, max=1 << 20)
    src_len = torch.export.Dim("src_len", min=1, max=1 << 20)
    buffer = {0: sentences, 2: capacity}
    source = {0: sentences, 2: src_len}
    dynamic_shapes = {
        "tokens": {0: sentences}, "position": None,
        "keys": [buffer] * n_layers, "values": [buffer] * n_layers,
        "history_bias": {0: sentences, 3: written},
        "cross_keys": [source] * n_layers, "cross_values": [source] * n_layers,
        "cross_bias": {0: sentences, 3: src_len},
    }  # fmt: skip
    aoti.export_and_package(step, arguments, dynamic_shapes, path, aoti.library_options())


def package_name(beams: int | str, key: str) -> str:
    """The file a beam program of `beams` beams a sentence (or a glob's "*") and this key is kept in."""
    return f"decoder-beam-step-{beams}-beams-{key}.pt2"


class BeamPrograms:
    """An engine's compiled beam steps (`SharedBeamStep`), one per beam width, kept in `cache_dir`
    (`CompiledEngine`'s). `takes(cache)` says whether a step runs here; `next_log_probs` runs it."""

    def __init__(
        self,
        model: Transformer,
        cache_dir: Path,
        like: nn.Module,
        say=None,
        products=None,
        digests: TensorDigests | None = None,
        measured=None,
    ):
        self.step = SharedBeamStep(model, like=like).eval()
        # the weights' digests (`aoti.program_key`), shared with the engine's other programs
        self.digests = digests
        self.products = products  # () -> the products the step takes (None: PyTorch's)
        # () -> qkv's products where the step takes them only as measured here, else None
        # (`_measured_choice`)
        self.measured = measured
        self.measured_ratio: float | None = None  # their time / oneDNN's, where measured
        self.cache_dir, self.say = cache_dir, say
        self.programs: dict[int, object] = {}  # beams -> the loaded program, as a function
        self.compile_seconds: dict[int, float] = {}
        self._key: str | None = None
        self._native_checked = False

    @staticmethod
    def takes(cache) -> bool:
        """Whether this position of `cache` runs on a beam program: a `BeamCache` of 2 to
        `MAX_SENTENCES` sentences, each with its full width of beams, and sources of at least one
        token."""
        return (
            isinstance(cache, BeamCache)
            and cache.max_beams > 1
            and cache.width == cache.max_beams
            and cache.n_sentences is not None
            and 1 < cache.n_sentences <= MAX_SENTENCES
            and cache.length > 0
            and not cache.has_empty_source
        )

    def use_native(self, beams: int) -> None:
        """Load qkv's operators for the step (built at their first use on this machine), or say once
        why the step takes PyTorch's operators; and choose its products (for `beams` beams a
        sentence, where measured)."""
        if self._native_checked:
            return
        self._native_checked = True
        why = native.load(self.say)
        self.step.native = why is None
        if why is None and self.products is not None:
            self.step.products = self.products()  # None where qkv's fp32 products do not serve
            if self.step.products is None and self.measured is not None:
                self.step.products = self._measured_choice(beams)
            # int8 products: another program (`aoti.program_key`)
            self.step.int8 = getattr(self.step.products, "int8", False)
        if why is not None and self.say:
            self.say(f"{why}: beam search takes PyTorch's operators")

    def _measured_choice(self, beams: int) -> DecoderProducts | None:
        """qkv's products (`measured`) or None (oneDNN's), where that is measured on this CPU: a
        program kept from either choice says what was chosen as it was compiled (no measuring, no
        second compile); else the products of `MAX_SENTENCES` sentences of `beams` beams, timed both
        ways (`product_choice`). Where oneDNN's cannot be timed, PyTorch's, as without measuring."""
        candidate = self.measured()
        if candidate is None:
            return None
        for products in (candidate, None):
            self.step.products = products
            key = aoti.program_key(self.step, self.digests)
            if any(self.cache_dir.glob(package_name("*", key))):
                return products
        rows = beams * MAX_SENTENCES
        try:
            takes, self.measured_ratio = product_choice.takes_qkvs(self.step, candidate, rows)
        except (RuntimeError, AttributeError):  # no oneDNN in this PyTorch: no choice to make
            return None
        return candidate if takes else None

    def package_path(self, beams: int) -> Path:
        self.use_native(beams)  # a program that calls the operator is another program: another key
        if self._key is None:
            self._key = aoti.program_key(self.step, self.digests)
        return self.cache_dir / package_name(beams, self._key)

    def program(self, arguments: tuple):
        """The program for this beam width, a function of the step's arguments: loaded, from the
        cache, or compiled and saved."""
        beams = arguments[0].size(1)
        if beams not in self.programs:
            started = time.perf_counter()
            program = aoti.load_or_compile(
                self.package_path(beams),
                lambda path: compile_package(self.step, arguments, path),
                f"the decoder step for {beams} beams a sentence",
                self.say,
            )
            # The package takes the tensors of the lists one by one.
            self.programs[beams] = lambda *given: program(*pytree.tree_leaves(given))
            self.compile_seconds[beams] = time.perf_counter() - started
        return self.programs[beams]

    def arguments(self, last_tokens: Tensor, cache: BeamCache) -> tuple:
        """The program's inputs for this position; opens it in `cache` (`write_position` closes
        it)."""
        sentences, beams = cache.n_sentences, cache.max_beams
        written = cache.length * beams
        cache.open_position(sentences * beams, torch.float32, last_tokens.device)
        history_bias = cache.bias[..., :written].contiguous()  # (sentences, 1, beams, written)
        cross_bias = cache.source_bias
        if cross_bias is None:  # nothing masked: a bias of zeros
            src_len = cache.cross_attn[0].key.size(2)  # (sentences, heads, src_len, d_head)
            cross_bias = history_bias.new_zeros(sentences, 1, 1, src_len)
        return (
            last_tokens.reshape(sentences, beams).contiguous(),
            position_input(cache.length),
            [entry.key for entry in cache.self_attn],
            [entry.value for entry in cache.self_attn],
            history_bias,
            [entry.key for entry in cache.cross_attn],
            [entry.value for entry in cache.cross_attn],
            cross_bias,
        )

    def next_log_probs(self, last_tokens: Tensor, cache: BeamCache, banned: tuple[int, ...]):
        """(rows,) the newest tokens -> (rows, vocab) log-probabilities of the next ones, from the
        program (compiled at its first use): exceptions from compiling or running it propagate."""
        arguments = self.arguments(last_tokens, cache)
        # On an exception the position stays open, and the eager step may open it again.
        logits, *projected = self.program(arguments)(*arguments)
        n_heads = self.step.n_heads
        cache.write_position([split_heads(p, cache.n_sentences, n_heads)[1:] for p in projected])
        log_probs = torch.ops.qkv.log_softmax_(logits) if self.step.native else log_softmax(logits)
        return without(log_probs, banned)
