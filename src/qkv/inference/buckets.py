"""Which compiled decoder step a batch runs on: a program is made for a fixed number of rows
(sentences x beams), so a few sizes of program serve every batch, each compiled once.

- Up to `MAX_ROWS` rows (beam 5 on one sentence, greedy on up to 5) a program of that many rows.
- One beam per sentence on more sentences (greedy, sampling): the rows rounded up to one of
  `ONE_BEAM_ROWS` (the cache repeats its last row in the others), and, as sentences finish, the
  search moves to one of `SHRINK_TO` once its live sentences fit (`StaticCache.reorder`).
- Beams on more rows: none here (the eager step, or from two sentences `qkv.inference.beam_program`).

Programs of many rows gain where they were measured to: every model on `WIDE_VECTORS`, elsewhere only
a model whose step fits `MAX_WEIGHT_BYTES_FOR_ROWS` (`many_rows_gain`); else one row only. CUDA
graphs gain at any size (`qkv.inference.cuda_graphs`). Figures: benchmarks/README.md.
"""

from __future__ import annotations

import torch

# Sentences x beams: beam 5 on one sentence, greedy on up to 5 (more sentences: `ONE_BEAM_ROWS`). With
# 5-row register blocks on AVX2 (`AVX2_ROW_BLOCK`), Inductor's products gain at 2-5 rows on AVX-512
# and AVX2 even where the weights outgrow the processor's cache: beam 5 on one sentence of the base
# model (105 MB), compiled / eager, 1.17-1.22x on AVX-512, 1.46-1.51x on AVX2 (benchmarks/README.md).
# Elsewhere (Arm, no vectors), not measured: a model that large compiles one row only.
MAX_ROWS = 5
# One hypothesis per sentence (greedy, sampling) on more sentences: the rows are rounded up to one of
# these (the cache repeats its last row in the others), so that a few programs serve every batch.
# Compiled / eager, greedy on the small model: 8 rows 1.53-1.54x, 16 rows 1.28-1.31x, 32 rows
# 1.07-1.13x (AVX-512 and AVX2). The base model (105 MB a step), Zen 4, since 32-row programs take
# oneDNN's products (`aoti.LIBRARY_PRODUCTS_FROM_ROWS`): 8 rows 1.30x / 1.31x, 16 rows 1.24x / 1.19x,
# 32 rows 1.16x / 1.05-1.07x (AVX-512 / AVX2); so every model on `WIDE_VECTORS`, and elsewhere only
# models whose step fits MAX_WEIGHT_BYTES_FOR_ROWS. Beams stay at MAX_ROWS: 40 rows gained nothing, 160
# lost (0.83-0.90x).
ONE_BEAM_ROWS = (8, 16, 32)
# Greedy search on many sentences moves to one of these smaller programs once its live sentences fit
# (`StaticCache.reorder`). In length-sorted batches of 32 real sentences, half of the rows' steps came
# after their sentence had ended, and a third of the steps had one sentence left: held to AVX2,
# 2.42 -> 1.65 ms a sentence with 16, 8 and 4 rows, 1.57 with one row too (that of one sentence at a
# time); every program of 1-5 rows gained no more (benchmarks/README.md, session 19).
SHRINK_TO = (1, 4, 8, 16)
MAX_WEIGHT_BYTES_FOR_ROWS = 32 * 2**20  # above, one row only, unless `WIDE_VECTORS` says otherwise
WIDE_VECTORS = ("AVX512", "AVX2")  # ATen capabilities whose programs gain at every size of model


def wide_vectors() -> bool:
    """Whether this CPU's ATen capability is one of `WIDE_VECTORS` (where beams on many sentences
    are compiled too, `qkv.inference.beam_program`)."""
    return torch.backends.cpu.get_cpu_capability() in WIDE_VECTORS


def many_rows_gain(step_bytes: int) -> bool:
    """Whether programs of more than one row gain for a step that reads `step_bytes` of weights."""
    return step_bytes <= MAX_WEIGHT_BYTES_FOR_ROWS or wide_vectors()


def program_rows(sentences: int, max_beams: int, many_rows: bool) -> int | None:
    """The rows of the program that decodes `sentences` x `max_beams` rows, or None: the eager
    step. Up to `MAX_ROWS` rows as they are; one beam per sentence, up to `ONE_BEAM_ROWS`; one row
    only where programs of `many_rows` do not gain."""
    rows = sentences * max_beams
    if not many_rows:
        return 1 if rows == 1 else None
    if rows <= MAX_ROWS:
        return rows
    if max_beams == 1:
        return next((bucket for bucket in ONE_BEAM_ROWS if bucket >= rows), None)
    return None


def fewer_rows(rows: int, many_rows: bool) -> tuple[int, ...]:
    """The programs that a search with one beam per sentence on `rows` rows moves to as its
    sentences finish (`StaticCache.reorder`): those of `SHRINK_TO` that exist and have at most half
    as many rows; none from `MAX_ROWS` rows or fewer (it would cost a compile, not gain)."""
    if rows <= MAX_ROWS:
        return ()
    return tuple(r for r in SHRINK_TO if r <= rows // 2 and program_rows(r, 1, many_rows) == r)


def sentences_per_program(max_beams: int, many_rows: bool, beam_program: bool) -> list[int]:
    """For each program that a search with `max_beams` beams can run on, the fewest sentences that
    run it, smallest first: what a server translates before it listens, so that no request waits
    for a compile. With `beam_program` (beams on many sentences compiled), the beam program from two
    sentences (it runs from the second step, `qkv.inference.beam_program`)."""
    fewest: dict[int, int] = {}
    for sentences in range(1, max(MAX_ROWS, ONE_BEAM_ROWS[-1]) + 1):
        rows = program_rows(sentences, max_beams, many_rows)
        if rows is not None:
            fewest.setdefault(rows, sentences)
        elif max_beams > 1 and sentences > 1 and beam_program:
            fewest.setdefault(0, sentences)
    return sorted(fewest.values())
