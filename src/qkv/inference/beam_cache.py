"""A KV cache whose beams share their sentence's storage, so that beam search never copies the cache.

Were every decoder row (a beam) to own its keys and values, each step of a beam search would copy the
whole cache twice: once into the new order of the beams (``index_select``), once to append the new
position (``cat``). Both copies grow with the output (a fifth of the time of a beam search on a CPU).

Here the beams of a sentence share one tensor per layer, and nothing in it ever moves:

- the key of position t of beam b is written once, to slot ``t * max_beams + b`` of its sentence;
- a beam attends only to the slots of its own history. Which slots those are is a small mask,
  `ancestry` (sentences, beams, slots), kept as an additive one (0 in the history, -inf elsewhere), and
  it is all that a reorder of the beams changes: a new beam inherits its parent's row of it;
- the queries of a sentence's beams attend together, (sentences, heads, beams, d_head) against
  (sentences, heads, slots, d_head): softmax(Q K^T / sqrt(d_k) + mask) V
  (`qkv.inference.engine.attention_with_bias`). Slots outside a beam's history get weight exactly zero, so the
  result is the per-beam attention. Each beam meets all of its sentence's slots, `max_beams` times the
  products of per-beam attention: measured cheaper than gathering each beam's own keys
  (benchmarks/README.md, "CPU kernels");
- the encoder's keys and values for cross-attention are kept once per sentence, not once per beam.

Only sentences that leave the batch (finished) cause copies, of the few that take their places (below).

The contract of `reorder(index)` (what `qkv.search` does): rows are sentence-major; the new rows of a
sentence stay together, come from the rows of one old sentence, and no old sentence appears twice. That
covers reordering beams, the first expansion from one row per sentence to `max_beams`, and dropping
sentences. A drop costs least when the sentences that stay keep their places and the last ones fill the
places of those that left (`holes_filled`): then only those few move, within the buffers they are in
(`_keep`); any other order copies every sentence's keys and values. Decoding runs one position per
call.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

# Positions the buffers hold at first; doubled when full, up to `max_len` when the caller gives it.
# Starting small rather than at max_len keeps memory in step with the outputs, which usually end well
# before the search's limit (source length + 50).
INITIAL_CAPACITY = 32


class BeamCache:
    """Decoder state for incremental decoding of up to `max_beams` rows per sentence (1 for greedy).

    ``engine.step(last_tokens, memory, src_mask, cache)`` at each step (`qkv.inference.engine`) and
    ``cache.reorder(rows)`` between steps. The batch starts with one row per sentence."""

    def __init__(self, n_layers: int, max_beams: int = 1, max_len: int | None = None):
        if max_beams < 1:
            raise ValueError(f"max_beams must be at least 1, got {max_beams}")
        self.max_beams = max_beams
        self.n_sentences: int | None = None  # known at the first step
        self.width = 1  # rows per sentence now
        self.length = 0  # positions written by every layer
        self.max_len = max_len
        self.capacity = min(max_len, INITIAL_CAPACITY) if max_len else INITIAL_CAPACITY
        # Which slots each beam attends to, as an additive attention mask: 0 for the slots of the
        # beam's history, -inf elsewhere. (n_sentences, width, capacity * max_beams)
        self.ancestry: Tensor | None = None
        # The open position's part of it, (sentences, 1, beams, slots so far): shared by the layers.
        self.bias: Tensor | None = None
        # The source mask (sentences, 1, 1, src_len) that every layer's cross-attention applies, and
        # its additive form: set at the first step, selected at a drop, once for all the layers
        # (`set_source_mask`).
        self.source_mask: Tensor | None = None
        self.source_bias: Tensor | None = None
        self.has_empty_source = False
        self.source_dtype = torch.float32
        self.source_set = False
        self.self_attn = [SharedSelfAttentionCache(self) for _ in range(n_layers)]
        self.cross_attn = [SharedCrossAttentionCache(self) for _ in range(n_layers)]

    def __len__(self) -> int:
        """Number of target positions already cached."""
        return self.length

    def group(self, x: Tensor, n_heads: int) -> Tensor:
        """(rows, 1, d_model) -> (sentences, n_heads, beams, d_head): a sentence's beams as its queries."""
        rows, _, d_model = x.shape
        if rows != self.n_sentences * self.width:
            raise ValueError(
                f"{rows} decoder rows, but the cache holds {self.n_sentences} sentences x "
                f"{self.width} beams"
            )
        if x.size(1) != 1:
            raise ValueError("BeamCache decodes one position per call")
        grouped = x.view(self.n_sentences, self.width, n_heads, d_model // n_heads)
        return grouped.transpose(1, 2)

    def ungroup(self, x: Tensor) -> Tensor:
        """(sentences, n_heads, beams, d_head) -> (rows, 1, d_model): the concatenation of the heads."""
        n_sentences, n_heads, width, d_head = x.shape
        return x.transpose(1, 2).reshape(n_sentences * width, 1, n_heads * d_head)

    def open_position(self, rows: int, dtype: torch.dtype, device) -> Tensor:
        """Start position `length` for `rows` decoder rows (the engine, before the first layer): each
        beam's history gains the beam's own new slot. Returns the additive mask (sentences, 1, beams,
        slots so far): 0 in the beam's history, -inf elsewhere; shared by every layer (`bias`). A beam
        always sees its own new slot, so no row is empty."""
        if self.n_sentences is None:
            self.n_sentences = rows
        if rows != self.n_sentences * self.width:
            raise ValueError(
                f"{rows} decoder rows, but the cache holds {self.n_sentences} sentences x "
                f"{self.width} beams"
            )
        n, width, beams = self.n_sentences, self.width, self.max_beams
        if self.ancestry is None:
            shape = (n, width, self.capacity * beams)
            self.ancestry = torch.full(shape, -math.inf, dtype=dtype, device=device)
        if self.length == self.capacity:
            self.capacity *= 2
            if self.max_len and self.length < self.max_len:
                self.capacity = min(self.capacity, self.max_len)
            self.ancestry = _grow(self.ancestry, self.capacity * beams, dim=2, fill=-math.inf)
        start = self.length * beams
        # Each beam's own new slot: the diagonal of the (beams, beams) block of this position.
        self.ancestry[:, :, start : start + width].diagonal(dim1=1, dim2=2).fill_(0.0)
        self.bias = self.ancestry[:, None, :, : start + beams]
        return self.bias

    def close_position(self) -> None:
        """End the open position (the engine, after the last layer wrote its keys and values)."""
        self.length += 1

    def write_position(self, new_kv: list[tuple[Tensor, Tensor]]) -> None:
        """Write the open position's keys and values of every layer, a pair (sentences, n_heads,
        beams, d_head) each, as a compiled step gives them (`qkv.inference.beam_program`), and
        close it."""
        for entry, (k, v) in zip(self.self_attn, new_kv, strict=True):
            entry.write(k, v)
        self.close_position()

    def reorder(self, index: Tensor, cross_attention: bool = True) -> None:
        """Keep rows `index` of the batch, in that order (see the module's docstring for the contract).

        cross_attention=False says that beams only moved within their own sentences (the same
        sentences, the same number of rows each): then only the ancestry changes. Otherwise the cache works out which sentences stay and how many rows each now has."""
        if self.n_sentences is None:
            raise RuntimeError("reorder before the first step")
        if not cross_attention:
            if index.numel() != self.n_sentences * self.width:
                raise ValueError(
                    "BeamCache.reorder(cross_attention=False) must keep every row count"
                )
            self._inherit_ancestry(index, self.n_sentences, self.width)
            return
        old_sentence = torch.div(index, self.width, rounding_mode="floor")
        sentences = torch.unique_consecutive(old_sentence)
        n_new = sentences.numel()
        width = index.numel() // n_new if n_new else 0
        if n_new and (
            width * n_new != index.numel()
            or width > self.max_beams
            or not bool((old_sentence.view(n_new, width) == sentences[:, None]).all())
            or torch.unique(sentences).numel() != n_new  # each old sentence once at most
        ):
            raise ValueError(
                "BeamCache.reorder: the rows of each sentence must stay together, come from one "
                f"sentence, not repeat one, and number at most max_beams={self.max_beams}"
            )
        if n_new != self.n_sentences or not bool(
            (sentences == torch.arange(n_new, device=index.device)).all()
        ):
            moved = _moved_in_place(sentences)
            for entry in (*self.self_attn, *self.cross_attn):
                entry.keep_sentences(sentences, moved)
            mask = self.source_mask
            if mask is not None and mask.size(0) > 1:
                self.set_source_mask(mask.index_select(0, sentences), self.source_dtype)
        self._inherit_ancestry(index, n_new, width)
        self.n_sentences, self.width = n_new, width

    def set_source_mask(self, mask: Tensor | None, dtype: torch.dtype) -> None:
        """mask (sentences, 1, 1, src_len), True = a real token, or None: what every layer's
        cross-attention masks, with its additive form `source_bias` (0 or -inf) in `dtype`. That is
        None when nothing is masked, or when some source has no token at all (`has_empty_source`: its
        row would be all -inf, so the boolean mask and the reference formula take over). Kept here
        rather than in each layer, which each selected the same mask and rebuilt the same bias: a drop
        on a file of Multi30k took 0.76 ms that way, 0.58 ms this way (a Zen 4 held to AVX2)."""
        self.source_mask, self.source_dtype, self.source_set = mask, dtype, True
        self.has_empty_source = mask is not None and not bool(mask.any(dim=-1).all())
        if mask is None or self.has_empty_source or bool(mask.all()):
            self.source_bias = None  # nothing to mask out, or the boolean mask takes over
        else:
            bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
            self.source_bias = bias.masked_fill_(~mask, -math.inf)

    def _inherit_ancestry(self, index: Tensor, n_sentences: int, width: int) -> None:
        """Each new row (beam) takes the history of old row `index[row]`."""
        if self.ancestry is not None:
            slots = self.ancestry.size(2)
            inherited = self.ancestry.view(-1, slots).index_select(0, index)
            self.ancestry = inherited.view(n_sentences, width, slots)


def holes_filled(live: Tensor) -> Tensor:
    """(rows,) True for the rows that go on -> their indices, in the order a search keeps them
    (`qkv.search`): each stays in its place, and the last ones take the places of those that left.
    A search reorders every per-row tensor by these indices, so the order is its to choose; this one
    lets the cache move only the rows that fill a place (`_keep`), not every row after the first that
    left."""
    n_live = int(live.sum())
    kept = torch.arange(n_live, device=live.device)
    places = (~live[:n_live]).nonzero().squeeze(1)  # of rows that left, among the first n_live
    kept[places] = live[n_live:].nonzero().squeeze(1) + n_live  # as many live rows beyond them
    return kept


def _owner(beams: BeamCache) -> BeamCache:
    """A layer's way back to its `BeamCache`, which holds the layer: a weak one, so that the two make
    no reference cycle. With a cycle, a finished search's keys and values (7 MB for 32 sentences of
    the benchmark's small model) stayed until Python's cyclic collector ran, and the next search took
    fresh memory from the system instead: ~2,000 page faults a greedy search (benchmarks/README.md)."""
    return weakref.proxy(beams)


class SharedSelfAttentionCache:
    """One decoder layer's self-attention keys and values: (sentences, n_heads, slots, d_head) each."""

    def __init__(self, beams: BeamCache):
        self.beams = _owner(beams)
        self.key: Tensor | None = None
        self.value: Tensor | None = None

    def append(self, k: Tensor, v: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
        """Write the open position's keys and values, (rows, 1, d_model) each; return the sentence's
        keys and values so far (sentences, n_heads, slots, d_head) and the additive mask of each
        beam's history (sentences, 1, beams, slots)."""
        beams = self.beams
        k = beams.group(k, n_heads)  # (sentences, n_heads, beams, d_head)
        v = beams.group(v, n_heads)
        self.write(k, v)
        end = beams.bias.size(-1)
        return self.key[:, :, :end], self.value[:, :, :end], beams.bias

    def write(self, k: Tensor, v: Tensor) -> None:
        """Write the open position's keys and values, (sentences, n_heads, beams, d_head) each, into
        the slots of the position (the buffers grown first if they are full)."""
        beams = self.beams
        slots = beams.capacity * beams.max_beams
        if self.key is None:
            shape = (beams.n_sentences, k.size(1), slots, k.size(-1))
            self.key, self.value = k.new_empty(shape), v.new_empty(shape)
        elif self.key.size(2) < slots:
            self.key, self.value = _grow(self.key, slots, dim=2), _grow(self.value, slots, dim=2)
        start = beams.length * beams.max_beams
        self.key[:, :, start : start + beams.width] = k
        self.value[:, :, start : start + beams.width] = v
        if beams.width < beams.max_beams:
            # Slots no beam owns (only one beam exists at the first position) are masked out, but
            # must be finite: -inf + NaN, or 0 x NaN, would still be NaN.
            self.key[:, :, start + beams.width : start + beams.max_beams] = 0
            self.value[:, :, start + beams.width : start + beams.max_beams] = 0

    def keep_sentences(self, sentences: Tensor, moved: Tensor | None) -> None:
        """Keep the storage of `sentences` only (the slots written so far), and the capacity;
        `moved` as `_moved_in_place` gives it."""
        if self.key is not None:
            used = self.beams.length * self.beams.max_beams
            self.key, self.value = (
                _keep(t, sentences, moved, used) for t in (self.key, self.value)
            )


def _moved_in_place(sentences: Tensor) -> Tensor | None:
    """The places of the kept `sentences` that another sentence moves into, if each kept sentence
    either stays in its place or comes from beyond the kept ones (the last sentences taking the places
    of those that left, as `holes_filled` orders them); else None."""
    n_new = sentences.numel()
    moved = (sentences != torch.arange(n_new, device=sentences.device)).nonzero().squeeze(1)
    return moved if bool((sentences[moved] >= n_new).all()) else None


def _keep(buffer: Tensor, sentences: Tensor, moved: Tensor | None, used: int | None = None):
    """buffer (sentences, ...) -> the same for `sentences`, in that order, with the first `used`
    entries of dimension 2 (all if None) copied and the rest left unwritten.

    With `moved` (`_moved_in_place`) only the sentences that fill a place move, within `buffer`, and
    the result is a view of its first rows; otherwise every sentence is copied to a new buffer. On a
    file of Multi30k (batches of up to 328 sentences) held to AVX2 on a Zen 4, a drop took 2.7-3.3 ms
    copying every sentence, 0.85 ms this way (benchmarks/README.md, session 20)."""
    written = buffer if used is None else buffer[:, :, :used]
    if moved is None:
        if used is None:
            return buffer.index_select(0, sentences)
        selected = buffer.new_empty((sentences.numel(), *buffer.shape[1:]))
        selected[:, :, :used] = written.index_select(0, sentences)
        return selected
    if moved.numel():
        written.index_copy_(0, moved, written.index_select(0, sentences[moved]))
    return buffer[: sentences.numel()]


class SharedCrossAttentionCache:
    """One decoder layer's cross-attention keys and values (sentences, n_heads, src_len, d_head):
    projected once per sentence, at the first step. The source mask is the `BeamCache`'s, the same
    for every layer: `mask`, `bias` and `has_empty_source` read it (`BeamCache.set_source_mask`)."""

    def __init__(self, beams: BeamCache):
        self.beams = _owner(beams)
        self.key: Tensor | None = None
        self.value: Tensor | None = None

    @property
    def mask(self) -> Tensor | None:
        return self.beams.source_mask

    @property
    def bias(self) -> Tensor | None:
        return self.beams.source_bias

    @property
    def has_empty_source(self) -> bool:
        return self.beams.has_empty_source

    def store(self, k: Tensor, v: Tensor, mask: Tensor | None, n_heads: int) -> None:
        """k, v: (rows, src_len, d_model) projections of the encoder output, one row per decoder row;
        mask: (rows, 1, 1, src_len) or None, the same for every layer (the first to store it sets
        the `BeamCache`'s). Keeps one row per sentence."""
        rows_per_sentence = k.size(0) // self.beams.n_sentences
        k, v = k[::rows_per_sentence], v[::rows_per_sentence]
        n_sentences, src_len, _ = k.shape
        self.key = k.reshape(n_sentences, src_len, n_heads, -1).transpose(1, 2).contiguous()
        self.value = v.reshape(n_sentences, src_len, n_heads, -1).transpose(1, 2).contiguous()
        if not self.beams.source_set:
            if mask is not None and mask.size(0) > 1:
                mask = mask[::rows_per_sentence]
            self.beams.set_source_mask(mask, self.key.dtype)

    def keep_sentences(self, sentences: Tensor, moved: Tensor | None) -> None:
        if self.key is not None:
            self.key, self.value = (_keep(t, sentences, moved) for t in (self.key, self.value))


def _grow(t: Tensor, size: int, dim: int, fill: float | None = None) -> Tensor:
    """`t` with dimension `dim` enlarged to `size`: the old content first, then `fill` or nothing."""
    shape = list(t.shape)
    shape[dim] = size
    grown = t.new_empty(shape) if fill is None else t.new_full(shape, fill)
    grown.narrow(dim, 0, t.size(dim)).copy_(t)
    return grown
