"""A run directory with a model that has really learned something: reversing a sequence of letters.

Built once per test session in about 5 seconds (a 1+1-layer model, 450 Adam steps with the learning rate
decaying to zero; it gets 99-100% of unseen sentences exactly right whatever the seed), so translation
tests can check meaningful output ("a b c" -> "c b a") instead of whatever random weights produce. With
300 steps at a constant rate it got ~90% right, and which sentences it missed changed with the torch
build: "a b c" came out as "c b" under torch 2.11.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from qkv.checkpoint import model_checkpoint, save_checkpoint
from qkv.model import Transformer, TransformerConfig
from qkv.tokenizer import Tokenizer

LETTERS = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p"]
MAX_WORDS = 5
STEPS = 450
LAYERS = 1
BATCH = 64


def random_sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(LETTERS) for _ in range(rng.randint(1, MAX_WORDS)))


def reverse(sentence: str) -> str:
    return " ".join(reversed(sentence.split()))


def pad_rows(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([row + [pad_id] * (width - len(row)) for row in rows])


def train_reverser(tokenizer: Tokenizer, seed: int = 0, max_len: int = 32) -> Transformer:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    config = TransformerConfig.preset(
        "tiny",
        src_vocab_size=tokenizer.vocab_size,
        tgt_vocab_size=tokenizer.vocab_size,
        d_ff=128,
        n_encoder_layers=LAYERS,
        n_decoder_layers=LAYERS,
        dropout=0.0,
        max_len=max_len,
    )
    model = Transformer(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    # Decaying to zero settles the weights: a model that ends on a high learning rate gets a few short
    # sentences wrong or right depending on the last updates, hence on the torch build's numerics.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / STEPS)
    bos, eos, pad = config.bos_id, config.eos_id, config.pad_id
    for _ in range(STEPS):
        sentences = [random_sentence(rng) for _ in range(BATCH)]
        src = pad_rows([[*tokenizer.encode(s), eos] for s in sentences], pad)
        tgt = pad_rows([[bos, *tokenizer.encode(reverse(s)), eos] for s in sentences], pad)
        logits = model(src, tgt[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tgt[:, 1:].flatten(), ignore_index=pad)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def build_toy_run(run_dir: Path) -> Path:
    """Write tokenizer.model, checkpoint_100.pt, checkpoint_200.pt, best.pt and last.pt to run_dir."""
    rng = random.Random(1)
    corpus = [random_sentence(rng) for _ in range(500)]
    tokenizer = Tokenizer.train([corpus], run_dir / "tokenizer.model", vocab_size=30)
    threads = torch.get_num_threads()
    torch.set_num_threads(
        1
    )  # a model this small gains nothing from more, and loses a lot on a busy CPU
    try:
        model = train_reverser(tokenizer)
    finally:
        torch.set_num_threads(threads)
    meta = {"dataset": "toy-reverse", "src_lang": "xx", "tgt_lang": "yy"}
    for step in (100, 200):
        save_checkpoint(
            run_dir / f"checkpoint_{step}.pt", model_checkpoint(model, step=step, meta=meta)
        )
    for name in ("best.pt", "last.pt"):
        save_checkpoint(run_dir / name, model_checkpoint(model, step=STEPS, meta=meta))
    return run_dir
