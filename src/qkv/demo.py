"""`qkv demo`: train a tiny Transformer on the built-in task, then show what it learned.

The built-in task (qkv.datasets.synthetic_pairs) writes dates out in words, in three word orders, and asks
for the ISO date: "the third of may nineteen ninety" -> "1990-05-03". The model must reorder (the year
comes first in the output, last in the input) and translate number words into digits, so it cannot
succeed by copying: it has to attend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from qkv.config import load_config
from qkv.train import train
from qkv.translate import Translator


@dataclass
class DemoResult:
    run_dir: Path
    seconds: float
    examples: list[tuple[str, str, str]]  # (source, model output, reference)
    accuracy: float  # exact-match accuracy on the test split
    n_test: int
    attention_png: Path  # the cross-attention of the last layer for the first test sentence


def default_demo_dir(runs: Path) -> Path:
    """runs/demo, where the README's follow-up commands look; runs/demo-2, -3, ... if it exists."""
    candidate, number = runs / "demo", 1
    while candidate.exists():
        number += 1
        candidate = runs / f"demo-{number}"
    return candidate


def demo_config_path() -> Path:
    return Path(str(files("qkv").joinpath("configs", "demo.toml")))


def run_demo(run_dir: str | Path, overrides: list[str] = (), n_examples: int = 8, log=print):
    from qkv.checkpoint import load_model
    from qkv.prepared import load_prepared

    started = time.time()
    config = load_config(demo_config_path(), overrides)
    train(config, run_dir, log=log)
    model, _ = load_model(run_dir)
    data = load_prepared(Path(run_dir) / "data")
    test = data.test
    hypotheses = Translator(model, data.tokenizer).translate(test.src_text, beam=1)
    correct = sum(h == r for h, r in zip(hypotheses, test.tgt_text, strict=True))
    examples = list(zip(test.src_text, hypotheses, test.tgt_text, strict=True))[:n_examples]
    attention_png = draw_attention(model, data.tokenizer, test.src_text[0], Path(run_dir))
    return DemoResult(
        Path(run_dir),
        time.time() - started,
        examples,
        correct / len(test),
        len(test),
        attention_png,
    )


def draw_attention(model, tokenizer, sentence: str, run_dir: Path) -> Path:
    """Where the decoder looks in the words while writing each digit: the last layer's cross-attention."""
    from qkv import visualize

    maps, translation = visualize.sentence_attention(model, tokenizer, sentence)
    last_layer = maps.n_layers("cross") - 1
    fig = visualize.plot_attention(
        maps, ["cross"], layer=last_layer, caption=f"{sentence}  →  {translation}"
    )
    return visualize.save_figure(fig, run_dir / "attention.png")
