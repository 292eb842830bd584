"""A tiny run directory for tests of the commands that load one: a randomly initialised tiny model and a
small tokenizer trained on the built-in synthetic task, saved as `qkv train` saves them. About a second."""

from pathlib import Path

import torch

from qkv.checkpoint import BEST, TOKENIZER, model_checkpoint, save_checkpoint
from qkv.datasets import synthetic_pairs
from qkv.model import Transformer, TransformerConfig
from qkv.tokenizer import Tokenizer

SENTENCE = "the third of may nineteen ninety"


def make_tiny_run(run_dir: Path, norm_first: bool = False, seed: int = 0, **overrides) -> Path:
    pairs = synthetic_pairs(400, seed=seed)
    tokenizer = Tokenizer.train(
        [[src for src, _ in pairs], [tgt for _, tgt in pairs]], run_dir / TOKENIZER, vocab_size=120
    )
    torch.manual_seed(seed)
    config = TransformerConfig.preset(
        "tiny",
        src_vocab_size=tokenizer.vocab_size,
        tgt_vocab_size=tokenizer.vocab_size,
        max_len=64,
        norm_first=norm_first,
        **overrides,
    )
    save_checkpoint(run_dir / BEST, model_checkpoint(Transformer(config)))
    return run_dir
