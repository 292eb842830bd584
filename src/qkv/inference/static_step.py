"""The decoder step that `qkv.inference.compiled` compiles: one position for every row over
`StaticCache`'s tensors of fixed shapes, with the eager engine's formulas, as one graph; whether it
can be compiled here, and its compile into a package (`qkv.inference.aoti`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from qkv.inference import aoti, native
from qkv.inference.compiled_encoder import positions_table, residual, stacked_self_attention
from qkv.inference.inductor_hooks import torch_older_than
from qkv.inference.packed_linear import DecoderProducts, feed_forward, projections
from qkv.inference.static_cache import (
    SLOT_MULTIPLE,
    attend,
    attend_with_new,
    gather_history,
    write_new_slot,
)
from qkv.inference.topk import biased_argmax, extensions_of_rows, log_softmax_topk
from qkv.model import Transformer

# The oldest PyTorch whose AOTInductor compiles the step: it calls qkv's operators as C functions
# (`aot_inductor.custom_ops_to_c_shims`, new in 2.8). PyTorch 2.4.1 and 2.7.1 stopped there after
# tracing the encoder and the step of a tiny model (12-19 s, then "KeyError:
# 'aot_inductor.custom_ops_to_c_shims'" or its AttributeError); 2.8.0, 2.13.0, 2.14.1 and 2.15.0
# pass the compiled paths' tests (session 57, `recipes/torch_versions.sh`).
COMPILED_FROM_TORCH = (2, 8)

# Whether greedy programs of many rows screen their output product (`StaticDecoderStep.screens`),
# as one row's do: qkv's int8 product finds each row's few candidates, whose exact logits are dot
# products with their own weights. The output product and argmax of 32 rows of the small benchmark
# model alone, on an Intel Xeon (AMX) as it comes: oneDNN's ~870 µs, qkv's fp32 ~690, screened
# ~215. Greedy searches of 32 sentences, two engines taking turns: small 0.82-0.85x the time, base
# 0.90-0.91x; held to AVX2 0.93-0.95x and 0.96-0.97x (benchmarks/README.md, session 53).
SCREENS_MANY_ROWS = True


class StaticDecoderStep(nn.Module):
    """One decoder position for every row, over a cache of fixed shapes: what `DecodingEngine.step`
    computes, with the same formulas, as one graph for the compiler."""

    def __init__(
        self,
        model: Transformer,
        greedy: bool = False,
        like: StaticDecoderStep | None = None,
        candidates: int = 1,
        writes_cache: bool = False,
    ):
        super().__init__()
        self.model = model
        self.greedy = greedy  # only the best token, and each row's history in its own row
        # Whether it writes this position's keys and values into `self_kv` itself (and their rows
        # into `ancestry`), or returns them for `StaticCache.write` (a CUDA graph's step, which
        # works on copies of its inputs)
        self.writes_cache = writes_cache
        # Without `greedy`: how many of each row's most likely tokens it returns (a beam search's
        # candidates, `qkv.inference.topk.extensions_of_rows`), at most the vocabulary.
        self.candidates = min(candidates, model.config.tgt_vocab_size)
        self.n_heads = model.config.n_heads
        self.positions = positions_table(model.tgt_positions)
        # Every product by qkv's own kernel (`with_products`), or None: PyTorch's
        self.products: DecoderProducts | None = None
        # Whether it calls qkv's operators, which makes it another program (`aoti.program_key`)
        self.native = False
        self.int8 = False  # whether `products` are int8 ones (`qkv.inference.int8_products`)
        # Whether its greedy program of one row may screen the output product (`screens`); False:
        # it computes every logit, for a search that keeps scores (`every_logit`)
        self.screening = True
        # Whether its candidates and greedy best tokens are qkv's operators (`topk`'s native), which
        # makes it another program too
        self.native_topk = False
        # What screens the output product of greedy programs of many rows where `products` is None
        # (`screens`; a `packed_linear.ScreenedRows`), set by the engine's programs where qkv's
        # operators load. Since session 54 qkv's products serve every greedy program on AVX2 and
        # AVX-512 (`packed_linear.serves`), so this is for a program whose products those lists
        # leave to PyTorch: screening does not hang on which products measured faster
        self.screen: nn.Module | None = None
        if like is not None:  # another step of the same model: its stacked copies, not new ones
            self.qkv_weights, self.qkv_biases = like.qkv_weights, like.qkv_biases
            return
        # Q, K and V of self-attention as one product (a frozen copy, as the eager engine keeps).
        self.qkv_weights, self.qkv_biases = stacked_self_attention(model.decoder.layers)

    def screens(self, rows: int) -> bool:
        """Whether its greedy program of `rows` rows finds the best tokens by screening the output
        product (`packed_linear.ScreenedOutput`), and returns the final hidden state in place of the
        logits (where the two differ in size: the engine tells them apart so): at one row with
        qkv's products; at more with qkv's operators (`native_topk`), whatever its products, where
        `SCREENS_MANY_ROWS`."""
        output = self.screened_output()
        if (
            output is None
            or not self.screening
            or not getattr(output, "screens", False)
            or output.out_features == self.model.config.d_model
        ):
            return False
        if rows == 1:
            return self.products is not None
        return SCREENS_MANY_ROWS and self.native_topk

    def screened_output(self) -> nn.Module | None:
        """The output product that screens: its products' (qkv's), else `screen`."""
        return self.products.output if self.products is not None else self.screen

    def _sibling(self) -> StaticDecoderStep:
        """A step of the same model and kind, its weights shared."""
        step = StaticDecoderStep(
            self.model, self.greedy, self, self.candidates, self.writes_cache
        ).eval()
        step.native_topk, step.screen = self.native_topk, self.screen
        return step

    def with_products(self, products: DecoderProducts) -> StaticDecoderStep:
        """This step, its weights shared, computing every product with `products` (qkv's kernel)."""
        step = self._sibling()
        step.products, step.native, step.int8 = products, True, products.int8
        return step

    def every_logit(self) -> StaticDecoderStep:
        """This step, its weights and products shared, never screening the output product: a
        greedy search that keeps scores needs every logit, and screening them first as well cost it
        ~100 µs a step (1.19x the time of a search of one sentence, small model)."""
        step = self._sibling()
        step.products, step.native, step.int8 = self.products, self.native, self.int8
        step.screening = False
        return step

    def forward(
        self,
        tokens: Tensor,
        position: Tensor,
        self_kv: Tensor,
        ancestry: Tensor,
        cross_kv: Tensor,
        cross_bias: Tensor,
        banned_bias: Tensor,
        beam_scores: Tensor,
    ) -> tuple[Tensor, ...]:
        """tokens (rows,) at `position` (a 0-d tensor) -> what the searches ask of a step
        (`qkv.inference.engine.NextToken`): the log-probabilities of the next token (rows, vocab),
        with the banned ones at -inf, the most likely next token (rows,) and its log-probability
        (rows,), the `candidates` most likely with theirs (rows, candidates), and a beam search's
        `candidates` best extensions of one sentence whose beams are every row, each row's score
        `beam_scores` (rows,) (`topk.extensions_of_rows`: sums (1, candidates), their rows and
        tokens; ~25 µs of calls a step after the program, beam 5, small model); with `greedy`,
        the most likely next token and the logits (rows, vocab), whose softmax only a search that
        keeps scores computes; and each layer's self-attention projection of this position (rows,
        1, 3 * d_model: queries, keys, values), whose keys and values the cache keeps
        (`StaticCache.write`): returned as the layers made them (stacked in the program, they
        cost kernels of 82 + 2 x 20 µs a step in the 32-row greedy program held to AVX2). With
        `writes_cache`, those are not returned: the program writes the keys and values into
        `self_kv` itself (`write_new_slot`), which cost less than the calls that copy them after it
        (beam 5 on one sentence, small model: ~30 µs a step).

        self_kv (2, layers, rows, heads, capacity, d_head): keys and values of the positions before
        (read only but with `writes_cache`), slot s of row r's beam in row ancestry[r, s] (`StaticCache`; with `greedy`, in
        row r: ancestry is not read). cross_kv (2, layers, rows, heads, src_slots, d_head),
        cross_bias (rows, 1, 1, src_slots): the encoder's, with 0 / -inf for real / padded source
        positions. banned_bias (vocab,): -inf for the tokens that may not come next, else 0, added
        after the softmax. beam_scores: read for the extensions only (any numbers otherwise)."""
        model, n_heads = self.model, self.n_heads
        rows = tokens.size(0)
        at = position.view(1)
        y = model.tgt_embed(tokens[:, None]) + self.positions.index_select(0, at)[None]
        capacity = self_kv.size(4)
        # (1, 1, 1, capacity): the slots of earlier positions
        slots = torch.arange(capacity, device=tokens.device)
        self_bias = torch.where(slots < position, 0.0, -math.inf).view(1, 1, 1, capacity)
        # (2, layers, rows, heads, capacity, d_head)
        history = self_kv if self.greedy else gather_history(self_kv, ancestry)
        projected = []  # each layer's queries, keys and values: the cache keeps the last two
        for i, layer in enumerate(model.decoder.layers):
            qkv_proj, self_out, cross_q, cross_out = projections(self.products, i, layer, self)
            h = layer.norm1(y) if layer.norm_first else y
            projected.append(qkv_proj(h))  # (rows, 1, 3 * d_model)
            q, k, v = projected[i].view(rows, 3, n_heads, 1, -1).unbind(1)
            attended = attend_with_new(q, history[0, i], history[1, i], self_bias, k, v)
            y = residual(layer, layer.norm1, y, self_out(attended))
            h = layer.norm2(y) if layer.norm_first else y
            q = cross_q(h).view(rows, n_heads, 1, -1)
            attended = attend(q, cross_kv[0, i], cross_kv[1, i], cross_bias)
            y = residual(layer, layer.norm2, y, cross_out(attended))
            h = layer.norm3(y) if layer.norm_first else y
            y = residual(layer, layer.norm3, y, feed_forward(self.products, i, layer, h))
        if self.writes_cache:
            write_new_slot(self_kv, ancestry, at, projected, n_heads, beams=not self.greedy)
            projected = []
        output = self.products.output if self.products is not None else model.output
        normed = model.decoder.final_norm(y)  # (rows, 1, d_model)
        if self.greedy and self.screens(rows):  # the best tokens without every logit
            hidden = normed[:, 0]
            return self.screened_output().best(hidden, banned_bias), hidden, *projected
        logits = output(normed)[:, 0]  # (rows, vocab)
        # The search's own first operations, here at a few µs instead of ~25 µs of calls a step (and
        # a beam search's candidates: ~70 µs of calls, slower still right after the program).
        if self.greedy:  # the best of log_softmax(logits) + banned_bias: the best logit's token
            best = biased_argmax(logits, banned_bias, self.native_topk)
            return best, logits, *projected
        log_probs, top_log_probs, top_tokens = log_softmax_topk(
            logits, banned_bias, self.candidates, self.native_topk
        )
        # The best is the first of the most likely: its own `max` over the vocabulary cost a pass
        # (an argmax, slow to vectorise) of the program's largest kernel (one sentence, beam 5,
        # int8: 1.04x the sentences a second).
        best_log_probs, best = top_log_probs[:, 0], top_tokens[:, 0]
        extensions = extensions_of_rows(
            top_log_probs, top_tokens, beam_scores[None], self.candidates, self.native_topk
        )
        return log_probs, best, best_log_probs, top_log_probs, top_tokens, *extensions, *projected


def compiled_step_unavailable(model: Transformer) -> str | None:
    """None if the compiled step can serve `model` here, else why not (one line)."""
    if (older := torch_older_than(COMPILED_FROM_TORCH)) is not None:
        least = ".".join(map(str, COMPILED_FROM_TORCH))
        return f"the compiled step needs PyTorch {least} or later, not {older}"
    weight = model.output.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        dtype = str(weight.dtype).removeprefix("torch.")
        return f"the compiled step runs fp32 models on the CPU, not {dtype} on {weight.device}"
    if native.compiler() is None:
        return "the compiled step needs a C++ compiler (c++, g++ or clang++) for PyTorch's Inductor"
    return None


def compile_package(step: StaticDecoderStep, arguments: tuple, path: Path) -> None:
    """Export the step for arguments like these (any capacity and source length) and compile it
    with AOTInductor into the package `path` (`qkv.inference.aoti`)."""
    capacity = torch.export.Dim("capacity", min=SLOT_MULTIPLE, max=1 << 20)
    src_slots = torch.export.Dim("src_slots", min=SLOT_MULTIPLE, max=1 << 20)
    dynamic_shapes = {
        "tokens": None, "position": None, "self_kv": {4: capacity}, "ancestry": {1: capacity},
        "cross_kv": {4: src_slots}, "cross_bias": {3: src_slots}, "banned_bias": None,
        "beam_scores": None,
    }  # fmt: skip
    rows = arguments[0].size(0)
    options, own_products_up_to = aoti.options_for(rows), aoti.own_products_up_to(rows)
    aoti.export_and_package(step, arguments, dynamic_shapes, path, options, own_products_up_to)
