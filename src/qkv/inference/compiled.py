"""A decoder step with no Python in it, for batches of a few rows (one sentence at a time).

At batch 1 the eager engine's step is ~240 small PyTorch operators, and its products of one row by a
matrix (oneDNN's packed call, ~15 µs each at 256 x 256 where the arithmetic takes ~3) cost more than
the arithmetic: CTranslate2 decoded a sentence 2x faster. Here the step is one program, compiled by
PyTorch's Inductor for a fixed number of rows:

- the cache has fixed shapes: keys and values of every layer in one tensor (2, layers, rows, heads,
  capacity, d_head), preallocated for the search's longest output and written at the step's position;
  a slot not written yet is zero and masked out (-inf);
- the encoder's keys and values are projected once per search, padded to a multiple of 8 positions
  (the padding masked out);
- `torch.compile` with the weights frozen into the program (``freezing``) and Inductor's own C++
  matrix products chosen by measuring (``max_autotune`` with the CPP backend; packed weights, the bias
  and ReLU fused), and a C++ wrapper around the kernels (``cpp_wrapper``). The capacity and the source
  length are dynamic: one program per number of rows, compiled at its first use (~10-30 s; Inductor
  keeps what it compiled and measured in its cache, TORCHINDUCTOR_CACHE_DIR, by default
  /tmp/torchinductor_<user>, and a later process compiles again from it in less time).

`CompiledEngine` is `qkv.inference.DecodingEngine` with this step for batches of up to `MAX_ROWS` rows
(sentences x beams) on the CPU in fp32; larger batches, other devices and dtypes take the eager step
(at 32 rows and more oneDNN's products are as fast, and rows drop as sentences finish: one program per
count). The search (`qkv.search`) is the same. Where Inductor cannot compile (no C++ compiler, an
unsupported platform), the same step runs uncompiled for that search and the engine says so once, then
uses the eager step.
"""

from __future__ import annotations

import math
import shutil
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.inference.beam_cache import BeamCache
from qkv.inference.engine import DecodingEngine
from qkv.model import Transformer

# Sentences x beams. At 5 rows (beam 5 on one sentence) the eager step was as fast (benchmarks/README.md).
MAX_ROWS = 4
SLOT_MULTIPLE = 8  # capacity and source length are padded to a multiple of this (never 0 or 1)
INDUCTOR_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "cpp_wrapper": True,
}


def compiled_step_unavailable(model: Transformer) -> str | None:
    """None if the compiled step can serve `model` here, else why not (one line)."""
    weight = model.output.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        dtype = str(weight.dtype).removeprefix("torch.")
        return f"the compiled step runs fp32 models on the CPU, not {dtype} on {weight.device}"
    if not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")):
        return "the compiled step needs a C++ compiler (c++, g++ or clang++) for PyTorch's Inductor"
    return None


def _round_up(n: int, multiple: int = SLOT_MULTIPLE) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def _positions_table(positions: nn.Module) -> Tensor:
    """(max_len, d_model): the sinusoids, or the learned position embeddings."""
    table = getattr(positions, "table", None)
    return table if table is not None else positions.embedding.weight


class StaticDecoderStep(nn.Module):
    """One decoder position for every row, over a cache of fixed shapes: what `DecodingEngine.step`
    computes, with the same formulas, as one graph for the compiler."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.n_heads = model.config.n_heads
        self.positions = _positions_table(model.tgt_positions)
        # Q, K and V of self-attention as one product (a frozen copy, as the eager engine keeps).
        self.qkv_weights = nn.ParameterList()
        self.qkv_biases = nn.ParameterList()
        for layer in model.decoder.layers:
            attention = layer.self_attn
            projections = attention.q_proj, attention.k_proj, attention.v_proj
            weight = torch.cat([p.weight.detach() for p in projections])
            self.qkv_weights.append(nn.Parameter(weight, requires_grad=False))
            if attention.q_proj.bias is not None:
                bias = torch.cat([p.bias.detach() for p in projections])
                self.qkv_biases.append(nn.Parameter(bias, requires_grad=False))

    def forward(
        self,
        tokens: Tensor,
        position: Tensor,
        self_kv: Tensor,
        cross_kv: Tensor,
        cross_bias: Tensor,
    ) -> Tensor:
        """tokens (rows,) at `position` (a 0-d tensor) -> (rows, 1, vocab) logits of the next token.

        self_kv (2, layers, rows, heads, capacity, d_head): keys and values so far; this position's are
        written into it. cross_kv (2, layers, rows, heads, src_slots, d_head), cross_bias (rows, 1, 1,
        src_slots): the encoder's, with 0 / -inf for real / padded source positions."""
        model, n_heads = self.model, self.n_heads
        rows = tokens.size(0)
        at = position.view(1)
        y = model.tgt_embed(tokens[:, None]) + self.positions.index_select(0, at)[None]
        capacity = self_kv.size(4)
        # (1, 1, 1, capacity): the slots written so far, this one included
        slots = torch.arange(capacity, device=tokens.device)
        self_bias = torch.where(slots <= position, 0.0, -math.inf).view(1, 1, 1, capacity)
        for i, layer in enumerate(model.decoder.layers):
            bias = self.qkv_biases[i] if len(self.qkv_biases) else None
            h = layer.norm1(y) if layer.norm_first else y
            q, k, v = F.linear(h, self.qkv_weights[i], bias).view(rows, 3, n_heads, 1, -1).unbind(1)
            self_kv[0, i].index_copy_(2, at, k)  # (rows, heads, capacity, d_head)
            self_kv[1, i].index_copy_(2, at, v)
            attended = _attend(q, self_kv[0, i], self_kv[1, i], self_bias)
            y = _residual(layer, layer.norm1, y, layer.self_attn.out_proj(attended))
            attention = layer.cross_attn
            h = layer.norm2(y) if layer.norm_first else y
            q = attention.q_proj(h).view(rows, n_heads, 1, -1)
            attended = _attend(q, cross_kv[0, i], cross_kv[1, i], cross_bias)
            y = _residual(layer, layer.norm2, y, attention.out_proj(attended))
            h = layer.norm3(y) if layer.norm_first else y
            y = _residual(layer, layer.norm3, y, layer.feed_forward(h))
        return model.output(model.decoder.final_norm(y))


def _attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """softmax(Q K^T / sqrt(d_k) + bias) V for (rows, heads, 1, d_head) queries -> (rows, 1, d_model)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1))) + bias
    out = torch.matmul(scores.softmax(dim=-1), v)  # (rows, heads, 1, d_head)
    return out.transpose(1, 2).reshape(q.size(0), 1, -1)


def _residual(layer, norm, y: Tensor, sublayer_out: Tensor) -> Tensor:
    """Post-LN: norm(y + f(y)); pre-LN: y + f(norm(y)) (the norm was applied to f's input)."""
    return y + sublayer_out if layer.norm_first else norm(y + sublayer_out)


# The compiled programs of every StaticDecoderStep hang on its `forward`; this one guard, the identity of
# the step's own stacked weights (new for each step), keeps each engine to its own programs. Its weights
# are constants of the program (frozen), so the guards Dynamo sets on every submodule (~30 µs a call)
# would check nothing more.
_IDENTITY = "self._modules['qkv_weights']._parameters['0']"


def _guards_worth_checking(guards) -> list[bool]:
    """Keep the guards on the inputs and the global state, and the step's identity."""
    return [not guard.name.startswith("self") or guard.name == _IDENTITY for guard in guards]


class StaticCache:
    """The compiled step's cache: `BeamCache`'s contract (`reorder`, `len`) over tensors of fixed
    shapes, one row per (sentence, beam).

    It keeps `rows` rows from the first step to the last (sentences x beams at the most), so that one
    program serves the whole search: while the search has fewer (one row per sentence at the first
    step of a beam search; sentences that finished), the last row is repeated to fill them, and its
    results are dropped. A reorder moves the rows (small, at a few rows)."""

    def __init__(self, n_layers: int, rows: int, max_beams: int, max_len: int):
        self.n_layers, self.rows, self.max_beams = n_layers, rows, max_beams
        self.capacity = _round_up(max_len)
        self.length = 0
        self.self_kv: Tensor | None = None  # (2, layers, rows, heads, capacity, d_head)
        self.cross_kv: Tensor | None = None  # (2, layers, rows, heads, src_slots, d_head)
        self.cross_bias: Tensor | None = None  # (rows, 1, 1, src_slots)
        self.fallback: BeamCache | None = None  # set when this search takes the eager step

    def __len__(self) -> int:
        return self.fallback.length if self.fallback is not None else self.length

    def filled(self, index: Tensor) -> Tensor:
        """(n,) row indices -> (rows,): the last one repeated."""
        return torch.cat([index, index[-1:].expand(self.rows - index.numel())])

    def reorder(self, index: Tensor, cross_attention: bool = True) -> None:
        """Keep rows `index`, in that order."""
        if self.fallback is not None:
            self.fallback.reorder(index, cross_attention)
            return
        if index.numel() == 0:  # every sentence is done: no step follows
            return
        index = self.filled(index)
        self.self_kv = self.self_kv.index_select(2, index)
        if cross_attention:
            self.cross_kv = self.cross_kv.index_select(2, index)
            self.cross_bias = self.cross_bias.index_select(0, index)
        self.mark_dynamic()

    def mark_dynamic(self) -> None:
        """One program serves every capacity and source length (not every number of rows)."""
        torch._dynamo.mark_dynamic(self.self_kv, 4)
        torch._dynamo.mark_dynamic(self.cross_kv, 4)
        torch._dynamo.mark_dynamic(self.cross_bias, 3)


class CompiledEngine(DecodingEngine):
    """`DecodingEngine` whose step is compiled (`StaticDecoderStep`) for batches of up to `MAX_ROWS`
    rows. `warn` says once why the compiled step is not taken, if it is not."""

    def __init__(self, model: Transformer, warn=warnings.warn):
        super().__init__(model)
        self.warn = warn
        self.unavailable = compiled_step_unavailable(model)
        self.static_step = StaticDecoderStep(model).eval()
        self.compiled_step = None
        self.compiled_rows: set[int] = set()  # the row counts compiled so far
        if self.unavailable is None:
            self.compiled_step = torch.compile(
                self.static_step,
                dynamic=False,
                fullgraph=True,
                options={"guard_filter_fn": _guards_worth_checking},
            )
        else:
            warn(f"{self.unavailable}: decoding takes the eager step")

    def new_cache(
        self, max_beams: int = 1, max_len: int | None = None, sentences: int | None = None
    ) -> BeamCache | StaticCache:
        """A `StaticCache` for `sentences` x `max_beams` rows up to `MAX_ROWS` while the compiled
        step works; else the eager engine's `BeamCache`."""
        rows = None if sentences is None else sentences * max_beams
        if self.unavailable is None and rows is not None and rows <= MAX_ROWS:
            max_len = max_len or self.config.max_len
            return StaticCache(len(self.decoder), rows, max_beams, max_len)
        return super().new_cache(max_beams, max_len)

    def step(self, last_tokens: Tensor, memory: Tensor, src_mask: Tensor, cache) -> Tensor:
        if not isinstance(cache, StaticCache):
            return super().step(last_tokens, memory, src_mask, cache)
        if cache.fallback is not None:
            return super().step(last_tokens, memory, src_mask, cache.fallback)
        if cache.self_kv is None and not self._start(cache, memory, src_mask):
            return super().step(last_tokens, memory, src_mask, cache.fallback)
        rows = last_tokens.size(0)
        # Also contiguous: a column of the ids, strided, would mean a new program.
        tokens = cache.filled(last_tokens)
        position = torch.tensor(cache.length)
        arguments = (tokens, position, cache.self_kv, cache.cross_kv, cache.cross_bias)
        if self.compiled_step is not None:
            try:
                if cache.rows in self.compiled_rows:
                    logits = self.compiled_step(*arguments)
                else:  # the options are read when it compiles; setting them costs ~20 µs a call
                    with torch._inductor.config.patch(INDUCTOR_OPTIONS):
                        logits = self.compiled_step(*arguments)
                    self.compiled_rows.add(cache.rows)
            except Exception as error:  # Inductor's failures have many types; the step is the same
                self.compiled_step = None
                why = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
                self.unavailable = f"PyTorch could not compile the decoder step here ({why})"
                self.warn(f"{self.unavailable}: decoding takes the eager step")
                cache.self_kv.select(4, cache.length).zero_()  # a failed call may have written
        if self.compiled_step is None:
            logits = self.static_step(*arguments)
        cache.length += 1
        return logits[:rows]

    def _start(self, cache: StaticCache, memory: Tensor, src_mask: Tensor) -> bool:
        """Project the encoder output for cross-attention and allocate the cache (the first step).
        False when a source has no token at all (its attention would be NaN with an additive mask):
        then this search takes the eager step, whose reference formula covers it."""
        if src_mask is not None and not bool(src_mask.any(dim=-1).all()):
            cache.fallback = BeamCache(len(self.decoder), cache.max_beams, cache.capacity)
            return False
        config = self.config
        filled = cache.filled(torch.arange(memory.size(0), device=memory.device))
        if src_mask is not None:
            src_mask = src_mask.index_select(0, filled)
        rows, src_len = cache.rows, memory.size(1)
        n_heads, d_head = config.n_heads, config.d_head
        src_slots = _round_up(src_len)
        cross_kv = memory.new_zeros((2, len(self.decoder), rows, n_heads, src_slots, d_head))
        for i, (_, _, cross_attention, _) in enumerate(self.decoder):
            kv = cross_attention.kv(memory).index_select(0, filled)
            for j, t in enumerate(kv.chunk(2, dim=-1)):  # (rows, src_len, d_model) each
                heads = t.view(rows, src_len, n_heads, d_head).transpose(1, 2)
                cross_kv[j, i, :, :, :src_len] = heads
        cross_bias = memory.new_full((rows, 1, 1, src_slots), -math.inf)
        real = cross_bias[..., :src_len]
        if src_mask is None:
            real.zero_()
        else:
            real.masked_fill_(src_mask, 0.0)
        shape = (2, len(self.decoder), rows, n_heads, cache.capacity, d_head)
        cache.self_kv = memory.new_zeros(shape)
        cache.cross_kv, cache.cross_bias = cross_kv, cross_bias
        cache.mark_dynamic()
        return True
