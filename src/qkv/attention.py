"""Attention: the formula of the paper written out, multi-head attention, and the KV cache for decoding.

Mask convention, for the whole package: a boolean mask where **True means "may attend"** and False means
"masked out" (the same meaning as a boolean ``attn_mask`` of ``torch.nn.functional.scaled_dot_product_attention``).
Masks broadcast against the scores, of shape (batch, n_heads, q_len, k_len); typical shapes are
(batch, 1, 1, k_len) for key padding and (1, 1, q_len, k_len) for causality.

A query row whose keys are all masked (for instance an empty, all-padding source) attends to nothing: its
weights are all zero and its output is the zero vector, never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.beam_cache import SharedCrossAttentionCache, SharedSelfAttentionCache
from qkv.kernels import Linear, dropout, frozen_cache, linear


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V  (paper section 3.2.1), returning (output, weights).

    q: (..., q_len, d_k), k: (..., k_len, d_k), v: (..., k_len, d_v); mask: True = may attend.
    Returns output (..., q_len, d_v) and the attention weights (..., q_len, k_len).
    This is the readable reference path; `MultiHeadAttention` uses PyTorch's fused kernel unless weights are
    asked for.
    """
    d_k = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (..., q_len, k_len)
    if mask is not None:
        # The most negative finite number rather than -inf: a fully masked row then stays finite (no NaN).
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        # Exact zeros where masked; this also empties rows that had nothing to attend to.
        weights = weights.masked_fill(~mask, 0.0)
    if dropout_p > 0.0:
        weights = dropout(weights, dropout_p)
    return weights @ v, weights


def attention_with_bias(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """softmax(Q K^T / sqrt(d_k) + bias) V: `scaled_dot_product_attention` with the mask given as an
    additive one (0 = may attend, -inf = masked), for decoding, where the same mask serves every layer.
    Three operations instead of seven on small tensors; every query must see at least one key."""
    scores = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.size(-1)))
    if bias is not None:
        scores.add_(bias)
    return torch.matmul(scores.softmax(dim=-1), v)


def causal_mask(q_len: int, k_len: int | None = None, device=None) -> Tensor:
    """(1, 1, q_len, k_len) mask letting query i see keys up to its own position.

    With k_len > q_len the queries are the *last* q_len positions (decoding with a cache): query i sits at
    absolute position k_len - q_len + i.
    """
    k_len = q_len if k_len is None else k_len
    offset = k_len - q_len
    query_pos = torch.arange(q_len, device=device).unsqueeze(1) + offset
    key_pos = torch.arange(k_len, device=device).unsqueeze(0)
    return (key_pos <= query_pos).view(1, 1, q_len, k_len)


@dataclass
class AttentionCache:
    """Keys and values one attention sublayer has already computed, each (batch, n_heads, len, d_head)."""

    key: Tensor | None = None
    value: Tensor | None = None


class KVCache:
    """Decoder state for incremental decoding: per layer, the self-attention keys/values of the tokens
    generated so far (appended at each step), and the cross-attention keys/values of the encoder output
    (projected once per sentence, then reused)."""

    def __init__(self, n_layers: int):
        self.self_attn = [AttentionCache() for _ in range(n_layers)]
        self.cross_attn = [AttentionCache() for _ in range(n_layers)]

    def __len__(self) -> int:
        """Number of target positions already cached."""
        first = self.self_attn[0].key if self.self_attn else None
        return 0 if first is None else first.size(2)

    def reorder(self, index: Tensor, cross_attention: bool = True) -> None:
        """Keep batch rows `index` (in that order): beam search reorders beams and drops finished sentences.

        cross_attention=False leaves the cross-attention keys/values as they are: when beams only move
        within their own sentence, every row of a sentence holds the same encoder projection already."""
        entries = (*self.self_attn, *self.cross_attn) if cross_attention else self.self_attn
        for entry in entries:
            if entry.key is not None:
                entry.key = entry.key.index_select(0, index)
                entry.value = entry.value.index_select(0, index)


def _stack(projections) -> tuple[Tensor, Tensor | None]:
    weight = torch.cat([proj.weight for proj in projections])
    has_bias = projections[0].bias is not None
    return weight, torch.cat([proj.bias for proj in projections]) if has_bias else None


def _fused_is_slower(q: Tensor) -> bool:
    """On CPU in bf16/fp16, PyTorch's fused (flash) kernel ran 2-4x slower than the written-out formula
    for sentence-length inputs (forward + backward, batch 128, 4 heads, length 32, torch 2.13, AVX-512),
    so half precision on CPU takes the reference path. So does a single query (a decoding step): fp32,
    160 rows x 4 heads, 16 keys, the written-out formula took 145 us against the fused kernel's 322 us."""
    on_cpu = q.device.type == "cpu"
    return on_cpu and (q.dtype in (torch.bfloat16, torch.float16) or q.size(-2) == 1)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    The h per-head projections are stored together as one d_model x d_model matrix each for W^Q, W^K, W^V
    (head i owns the i-th block of d_head output features), as the paper's implementation and PyTorch do.
    Self-attention: ``mha(x)``. Cross-attention: ``mha(x, memory)`` (queries from x, keys and values from
    memory).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.dropout = dropout
        self.q_proj = Linear(d_model, d_model, bias=bias)  # W^Q
        self.k_proj = Linear(d_model, d_model, bias=bias)  # W^K
        self.v_proj = Linear(d_model, d_model, bias=bias)  # W^V
        self.out_proj = Linear(d_model, d_model, bias=bias)  # W^O

    def split_heads(self, x: Tensor) -> Tensor:
        """(batch, len, d_model) -> (batch, n_heads, len, d_head)"""
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.d_head).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        """(batch, n_heads, len, d_head) -> (batch, len, d_model): the concatenation of the heads."""
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.d_model)

    def project_self(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Q, K, V of x, each (batch, len, d_model), as one matmul: faster than three on every device."""
        weight, bias = self._stacked(self.q_proj, self.k_proj, self.v_proj)
        return linear(x, weight, bias).chunk(3, dim=-1)

    def project_memory(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """K, V of the encoder output for cross-attention, as one matmul."""
        weight, bias = self._stacked(self.k_proj, self.v_proj)
        return linear(memory, weight, bias).chunk(2, dim=-1)

    def _stacked(self, *projections: nn.Linear) -> tuple[Tensor, Tensor | None]:
        """The weights (and biases) of `projections` stacked into one matrix. Inside a
        `qkv.kernels.frozen_weights` block (a search) the stacked copy is made once: stacking anew at
        every decoding step copied 3 d_model^2 numbers per layer and position."""
        cache = frozen_cache()
        if cache is None:
            return _stack(projections)
        key = ("stacked", *(id(proj.weight) for proj in projections))
        entry = cache.get(key)
        if entry is None:
            entry = cache[key] = (projections, _stack(projections))
        return entry[1]

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        cache: AttentionCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from x (batch, q_len, d_model) to itself, or to `memory` (batch, k_len, d_model).

        mask: True = may attend, broadcastable to (batch, n_heads, q_len, k_len).
        causal: also forbid attending to later positions (decoder self-attention).
        cache: for incremental decoding. Self-attention appends the new keys/values to it; cross-attention
            fills it from `memory` on the first call and reuses it afterwards (memory is then not projected
            again, only its presence says "cross-attention").
        need_weights: return the per-head attention weights (batch, n_heads, q_len, k_len); this takes the
            written-out reference path instead of the fused kernel.
        Returns (output (batch, q_len, d_model), weights or None).
        """
        if isinstance(cache, (SharedSelfAttentionCache, SharedCrossAttentionCache)):
            if need_weights:
                raise ValueError("a BeamCache does not return attention weights; use a KVCache")
            return self._forward_shared(x, memory, mask, cache), None
        if memory is not None:
            q = self.split_heads(self.q_proj(x))
            if cache is not None and cache.key is not None:
                k, v = cache.key, cache.value
            else:
                k, v = (self.split_heads(t) for t in self.project_memory(memory))
                if cache is not None:
                    cache.key, cache.value = k, v
        else:
            q, k, v = (self.split_heads(t) for t in self.project_self(x))
            if cache is not None:
                if cache.key is not None:
                    k = torch.cat([cache.key, k], dim=2)
                    v = torch.cat([cache.value, v], dim=2)
                cache.key, cache.value = k, v
        # q: (batch, n_heads, q_len, d_head); k, v: (batch, n_heads, k_len, d_head)

        q_len, k_len = q.size(2), k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        fused = not need_weights and not _fused_is_slower(q)
        # The fused kernel's own causal flag aligns queries with the first keys, which is right only when
        # there is no cache offset; a single new query may see every cached key and needs no mask at all.
        use_causal_flag = fused and causal and q_len == k_len and mask is None
        if causal and not use_causal_flag and q_len > 1:
            step_mask = causal_mask(q_len, k_len, device=x.device)
            mask = step_mask if mask is None else mask & step_mask

        if fused:
            out, weights = self._fused_attention(q, k, v, mask, dropout_p, use_causal_flag), None
        else:
            out, weights = scaled_dot_product_attention(q, k, v, mask, dropout_p)
        return self.out_proj(self.merge_heads(out)), (weights if need_weights else None)

    def _forward_shared(self, x, memory, mask, cache) -> Tensor:
        """One decoding step with a `qkv.beam_cache.BeamCache`: the beams of a sentence attend together,
        as the queries of one sequence, to the sentence's keys; the cache's mask keeps each beam to its
        own history (self-attention) or to the source's real tokens (cross-attention)."""
        if memory is None:
            q, k, v = self.project_self(x)
            k, v, bias = cache.append(k, v, self.n_heads)
        else:
            q = self.q_proj(x)
            if cache.key is None:
                cache.store(*self.project_memory(memory), mask, self.n_heads)
            k, v, bias = cache.key, cache.value, cache.bias
        q = cache.beams.group(q, self.n_heads)  # (sentences, n_heads, beams, d_head)
        # k, v: (sentences, n_heads, slots or src_len, d_head)
        if memory is not None and cache.has_empty_source:
            out, _ = scaled_dot_product_attention(q, k, v, cache.mask)  # never NaN
        elif q.device.type == "cpu":
            out = attention_with_bias(q, k, v, bias)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out_proj(cache.beams.ungroup(out))

    @staticmethod
    def _fused_attention(q, k, v, mask, dropout_p, is_causal) -> Tensor:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
        # Rows with no key to attend to: let them see everything, then zero their output, so the fused
        # kernel cannot produce NaN and the result matches the reference path.
        empty_rows = ~mask.any(dim=-1, keepdim=True)  # (..., q_len, 1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask | empty_rows, dropout_p=dropout_p
        )
        return out.masked_fill(empty_rows, 0.0)
