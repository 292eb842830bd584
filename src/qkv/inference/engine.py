"""The decoding engine: a trained model prepared for decoding one token at a time.

``engine = prepare_for_decoding(model)`` computes what ``model.encode`` and ``model.decode`` compute,
with the model's own embeddings, positions and LayerNorms and the same formulas, in the way that makes
decoding fast (tests check that its logits equal the reference model's):

- the linear maps are prepared once (`qkv.inference.linear`): oneDNN's packed weights on the CPU, the
  ReLU fused into the first feed-forward matrix, Q/K/V stacked into one matrix;
- the decoder runs one position per call over a `BeamCache`, in which the beams of a sentence share the
  sentence's keys and values, and the encoder's keys and values are projected once per sentence;
- the beams of a sentence attend together as the queries of one sequence:
  softmax(Q K^T / sqrt(d_k) + bias) V, where the additive `bias` (0 or -inf) keeps each beam to its own
  history (`attention_with_bias`).

The engine holds copies of the linear maps' weights (packed, stacked) and uses the model's own
embeddings and LayerNorms: prepare a new one after the model's parameters change. The model is left as
it is; search (`qkv.search`) runs on the engine.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from qkv.attention import attention_weights, fused_attention, fused_is_faster
from qkv.inference.beam_cache import BeamCache
from qkv.inference.linear import PreparedLinear
from qkv.inference.topk import argmax, best_extensions
from qkv.model import Transformer

# On the CPU, one query per (sentence, head) over the cache, for at most this many of them (greedy on a
# few sentences): PyTorch's fused attention, 5-9 µs against 11-14 µs for `attention_with_bias`; beyond,
# or with a query per beam, it was slower (measured on AVX-512 and AVX2, benchmarks/README.md). It made
# an eager greedy search of one sentence 5-6% faster.
FUSED_MAX_HEAD_ROWS = 32
# The encoder's self-attention on the CPU, written out with the source mask as an additive bias made
# once per batch (`attention_with_bias`), while the scores (batch x heads x src_len x src_len) are at
# most this many: PyTorch's fused kernel with a boolean mask was up to 6.5x slower there (32 sentences
# of 16 tokens, 4 heads: 364 against 99 µs a layer held to AVX2; 303 against 89 on AVX-512). It was
# faster (the formula at 0.5-0.7x) for 128-token sources in batches of 4M scores or more, and in two
# cases of 0.5M (benchmarks/README.md, "The encoder's attention", session 17).
WRITTEN_OUT_MAX_SCORES = 2**21


def attention_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """softmax(Q K^T / sqrt(d_k) + bias) V: `qkv.attention.scaled_dot_product_attention` with the mask
    given as an additive one (0 = may attend, -inf = masked), which the cache keeps for every layer.
    Three operations instead of seven on small tensors; every query must see at least one key."""
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.size(-1)))
    if bias is not None:
        scores.add_(bias)
    return torch.matmul(scores.softmax(dim=-1), v)


def log_softmax(logits: Tensor) -> Tensor:
    """(rows, vocab) logits -> fp32 log-probabilities. On the CPU, fp32 logits are overwritten: a
    second rows x vocab tensor at every step (5 MB at batch 32, beam 5, vocabulary 8000) pushed the
    weights out of the processor's cache, and a fresh one could mean fresh pages from the system."""
    log_probs = logits.float()  # the logits themselves if they are fp32
    if log_probs.device.type == "cpu":
        return torch.log_softmax(log_probs, dim=-1, out=log_probs)
    return torch.log_softmax(log_probs, dim=-1)


def without(log_probs: Tensor, banned: tuple[int, ...]) -> Tensor:
    """(rows, vocab) log-probabilities with the `banned` ids set to -inf, in place."""
    # One operation, not one per id: at one sentence a step is a few hundred microseconds.
    return log_probs.index_fill_(1, _ids_tensor(banned, log_probs.device), -math.inf)


@functools.cache
def _ids_tensor(ids: tuple[int, ...], device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # kept across calls, in and out of inference mode
        return torch.tensor(ids, dtype=torch.long, device=device)


class NextToken:
    """What the searches ask of an engine at each step, from its `step`: the next token's
    log-probabilities, the most likely next token, or a beam search's candidates. An engine whose
    step can compute these itself (`qkv.inference.compiled`: inside its compiled program) overrides
    them."""

    def step(self, last_tokens: Tensor, memory, src_mask, cache) -> Tensor:
        raise NotImplementedError

    def next_log_probs(
        self, last_tokens: Tensor, memory, src_mask, cache, banned: tuple[int, ...] = ()
    ) -> Tensor:
        """(rows,) the newest token of each row -> (rows, vocab) fp32 log-probabilities of the next
        one (`log_softmax` of `step`'s logits), with the `banned` ids at -inf: removed after the
        softmax, so that a score is what a teacher-forced forward pass gives."""
        logits = self.step(last_tokens, memory, src_mask, cache)
        return without(log_softmax(logits[:, -1]), banned)

    def next_best(
        self,
        last_tokens: Tensor,
        memory,
        src_mask,
        cache,
        banned: tuple[int, ...] = (),
        scores: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """(rows,) the newest token of each row -> the most likely next token of each row (rows,)
        and its log-probability (rows,), as `next_log_probs` gives them; None for it without
        `scores`, when the softmax is not computed at all (the best logit is the best token)."""
        if scores:
            log_probs = self.next_log_probs(last_tokens, memory, src_mask, cache, banned)
            best = argmax(log_probs)
            return best, log_probs.gather(1, best[:, None]).squeeze(1)
        logits = self.step(last_tokens, memory, src_mask, cache)[:, -1]
        return argmax(without(logits.float(), banned)), None

    def best_extensions(
        self,
        last_tokens: Tensor,
        memory,
        src_mask,
        cache,
        banned: tuple[int, ...],
        beam_scores: Tensor,
        k: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """A beam search's candidates (`qkv.inference.topk.best_extensions`): (rows,) the newest
        token of each beam, beam_scores (sentences, beams) -> the k best sums beam score +
        log-probability of the next token (`next_log_probs`) of each sentence, best first, and for
        each the beam it extends and its token (sentences, k)."""
        log_probs = self.next_log_probs(last_tokens, memory, src_mask, cache, banned)
        return best_extensions(log_probs, beam_scores, k)


def prepare_for_decoding(model: Transformer, int8: bool = False) -> DecodingEngine:
    """The engine of `model` as it is now (its device, dtype and weights). int8: every linear map
    with int8 weights (`qkv.inference.linear`; an fp32 model on the CPU), or `Int8Unavailable`."""
    return DecodingEngine(model, int8)


class _Attention:
    """One attention sublayer's projections, prepared: Q/K/V stacked for self-attention; Q alone and
    K/V stacked (applied once to the encoder output) for cross-attention."""

    def __init__(self, attention, cross: bool, int8: bool):
        self.n_heads = attention.n_heads
        if cross:
            self.q = PreparedLinear.of(attention.q_proj, int8=int8)
            self.kv = PreparedLinear.stacked(attention.k_proj, attention.v_proj, int8=int8)
        else:
            projections = attention.q_proj, attention.k_proj, attention.v_proj
            self.qkv = PreparedLinear.stacked(*projections, int8=int8)
        self.out = PreparedLinear.of(attention.out_proj, int8=int8)


class _FeedForward:
    """max(0, x W_1 + b_1) W_2 + b_2, the ReLU fused into W_1's product (another activation after it)."""

    def __init__(self, feed_forward, int8: bool):
        relu = feed_forward.activation is F.relu
        self.linear1 = PreparedLinear.of(feed_forward.linear1, relu=relu, int8=int8)
        self.activation = None if relu else feed_forward.activation
        self.linear2 = PreparedLinear.of(feed_forward.linear2, int8=int8)

    def __call__(self, x: Tensor) -> Tensor:
        hidden = self.linear1(x)
        if self.activation is not None:
            hidden = self.activation(hidden)
        return self.linear2(hidden)


def _split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(batch, len, d_model) -> (batch, n_heads, len, d_head)"""
    batch, length, d_model = x.shape
    return x.view(batch, length, n_heads, d_model // n_heads).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """(batch, n_heads, len, d_head) -> (batch, len, d_model)"""
    batch, n_heads, length, d_head = x.shape
    return x.transpose(1, 2).reshape(batch, length, n_heads * d_head)


class DecodingEngine(NextToken):
    """`encode` a batch of sources, then `step` the decoder one position at a time over `new_cache()`."""

    def __init__(self, model: Transformer, int8: bool = False):
        self.model = model
        self.config = model.config
        self.int8 = int8
        self.on_cpu = model.output.weight.device.type == "cpu"
        self.encoder = [
            (
                layer,
                _Attention(layer.self_attn, cross=False, int8=int8),
                _FeedForward(layer.feed_forward, int8),
            )
            for layer in model.encoder.layers
        ]
        self.decoder = [
            (
                layer,
                _Attention(layer.self_attn, cross=False, int8=int8),
                _Attention(layer.cross_attn, cross=True, int8=int8),
                _FeedForward(layer.feed_forward, int8),
            )
            for layer in model.decoder.layers
        ]
        self.output = PreparedLinear(model.output.weight, int8=int8)

    def new_cache(
        self, max_beams: int = 1, max_len: int | None = None, sentences: int | None = None
    ) -> BeamCache:
        """An empty decoder cache for up to `max_beams` rows per sentence and `max_len` positions
        (`sentences`: how many the search starts with, which a compiled engine's choice needs)."""
        return BeamCache(len(self.decoder), max_beams, max_len)

    # --- the encoder ---------------------------------------------------------------------------------

    def encode(self, src_ids: Tensor) -> tuple[Tensor, Tensor]:
        """src_ids (batch, src_len) -> the encoder output (batch, src_len, d_model), as
        ``model.encode``, and the source mask (batch, 1, 1, src_len), True = real token."""
        model = self.model
        src_mask = model.src_mask(src_ids)
        x = model.src_embed(src_ids) + model.src_positions(src_ids.size(1))
        bias = self._source_bias(src_mask, x.dtype)
        for layer, attention, feed_forward in self.encoder:
            if layer.norm_first:
                x = x + self._self_attention(attention, layer.norm1(x), src_mask, bias)
                x = x + feed_forward(layer.norm2(x))
            else:
                x = layer.norm1(x + self._self_attention(attention, x, src_mask, bias))
                x = layer.norm2(x + feed_forward(x))
        return model.encoder.final_norm(x), src_mask

    def _source_bias(self, src_mask: Tensor, dtype: torch.dtype) -> Tensor | None:
        """(batch, 1, 1, src_len) the source mask as an additive one (0 or -inf), for the encoder's
        attention written out (`WRITTEN_OUT_MAX_SCORES`); None where the fused kernel takes it: off
        the CPU, for large scores, and when a source has no token (its row would be all -inf)."""
        batch, _, _, src_len = src_mask.shape
        scores = batch * self.config.n_heads * src_len * src_len
        if not self.on_cpu or scores > WRITTEN_OUT_MAX_SCORES or not bool(src_mask.any(-1).all()):
            return None
        bias = torch.zeros(src_mask.shape, dtype=dtype, device=src_mask.device)
        return bias.masked_fill_(~src_mask, -math.inf)

    @staticmethod
    def _self_attention(attention: _Attention, x: Tensor, mask: Tensor, bias: Tensor | None):
        q, k, v = (_split_heads(t, attention.n_heads) for t in attention.qkv(x).chunk(3, dim=-1))
        if bias is not None:
            out = attention_with_bias(q, k, v, bias)
        elif fused_is_faster(q):
            out = fused_attention(q, k, v, mask)
        else:
            out = attention_weights(q, k, mask) @ v
        return attention.out(_merge_heads(out))

    # --- the decoder, one position per call ----------------------------------------------------------

    def step(
        self, last_tokens: Tensor, memory: Tensor, src_mask: Tensor, cache: BeamCache
    ) -> Tensor:
        """(rows,) the newest token of each row -> (rows, 1, tgt_vocab_size) logits of the next one.

        memory, src_mask: from `encode`, one row per sentence or per decoder row (read at the first
        step only: the cache keeps the cross-attention keys and values)."""
        model = self.model
        y = model.tgt_embed(last_tokens[:, None]) + model.tgt_positions(1, len(cache))
        cache.open_position(y.size(0), y.dtype, y.device)  # every layer writes this position
        for i, (layer, self_attention, cross_attention, feed_forward) in enumerate(self.decoder):
            self_entry, cross_entry = cache.self_attn[i], cache.cross_attn[i]
            if layer.norm_first:
                y = y + self._cached_self_attention(self_attention, layer.norm1(y), self_entry)
                h = layer.norm2(y)
                y = y + self._cross_attention(cross_attention, h, memory, src_mask, cross_entry)
                y = y + feed_forward(layer.norm3(y))
            else:
                y = layer.norm1(y + self._cached_self_attention(self_attention, y, self_entry))
                attended = self._cross_attention(cross_attention, y, memory, src_mask, cross_entry)
                y = layer.norm2(y + attended)
                y = layer.norm3(y + feed_forward(y))
        cache.close_position()
        return self.output(model.decoder.final_norm(y))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
        """q (sentences, heads, queries, d_head) over k, v (sentences, heads, slots, d_head)."""
        one_query = q.size(-2) == 1
        if self.on_cpu and not (one_query and q.size(0) * q.size(1) <= FUSED_MAX_HEAD_ROWS):
            return attention_with_bias(q, k, v, bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def _cached_self_attention(self, attention: _Attention, y: Tensor, entry) -> Tensor:
        """y (rows, 1, d_model): the new position's keys and values join the cache; each beam attends
        to its own history."""
        cache = entry.beams
        q, k, v = attention.qkv(y).chunk(3, dim=-1)
        k, v, bias = entry.append(k, v, attention.n_heads)  # (sentences, n_heads, slots, d_head)
        q = cache.group(q, attention.n_heads)  # (sentences, n_heads, beams, d_head)
        return attention.out(cache.ungroup(self._attend(q, k, v, bias)))

    def _cross_attention(self, attention: _Attention, y, memory, src_mask, entry) -> Tensor:
        """y (rows, 1, d_model) attends to the encoder output, projected at the first step only."""
        cache = entry.beams
        if entry.key is None:
            entry.store(*attention.kv(memory).chunk(2, dim=-1), src_mask, attention.n_heads)
        q = cache.group(attention.q(y), attention.n_heads)
        if entry.has_empty_source:  # a row of -inf would be NaN: the boolean mask, written out
            out = attention_weights(q, entry.key, entry.mask) @ entry.value
        else:
            out = self._attend(q, entry.key, entry.value, entry.bias)
        return attention.out(cache.ungroup(out))
