"""The data a training run reads: prepared on the fly into RUN_DIR/data when the config names a
dataset or files, and, with BPE-dropout, the training pairs segmented anew each epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qkv.config import Config
from qkv.data import PAD_MULTIPLE, EncodedSplit, round_up
from qkv.distributed import Distributed
from qkv.errors import QkvError


def resegmented(data, config: Config, epoch: int) -> EncodedSplit:
    """The training pairs of `epoch` segmented anew with BPE-dropout (data.subword_dropout), from a
    seed of (train.seed, epoch): every rank, and a resumed run, gets the same ids. A pair whose
    sampled segmentation is longer than data.max_len keeps its prepared ids; with
    data.subword_dropout_side = 'source', the targets keep theirs."""
    prepared, tokenizer = data.train, data.tokenizer
    dropout = config.data.subword_dropout
    seed = int(np.random.default_rng([config.train.seed, epoch]).integers(2**31))
    src = tokenizer.sample_batch(prepared.src_text, dropout, seed)
    if config.data.subword_dropout_side == "both":
        tgt = tokenizer.sample_batch(prepared.tgt_text, dropout, seed + 1)
    else:
        tgt = list(prepared.tgt)
    max_len = config.data.max_len
    for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
        if max(len(s), len(t)) > max_len:
            src[i], tgt[i] = prepared.src[i], prepared.tgt[i]
    return EncodedSplit(src, tgt)


def run_meta(data) -> dict:
    """What a checkpoint records of its data, for translation and evaluation later."""
    return {key: data.info.get(key) for key in ("dataset", "src_lang", "tgt_lang")}


def load_training_data(config: Config, run_dir: Path, dist_info: Distributed, log):
    """The prepared data the config names; prepared into RUN_DIR/data first when it is not there yet."""
    from qkv.prepare import prepare
    from qkv.prepared import is_prepared, load_prepared

    data_config = config.data
    if data_config.prepared:
        return load_prepared(data_config.prepared)
    if not data_config.dataset and not data_config.trainpref:
        raise QkvError(
            "the config names no data: set data.dataset (e.g. 'multi30k' or 'synthetic'), "
            "data.trainpref, or data.prepared"
        )
    prepared_dir = run_dir / "data"
    if dist_info.is_main and not is_prepared(prepared_dir):
        log(f"preparing data into {prepared_dir}")
        prepare(
            out=prepared_dir,
            dataset=data_config.dataset,
            trainpref=data_config.trainpref,
            validpref=data_config.validpref,
            testpref=data_config.testpref,
            src_lang=data_config.src_lang,
            tgt_lang=data_config.tgt_lang,
            data_dir=data_config.data_dir,
            vocab_size=data_config.vocab_size,
            model_type=data_config.tokenizer_type,
            max_len=data_config.max_len,
            seed=data_config.seed,
            progress=dist_info.is_main,
        )
    dist_info.barrier()
    return load_prepared(prepared_dir)


def check_lengths(data, max_len: int, pad_multiple: int, filters_by_length: bool = True) -> None:
    """A QkvError, before any step, where a training or validation pair needs more positions than
    the model has: its subwords and EOS (or BOS and its subwords), padded as batches are to a
    multiple of `pad_multiple` (train.pad_multiple). Before, a ValueError's traceback at the first
    batch that held one. `filters_by_length`: whether data.max_len drops training pairs (it does
    where qkv prepares the data, not for data.prepared)."""
    # Validation pads its batches as translation does (`collate`'s default), whatever training does
    for name, multiple in (("train", pad_multiple), ("val", PAD_MULTIPLE)):
        split = getattr(data, name)
        pairs = zip(split.src, split.tgt, strict=True)
        longest = max((max(len(s), len(t)) for s, t in pairs), default=0)
        needed = round_up(longest + 1, multiple)
        if needed > max_len:
            fits = max_len // multiple * multiple - 1
            # Only training pairs are dropped by length, and only where qkv prepares the data
            shorter = name == "train" and filters_by_length and fits >= 1
            raise QkvError(
                f"a {name} pair has {longest} subwords: with its EOS or BOS, in batches padded to "
                f"a multiple of {multiple}, {needed} positions, more than model.max_len = "
                f"{max_len}; set model.max_len to at least {needed}"
                + (f", or data.max_len to at most {fits}" if shorter else "")
            )
