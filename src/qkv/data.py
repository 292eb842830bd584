"""Parallel text in, batches out: reading and validating corpora, filtering pairs, token-count batches.

Reading never guesses: a bad file stops with a `QkvError` naming the file and line. Filtering never
hides anything: each dropped pair is counted under its reason. Batching follows fairseq's
`max_tokens`: pairs sorted into length buckets, batches filled up to a token budget that counts
padding, lengths padded to a multiple of 8 so compiled kernels see few distinct shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qkv.errors import QkvError
from qkv.text import decode_lines, read_lines  # noqa: F401  (qkv.data.read_lines, as before)
from qkv.tokenizer import SPECIALS, SpecialIds

Pair = tuple[str, str]
PAD_MULTIPLE = 8  # batch lengths are padded to a multiple of this (`collate`)

# ---------------------------------------------------------------------------------------------
# Reading


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> list[Pair]:
    """Sentence pairs from two line-aligned files; their line counts must agree."""
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise QkvError(f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}")
    if not src_lines:
        raise QkvError(f"{src_path} and {tgt_path} are empty: no sentence pairs")
    return list(zip(src_lines, tgt_lines, strict=True))


def read_tsv(path: str | Path) -> list[Pair]:
    """Sentence pairs from a file of `source<TAB>target` lines (a blank line is an empty pair)."""
    pairs = []
    for number, line in enumerate(read_lines(path), start=1):
        columns = line.split("\t") if line.strip() else ["", ""]
        if len(columns) != 2:
            raise QkvError(
                f"{path}:{number}: expected 2 tab-separated columns (source, target), "
                f"found {len(columns)}"
            )
        pairs.append((columns[0], columns[1]))
    if not pairs:
        raise QkvError(f"{path} is empty: no sentence pairs")
    return pairs


def is_tsv(path: str | Path) -> bool:
    return str(path).endswith((".tsv", ".tsv.gz"))


def corpus_files(prefix: str | Path, src_lang: str, tgt_lang: str) -> tuple[Path, Path]:
    """fairseq's naming: `train` + `de` -> `train.de` or `train.de.gz`."""
    return _language_file(prefix, src_lang), _language_file(prefix, tgt_lang)


def _language_file(prefix: str | Path, lang: str) -> Path:
    candidates = [Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
        if candidate.is_dir():
            raise QkvError(f"{candidate} is a folder, not the {lang} side of the corpus {prefix}")
    raise QkvError(
        f"no {lang} side for {prefix}: neither {candidates[0]} nor {candidates[1]} exists"
    )


def read_corpus(prefix: str | Path, src_lang: str, tgt_lang: str) -> list[Pair]:
    """Pairs from `prefix.{src_lang}` + `prefix.{tgt_lang}` (plain or .gz), or from a .tsv file."""
    if is_tsv(prefix):
        return read_tsv(prefix)
    return read_parallel(*corpus_files(prefix, src_lang, tgt_lang))


# ---------------------------------------------------------------------------------------------
# Filtering


@dataclass
class Dropped:
    """How many pairs were dropped, by reason (the first reason that applies)."""

    empty: int = 0
    too_long: int = 0
    ratio: int = 0

    @property
    def total(self) -> int:
        return self.empty + self.too_long + self.ratio


def drop_empty(pairs: Iterable[Pair]) -> tuple[list[Pair], int]:
    """Strip each side; drop pairs where either side is blank. Returns (kept, number dropped)."""
    kept, dropped = [], 0
    for src, tgt in pairs:
        src, tgt = src.strip(), tgt.strip()
        if src and tgt:
            kept.append((src, tgt))
        else:
            dropped += 1
    return kept, dropped


def length_filter(
    src_ids: Sequence[Sequence[int]],
    tgt_ids: Sequence[Sequence[int]],
    max_len: int,
    max_ratio: float = 9.0,
) -> tuple[list[int], Dropped]:
    """Indices of pairs to keep: at most `max_len` subwords a side and a length ratio of at most
    `max_ratio` (fairseq's clean-corpus default is 9: longer-to-shorter above that is a
    misalignment, not a translation)."""
    keep, dropped = [], Dropped()
    for index, (src, tgt) in enumerate(zip(src_ids, tgt_ids, strict=True)):
        longer, shorter = max(len(src), len(tgt)), min(len(src), len(tgt))
        if longer > max_len:
            dropped.too_long += 1
        elif longer > max_ratio * max(shorter, 1):
            dropped.ratio += 1
        else:
            keep.append(index)
    return keep, dropped


# ---------------------------------------------------------------------------------------------
# Encoded splits and batches


@dataclass
class EncodedSplit:
    """One split as subword ids without special ids; raw text kept where BLEU needs references."""

    src: list[list[int]]
    tgt: list[list[int]]
    src_text: list[str] | None = None
    tgt_text: list[str] | None = None

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, index: int) -> tuple[list[int], list[int]]:
        return self.src[index], self.tgt[index]

    def lengths(self) -> list[tuple[int, int]]:
        """Lengths as the model sees them: src + [eos], and [bos] + tgt (= tgt + [eos])."""
        return [(len(s) + 1, len(t) + 1) for s, t in zip(self.src, self.tgt, strict=True)]

    def collate(
        self,
        indices: Sequence[int],
        specials: SpecialIds = SPECIALS,
        pad_multiple: int = PAD_MULTIPLE,
    ) -> Batch:
        pairs = [(self.src[i], self.tgt[i]) for i in indices]
        return collate(pairs, specials, pad_multiple, indices)


@dataclass
class Batch:
    """Padded tensors for one step. src (batch, src_len); tgt_in, tgt_out (batch, tgt_len).

    tgt_in = [bos] + ids is what the decoder reads, tgt_out = ids + [eos] what it must predict.
    n_src_tokens and n_tgt_tokens count non-pad entries of src and tgt_out.
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    n_src_tokens: int
    n_tgt_tokens: int
    indices: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return self.src.shape[0]

    @property
    def n_tokens(self) -> int:
        """Tokens this batch spends of a `max_tokens` budget, padding included."""
        return self.size * max(self.src.shape[1], self.tgt_in.shape[1])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        src, tgt_in, tgt_out = (
            t.to(device, non_blocking=non_blocking) for t in (self.src, self.tgt_in, self.tgt_out)
        )
        return dataclasses.replace(self, src=src, tgt_in=tgt_in, tgt_out=tgt_out)


def round_up(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def collate(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    specials: SpecialIds = SPECIALS,
    pad_multiple: int = PAD_MULTIPLE,
    indices: Sequence[int] = (),
) -> Batch:
    """Pairs of subword ids (no special ids) -> a `Batch` padded to lengths that are multiples
    of `pad_multiple` (source gets eos appended; target gets bos before and eos after)."""
    if not pairs:
        raise ValueError("collate needs at least one pair")
    src_len = round_up(max(len(s) for s, _ in pairs) + 1, pad_multiple)
    tgt_len = round_up(max(len(t) for _, t in pairs) + 1, pad_multiple)
    src = torch.full((len(pairs), src_len), specials.pad, dtype=torch.long)
    tgt_in = torch.full((len(pairs), tgt_len), specials.pad, dtype=torch.long)
    tgt_out = torch.full((len(pairs), tgt_len), specials.pad, dtype=torch.long)
    for row, (s, t) in enumerate(pairs):
        src[row, : len(s) + 1] = torch.tensor([*s, specials.eos])
        tgt_in[row, : len(t) + 1] = torch.tensor([specials.bos, *t])
        tgt_out[row, : len(t) + 1] = torch.tensor([*t, specials.eos])
    return Batch(
        src=src,
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        n_src_tokens=sum(len(s) + 1 for s, _ in pairs),
        n_tgt_tokens=sum(len(t) + 1 for _, t in pairs),
        indices=list(indices),
    )


def cut_into_batches(indices: list[int], costs: list[int], max_tokens: int) -> list[list[int]]:
    """`indices`, in their order, cut into consecutive batches: a batch takes the next example while
    its size times its widest example's cost stays within `max_tokens` (one example at least)."""
    batches, current, widest = [], [], 0
    for index, cost in zip(indices, costs, strict=True):
        widest_with = max(widest, cost)
        if current and (len(current) + 1) * widest_with > max_tokens:
            batches.append(current)
            current, widest_with = [], cost
        current.append(index)
        widest = widest_with
    if current:
        batches.append(current)
    return batches


class TokenBatchSampler:
    """Batches of example indices holding at most `max_tokens` tokens each, padding included.

    `lengths[i]` is (src_len, tgt_len) as the model sees example i (`EncodedSplit.lengths()`).
    A batch costs batch_size * max(src_len, tgt_len) after rounding both up to `pad_multiple`.

    Each epoch: examples sorted by padded length (ties in a random order from `seed` and the
    epoch), cut greedily into batches, and the batches shuffled. The same seed and epoch give the
    same batches in the same order on every machine, so `batches(epoch, start=k)` resumes exactly
    where a run stopped. With `world_size` > 1, rank r takes every world_size-th batch of that
    one list; the last `len % world_size` batches of the (shuffled) list are dropped so that every
    rank runs the same number of steps and no two ranks share an example. Which batches are
    dropped changes every epoch.
    """

    def __init__(
        self,
        lengths: Sequence[tuple[int, int]],
        max_tokens: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad_multiple: int = PAD_MULTIPLE,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.max_tokens, self.seed, self.shuffle = max_tokens, seed, shuffle
        self.rank, self.world_size, self.pad_multiple = rank, world_size, pad_multiple
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1, 2)
        self._padded = -(-lengths // pad_multiple) * pad_multiple
        self._lengths = lengths
        self._cost = self._padded.max(axis=1)  # tokens one example costs in a batch of its length
        if len(lengths) == 0:
            raise QkvError("no examples to batch")
        if self._cost.max() > max_tokens:
            raise QkvError(
                f"an example of {self._cost.max()} tokens (padded) does not fit in max_tokens="
                f"{max_tokens}: raise max_tokens or lower max_len"
            )
        n_batches = len(self._epoch_batches(0))
        if n_batches < world_size:
            raise QkvError(
                f"only {n_batches} batches of {max_tokens} tokens for {world_size} ranks: "
                f"lower max_tokens"
            )
        self.batches_per_rank = n_batches // world_size

    def batches(self, epoch: int, start: int = 0) -> list[list[int]]:
        """This rank's batches for `epoch`, from batch number `start` on."""
        every = self._epoch_batches(epoch)
        every = every[: len(every) - len(every) % self.world_size]
        return every[self.rank :: self.world_size][start:]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self._cost)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        # Stable sort on (cost, src, tgt): equal lengths stay in the shuffled order. The sequence
        # of lengths, hence where batches are cut, is the same every epoch: so is their number.
        keys = (self._padded[order, 1], self._padded[order, 0], self._cost[order])
        order = order[np.lexsort(keys)]
        batches = self._cut(order)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _cut(self, order: np.ndarray) -> list[list[int]]:
        return cut_into_batches(order.tolist(), self._cost[order].tolist(), self.max_tokens)

    def padding_efficiency(self, epoch: int = 0) -> float:
        """Share of non-pad entries in the src and tgt tensors of all batches of an epoch."""
        real = slots = 0
        for batch in self._epoch_batches(epoch):
            padded = self._padded[batch]
            real += int(self._lengths[batch].sum())
            slots += len(batch) * int(padded[:, 0].max() + padded[:, 1].max())
        return real / slots
