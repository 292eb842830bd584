"""`qkv prepare`: from raw parallel text to a folder that training and translation read.

Steps: read and validate the splits, drop empty pairs, hold out validation data if none was
given, train the tokenizer on the training split of both languages, encode, drop over-long and
misaligned training pairs, write everything, and summarise what was kept and dropped.

The prepared folder:

    tokenizer.model, tokenizer.vocab   the SentencePiece model (training and translation share it)
    train.pt, val.pt[, test.pt]        subword ids without special ids, as flat int32 tensors with
                                       offsets (torch.load(..., weights_only=True) reads them)
    {split}.{src}, {split}.{tgt}       raw text, one sentence a line: BLEU scores against val and test;
                                       training segments train.* anew each epoch with BPE-dropout
    prepare.json                       languages, vocabulary, special ids, counts, origin of splits
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qkv import datasets
from qkv.atomic import atomic_write, remove_partial_writes_of
from qkv.data import (
    Dropped,
    EncodedSplit,
    Pair,
    corpus_files,
    drop_empty,
    is_tsv,
    length_filter,
    read_corpus,
    read_parallel,
)
from qkv.errors import QkvError
from qkv.outputs import check_output_folder, check_parents_are_folders
from qkv.prepared import (  # noqa: F401
    PARTIAL,
    PreparedData,
    begin_writing,
    finish_writing,
    is_partial,
    load_prepared,
    partial_names,
    write_info,
    write_split,
)
from qkv.tokenizer import MIN_VOCAB_SIZE, MODEL_TYPES, Tokenizer

DATASETS = ("multi30k", "synthetic")
DEFAULT_VOCAB_SIZE = {"multi30k": 8000, "synthetic": 200, None: 8000}
DEFAULT_SYNTHETIC_SIZES = {"train": 20_000, "val": 500, "test": 500}
MAX_HELD_OUT = 1000  # validation pairs taken from train when no validation files are given
SYNTHETIC_SRC, SYNTHETIC_TGT = datasets.SYNTHETIC_LANGS


@dataclass
class SplitStats:
    name: str
    origin: str  # where the pairs came from: files, a dataset split, or "held out from train"
    read: int
    kept: int
    dropped: Dropped = field(default_factory=Dropped)
    src_tokens: int = 0  # subwords, without special ids
    tgt_tokens: int = 0

    @property
    def mean_src_len(self) -> float:
        return self.src_tokens / max(self.kept, 1)

    @property
    def mean_tgt_len(self) -> float:
        return self.tgt_tokens / max(self.kept, 1)


@dataclass
class PrepareSummary:
    out: Path
    dataset: str | None
    src_lang: str
    tgt_lang: str
    vocab_size: int
    model_type: str
    splits: list[SplitStats]
    notes: list[str]
    tokenizer_seconds: float


# ---------------------------------------------------------------------------------------------
# prepare


def prepare(
    out: str | os.PathLike,
    *,
    dataset: str | None = None,
    src_lang: str | None = None,
    tgt_lang: str | None = None,
    trainpref: str | os.PathLike | None = None,
    validpref: str | os.PathLike | None = None,
    testpref: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    vocab_size: int | None = None,
    model_type: str = "bpe",
    max_len: int = 256,
    max_ratio: float = 9.0,
    valid_size: int | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    force: bool = False,
) -> PrepareSummary:
    """Prepare `out` from a named dataset (`multi30k`, `synthetic`) or from files (`trainpref`...).

    Only the training split is filtered (empty, longer than `max_len` subwords, length ratio above
    `max_ratio`); validation and test data are kept whole so that scores compare with published
    ones. Without validation files, a seeded slice of train (`valid_size`, default up to 1000
    pairs) is held out. `train_size`/`valid_size`/`test_size` size the synthetic task.

    `out` may be new, empty, or hold files that prepare does not write; a folder prepared before
    is replaced only with `force`; a file prepare would write that it did not write (one of the
    inputs, say: `--trainpref DIR/train --out DIR`) is never replaced.
    """
    log = _logger(progress)
    src_lang, tgt_lang = _check_request(
        dataset, src_lang, tgt_lang, trainpref, validpref, testpref, model_type
    )
    _check_numbers(
        {"--max-len": max_len, "--train-size": train_size, "--valid-size": valid_size,
         "--test-size": test_size},
        max_ratio,
    )  # fmt: skip
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:  # SentencePiece's says INTERNAL
        raise QkvError(f"--vocab-size must be at least {MIN_VOCAB_SIZE}, not {vocab_size}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QkvError(f"{out} exists and is not a folder")
    check_parents_are_folders(out, "--out")
    inputs = [
        path
        for prefix in (trainpref, validpref, testpref)
        if prefix is not None
        for path in ([Path(prefix)] if is_tsv(prefix) else corpus_files(prefix, src_lang, tgt_lang))
    ]
    names = output_names(src_lang, tgt_lang)
    # What a prepare that stopped half way left is no one's data: it is replaced without --force.
    stopped = is_partial(out)
    check_output_folder(out, names, inputs, _earlier_output_names(out), force or stopped)
    if stopped:
        log(f"{out}: replacing what a qkv prepare that stopped there left")
    for path in remove_partial_writes_of(out, [*names, PARTIAL]):
        log(f"removed {path}, left by a write that was cut short")

    log("reading the data")
    raw, notes = _read_splits(
        dataset, src_lang, tgt_lang, trainpref, validpref, testpref, data_dir, seed,
        sizes={"train": train_size, "val": valid_size, "test": test_size},
    )  # fmt: skip
    train_origin, train_pairs = raw["train"]
    train_pairs, n_empty = drop_empty(train_pairs)
    if not train_pairs:
        raise QkvError(f"{train_origin}: all {n_empty} pairs are empty")
    if "val" not in raw:
        train_pairs, held_out = _hold_out(train_pairs, valid_size, seed)
        raw["val"] = ("held out from train", held_out)
        notes.append(
            f"val: {len(held_out)} pairs held out from train (seed {seed}), "
            "because no validation files were given"
        )
    raw["train"] = (train_origin, train_pairs)

    vocab_size = DEFAULT_VOCAB_SIZE[dataset] if vocab_size is None else vocab_size
    log(f"training a {model_type} tokenizer with {vocab_size} subwords")
    # Into a folder of its own: `out` gets the tokenizer with the splits, once every split is
    # encoded. Written into `out` at once, a prepare that then failed (every pair dropped) left a
    # tokenizer there that it refused to replace when run again.
    with tempfile.TemporaryDirectory(prefix="qkv-prepare-") as scratch:
        started = time.perf_counter()
        tokenizer = Tokenizer.train(
            [[s for s, _ in train_pairs], [t for _, t in train_pairs]],
            Path(scratch) / "tokenizer.model",
            vocab_size=vocab_size,
            model_type=model_type,
            split_digits=dataset == "synthetic",  # ISO dates: one digit, one token
        )
        tokenizer_seconds = time.perf_counter() - started

        log("encoding")
        stats, encoded = [], {}
        for name, (origin, pairs) in raw.items():
            split, stats_row = _encode(name, origin, pairs, tokenizer)
            if name == "train":
                split, stats_row = _filter_train(split, stats_row, n_empty, max_len, max_ratio)
            encoded[name] = split
            stats.append(stats_row)

        log(f"writing {out}")
        summary = PrepareSummary(
            out, dataset, src_lang, tgt_lang, tokenizer.vocab_size, model_type, stats, notes,
            tokenizer_seconds,
        )  # fmt: skip
        settings = dict(max_len=max_len, max_ratio=max_ratio, seed=seed)
        _write(out, summary, encoded, tokenizer, Path(scratch), **settings)
    return summary


SPLITS = ("train", "val", "test")


def output_names(src_lang: str, tgt_lang: str) -> list[str]:
    """Every file name prepare may write into its folder."""
    names = ["tokenizer.model", "tokenizer.vocab", "prepare.json"]
    for split in SPLITS:
        names += [f"{split}.pt", f"{split}.{src_lang}", f"{split}.{tgt_lang}"]
    return names


def _earlier_output_names(out: Path) -> set[str]:
    """The file names earlier prepares wrote into `out`: those of its prepare.json (none if
    unreadable) and those of a prepare that stopped there."""
    try:
        info = json.loads((out / "prepare.json").read_text(encoding="utf-8"))
        written = set(output_names(str(info["src_lang"]), str(info["tgt_lang"])))
    except (OSError, ValueError, KeyError, TypeError):
        written = set()
    return written | partial_names(out)


def _check_request(dataset, src_lang, tgt_lang, trainpref, validpref, testpref, model_type):
    """Reject contradictory or incomplete requests before any work; returns the languages."""
    if model_type not in MODEL_TYPES:
        raise QkvError(f"unknown tokenizer type {model_type!r}; choose one of {MODEL_TYPES}")
    if (dataset is None) == (trainpref is None):
        raise QkvError("give either a dataset (--dataset) or training files (--trainpref)")
    if dataset is not None and (validpref or testpref):
        raise QkvError("--validpref and --testpref go with --trainpref, not with --dataset")
    if dataset is not None and dataset not in DATASETS:
        raise QkvError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset == "synthetic":
        if (src_lang or SYNTHETIC_SRC, tgt_lang or SYNTHETIC_TGT) != (SYNTHETIC_SRC, SYNTHETIC_TGT):
            raise QkvError(f"the synthetic task translates {SYNTHETIC_SRC} to {SYNTHETIC_TGT}")
        return SYNTHETIC_SRC, SYNTHETIC_TGT
    if not src_lang or not tgt_lang:
        raise QkvError("name both languages: --src-lang and --tgt-lang")
    if src_lang == tgt_lang:
        raise QkvError(f"source and target language are both {src_lang!r}")
    return src_lang, tgt_lang


def _check_numbers(counts: dict[str, int | None], max_ratio: float) -> None:
    """Each count (None: its default) at least 1, and --max-ratio a number of at least 1."""
    for option, value in counts.items():
        if value is not None and value < 1:
            raise QkvError(f"{option} must be at least 1, not {value}")
    if not (math.isfinite(max_ratio) and max_ratio >= 1):
        raise QkvError(f"--max-ratio must be a number of at least 1, not {max_ratio}")


def _encode(name, origin, pairs, tokenizer) -> tuple[EncodedSplit, SplitStats]:
    src_text, tgt_text = [s for s, _ in pairs], [t for _, t in pairs]
    split = EncodedSplit(
        tokenizer.encode_batch(src_text), tokenizer.encode_batch(tgt_text), src_text, tgt_text
    )
    stats = SplitStats(name, origin, read=len(pairs), kept=len(pairs))
    stats.src_tokens, stats.tgt_tokens = sum(map(len, split.src)), sum(map(len, split.tgt))
    return split, stats


def _filter_train(split, stats, n_empty, max_len, max_ratio) -> tuple[EncodedSplit, SplitStats]:
    """Drop over-long and misaligned training pairs; count them with the empty ones dropped before."""
    keep, dropped = length_filter(split.src, split.tgt, max_len, max_ratio)
    dropped.empty = n_empty
    if not keep:
        raise QkvError(f"{stats.origin}: every pair was dropped ({_reasons(dropped)})")
    # The raw text stays beside the ids: BPE-dropout segments it anew every epoch.
    kept = EncodedSplit(
        [split.src[i] for i in keep], [split.tgt[i] for i in keep],
        [split.src_text[i] for i in keep], [split.tgt_text[i] for i in keep],
    )  # fmt: skip
    filtered = SplitStats(
        stats.name, stats.origin, read=stats.read + n_empty, kept=len(keep), dropped=dropped,
        src_tokens=sum(map(len, kept.src)), tgt_tokens=sum(map(len, kept.tgt)),
    )  # fmt: skip
    return kept, filtered


def _read_splits(
    dataset, src_lang, tgt_lang, trainpref, validpref, testpref, data_dir, seed, sizes
):
    """{split: (origin, pairs)} for train, and val/test where the source has them; plus notes."""
    if dataset == "multi30k":
        names = {"train": "train", "val": "val", "test": "test_2016_flickr"}
        raw = {}
        for split, official in names.items():
            files = [
                datasets.multi30k_file(official, lang, data_dir) for lang in (src_lang, tgt_lang)
            ]
            raw[split] = (f"multi30k {official}", read_parallel(*files))
        return raw, []
    if dataset == "synthetic":
        sizes = {k: v if v is not None else DEFAULT_SYNTHETIC_SIZES[k] for k, v in sizes.items()}
        pairs = datasets.synthetic_pairs(sum(sizes.values()), seed)
        n_train, n_val = sizes["train"], sizes["val"]
        raw = {
            "train": ("synthetic", pairs[:n_train]),
            "val": ("synthetic", pairs[n_train : n_train + n_val]),
            "test": ("synthetic", pairs[n_train + n_val :]),
        }
        notes = [f"synthetic dates task, seed {seed}: {n_train}/{n_val}/{sizes['test']} pairs"]
        return {k: v for k, v in raw.items() if v[1]}, notes
    raw = {"train": (str(trainpref), read_corpus(trainpref, src_lang, tgt_lang))}
    for split, prefix in (("val", validpref), ("test", testpref)):
        if prefix is not None:
            raw[split] = (str(prefix), read_corpus(prefix, src_lang, tgt_lang))
    return raw, []


def _hold_out(pairs: list[Pair], size: int | None, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Split off a seeded random slice of `pairs` for validation: (rest, held out)."""
    if len(pairs) < 2:
        raise QkvError(
            f"{len(pairs)} training pair is too few to hold any out for validation: give --validpref"
        )
    if size is None:
        size = min(MAX_HELD_OUT, len(pairs) // 10)
        if size == 0:  # it said "cannot hold out 0", of a size the user never gave
            raise QkvError(
                f"{len(pairs)} training pairs are too few to hold a tenth out for validation: "
                f"give --validpref, or --valid-size between 1 and {len(pairs) - 1}"
            )
    if size >= len(pairs):
        raise QkvError(
            f"--valid-size {size} would leave none of the {len(pairs)} training pairs to train on: "
            f"give a size between 1 and {len(pairs) - 1}, or --validpref"
        )
    chosen = set(random.Random(seed).sample(range(len(pairs)), size))
    rest = [pair for i, pair in enumerate(pairs) if i not in chosen]
    return rest, [pair for i, pair in enumerate(pairs) if i in chosen]


def _reasons(dropped: Dropped) -> str:
    return f"{dropped.empty} empty, {dropped.too_long} too long, {dropped.ratio} length ratio"


def _logger(progress: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if progress:
            print(f"qkv prepare: {message}", file=sys.stderr, flush=True)

    return log


# ---------------------------------------------------------------------------------------------
# The summary


def print_summary(summary: PrepareSummary, file=None) -> None:
    """The table `qkv prepare` prints: per split, pairs read, kept, dropped by reason, tokens."""
    from rich.console import Console
    from rich.table import Table

    file = file or sys.stdout
    table = Table(
        title=f"{summary.dataset or 'files'} {summary.src_lang}-{summary.tgt_lang} -> {summary.out}"
    )
    table.add_column("split")
    table.add_column("from", no_wrap=True)
    for header in ("read", "kept", "empty", "too long", "bad ratio"):
        table.add_column(header, justify="right")
    for header in ("src tokens", "mean len", "tgt tokens", "mean len"):
        table.add_column(header, justify="right")
    for split in summary.splits:
        d = split.dropped
        table.add_row(
            split.name, split.origin, f"{split.read:,}", f"{split.kept:,}",
            f"{d.empty:,}", f"{d.too_long:,}", f"{d.ratio:,}",
            f"{split.src_tokens:,}", f"{split.mean_src_len:.1f}",
            f"{split.tgt_tokens:,}", f"{split.mean_tgt_len:.1f}",
        )  # fmt: skip
    # Not a terminal (a pipe, a log file): no width limit, so no cell ever wraps mid-word.
    console = Console(file=file, width=None if file.isatty() else 10_000, highlight=False)
    console.print(table)
    console.print(
        f"vocabulary: {summary.vocab_size:,} subwords ({summary.model_type}), "
        f"joint {summary.src_lang}+{summary.tgt_lang}; trained in {summary.tokenizer_seconds:.1f} s"
    )
    console.print(
        "empty, too long, bad ratio: pairs dropped for that reason. Only train is filtered; "
        "val and test are kept whole. Tokens are subwords, without bos/eos."
    )
    for note in summary.notes:
        console.print(note)


# ---------------------------------------------------------------------------------------------
# The prepared folder on disk


def _write(out, summary, encoded, tokenizer, tokenizer_dir: Path, **settings) -> None:
    """The splits and the tokenizer (from `tokenizer_dir`), then prepare.json; marked partial until
    the last is written."""
    out.mkdir(parents=True, exist_ok=True)
    begin_writing(out, output_names(summary.src_lang, summary.tgt_lang))
    for name, split in encoded.items():
        write_split(out, name, split, summary.src_lang, summary.tgt_lang)
    for name in ("tokenizer.model", "tokenizer.vocab"):
        data = (tokenizer_dir / name).read_bytes()
        atomic_write(out / name, lambda file, data=data: file.write(data))
    info = {
        "dataset": summary.dataset,
        "src_lang": summary.src_lang,
        "tgt_lang": summary.tgt_lang,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_type": summary.model_type,
        "special_ids": tokenizer.specials.as_dict(),
        "splits": {s.name: _split_info(s) for s in summary.splits},
        "notes": summary.notes,
        "tokenizer_seconds": round(summary.tokenizer_seconds, 3),
        **settings,
    }
    write_info(out, info)
    finish_writing(out)


def _split_info(stats: SplitStats) -> dict:
    return {
        "origin": stats.origin,
        "read": stats.read,
        "kept": stats.kept,
        "dropped": asdict(stats.dropped),
        "src_tokens": stats.src_tokens,
        "tgt_tokens": stats.tgt_tokens,
    }
