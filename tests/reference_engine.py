"""A decoding engine without a cache: the reference model run over each row's whole history at every
step. What `qkv.inference.DecodingEngine` must equal; `benchmarks/decode_speed.py` times it too."""

from __future__ import annotations

import torch


class TokenHistory:
    """The "cache" of `UncachedEngine`: every row's tokens so far, and its encoder output and mask,
    reordered with the beams."""

    def __init__(self):
        self.ids = self.memory = self.src_mask = None

    def reorder(self, index, cross_attention=True):
        self.ids, self.memory, self.src_mask = (
            t.index_select(0, index) for t in (self.ids, self.memory, self.src_mask)
        )


class UncachedEngine:
    def __init__(self, model):
        self.model, self.config = model, model.config

    def encode(self, src_ids):
        return self.model.encode(src_ids), self.model.src_mask(src_ids)

    def new_cache(self, max_beams=1, max_len=None, sentences=None) -> TokenHistory:
        return TokenHistory()

    def step(self, last_tokens, memory, src_mask, cache: TokenHistory):
        if cache.ids is None:  # the first step: later ones get no encoder output (see qkv.search)
            cache.memory, cache.src_mask = memory, src_mask
            cache.ids = last_tokens[:, None]
        else:
            cache.ids = torch.cat([cache.ids, last_tokens[:, None]], dim=1)
        return self.model.decode(cache.ids, cache.memory, cache.src_mask)[:, -1:]
