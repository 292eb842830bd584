"""`qkv attention` and `qkv explain`: looking inside a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from qkv.cli.common import check_written_files
from qkv.errors import QkvError
from qkv.kinds import KINDS


def _load_run(run_dir: str):
    """The model of a run directory (or checkpoint) and the tokenizer saved beside it."""
    from qkv.translate import Translator

    translator = Translator.load(run_dir)
    return translator.model, translator.tokenizer


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
    parser.add_argument(
        "--force", action="store_true", help="replace the picture or page if it exists"
    )
    parser.add_argument("--layer", type=int, metavar="L", help="draw only layer L (default: all)")
    parser.add_argument("--head", type=int, metavar="H", help="draw only head H (default: all)")
    parser.add_argument("--kind", choices=KINDS, help="draw only this kind (default: all three)")
    parser.set_defaults(run=_run_attention)


def _run_attention(args) -> int:
    from qkv import visualize
    from qkv.checkpoint import resolve_checkpoint
    from qkv.tokenizer import utf8_text

    utf8_text(args.sentence)
    output = args.output or (None if args.html else "attention.png")
    resolve_checkpoint(args.run_dir)  # what the model is, before where the picture goes
    check_written_files({"-o": output, "--html": args.html}, args.run_dir, args.force)
    if output and (problem := visualize.picture_format_problem(output)):
        raise QkvError(f"-o {output}: {problem}")
    model, tokenizer = _load_run(args.run_dir)
    kinds = [args.kind] if args.kind else list(KINDS)
    layer, head = _one_based(args.layer, "layer"), _one_based(args.head, "head")
    try:  # before the sentence is translated
        layers = visualize.model_layers(model)
        visualize.check_panels(kinds, layer, head, layers, model.config.n_heads)
    except ValueError as error:
        raise QkvError(str(error)) from None
    maps, translation = visualize.sentence_attention(model, tokenizer, args.sentence)
    caption = f"{args.sentence}  →  {translation}"
    print(f"source:      {' '.join(maps.src_labels)}")
    print(f"translation: {translation}")
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
        # argparse would write the one-or-two positionals as "[RUN_DIR] TEXT [[RUN_DIR] TEXT ...]"
        usage="qkv explain [-h] [--layer L] [--kind {encoder,decoder,cross}] [--heads H]\n"
        "                   [--html FILE] [--force] [RUN_DIR] TEXT",
        help="walk through one self-attention sublayer on real numbers",
        description=(
            "Show how self-attention computes its output, step by step, on the numbers of a model: "
            "the input vectors X; Q = X W^Q, K = X W^K, V = X W^V per head; Q K^T; scaled by "
            "sqrt(d_k); softmax; Z = softmax(...) V; the heads concatenated; multiplied by W^O. The "
            "last matrix is exactly what the model computes in that sublayer. Without RUN_DIR "
            "a small randomly initialised model is used (the numbers are then not learned ones)."
        ),
        epilog=(
            "examples:\n"
            '  qkv explain "thinking machines"\n'
            '  qkv explain runs/multi30k "Ein Mann fährt Fahrrad." --layer 2 --heads 1,2\n'
            '  qkv explain runs/multi30k "Ein Mann fährt Fahrrad." --kind cross --layer 3\n'
            '  qkv explain "thinking machines" --heads all --html explain.html'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="+", metavar="[RUN_DIR] TEXT", help="optional run directory, then the text"
    )
    parser.add_argument("--layer", type=int, default=1, metavar="L", help="layer (default 1)")
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="encoder",
        help="encoder self-attention (default), or, with RUN_DIR, decoder self-attention or "
        "encoder-decoder attention over the model's translation",
    )
    parser.add_argument(
        "--heads", default="1", metavar="H", help="heads to show: 1, 1,3 or all (default 1)"
    )
    parser.add_argument("--html", metavar="FILE", help="also write the walk-through as a web page")
    parser.add_argument("--force", action="store_true", help="replace the --html page if it exists")
    parser.set_defaults(run=_run_explain)


def _parse_heads(text: str) -> list[int] | None:
    if text == "all":
        return None
    try:
        heads = [int(part) for part in text.split(",")]
    except ValueError:
        raise QkvError(f"--heads takes numbers like 1 or 1,3 or 'all', not {text!r}") from None
    if len(set(heads)) < len(heads):  # each of them was shown twice
        raise QkvError(f"--heads names a head twice: {text}")
    return [_one_based(h, "head") for h in heads]


def _run_explain(args) -> int:
    from qkv import explain, visualize
    from qkv.checkpoint import resolve_checkpoint
    from qkv.tokenizer import utf8_text

    if len(args.inputs) > 2:
        raise QkvError("explain takes [RUN_DIR] TEXT: quote the text if it has spaces")
    *run_dir, text = args.inputs
    a_run = any((Path(text) / name).is_file() for name in ("best.pt", "last.pt"))
    if not run_dir and (a_run or (text.endswith(".pt") and Path(text).is_file())):
        # A random model explained the words "runs/x" (or "runs/x/best")
        what = "a run" if a_run else "a checkpoint"
        raise QkvError(
            f"{text} is {what}: give the text to explain after it (explain RUN_DIR TEXT)"
        )
    text = utf8_text(text)
    if run_dir:
        resolve_checkpoint(run_dir[0])  # what the model is, before where the page goes
    check_written_files({"--html": args.html}, run_dir[0] if run_dir else None, args.force)
    tgt_ids = tgt_labels = None
    if run_dir:
        model, tokenizer = _load_run(run_dir[0])
        src_ids = visualize.source_ids(model, tokenizer, text)
        labels = [tokenizer.id_to_piece(i) for i in src_ids]
        origin = f"the model of {run_dir[0]}"
        if args.kind != "encoder":  # the decoder attends over the model's own translation
            tgt_ids, translation = visualize.greedy_decoder_input(model, tokenizer, src_ids)
            tgt_labels = [tokenizer.id_to_piece(i) for i in tgt_ids]
            origin += f", over its translation {translation!r}"
    elif args.kind != "encoder":
        raise QkvError(f"--kind {args.kind} needs a RUN_DIR: a random model has no translation")
    else:
        model, src_ids, labels = explain.random_model(text)
        origin = "a small RANDOMLY INITIALISED model (no RUN_DIR given): the steps are real, the weights are not learned"
    layer, heads = _one_based(args.layer, "layer"), _parse_heads(args.heads)
    try:
        result = explain.explain(
            model, src_ids, labels, args.kind, layer, heads, tgt_ids, tgt_labels
        )
    except ValueError as error:
        raise QkvError(str(error)) from None
    result.notes.insert(0, f"Using {origin}.")
    print(explain.render_text(result))
    if args.html:
        from qkv.atomic import atomic_write

        page = explain.render_html(result).encode("utf-8")
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.html, lambda file: file.write(page))
        print(f"wrote {args.html}")
    return 0
