"""The encoder-decoder Transformer (paper section 3, figure 1): configuration, presets, masks, the model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qkv.layers import (
    ACTIVATIONS,
    DecoderLayer,
    EncoderLayer,
    LearnedPositions,
    SinusoidalPositions,
    TokenEmbedding,
)


@dataclass
class TransformerConfig:
    """Every dimension and switch of the model. Special ids must match the tokenizer the model is used with."""

    src_vocab_size: int = 8000
    tgt_vocab_size: int = 8000
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1  # residual, embedding and feed-forward dropout (P_drop, section 5.4)
    attention_dropout: float = 0.0  # on the attention weights
    max_len: int = 256  # positions the model can encode, in subword tokens
    norm_first: bool = (
        False  # False: post-LN as in the paper; True: pre-LN with a final norm per stack
    )
    positional: str = "sinusoidal"  # 'sinusoidal' | 'learned'
    activation: str = "relu"  # 'relu' (the paper) | 'gelu'
    # One embedding matrix for source and target (section 3.4; needs one vocabulary). None: share
    # when the two vocabularies have one size, as qkv's joint tokenizer gives them.
    share_embeddings: bool | None = None
    tie_output: bool = True  # output projection = target embedding matrix (section 3.4)
    pad_id: int = 0
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self) -> None:
        if self.share_embeddings is None:
            self.share_embeddings = self.src_vocab_size == self.tgt_vocab_size
        problems = []
        sizes = ("d_model", "n_heads", "d_ff", "src_vocab_size", "tgt_vocab_size", "max_len")
        problems += [f"{name} must be positive, not {getattr(self, name)}" for name in sizes
                     if getattr(self, name) < 1]  # fmt: skip
        if not problems and self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.positional not in ("sinusoidal", "learned"):
            problems.append(
                f"positional must be 'sinusoidal' or 'learned', not {self.positional!r}"
            )
        if self.activation not in ACTIVATIONS:
            problems.append(
                f"activation must be one of {sorted(ACTIVATIONS)}, not {self.activation!r}"
            )
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            problems.append(
                "share_embeddings needs src_vocab_size == tgt_vocab_size, "
                f"got {self.src_vocab_size} and {self.tgt_vocab_size}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TransformerConfig:
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides) -> TransformerConfig:
        """A named size ('tiny', 'small', 'base', 'big'), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # For tests and the built-in task: trains in seconds on a CPU.
    "tiny": dict(
        d_model=64, n_heads=4, d_ff=256, n_encoder_layers=2, n_decoder_layers=2, dropout=0.1
    ),
    # For Multi30k-sized data on a CPU.
    "small": dict(
        d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3, dropout=0.1
    ),
    # Table 3 of the paper, "base" and "big".
    "base": dict(
        d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6, dropout=0.1
    ),
    "big": dict(
        d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3
    ),
}


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """(batch, len) token ids -> (batch, 1, 1, len) key mask, True = real token (may be attended to)."""
    return (ids != pad_id)[:, None, None, :]


def _flat_rows(mask: Tensor) -> Tensor:
    """(batch, len) bool -> indices of its True entries in the flattened (batch * len) positions."""
    return mask.flatten().nonzero().squeeze(1)


def _check_only_at(only_at: Tensor, tgt_ids: Tensor) -> Tensor:
    """The decoder is causal, so a position left out may not precede one kept in its row: its hidden
    state, computed only in part, would reach the later one through self-attention."""
    if only_at.dtype != torch.bool or only_at.shape != tgt_ids.shape:
        raise ValueError(
            f"only_at must be a bool mask shaped like tgt_ids {tuple(tgt_ids.shape)}, got "
            f"{only_at.dtype} {tuple(only_at.shape)}"
        )
    if bool((only_at[:, 1:] & ~only_at[:, :-1]).any()):
        raise ValueError("only_at must be True at the start of each row and False after: padding")
    return only_at


class Encoder(nn.Module):
    """A stack of identical `EncoderLayer`s (with a final LayerNorm when pre-LN)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(*_layer_args(config)) for _ in range(config.n_encoder_layers)
        )
        self.final_norm = nn.LayerNorm(config.d_model) if config.norm_first else nn.Identity()

    def forward(
        self,
        x: Tensor,
        src_mask: Tensor | None,
        need_weights: bool = False,
        rows: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor]]:
        all_weights = []
        for layer in self.layers:
            x, weights = layer(x, src_mask, need_weights=need_weights, rows=rows)
            if need_weights:
                all_weights.append(weights)
        return self.final_norm(x), all_weights


class Decoder(nn.Module):
    """A stack of identical `DecoderLayer`s, each attending to the output of the last encoder layer."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(*_layer_args(config)) for _ in range(config.n_decoder_layers)
        )
        self.final_norm = nn.LayerNorm(config.d_model) if config.norm_first else nn.Identity()

    def forward(
        self,
        y: Tensor,
        memory: Tensor,
        src_mask: Tensor | None,
        need_weights: bool = False,
        rows: Tensor | None = None,
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        self_weights, cross_weights = [], []
        for layer in self.layers:
            y, self_w, cross_w = layer(y, memory, src_mask, need_weights=need_weights, rows=rows)
            if need_weights:
                self_weights.append(self_w)
                cross_weights.append(cross_w)
        return self.final_norm(y), self_weights, cross_weights


def _layer_args(config: TransformerConfig) -> tuple:
    return (
        config.d_model,
        config.n_heads,
        config.d_ff,
        config.dropout,
        config.attention_dropout,
        config.activation,
        config.norm_first,
    )


class Transformer(nn.Module):
    """The encoder-decoder Transformer.

    >>> model = Transformer(TransformerConfig.preset("tiny", src_vocab_size=100, tgt_vocab_size=100))
    >>> logits = model(src_ids, tgt_ids)          # (batch, tgt_len, tgt_vocab_size)

    Token ids are batch-first LongTensors padded with ``config.pad_id``. ``tgt_ids`` is the decoder input
    (BOS followed by the target, without its last token); the decoder is causal, so position t sees only
    target positions <= t.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        positions = SinusoidalPositions if config.positional == "sinusoidal" else LearnedPositions
        self.src_embed = TokenEmbedding(config.src_vocab_size, config.d_model, config.pad_id)
        if config.share_embeddings:
            self.tgt_embed = self.src_embed
        else:
            self.tgt_embed = TokenEmbedding(config.tgt_vocab_size, config.d_model, config.pad_id)
        self.src_positions = positions(config.max_len, config.d_model)
        self.tgt_positions = positions(config.max_len, config.d_model)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.output = nn.Linear(config.d_model, config.tgt_vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_output:
            self.output.weight = self.tgt_embed.embedding.weight

    def reset_parameters(self) -> None:
        """Xavier-uniform projections (as the reference implementations); embeddings N(0, d_model^-0.5),
        which the sqrt(d_model) scaling brings to unit variance; zero biases; pad embedding zero."""
        for name, param in self.named_parameters():
            if "embed" in name and "positions" not in name:
                nn.init.normal_(param, mean=0.0, std=self.config.d_model**-0.5)
            elif param.dim() > 1:
                nn.init.xavier_uniform_(param)
            elif name.endswith("bias"):
                nn.init.zeros_(param)
        with torch.no_grad():
            self.src_embed.embedding.weight[self.config.pad_id].zero_()
            self.tgt_embed.embedding.weight[self.config.pad_id].zero_()

    def src_mask(self, src_ids: Tensor) -> Tensor:
        return padding_mask(src_ids, self.config.pad_id)

    def encode(
        self, src_ids: Tensor, return_attention: bool = False, skip_padding: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """src_ids (batch, src_len) -> memory (batch, src_len, d_model), the output of the last encoder layer.

        With return_attention, also the self-attention weights of each layer, (batch, n_heads, src_len,
        src_len) each. With skip_padding, the feed-forward sublayers run at real positions only
        (`qkv.layers.at_rows`): the memory at pad positions, which no one attends to, is then not what
        the full computation gives.
        """
        x = self.src_embed(src_ids) + self.src_positions(src_ids.size(1))
        src_mask = self.src_mask(src_ids)
        rows = _flat_rows(src_mask.flatten(1)) if skip_padding else None
        memory, weights = self.encoder(
            self.embed_dropout(x), src_mask, need_weights=return_attention, rows=rows
        )
        return (memory, weights) if return_attention else memory

    def decode(
        self,
        tgt_ids: Tensor,
        memory: Tensor,
        src: Tensor,
        return_attention: bool = False,
        only_at: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        """Logits (batch, tgt_len, tgt_vocab_size) for target ids given the encoder output.

        src: the source ids (batch, src_len) or their mask from `src_mask` (batch, 1, 1, src_len).
        (Decoding one new position at a time over a cache: `qkv.inference.DecodingEngine.step`.)
        With return_attention, also {'decoder': [...], 'cross': [...]}: per layer, the self-attention weights
        (batch, n_heads, tgt_len, tgt_len so far) and the encoder-decoder weights (batch, n_heads, tgt_len,
        src_len). With only_at, see `forward`: logits (n_true, tgt_vocab_size).
        """
        src_mask = src if src.dtype == torch.bool else self.src_mask(src)
        rows = None
        if only_at is not None:
            if return_attention:
                raise ValueError("only_at computes some positions only: no attention to return")
            rows = _flat_rows(_check_only_at(only_at, tgt_ids))
        y = self.tgt_embed(tgt_ids) + self.tgt_positions(tgt_ids.size(1))
        y, self_weights, cross_weights = self.decoder(
            self.embed_dropout(y), memory, src_mask, need_weights=return_attention, rows=rows
        )
        if rows is not None:
            y = y.flatten(0, 1).index_select(0, rows)  # (n_true, d_model)
        logits = self.output(y)
        if return_attention:
            return logits, {"decoder": self_weights, "cross": cross_weights}
        return logits

    def forward(
        self,
        src_ids: Tensor,
        tgt_ids: Tensor,
        return_attention: bool = False,
        only_at: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, list[Tensor]]]:
        """Teacher-forced logits (batch, tgt_len, tgt_vocab_size).

        With return_attention, also {'encoder': [...], 'decoder': [...], 'cross': [...]}: per kind, one
        tensor (batch, n_heads, query_len, key_len) for each layer.

        only_at, a bool mask (batch, tgt_len) whose True positions come first in each row (training
        passes ``tgt_out != pad_id``): the logits at those positions only, (n_true, tgt_vocab_size) in
        row-major order, equal to ``forward(src_ids, tgt_ids)[only_at]`` (up to dropout's draws in
        training). The output projection and the feed-forward sublayers then skip the padding of both
        sides (`qkv.layers.at_rows`): on batches padded to multiples of 8, a fifth padding, a training
        step was 13% faster (benchmarks/README.md, "Skipping the padding").
        """
        if return_attention:
            if only_at is not None:
                raise ValueError("only_at computes some positions only: no attention to return")
            memory, encoder_weights = self.encode(src_ids, return_attention=True)
            logits, weights = self.decode(tgt_ids, memory, src_ids, return_attention=True)
            return logits, {"encoder": encoder_weights, **weights}
        memory = self.encode(src_ids, skip_padding=only_at is not None)
        return self.decode(tgt_ids, memory, src_ids, only_at=only_at)

    def num_parameters(self) -> int:
        """Distinct trainable parameters (tied matrices counted once)."""
        return sum(p.numel() for p in self.parameters())
