"""The `qkv` command line: argument handling only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import sys

from qkv import __version__
from qkv.errors import QkvError

# Each subcommand has an `_add_<name>(subparsers)` that builds its parser and sets `run=_run_<name>`.
# Heavy modules (torch, sentencepiece) are imported inside the `_run_*` functions so `--help` is instant.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkv",
        description="The Transformer of 'Attention Is All You Need': train, translate, look inside.",
    )
    parser.add_argument("--version", action="version", version=f"qkv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args) or 0
    except QkvError as error:
        print(f"qkv: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkv: interrupted", file=sys.stderr)
        return 130


# Subcommands, in the order `qkv --help` lists them.
COMMANDS: list = []


# --- Looking inside: attention pictures and the step-by-step of self-attention -----------------------

KINDS = ("encoder", "decoder", "cross")  # as in qkv.visualize, repeated so --help needs no torch


def _load_run(run_dir: str):
    """The model of a run directory (or checkpoint) and the tokenizer saved beside it."""
    from qkv.checkpoint import TOKENIZER, load_model
    from qkv.tokenizer import Tokenizer

    model, checkpoint_path = load_model(run_dir)
    tokenizer_path = checkpoint_path.parent / TOKENIZER
    if not tokenizer_path.is_file():
        raise QkvError(f"{tokenizer_path}: no tokenizer beside the checkpoint")
    return model, Tokenizer.load(tokenizer_path)


def _source_ids(model, tokenizer, text: str) -> list[int]:
    """Source ids as the model sees them in training: the subwords, then EOS."""
    ids = [*tokenizer.encode(text), tokenizer.eos_id]
    if len(ids) == 1:
        raise QkvError("the sentence is empty")
    if len(ids) > model.config.max_len:
        raise QkvError(
            f"the sentence has {len(ids)} tokens; the model takes at most {model.config.max_len}"
        )
    return ids


def _one_based(value: int | None, what: str) -> int | None:
    """CLI numbers count from 1, as titles do; the library counts from 0."""
    if value is None:
        return None
    if value < 1:
        raise QkvError(f"{what} numbers start at 1, got {value}")
    return value - 1


def _add_attention(subparsers) -> None:
    parser = subparsers.add_parser(
        "attention",
        help="draw a trained model's attention weights for one sentence",
        description=(
            "Translate SENTENCE, then draw the attention weights the model used: encoder "
            "self-attention, decoder self-attention and encoder-decoder attention, with the subword "
            "tokens on both axes. The picture has one row of panels per (kind, layer) and one column "
            "per head: --layer keeps one layer, --head one head, --kind one kind. Layers and heads "
            "count from 1."
        ),
        epilog=(
            "examples:\n"
            '  qkv attention runs/multi30k "Ein Mann fährt Fahrrad."\n'
            '  qkv attention runs/multi30k "Ein Mann fährt Fahrrad." --kind cross --layer 3 -o cross.png\n'
            '  qkv attention runs/multi30k "Ein Mann fährt Fahrrad." --html attention.html'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or checkpoint file)")
    parser.add_argument("sentence", metavar="SENTENCE", help="source sentence to translate")
    parser.add_argument(
        "-o",
        "--output",
        metavar="PNG",
        help="picture to write (default attention.png, unless --html)",
    )
    parser.add_argument(
        "--html", metavar="FILE", help="also write an interactive, self-contained page"
    )
    parser.add_argument("--layer", type=int, metavar="L", help="draw only layer L (default: all)")
    parser.add_argument("--head", type=int, metavar="H", help="draw only head H (default: all)")
    parser.add_argument("--kind", choices=KINDS, help="draw only this kind (default: all three)")
    parser.set_defaults(run=_run_attention)


def _run_attention(args) -> int:
    from qkv import visualize

    model, tokenizer = _load_run(args.run_dir)
    src_ids = _source_ids(model, tokenizer, args.sentence)
    out_ids = visualize.greedy_translate(model, src_ids)
    # Decoder input: BOS, then the translation; position t predicts token t+1 (the last predicts EOS).
    words = out_ids[:-1] if out_ids[-1:] == [tokenizer.eos_id] else out_ids
    tgt_ids = [tokenizer.bos_id, *words]
    maps = visualize.collect_attention(
        model,
        src_ids,
        tgt_ids,
        [tokenizer.id_to_piece(i) for i in src_ids],
        [tokenizer.id_to_piece(i) for i in tgt_ids],
    )
    translation = tokenizer.decode(out_ids)
    caption = f"{args.sentence}  →  {translation}"
    print(f"source:      {' '.join(maps.src_labels)}")
    print(f"translation: {translation}")

    kinds = [args.kind] if args.kind else list(visualize.KINDS)
    layer, head = _one_based(args.layer, "layer"), _one_based(args.head, "head")
    try:
        visualize.select(maps, kinds, layer, head)
    except ValueError as error:
        raise QkvError(str(error)) from None
    output = args.output or (None if args.html else "attention.png")
    if output:
        fig = visualize.plot_attention(maps, kinds, layer, head, caption=caption)
        visualize.save_figure(fig, output)
        print(f"wrote {output}")
    if args.html:
        title = "Attention inside the Transformer, on one sentence"
        visualize.write_attention_html(args.html, maps, title, caption)
        print(f"wrote {args.html}")
    return 0


def _add_explain(subparsers) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="walk through one self-attention sublayer on real numbers",
        description=(
            "Show how self-attention computes its output, step by step, on the numbers of a model: "
            "the input vectors X; Q = X W^Q, K = X W^K, V = X W^V per head; Q K^T; scaled by "
            "sqrt(d_k); softmax; Z = softmax(...) V; the heads concatenated; multiplied by W^O. The "
            "last matrix is exactly what the model's encoder computes in that layer. Without RUN_DIR "
            "a small randomly initialised model is used (the numbers are then not learned ones)."
        ),
        epilog=(
            "examples:\n"
            '  qkv explain "thinking machines"\n'
            '  qkv explain runs/multi30k "Ein Mann fährt Fahrrad." --layer 2 --heads 1,2\n'
            '  qkv explain "thinking machines" --heads all --html explain.html'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="[RUN_DIR] TEXT", help="optional run directory, then the text"
    )
    parser.add_argument(
        "--layer", type=int, default=1, metavar="L", help="encoder layer (default 1)"
    )
    parser.add_argument(
        "--heads", default="1", metavar="H", help="heads to show: 1, 1,3 or all (default 1)"
    )
    parser.add_argument("--html", metavar="FILE", help="also write the walk-through as a web page")
    parser.set_defaults(run=_run_explain)


def _parse_heads(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        heads = [int(part) for part in text.split(",")]
    except ValueError:
        raise QkvError(f"--heads takes numbers like 1 or 1,3 or 'all', not {text!r}") from None
    return [_one_based(h, "head") for h in heads]


def _random_model_and_ids(text: str):
    """A seeded, randomly initialised tiny model and whitespace-word ids: no training run needed."""
    import torch

    from qkv.model import Transformer, TransformerConfig

    words = text.split()
    if not words:
        raise QkvError("the text is empty")
    vocab = {word: 4 + i for i, word in enumerate(dict.fromkeys(words))}  # ids 0-3 are specials
    torch.manual_seed(0)
    config = TransformerConfig.preset(
        "tiny", src_vocab_size=4 + len(vocab), tgt_vocab_size=4 + len(vocab)
    )
    model = Transformer(config).eval()
    return model, [vocab[w] for w in words] + [config.eos_id], [*words, "</s>"]


def _run_explain(args) -> int:
    from qkv import explain

    if len(args.inputs) > 2:
        raise QkvError("explain takes [RUN_DIR] TEXT: quote the text if it has spaces")
    *run_dir, text = args.inputs
    if run_dir:
        model, tokenizer = _load_run(run_dir[0])
        src_ids = _source_ids(model, tokenizer, text)
        labels = [tokenizer.id_to_piece(i) for i in src_ids]
        origin = f"the model of {run_dir[0]}"
    else:
        model, src_ids, labels = _random_model_and_ids(text)
        origin = "a small RANDOMLY INITIALISED model (no RUN_DIR given): the steps are real, the weights are not learned"
    layer, heads = _one_based(args.layer, "layer"), _parse_heads(args.heads)
    try:
        result = explain.explain(model, src_ids, labels, "encoder", layer, heads)
    except ValueError as error:
        raise QkvError(str(error)) from None
    result.notes.insert(0, f"Using {origin}.")
    print(explain.render_text(result))
    if args.html:
        from pathlib import Path

        Path(args.html).write_text(explain.render_html(result), encoding="utf-8")
        print(f"wrote {args.html}")
    return 0


COMMANDS += [_add_attention, _add_explain]
