"""The compiled decoder step's cache (`qkv.inference.compiled`): keys and values of every layer in
tensors of fixed shapes, one row per (sentence, beam), so that one compiled program serves a whole
search."""

from __future__ import annotations

import torch
from torch import Tensor

from qkv.inference.beam_cache import INITIAL_CAPACITY, BeamCache, _grow

SLOT_MULTIPLE = 8  # capacity and source length are padded to a multiple of this (never 0 or 1)


def _round_up(n: int, multiple: int = SLOT_MULTIPLE) -> int:
    return max(multiple, -(-n // multiple) * multiple)


class StaticCache:
    """The compiled step's cache: `BeamCache`'s contract (`reorder`, `len`) over tensors of fixed
    shapes, one row per (sentence, beam).

    It keeps `rows` rows from the first step to the last (sentences x beams at the most), so that one
    program serves the whole search: while the search has fewer (one row per sentence at the first
    step of a beam search; sentences that finished), the last row is repeated to fill them, and its
    results are dropped. A reorder moves the rows (small, at a few rows)."""

    def __init__(self, n_layers: int, rows: int, max_beams: int, max_len: int):
        self.n_layers, self.rows, self.max_beams = n_layers, rows, max_beams
        # As BeamCache: a few positions at first, doubled when full (the program's capacity is
        # dynamic). Each step attends to, and each reorder moves, every slot: allocated for the
        # search's limit (source length + 50), they made a real beam search slower than the eager one.
        self.max_capacity = _round_up(max_len)
        self.capacity = min(self.max_capacity, INITIAL_CAPACITY)
        self.length = 0
        self.self_kv: Tensor | None = None  # (2, layers, rows, heads, capacity, d_head)
        self.cross_kv: Tensor | None = None  # (2, layers, rows, heads, src_slots, d_head)
        self.cross_bias: Tensor | None = None  # (rows, 1, 1, src_slots)
        self.fallback: BeamCache | None = None  # set when this search takes the eager step

    def __len__(self) -> int:
        return self.fallback.length if self.fallback is not None else self.length

    def make_room(self) -> None:
        """Room for the next position: the slots doubled when all are written."""
        if self.length == self.capacity:
            self.capacity = min(2 * self.capacity, self.max_capacity)
            self.self_kv = _grow(self.self_kv, self.capacity, dim=4, fill=0.0)

    def filled(self, index: Tensor) -> Tensor:
        """(n,) row indices -> (rows,): the last one repeated (contiguous, as the program wants)."""
        if index.numel() == self.rows:  # every step of a search whose rows are all live
            return index.contiguous()
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
