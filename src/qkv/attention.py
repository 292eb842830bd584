"""Attention: the formula of the paper written out, and multi-head attention (paper section 3.2).

This is the reference model's attention, as a reader checks it against the paper. Decoding one token at
a time over a cache is the decoding engine's work (`qkv.inference`), which reuses the functions here.

Mask convention, for the whole package: a boolean mask where **True means "may attend"** and False means
"masked out" (the same meaning as a boolean ``attn_mask`` of ``torch.nn.functional.scaled_dot_product_attention``).
Masks broadcast against the scores, of shape (batch, n_heads, q_len, k_len); typical shapes are
(batch, 1, 1, k_len) for key padding and (1, 1, q_len, k_len) for causality.

A query row whose keys are all masked (for instance an empty, all-padding source) attends to nothing: its
weights are all zero and its output is the zero vector, never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(Q K^T / sqrt(d_k)), masked: (..., q_len, k_len), each row summing to 1 (or all zero when
    its query may attend to no key)."""
    d_k = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (..., q_len, k_len)
    if mask is not None:
        # The most negative finite number rather than -inf: a fully masked row then stays finite (no NaN).
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        # Exact zeros where masked; this also empties rows that had nothing to attend to.
        weights = weights.masked_fill(~mask, 0.0)
    return weights


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
    The formula written out; `MultiHeadAttention.forward` says when PyTorch's fused kernel runs instead.
    """
    weights = attention_weights(q, k, mask)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v, weights


def fused_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float = 0.0, causal=False
) -> Tensor:
    """`scaled_dot_product_attention`'s output by PyTorch's fused kernel (no weights), NaN-free as it:
    rows with no key to attend to see everything, then their output is zeroed."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
    empty_rows = ~mask.any(dim=-1, keepdim=True)  # (..., q_len, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty_rows, dropout_p=dropout_p)
    return out.masked_fill(empty_rows, 0.0)


def fused_is_faster(q: Tensor) -> bool:
    """Whether PyTorch's fused kernel beats the written-out formula for these queries. On a CPU in
    bf16/fp16 it ran 2-4x slower (measurements in benchmarks/README.md), so half precision on a CPU
    takes the written-out path."""
    return not (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16))


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
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)  # W^Q
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)  # W^K
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)  # W^V
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)  # W^O
        self.weights_dropout = nn.Dropout(dropout)  # on the attention weights
        # The function `project` computes with (qkv.kernels.use_fast_kernels sets its own).
        self.linear = F.linear

    @property
    def dropout(self) -> float:
        return self.weights_dropout.p

    def split_heads(self, x: Tensor) -> Tensor:
        """(batch, len, d_model) -> (batch, n_heads, len, d_head)"""
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_heads, self.d_head).transpose(1, 2)

    def merge_heads(self, x: Tensor) -> Tensor:
        """(batch, n_heads, len, d_head) -> (batch, len, d_model): the concatenation of the heads."""
        batch, _, length, _ = x.shape
        return x.transpose(1, 2).reshape(batch, length, self.d_model)

    def project(self, x: Tensor, *projections: nn.Linear) -> tuple[Tensor, ...]:
        """x through several projections (W^Q, W^K, W^V of self-attention) as one product, their
        weights stacked as nn.MultiheadAttention's in_proj_weight: faster than a product each."""
        weight = torch.cat([projection.weight for projection in projections])
        biases = [projection.bias for projection in projections]
        bias = None if biases[0] is None else torch.cat(biases)
        return self.linear(x, weight, bias).chunk(len(projections), dim=-1)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from x (batch, q_len, d_model) to itself, or to `memory` (batch, k_len, d_model).

        mask: True = may attend, broadcastable to (batch, n_heads, q_len, k_len).
        causal: also forbid attending to later positions (decoder self-attention).
        need_weights: return the per-head attention weights (batch, n_heads, q_len, k_len).
        Returns (output (batch, q_len, d_model), weights or None).
        """
        if memory is None:  # self-attention: Q = X W^Q, K = X W^K, V = X W^V
            q, k, v = self.project(x, self.q_proj, self.k_proj, self.v_proj)
        else:  # cross-attention: Q = X W^Q, K = M W^K, V = M W^V for the encoder's output M
            q, (k, v) = self.q_proj(x), self.project(memory, self.k_proj, self.v_proj)
        q = self.split_heads(q)  # (batch, n_heads, q_len, d_head)
        k, v = self.split_heads(k), self.split_heads(v)  # (batch, n_heads, k_len, d_head)
        dropout_p = self.dropout if self.training else 0.0

        if not need_weights and fused_is_faster(q):
            # PyTorch's fused kernel; its causal flag stands in for the mask when nothing else is masked.
            if causal and mask is not None:
                mask = mask & causal_mask(q.size(2), k.size(2), device=x.device)
            out = fused_attention(q, k, v, mask, dropout_p, causal=causal and mask is None)
            weights = None
        else:
            # The formula written out (section 3.2.1), dropout on the weights as the paper's code.
            if causal:
                step_mask = causal_mask(q.size(2), k.size(2), device=x.device)
                mask = step_mask if mask is None else mask & step_mask
            weights = self.weights_dropout(attention_weights(q, k, mask))
            out = weights @ v
        return self.out_proj(self.merge_heads(out)), (weights if need_weights else None)
