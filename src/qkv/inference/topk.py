"""``torch.topk`` and ``argmax`` for a beam search on the CPU: the best 2 x beam of beam x vocab
scores per sentence at every step.

``torch.topk`` on the CPU sorts its way through every element of a row. Here a row is cut into chunks,
the chunks' maxima (a vectorised reduction) say which k chunks can hold the k best values, and only
those k chunks are searched (timings in benchmarks/README.md, "CPU kernels"). Same values; where values
are equal, which index comes first may differ from ``torch.topk``. Other devices, and
``QKV_FAST_KERNELS=0``, call PyTorch's own function.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from qkv.kernels import FAST

# Chunk lengths `topk` may use, and the shortest row worth chunking.
_TOPK_CHUNKS = range(160, 31, -1)
_TOPK_MIN_ROW = 4096


def topk(
    x: Tensor, k: int, row_offsets: Tensor | None = None, rows_per_group: int = 1
) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=1)`` for a 2-D x: the k largest values of each row, largest first, and their
    indices. Where values are equal, which index comes first may differ from ``torch.topk``.

    With `row_offsets` (rows,) and `rows_per_group`: the k largest sums ``x[r, i] + row_offsets[r]``
    of each group of `rows_per_group` consecutive rows laid end to end, and their indices there
    (``(r % rows_per_group) * length + i``): ``(x + row_offsets[:, None]).view(-1, rows_per_group *
    length).topk(k, dim=1)`` without writing every sum. (A beam search's candidates: the beams'
    scores plus each next token's log-probability.)

    Why it is exact: each of the k chunks with the largest maxima holds a value at least as large as
    the k-th largest chunk maximum t, so the k-th largest value is at least t too; and a value that
    large lies in a chunk whose maximum is at least t. Rounding is monotonic, so the largest sum of a
    chunk is its largest value plus the row's offset."""
    rows, length = x.shape
    groups = rows // rows_per_group
    chunk = _topk_chunk(length, k, rows_per_group)
    if (
        not FAST
        or chunk is None
        or x.device.type != "cpu"
        or not x.is_contiguous()
        or torch.compiler.is_compiling()
    ):
        sums = x if row_offsets is None else x + row_offsets[:, None]
        return sums.reshape(groups, rows_per_group * length).topk(k, dim=1)
    n_chunks = length // chunk  # per row
    chunks = x.view(rows * n_chunks, chunk)
    maxima = chunks.view(rows, n_chunks, chunk).amax(dim=2)
    if row_offsets is not None:
        maxima += row_offsets[:, None]
    per_group = rows_per_group * n_chunks
    best_chunks = maxima.view(groups, per_group).topk(k, dim=1).indices  # (groups, k) in the group
    # Whole chunks as rows of `chunks`: index_select copies rows 3x faster than gather picks elements.
    chunk_ids = best_chunks + torch.arange(0, rows * n_chunks, per_group, device=x.device)[:, None]
    chunk_ids = chunk_ids.flatten()
    candidates = chunks.index_select(0, chunk_ids)  # (groups * k, chunk)
    if row_offsets is not None:
        row = index_quotient(chunk_ids, n_chunks)
        candidates += row_offsets.index_select(0, row)[:, None]
    values, within = candidates.view(groups, k * chunk).topk(k, dim=1)
    chunk_in, at = split_index(within, chunk)
    return values, best_chunks.gather(1, chunk_in) * chunk + at


# From this many rows on, `argmax` takes `topk`'s chunk maxima: PyTorch's own argmax is faster for a
# few rows and slower for many (benchmarks/README.md, "CPU kernels").
ARGMAX_MIN_ROWS = 16


def argmax(x: Tensor) -> Tensor:
    """``x.argmax(dim=1)`` for a 2-D x (where values are equal, which index is returned may differ)."""
    if x.size(0) < ARGMAX_MIN_ROWS or x.device.type != "cpu":
        return x.argmax(dim=1)
    return topk(x, 1)[1][:, 0]


@functools.cache
def _topk_chunk(length: int, k: int, rows_per_group: int = 1) -> int | None:
    """The longest chunk length in _TOPK_CHUNKS that divides a row of `length` so that a group of
    `rows_per_group` rows has at least 4 k chunks (fewer would leave little to skip), or None: then
    `torch.topk` is as good."""
    if length * rows_per_group < _TOPK_MIN_ROW:
        return None
    for chunk in _TOPK_CHUNKS:
        if length % chunk == 0 and rows_per_group * (length // chunk) >= 4 * k:
            return chunk
    return None


def best_extensions(
    log_probs: Tensor, beam_scores: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """A beam search's candidates: for each sentence, the k best sums beam score + log-probability
    of the next token over its beams and the whole vocabulary.

    log_probs (sentences * beams, vocab); beam_scores (sentences, beams). Returns the sums
    (sentences, k), best first, and for each the beam it extends and its token (sentences, k)."""
    vocab = log_probs.size(-1)
    sums, flat = topk(log_probs, k, beam_scores.reshape(-1), rows_per_group=beam_scores.size(1))
    return (sums, *split_index(flat, vocab))


def row_topk(x: Tensor, k: int, native: bool = False) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=1)`` for a 2-D x, as one graph can hold it (no Python branches on values):
    `topk`'s chunks for a compiled program. Inside one, ``torch.topk`` over a row of 8000 is
    PyTorch's own kernel called from the program, and cost 4x what the chunks do (114 against 26 µs
    at 5 rows, benchmarks/README.md, session 26). With `native`, qkv's operator (`qkv::row_topk`,
    loaded: `qkv.inference.native`), one pass a row: where the chunks' second `torch.topk` alone
    took ~15 µs at 5 rows, it takes ~6 for the whole (small model, AVX-512)."""
    if native:
        return torch.ops.qkv.row_topk(x, k)
    rows, length = x.shape
    chunk = _topk_chunk(length, k)
    if chunk is None:
        return x.topk(k, dim=1)
    chunks = x.view(rows, length // chunk, chunk)
    best_chunks = chunks.amax(dim=2).topk(k, dim=1).indices  # (rows, k)
    picked = torch.gather(chunks, 1, best_chunks[:, :, None].expand(rows, k, chunk))
    values, within = picked.view(rows, k * chunk).topk(k, dim=1)
    chunk_in, at = split_index(within, chunk)
    return values, best_chunks.gather(1, chunk_in) * chunk + at


def log_softmax_topk(
    logits: Tensor, bias: Tensor, k: int, native: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """logits (rows, vocab), bias (vocab,) -> log_softmax(logits) + bias and its k largest of each
    row with their indices (`row_topk`). With `native`, qkv's operator (`qkv::log_softmax_topk`):
    one call that tops each row while it is in the first cache."""
    if native:
        return torch.ops.qkv.log_softmax_topk(logits, bias, k)
    log_probs = torch.log_softmax(logits, dim=-1) + bias
    return log_probs, *row_topk(log_probs, k)


def biased_argmax(logits: Tensor, bias: Tensor, native: bool = False) -> Tensor:
    """logits (rows, vocab), bias (vocab,) -> (rows,) ``(logits + bias).argmax(dim=-1)``: a greedy
    step's best tokens. With `native`, qkv's operator (`qkv::biased_argmax`): Inductor's argmax
    over 32 rows of 8000 logits was one thread's ~185 µs a step."""
    if native:
        return torch.ops.qkv.biased_argmax(logits, bias)
    return (logits + bias).argmax(dim=-1)


def extensions_of_rows(
    row_log_probs: Tensor, row_tokens: Tensor, beam_scores: Tensor, k: int, native: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """`best_extensions` from each row's best tokens only: row_log_probs and row_tokens (sentences *
    beams, n), each row's n most likely next tokens (`row_topk`). The k best extensions of a
    sentence are among them if k <= n: a row's sums are its log-probabilities plus one number.
    `native`: the k best by `row_topk`'s operator (inside a compiled step)."""
    sentences, beams = beam_scores.shape
    n = row_log_probs.size(1)
    sums = (row_log_probs + beam_scores.reshape(-1, 1)).view(sentences, beams * n)
    best_sums, at = row_topk(sums, k, native) if native else sums.topk(k, dim=1)
    tokens = row_tokens.view(sentences, beams * n).gather(1, at)
    return best_sums, index_quotient(at, n), tokens


def split_index(index: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(index // n, index % n) for indices that are never negative, by truncating division and
    `fmod`, which equal floor division and `%` there. PyTorch 2.8's Inductor computes int64 floor
    division and `%` wrongly in programs for AVX2: 3 // 10 gave -1 and 3 % 10 gave 13, so that a beam
    of one sentence, compiled, extended a beam -1 and stopped with an IndexError; truncating
    division and `fmod` came out right there (benchmarks/README.md, session 58)."""
    return index_quotient(index, n), torch.fmod(index, n)


def index_quotient(index: Tensor, n: int) -> Tensor:
    """index // n for indices that are never negative (`split_index`), where the remainder is not
    wanted."""
    return torch.div(index, n, rounding_mode="trunc")
