"""The compiled decoder step's cache (`qkv.inference.compiled`): keys and values of every layer in
tensors of fixed shapes, one row per (sentence, beam), so that one compiled program serves a whole
search, and how the program reads it (`gather_history`, `attend`, `attend_with_new`)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from qkv.inference.beam_cache import BeamCache, _grow
from qkv.inference.engine import _merge_heads, attention_with_bias

SLOT_MULTIPLE = 8  # capacity and source length are padded to a multiple of this (never 0 or 1)
# Slots at the first step, doubled when full. Every step reads every slot (masked past the length), so
# fewer at first is less to read while a sentence is short: against 32 (as `BeamCache` starts), held
# to AVX2, a trained model's sentences one at a time with beam 5 12.17 -> 11.75 ms, greedy in batches
# of 32 3.18 -> 3.12 ms a sentence; greedy one at a time the same (AVX-512: 11.19 -> 10.91, 1.82 ->
# 1.79; benchmarks/README.md, session 18).
INITIAL_SLOTS = SLOT_MULTIPLE


def _round_up(n: int, multiple: int = SLOT_MULTIPLE) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@functools.cache
def position_input(length: int, device: torch.device | str = "cpu") -> Tensor:
    """A program's position input, a 0-d tensor on the cache's device: made once per position,
    not at every step (a new tensor right after a program costs ~10 µs: its caches are cold)."""
    with torch.inference_mode(False):  # kept across calls, in and out of inference mode
        return torch.tensor(length, device=device)


def gather_history(self_kv: Tensor, ancestry: Tensor) -> Tensor:
    """The keys and values of each row's own beam, (2, layers, rows, heads, capacity, d_head): slot
    s of row r from row ancestry[r, s] of `self_kv` (`StaticCache`); one row is its own."""
    if self_kv.size(2) == 1:
        return self_kv
    slots = torch.arange(self_kv.size(4), device=self_kv.device)
    return self_kv[:, :, ancestry, :, slots].permute(2, 3, 0, 4, 1, 5)


def write_new_slot(
    self_kv: Tensor,
    ancestry: Tensor,
    at: Tensor,
    projected: list[Tensor],
    n_heads: int,
    beams: bool,
) -> None:
    """Inside a program: the keys and values of position `at` (a 1-element tensor), each layer's in
    its self-attention projection (rows, 1, 3 * d_model: queries, keys, values), into that slot of
    each row of `self_kv` (2, layers, rows, heads, capacity, d_head); with `beams`, the slot of each
    row's `ancestry` (rows, capacity) says it is in its own row. What `StaticCache.write` does after a
    program that returns them."""
    rows = self_kv.size(2)
    # (layers, rows, 2, heads, 1, d_head) -> (2, layers, rows, heads, 1, d_head)
    new_kv = torch.stack([p.view(rows, 3, n_heads, 1, -1)[:, 1:] for p in projected])
    self_kv.index_copy_(4, at, new_kv.permute(2, 0, 1, 3, 4, 5))
    if beams:
        ancestry.index_copy_(1, at, torch.arange(rows, device=ancestry.device)[:, None])


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """The eager engine's attention for (rows, heads, 1, d_head) queries -> (rows, 1, d_model),
    as a program reads the cache (`qkv.inference.compiled`)."""
    return _merge_heads(attention_with_bias(q, k, v, bias))


def attend_with_new(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, new_k: Tensor, new_v: Tensor
) -> Tensor:
    """`attend` to the cached keys k and values v (rows, heads, capacity, d_head), masked by bias,
    and to one more key and value (rows, heads, 1, d_head), without writing them into the cache:
    softmax over [q k^T + bias, q new_k^T] / sqrt(d_k), its weights split between v and new_v.

    The softmax is written out over its two parts (their common maximum, exponentials, one sum)
    rather than over their concatenation, which Inductor copied into a buffer of its own: in the
    small model's 32-row greedy program an attention kernel took 56-59 µs this way against 60-70,
    held to AVX2 on a Zen 4 (kernel profile; benchmarks/README.md, session 29)."""
    scale = 1.0 / math.sqrt(q.size(-1))
    scores = torch.matmul(q, k.transpose(-2, -1)).mul(scale).add(bias)  # (rows, heads, 1, capacity)
    new_score = (q * new_k).sum(dim=-1, keepdim=True).mul(scale)  # (rows, heads, 1, 1)
    weights, new_weight, total = softmax_with_new(scores, new_score)
    return _merge_heads((torch.matmul(weights, v) + new_weight * new_v) / total)


def softmax_with_new(scores: Tensor, new_score: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """softmax over [scores, new_score] (new_score one more along the last dimension), in its two
    parts and unnormalised: the exponentials of each after their common maximum, and their total
    (the weights are those over the total)."""
    top = torch.maximum(scores.amax(dim=-1, keepdim=True), new_score)
    weights, new_weight = (scores - top).exp(), (new_score - top).exp()
    return weights, new_weight, weights.sum(dim=-1, keepdim=True) + new_weight


def _source_bias(
    real: Tensor | None, rows: int, src_len: int, src_slots: int, like: Tensor
) -> Tensor:
    """(rows, 1, 1, src_slots) the cross-attention's additive mask: 0 where `real` (rows, 1, 1,
    src_len) is True (every source position where it is None), -inf at padding and past the
    source."""
    bias = like.new_full((rows, 1, 1, src_slots), -math.inf)
    if real is None:
        bias[..., :src_len] = 0.0
    else:
        bias[..., :src_len].masked_fill_(real, 0.0)
    return bias


class StaticCache:
    """The compiled step's cache: `BeamCache`'s contract (`reorder`, `len`) over tensors of fixed
    shapes, one row per (sentence, beam).

    It keeps `rows` rows (sentences x beams at the most), so that one program serves many steps:
    while the search has fewer (one row per sentence at the first step of a beam search; sentences
    that finished), the last row is repeated to fill them (with one beam, finished sentences keep
    their rows instead: below), and those results are dropped.

    With several beams, a reorder moves no keys or values: row r writes the keys and values of each
    position into its own row of `self_kv`, and `ancestry[r, s]` says which row of `self_kv` holds
    slot s of the beam that is row r now (a reorder is `ancestry.index_select(0, index)`, a few
    hundred integers). The program reads each slot from there. Moving the keys and values
    themselves (0.7-1.5 MB at five rows of the small model) took 15-40 µs a step of a beam search
    of ~500 µs; gathering them costs less.

    With one beam per sentence (greedy, sampling), rows reorder only when sentences finish: then
    nothing moves; each sentence keeps its row (`live_rows`), the finished ones' rows go on being
    computed (the program's rows are fixed anyway) and their results are dropped. So the ancestry
    stays the identity and greedy search's program reads each row's history as it is (gathering it
    took 2-4% of a greedy batch of 32 sentences). One row has nothing to reorder: its programs read
    `self_kv` as it is (the gather made greedy on one sentence 2-5% slower). Once the live sentences
    fit one of `fewer_rows` (a smaller program's rows), they move there, in the search's order: a
    copy of their rows, once or twice a search, and the steps after it cost what their rows do."""

    def __init__(
        self, n_layers: int, rows: int, max_beams: int, max_len: int, fewer_rows: tuple = ()
    ):
        self.n_layers, self.rows, self.max_beams = n_layers, rows, max_beams
        # With one beam: the smaller numbers of rows (programs) the cache moves to as sentences
        # finish, smallest first (`reorder`).
        self.fewer_rows = tuple(sorted(r for r in fewer_rows if r < rows))
        # A few positions at first, doubled when full (the program's capacity is dynamic). Each step
        # attends to every slot: allocated for the search's limit (source length + 50), they made a
        # real beam search slower than the eager one.
        self.max_capacity = _round_up(max_len)
        self.capacity = min(self.max_capacity, INITIAL_SLOTS)
        self.length = 0
        self.self_kv: Tensor | None = None  # (2, layers, rows, heads, capacity, d_head)
        self.ancestry: Tensor | None = None  # (rows, capacity): the row of self_kv of each slot
        self.row_ids: Tensor | None = None  # 0 ... rows - 1
        self.cross_kv: Tensor | None = None  # (2, layers, rows, heads, src_slots, d_head)
        self.cross_bias: Tensor | None = None  # (rows, 1, 1, src_slots)
        # One beam per sentence, once a sentence has finished: the row of each sentence still
        # decoded (None: the search's rows are the first ones, the last repeated after them).
        self.live_rows: Tensor | None = None
        self._tokens: Tensor | None = None  # the program's last tokens, every row
        self._searched = 0  # rows of the search at the last step
        self.fallback: BeamCache | None = None  # set when this search takes the eager step
        # Whether the fallback's search moves here once its sentences fit a program (`take_over`).
        self.hands_over = False

    def __len__(self) -> int:
        return self.fallback.length if self.fallback is not None else self.length

    def make_room(self) -> None:
        """Room for the next position: the slots doubled when all are written."""
        if self.length == self.capacity:
            self.capacity = min(2 * self.capacity, self.max_capacity)
            self.self_kv = _grow(self.self_kv, self.capacity, dim=4, fill=0.0)
            if self.max_beams == 1:  # the ancestry stays the identity (`write`)
                self.ancestry = self._identity()
            else:
                self.ancestry = _grow(self.ancestry, self.capacity, dim=1, fill=0)

    def set_source(self, projected: Tensor, src_mask: Tensor | None, n_heads: int) -> None:
        """Lay out every layer's cross-attention keys and values, `projected` (sentences, src_len,
        layers * 2 * d_model: each layer's keys, then its values), in `cross_kv`, each sentence in
        its row(s), and the source mask as the additive `cross_bias` (0 for a real token, -inf for
        padding and the slots past the source). One copy for all layers: at one sentence, a copy per
        layer and per keys or values cost more than the product that made them."""
        sentences, src_len, width = projected.shape
        d_head = width // (2 * self.n_layers * n_heads)
        src_slots = _round_up(src_len)
        filled = self.filled(torch.arange(sentences, device=projected.device))
        # (2, layers, sentences, heads, src_len, d_head)
        heads = projected.view(sentences, src_len, self.n_layers, 2, n_heads, d_head)
        heads = heads.permute(3, 2, 0, 4, 1, 5)
        if self.rows != sentences:  # else `filled` is every sentence in its own row
            heads = heads.index_select(2, filled)
        shape = (2, self.n_layers, self.rows, n_heads, src_slots, d_head)
        self.cross_kv = projected.new_empty(shape)
        self.cross_kv[..., src_len:, :] = 0  # slots past the source: masked out, but must be finite
        self.cross_kv[..., :src_len, :] = heads
        real = None if src_mask is None else src_mask.index_select(0, filled)
        self.cross_bias = _source_bias(real, self.rows, src_len, src_slots, projected)

    def start(self, self_kv: Tensor) -> None:
        """Take the (zero) keys and values of the first step; each row its own ancestor."""
        self.self_kv = self_kv
        self.row_ids = torch.arange(self.rows, device=self_kv.device)
        self.ancestry = self._identity()

    def _identity(self) -> Tensor:
        """(rows, capacity): every slot of each row in that row."""
        return self.row_ids[:, None].expand(self.rows, self.capacity).contiguous()

    def write(self, new_kv: tuple[Tensor, ...]) -> None:
        """Append this position's keys and values, each layer's as its self-attention projected
        them, (rows, 1, 3 * d_model: queries, keys, values): each row's to its own row of
        `self_kv`, where its slot of `ancestry` points."""
        slot = self.self_kv.select(4, self.length)  # (2, layers, rows, heads, d_head)
        d_head = slot.size(-1)
        # Few rows: the operator calls cost the most, one stack and one copy (small model, 1 row:
        # 7 µs against 18 µs a layer at a time). Many: the bytes do, one copy a layer (32 rows:
        # 26 µs against 35 µs stacked; both ways ~15 µs at 16 rows, Zen 4).
        if self.rows <= 16:
            stacked = torch.stack(new_kv).view(len(new_kv), self.rows, 3, -1, d_head)
            slot.copy_(stacked[:, :, 1:].permute(2, 0, 1, 3, 4))
        else:
            for i, projected in enumerate(new_kv):
                heads = projected.view(self.rows, 3, -1, d_head)  # (rows, 3, heads, d_head)
                slot[:, i].copy_(heads[:, 1:].transpose(0, 1))
        if self.max_beams > 1:  # with one beam, rows never reorder: every slot is already its own
            self.ancestry.select(1, self.length).copy_(self.row_ids)
        self.length += 1

    def written(self) -> None:
        """The program wrote this position's keys and values itself (`write_new_slot`)."""
        self.length += 1

    def program_tokens(self, last_tokens: Tensor) -> Tensor:
        """(n,) the search's newest tokens -> (rows,) the program's: each in its sentence's row
        (`live_rows`), or first, the last repeated after them. Rows of finished sentences keep
        their last token: their results are dropped (`search_rows`)."""
        self._searched = last_tokens.numel()
        if self.live_rows is None:
            tokens = self.filled(last_tokens)
        else:
            tokens = self._tokens.index_copy(0, self.live_rows, last_tokens)
        self._tokens = tokens
        return tokens

    def search_rows(self, program_output: Tensor) -> Tensor:
        """A program output (rows, ...) -> the search's rows of it (n, ...), as `program_tokens`
        placed them."""
        if self.live_rows is not None:
            return program_output.index_select(0, self.live_rows)
        if self._searched == self.rows:
            return program_output
        return program_output[: self._searched]

    def _move_to(self, rows: int) -> None:
        """One beam per sentence: keep only the live sentences' rows, first and in the search's
        order, the last repeated to make `rows` rows (a copy of their keys and values)."""
        live = self.live_rows
        keep = torch.cat([live, live[-1:].expand(rows - live.numel())])
        self.self_kv = self.self_kv.index_select(2, keep)
        self.cross_kv = self.cross_kv.index_select(2, keep)
        self.cross_bias = self.cross_bias.index_select(0, keep)
        self._take_rows(rows, self.fewer_rows)

    def _take_rows(self, rows: int, fewer_rows: tuple) -> None:
        """From now on `rows` rows, each sentence in its own, the search's first (one beam)."""
        self.rows, self.live_rows, self._tokens = rows, None, None
        self.fewer_rows = tuple(r for r in fewer_rows if r < rows)
        self.row_ids = torch.arange(rows, device=self.self_kv.device)
        self.ancestry = self._identity()

    def take_over(self, rows: int, fewer_rows: tuple = ()) -> bool:
        """One beam per sentence, started on the eager step (`fallback`, a `BeamCache`) with more
        sentences than a program has rows: now that they fit `rows` rows, move their keys and
        values here, where the programs read them (the last sentence repeated to fill the rows).
        False, and nothing moves, if a source has no token (the eager step's formula covers it)."""
        beams = self.fallback
        cross = beams.cross_attn
        if beams.n_sentences is None or cross[0].has_empty_source:
            return False
        sentences = torch.arange(beams.n_sentences, device=cross[0].key.device)
        keep = torch.cat([sentences, sentences[-1:].expand(rows - sentences.numel())])
        self.capacity = INITIAL_SLOTS
        while self.capacity <= beams.length:  # room for the next position, as `make_room` keeps
            self.capacity *= 2
        self.capacity = min(self.capacity, self.max_capacity)
        n_heads, src_len, d_head = cross[0].key.shape[1:]
        self.self_kv = cross[0].key.new_zeros(
            (2, self.n_layers, rows, n_heads, self.capacity, d_head)
        )
        self.cross_kv = cross[0].key.new_zeros(
            (2, self.n_layers, rows, n_heads, _round_up(src_len), d_head)
        )
        for i, (own, source) in enumerate(zip(beams.self_attn, cross, strict=True)):
            # with one beam, slot t of a sentence is position t
            self.self_kv[0, i, ..., : beams.length, :] = own.key[keep, :, : beams.length]
            self.self_kv[1, i, ..., : beams.length, :] = own.value[keep, :, : beams.length]
            self.cross_kv[0, i, ..., :src_len, :] = source.key[keep]
            self.cross_kv[1, i, ..., :src_len, :] = source.value[keep]
        mask = cross[0].mask
        real = None if mask is None else mask.expand(beams.n_sentences, -1, -1, -1)[keep]
        self.cross_bias = _source_bias(real, rows, src_len, self.cross_kv.size(4), self.cross_kv)
        self.length, self.fallback = beams.length, None
        self._take_rows(rows, fewer_rows)
        return True

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
        if self.max_beams == 1:
            # Only finished sentences leave: nothing moves, each sentence keeps its row (the greedy
            # program reads every row's history there), and the others' results are dropped...
            self.live_rows = (
                index if self.live_rows is None else self.live_rows.index_select(0, index)
            )
            # ... until the live ones fit a smaller program: then they move to its rows.
            fewer = next((r for r in self.fewer_rows if r >= index.numel()), self.rows)
            if fewer < self.rows:
                self._move_to(fewer)
            return
        index = self.filled(index)
        self.ancestry = self.ancestry.index_select(0, index)
        if cross_attention:
            self.cross_kv = self.cross_kv.index_select(2, index)
            self.cross_bias = self.cross_bias.index_select(0, index)
