"""The pieces a Transformer stack is made of: embeddings, positions, the feed-forward network, and the
encoder and decoder layers (paper section 3.1-3.5)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qkv.attention import MultiHeadAttention

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class TokenEmbedding(nn.Module):
    """Learned embeddings multiplied by sqrt(d_model) (section 3.4), so they are not drowned by positions."""

    def __init__(self, vocab_size: int, d_model: int, pad_id: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.scale = math.sqrt(d_model)

    @property
    def weight(self) -> Tensor:
        return self.embedding.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.embedding(ids) * self.scale  # (batch, len, d_model)


def sinusoidal_table(max_len: int, d_model: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(...)  (section 3.5): (max_len, d_model)."""
    position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model)
    )
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)[:, : d_model // 2]
    return table.float()


class SinusoidalPositions(nn.Module):
    """Fixed sinusoidal position encodings, added to the embeddings."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        # Not saved in checkpoints: it is a pure function of (max_len, d_model).
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        check_length(offset + length, self.max_len)
        return self.table[offset : offset + length].unsqueeze(0)  # (1, len, d_model)


class LearnedPositions(nn.Module):
    """Learned position embeddings (the paper found them nearly identical to sinusoids, section 3.5)."""

    def __init__(self, max_len: int, d_model: int):
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Embedding(max_len, d_model)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        check_length(offset + length, self.max_len)
        positions = torch.arange(offset, offset + length, device=self.embedding.weight.device)
        return self.embedding(positions).unsqueeze(0)  # (1, len, d_model)


def check_length(length: int, max_len: int) -> None:
    if length > max_len:
        raise ValueError(
            f"sequence of {length} positions is longer than the model's max_len={max_len}"
        )


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, applied to each position alone (section 3.3)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


def at_rows(sublayer: Callable[[Tensor], Tensor], x: Tensor, rows: Tensor | None) -> Tensor:
    """A position-wise sublayer computed only at `rows`, indices into the flattened (batch * len)
    positions of x (batch, len, d_model); the other positions keep x as it is. None: everywhere.

    Training skips the padding this way (`Transformer.forward`'s ``only_at``): a pad position of the
    source is never attended to, and one at the end of a target has no loss and is seen by no real
    position (those come before it, and the decoder is causal), so neither needs its feed-forward
    network, the largest product of a layer. Attention still sees every position: it needs the padded
    layout.
    """
    if rows is None:
        return sublayer(x)
    flat = x.flatten(0, 1)  # (batch * len, d_model)
    return flat.index_copy(0, rows, sublayer(flat.index_select(0, rows))).view_as(x)


class EncoderLayer(nn.Module):
    """Self-attention, then the feed-forward network; each sublayer wrapped as LayerNorm(x + Dropout(f(x)))
    (post-LN, the paper) or x + Dropout(f(LayerNorm(x))) (pre-LN, ``norm_first=True``)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=attention_dropout)
        self.feed_forward = FeedForward(d_model, d_ff, dropout=dropout, activation=activation)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        src_mask: Tensor | None,
        need_weights: bool = False,
        rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """x: (batch, src_len, d_model); src_mask: (batch, 1, 1, src_len), True = real token.

        rows: where to compute the feed-forward sublayer, see `at_rows` (None: everywhere).
        """
        if self.norm_first:
            attended, weights = self.self_attn(
                self.norm1(x), mask=src_mask, need_weights=need_weights
            )
            x = x + self.dropout(attended)
        else:
            attended, weights = self.self_attn(x, mask=src_mask, need_weights=need_weights)
            x = self.norm1(x + self.dropout(attended))
        return at_rows(self.feed_forward_sublayer, x, rows), weights

    def feed_forward_sublayer(self, x: Tensor) -> Tensor:
        if self.norm_first:
            return x + self.dropout(self.feed_forward(self.norm2(x)))
        return self.norm2(x + self.dropout(self.feed_forward(x)))


class DecoderLayer(nn.Module):
    """Masked self-attention over earlier target positions, attention over the encoder output, then the
    feed-forward network; residual connections and LayerNorm as in `EncoderLayer`."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        activation: str = "relu",
        norm_first: bool = False,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout=attention_dropout)
        self.feed_forward = FeedForward(d_model, d_ff, dropout=dropout, activation=activation)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        y: Tensor,
        memory: Tensor,
        src_mask: Tensor | None,
        need_weights: bool = False,
        rows: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """y: (batch, tgt_len, d_model); memory: (batch, src_len, d_model) from the last encoder layer.

        Returns (y, self-attention weights, cross-attention weights); weights only with need_weights.
        rows: where to compute the feed-forward sublayer, see `at_rows` (None: everywhere).
        """

        def self_attention(h):
            return self.self_attn(h, causal=True, need_weights=need_weights)

        def cross_attention(h):
            return self.cross_attn(h, memory, mask=src_mask, need_weights=need_weights)

        if self.norm_first:
            attended, self_weights = self_attention(self.norm1(y))
            y = y + self.dropout(attended)
            attended, cross_weights = cross_attention(self.norm2(y))
            y = y + self.dropout(attended)
        else:
            attended, self_weights = self_attention(y)
            y = self.norm1(y + self.dropout(attended))
            attended, cross_weights = cross_attention(y)
            y = self.norm2(y + self.dropout(attended))
        return at_rows(self.feed_forward_sublayer, y, rows), self_weights, cross_weights

    def feed_forward_sublayer(self, y: Tensor) -> Tensor:
        if self.norm_first:
            return y + self.dropout(self.feed_forward(self.norm3(y)))
        return self.norm3(y + self.dropout(self.feed_forward(y)))
