"""The `qkv` command line: argument handling only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from qkv import __version__
from qkv.errors import QkvError
from qkv.kinds import KINDS

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
    except BrokenPipeError:
        # The reader (e.g. `qkv translate ... | head`) stopped reading: not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model from a TOML config (prepares the data when needed)",
        description="Train a Transformer as CONFIG says. CONFIG is a TOML file with sections "
        "[model], [data], [train], [eval], or the name of a bundled recipe "
        f"({', '.join(recipe_names())}).",
        epilog="examples:\n"
        "  qkv train configs/demo.toml --out runs/demo\n"
        "  qkv train multi30k_de_en --out runs/de_en --set train.max_epochs=20\n"
        "  qkv train configs/multi30k_de_en.toml --out runs/de_en --resume\n"
        "  torchrun --nproc_per_node=2 -m qkv train configs/base.toml --out runs/base",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", metavar="CONFIG", help="TOML file or bundled recipe name")
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/CONFIG_NAME)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set train.lr=2.0",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from RUN_DIR/last.pt (or the newest readable checkpoint) exactly",
    )
    parser.set_defaults(run=_run_train)


def recipe_names() -> list[str]:
    from importlib.resources import files

    return sorted(
        p.name.removesuffix(".toml")
        for p in files("qkv").joinpath("configs").iterdir()
        if p.name.endswith(".toml")
    )


def resolve_recipe(name: str):
    """A config path as given, or the bundled recipe of that name."""
    from importlib.resources import files
    from pathlib import Path

    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    bundled = files("qkv").joinpath("configs", f"{name}.toml")
    if bundled.is_file():
        return Path(str(bundled))
    raise QkvError(f"{name}: no such config file or bundled recipe ({', '.join(recipe_names())})")


def _run_train(args) -> int:
    from pathlib import Path

    from qkv.config import load_config
    from qkv.train import train

    config_path = resolve_recipe(args.config)
    config = load_config(config_path, args.overrides)
    run_dir = Path(args.out) if args.out else Path("runs") / config_path.stem
    summary = train(config, run_dir, resume=args.resume, log=_log)
    _print_summary(summary)
    return 0


def _log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="qkv train: done", show_header=False)
    table.add_row("steps", f"{summary['steps']:,} ({summary['new_steps']:,} in this run)")
    table.add_row("epochs completed", str(summary["epochs"]))
    table.add_row("time", f"{summary['seconds']:.0f} s")
    table.add_row("target tokens/s", f"{summary['target_tokens_per_second']:,.0f}")
    table.add_row("best valid BLEU", f"{summary['best_bleu']:.2f}")
    table.add_row("run directory", summary["run_dir"])
    table.add_row("files", "best.pt, last.pt, metrics.jsonl, curves.png, tokenizer.model")
    Console(stderr=True).print(table)


# ---------------------------------------------------------------------------------------------
# qkv prepare

PREPARE_EXAMPLES = """\
examples:
  qkv prepare --dataset multi30k --src-lang de --tgt-lang en --out prepared/multi30k.de-en
  qkv prepare --dataset synthetic --out prepared/dates
  qkv prepare --trainpref corpus/train --validpref corpus/valid --src-lang de --tgt-lang en \\
      --out prepared/mine          (reads corpus/train.de and corpus/train.en, or .de.gz/.en.gz)
  qkv prepare --trainpref pairs.tsv --src-lang de --tgt-lang en --out prepared/tsv

Multi30k files are looked up as $QKV_DATA_DIR/multi30k/{split}.{lang}.gz (default data folder:
~/.cache/qkv) and downloaded from github.com/multi30k/dataset when missing.
Without --validpref, a seeded slice of train is held out for validation (the summary says so).
Only train is filtered: empty pairs, pairs over --max-len subwords, length ratios over --max-ratio.
"""


def _add_prepare(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="validate parallel text, train the tokenizer, encode: a folder training reads",
        description="Validate and filter parallel text, train a joint SentencePiece tokenizer, "
        "and write the encoded splits, raw val/test text and a summary to --out.",
        epilog=PREPARE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("what to prepare (a dataset, or your own files)")
    source.add_argument("--dataset", choices=["multi30k", "synthetic"], help="a named dataset")
    source.add_argument(
        "--trainpref", metavar="PATH", help="training files PATH.{src,tgt}[.gz] or PATH.tsv"
    )
    source.add_argument(
        "--validpref", metavar="PATH", help="validation files, named as --trainpref"
    )
    source.add_argument("--testpref", metavar="PATH", help="test files, named as --trainpref")
    source.add_argument("--src-lang", metavar="LANG", help="source language suffix, e.g. de")
    source.add_argument("--tgt-lang", metavar="LANG", help="target language suffix, e.g. en")
    source.add_argument(
        "--data-dir", metavar="DIR", help="data folder (default $QKV_DATA_DIR, else ~/.cache/qkv)"
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder to write (created if needed)"
    )
    options = parser.add_argument_group("tokenizer and filtering")
    options.add_argument(
        "--vocab-size", type=int, metavar="N", help="subwords (default 8000; synthetic 200)"
    )
    options.add_argument(
        "--tokenizer-type", choices=["bpe", "unigram"], default="bpe", help="default: bpe"
    )
    options.add_argument(
        "--max-len",
        type=int,
        default=256,
        metavar="N",
        help="drop training pairs longer than N subwords (default 256)",
    )
    options.add_argument(
        "--max-ratio",
        type=float,
        default=9.0,
        metavar="R",
        help="drop training pairs whose length ratio exceeds R (default 9)",
    )
    options.add_argument(
        "--valid-size",
        type=int,
        metavar="N",
        help="pairs held out of train without --validpref (default min(1000, 10%%)); synthetic: val size (500)",
    )
    options.add_argument(
        "--train-size", type=int, metavar="N", help="synthetic: training pairs (default 20000)"
    )
    options.add_argument(
        "--test-size", type=int, metavar="N", help="synthetic: test pairs (default 500)"
    )
    options.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for the held-out slice and the synthetic task (default 0)",
    )
    options.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a folder prepared before (never the input files, nor files prepare did not write)",
    )
    parser.set_defaults(run=_run_prepare)


def _run_prepare(args) -> int:
    from qkv.prepare import prepare, print_summary

    summary = prepare(
        args.out,
        dataset=args.dataset,
        src_lang=args.src_lang,
        tgt_lang=args.tgt_lang,
        trainpref=args.trainpref,
        validpref=args.validpref,
        testpref=args.testpref,
        data_dir=args.data_dir,
        vocab_size=args.vocab_size,
        model_type=args.tokenizer_type,
        max_len=args.max_len,
        max_ratio=args.max_ratio,
        valid_size=args.valid_size,
        train_size=args.train_size,
        test_size=args.test_size,
        seed=args.seed,
        progress=not args.quiet,
        force=args.force,
    )
    print_summary(summary)
    return 0


# ---------------------------------------------------------------------------------------------
# qkv translate, qkv evaluate, qkv average

TRANSLATE_EXAMPLES = """\
examples:
  echo "Ein Hund rennt." | qkv translate runs/de_en
  qkv translate runs/de_en -i test.de -o test.hyp --beam 5
  qkv translate runs/de_en/checkpoint_3000.pt -i test.de --n-best 3 --scores

output: one line per input line, in input order (an empty line gives an empty line).
  --scores:         SCORE<tab>TRANSLATION
  --n-best K:       K lines per input line: LINE_NUMBER<tab>TRANSLATION (with --scores:
                    LINE_NUMBER<tab>SCORE<tab>TRANSLATION), best first; an empty line gives one.
  A score is the log-probability over the length penalty, as the beam search ranks them.
"""


def _add_search_options(parser) -> None:
    search = parser.add_argument_group("search")
    search.add_argument("--beam", type=int, default=5, metavar="K", help="beam size (1: greedy)")
    search.add_argument(
        "--max-tokens",
        type=int,
        default=4096,
        metavar="N",
        help="source tokens per batch, padding included (default 4096)",
    )
    search.add_argument(
        "--length-penalty",
        type=float,
        default=0.6,
        metavar="ALPHA",
        help="length penalty exponent (default 0.6, the paper's)",
    )
    search.add_argument(
        "--length-penalty-style",
        choices=["gnmt", "fairseq"],
        default="gnmt",
        help="gnmt: ((5+len)/6)^alpha, the paper's; fairseq: len^alpha (default gnmt)",
    )
    search.add_argument(
        "--max-len",
        type=int,
        metavar="N",
        help="most tokens to generate, EOS included (default: source length + 50)",
    )
    search.add_argument(
        "--min-len", type=int, default=0, metavar="N", help="fewest tokens before EOS (default 0)"
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="tokenizer.model (default: the one beside the checkpoint)",
    )
    model.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    model.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 where the device computes it natively (a CPU with AVX512_BF16, AMX or Arm "
        "BF16; a recent GPU), else fp32. bf16 decodes 1.1-1.6x faster there, and many times "
        "slower on CPUs without it (default auto)",
    )
    model.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads (default: torch's, all cores; 1 is much faster on a busy machine)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _search_options(args) -> dict:
    if args.beam < 1:
        raise QkvError(f"--beam must be at least 1, got {args.beam}")
    if args.max_tokens < 1:
        raise QkvError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    return dict(
        beam=args.beam,
        max_tokens=args.max_tokens,
        length_penalty=args.length_penalty,
        length_penalty_style=args.length_penalty_style,
        max_len=args.max_len,
        min_len=args.min_len,
    )


def _load_translator(args):
    import torch

    import qkv

    if args.threads:
        torch.set_num_threads(args.threads)

    from qkv.hardware import precision_note

    translator = qkv.load(
        args.model,
        tokenizer=args.tokenizer,
        device=args.device,
        precision=args.precision,
        warn=lambda message: print(f"qkv: warning: {message}", file=sys.stderr),
    )
    if not args.quiet:
        note = precision_note(args.precision, translator.precision, args.device)
        print(f"qkv: {note}", file=sys.stderr)
    return translator


def _warner(source_name: str):
    def warn(message: str) -> None:
        print(f"qkv: warning: {source_name}: {message}", file=sys.stderr)

    return warn


def _add_translate(subparsers) -> None:
    parser = subparsers.add_parser(
        "translate",
        help="translate text with a trained model (beam search)",
        description="Translate each line of the input with the model of a run directory or "
        "checkpoint file.",
        epilog=TRANSLATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("-i", "--input", metavar="FILE", help="input text (default stdin)")
    parser.add_argument("-o", "--output", metavar="FILE", help="output file (default stdout)")
    _add_force(parser)
    parser.add_argument("--n-best", type=int, metavar="K", help="write the K best translations")
    parser.add_argument("--scores", action="store_true", help="write each translation's score")
    _add_search_options(parser)
    parser.set_defaults(run=_run_translate)


def _run_translate(args) -> int:
    from qkv.data import read_lines

    options = _search_options(args)
    _check_output(args, [args.input])
    stdin_error = None  # the first line of stdin that is not UTF-8: the lines before it still count
    if args.input:
        lines, source_name = read_lines(args.input), args.input
    else:
        (lines, stdin_error), source_name = _read_stdin(), "stdin"
    translator = _load_translator(args)
    results = translator.hypotheses(
        lines,
        n_best=args.n_best or 1,
        progress=bool(args.input) and not args.quiet,
        warn=_warner(source_name),
        **options,
    )
    out = []
    for number, hypotheses in enumerate(results, start=1):
        for hypothesis in hypotheses if args.n_best else hypotheses[:1]:
            fields = [str(number)] if args.n_best else []
            fields += [f"{hypothesis.score:.4f}"] if args.scores else []
            out.append("\t".join([*fields, hypothesis.text]))
    _write_lines(out, args.output)
    if stdin_error is not None:
        raise stdin_error
    return 0


def _add_force(parser) -> None:
    parser.add_argument(
        "--force", action="store_true", help="replace the -o file if it exists (never an input)"
    )


def _check_output(args, inputs: list) -> None:
    """Before any work: refuse an -o that is an input (the model's files included) or that exists
    without --force."""
    _check_written_files({"-o": args.output}, args.model, args.force, inputs)


def _check_written_files(outputs: dict, model: str | None, force: bool, inputs: list = ()) -> None:
    """`qkv.outputs.check_output_file` for each output given ({option: path or None}), with the
    model's checkpoint and tokenizer among the inputs."""
    from qkv.checkpoint import TOKENIZER, resolve_checkpoint
    from qkv.outputs import check_output_file

    model_files = []
    if model is not None:
        with contextlib.suppress(QkvError):  # a missing model is reported when it is loaded
            checkpoint = resolve_checkpoint(model)
            model_files = [checkpoint, checkpoint.parent / TOKENIZER]
    sources = [*(path for path in inputs if path), *model_files]
    for option, output in outputs.items():
        if output:
            check_output_file(output, sources, force, option)


def _read_stdin() -> tuple[list[str], QkvError | None]:
    """The lines of stdin up to the first that is not UTF-8, and the error naming it (or None)."""
    from qkv.data import decode_lines

    return decode_lines(sys.stdin.buffer.read(), "stdin")


def _write_lines(lines: list[str], path: str | None) -> None:
    text = "".join(f"{line}\n" for line in lines)
    if path is None:
        sys.stdout.write(text)
        return
    from qkv.atomic import atomic_write

    atomic_write(path, lambda file: file.write(text.encode("utf-8")))


EVALUATE_EXAMPLES = """\
examples:
  qkv evaluate runs/de_en --dataset multi30k --split test_2016_flickr
  qkv evaluate runs/de_en --src test.de --ref test.en --beam 4 --json
  qkv evaluate runs/de_en/averaged.pt --dataset multi30k --split val --src-lang de --tgt-lang en

Prints sacreBLEU's BLEU and chrF with their signatures, and lower-cased BLEU (sacreBLEU, 13a) for
comparison with papers that quote lower-cased BLEU. With --dataset, the languages come from the
checkpoint (what training recorded) unless --src-lang/--tgt-lang say otherwise.
"""


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="translate a test set and score it (sacreBLEU BLEU and chrF)",
        description="Translate a test set with a trained model and score it against references.",
        epilog=EVALUATE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT")
    data = parser.add_argument_group("test set (a dataset split, or --src and --ref files)")
    data.add_argument("--dataset", choices=["multi30k"], help="a named dataset")
    data.add_argument("--split", default="test_2016_flickr", help="default test_2016_flickr")
    data.add_argument("--src-lang", metavar="LANG", help="source language (default: training's)")
    data.add_argument("--tgt-lang", metavar="LANG", help="target language (default: training's)")
    data.add_argument("--data-dir", metavar="DIR", help="data folder (default $QKV_DATA_DIR)")
    data.add_argument("--src", metavar="FILE", help="source sentences, one a line (.gz ok)")
    data.add_argument("--ref", metavar="FILE", help="reference translations, aligned with --src")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    parser.add_argument("-o", "--output", metavar="FILE", help="also write the translations here")
    _add_force(parser)
    _add_search_options(parser)
    parser.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    import json

    from qkv.data import read_lines
    from qkv.evaluate import format_scores, score

    options = _search_options(args)
    if bool(args.dataset) == bool(args.src or args.ref):
        raise QkvError("give either --dataset (with --split) or both --src and --ref")
    if not args.dataset and not (args.src and args.ref):
        raise QkvError("--src and --ref go together: give both")
    _check_output(args, [args.src, args.ref])
    translator = _load_translator(args)
    if args.dataset:
        src_path, ref_path = _dataset_files(args, translator.meta)
    else:
        src_path, ref_path = args.src, args.ref
    sources, references = read_lines(src_path), read_lines(ref_path)
    if len(sources) != len(references):
        raise QkvError(f"{src_path} has {len(sources)} lines but {ref_path} has {len(references)}")
    if not sources:
        raise QkvError(f"{src_path} is empty: no sentences to evaluate")
    hypotheses = translator.translate(
        sources, progress=not args.quiet, warn=_warner(str(src_path)), **options
    )
    if args.output:
        _write_lines(hypotheses, args.output)
    scores = score(hypotheses, references)
    if args.json:
        details = dict(checkpoint=args.model, source=str(src_path), reference=str(ref_path))
        print(json.dumps({**scores, **details, "beam": args.beam}, indent=2))
    else:
        print(format_scores(scores))
    return 0


def _dataset_files(args, meta: dict):
    from qkv.datasets import multi30k_file

    src_lang = args.src_lang or meta.get("src_lang")
    tgt_lang = args.tgt_lang or meta.get("tgt_lang")
    if not src_lang or not tgt_lang:
        raise QkvError(
            f"{args.model}: the checkpoint does not record its languages; "
            "pass --src-lang and --tgt-lang"
        )
    files = [
        multi30k_file(args.split, lang, args.data_dir, progress=not args.quiet)
        for lang in (src_lang, tgt_lang)
    ]
    return files[0], files[1]


AVERAGE_EXAMPLES = """\
examples:
  qkv average runs/de_en --last 5 -o runs/de_en/averaged.pt
  qkv average runs/de_en/checkpoint_9000.pt runs/de_en/checkpoint_10000.pt -o averaged.pt
  qkv translate runs/de_en/averaged.pt -i test.de

The paper's base models average the last 5 checkpoints (written every 10 minutes), its big models
the last 20. The tokenizer.model of the run is copied beside OUT when none is there, so OUT
translates on its own.
"""


def _add_average(subparsers) -> None:
    parser = subparsers.add_parser(
        "average",
        help="average the parameters of several checkpoints into one",
        description="Average the parameters of checkpoints (the paper's final models).",
        epilog=AVERAGE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths", nargs="+", metavar="CHECKPOINT", help="checkpoint files, or one run directory"
    )
    parser.add_argument(
        "--last", type=int, metavar="N", help="average the run directory's N newest checkpoints"
    )
    parser.add_argument("-o", "--output", required=True, metavar="OUT", help="checkpoint to write")
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it exists (never an averaged checkpoint)",
    )
    parser.set_defaults(run=_run_average)


def _run_average(args) -> int:
    import shutil
    from pathlib import Path

    from qkv.checkpoint import (
        TOKENIZER,
        average_checkpoints,
        last_step_checkpoints,
        save_checkpoint,
    )
    from qkv.outputs import check_output_file

    if args.last is not None:
        if len(args.paths) != 1:
            raise QkvError("--last N takes one run directory")
        paths = last_step_checkpoints(args.paths[0], args.last)
    else:
        paths = [Path(p) for p in args.paths]
        for path in paths:
            if path.is_dir():
                raise QkvError(f"{path}: is a run directory; pass --last N to average its newest")
    check_output_file(args.output, paths, args.force)
    averaged = average_checkpoints(paths)
    output = Path(args.output)
    save_checkpoint(output, averaged)
    names = ", ".join(p.name for p in paths)
    print(f"averaged {len(paths)} checkpoints ({names}) into {output}", file=sys.stderr)
    tokenizer = Path(paths[-1]).parent / TOKENIZER
    if not (output.parent / TOKENIZER).exists() and tokenizer.is_file():
        shutil.copyfile(tokenizer, output.parent / TOKENIZER)
        print(f"copied {tokenizer} beside it", file=sys.stderr)
    return 0


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a tiny model on the built-in task (under a minute on a CPU) and show it working",
        description="Train a tiny Transformer, offline, on the built-in task (dates written in "
        "words -> ISO dates), then translate test sentences it never saw and report its accuracy.",
        epilog="examples:\n  qkv demo\n  qkv demo --steps 300 --out runs/quick-demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out",
        metavar="RUN_DIR",
        help="run directory (default runs/demo, which the README's examples use; runs/demo-2, -3, "
        "... once it exists)",
    )
    parser.add_argument("--steps", type=int, help="training steps (default: the demo recipe's)")
    parser.add_argument("--seed", type=int, help="random seed for data and training")
    parser.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from qkv.demo import default_demo_dir, run_demo

    run_dir = Path(args.out) if args.out else default_demo_dir(Path("runs"))
    overrides = []
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    if args.seed is not None:
        overrides += [f"train.seed={args.seed}", f"data.seed={args.seed}"]
    console = Console(soft_wrap=True)  # paths and sentences stay on one line, whatever the width
    console.print(
        "[bold]qkv demo[/]: teaching a tiny Transformer to read dates written in words "
        "and write them as ISO dates."
    )
    result = run_demo(run_dir, overrides, log=_log)
    table = Table(title="Test sentences the model never saw")
    table.add_column("input (words)")
    table.add_column("model output")
    table.add_column("reference")
    table.add_column("", justify="center")
    for source, output, reference in result.examples:
        mark = "[green]✓[/]" if output == reference else "[red]✗[/]"
        table.add_row(source, output, reference, mark)
    console.print(table)
    console.print(
        f"exact-match accuracy on {result.n_test} test sentences: "
        f"[bold]{result.accuracy:.1%}[/] after {result.seconds:.0f} s"
    )
    console.print(
        f"attention picture: {result.attention_png}  "
        "(where the decoder looks in the words while writing each character of the date)"
    )
    console.print(f"run directory: {result.run_dir}  (try: qkv translate {result.run_dir})")
    return 0


# --- Looking inside: attention pictures and the step-by-step of self-attention -----------------------


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
    from qkv.tokenizer import utf8_text

    utf8_text(args.sentence)
    output = args.output or (None if args.html else "attention.png")
    _check_written_files({"-o": output, "--html": args.html}, args.run_dir, args.force)
    model, tokenizer = _load_run(args.run_dir)
    maps, translation = visualize.sentence_attention(model, tokenizer, args.sentence)
    caption = f"{args.sentence}  →  {translation}"
    print(f"source:      {' '.join(maps.src_labels)}")
    print(f"translation: {translation}")

    kinds = [args.kind] if args.kind else list(KINDS)
    layer, head = _one_based(args.layer, "layer"), _one_based(args.head, "head")
    try:
        visualize.select(maps, kinds, layer, head)
    except ValueError as error:
        raise QkvError(str(error)) from None
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
    from qkv import explain, visualize
    from qkv.tokenizer import utf8_text

    if len(args.inputs) > 2:
        raise QkvError("explain takes [RUN_DIR] TEXT: quote the text if it has spaces")
    *run_dir, text = args.inputs
    text = utf8_text(text)
    _check_written_files({"--html": args.html}, run_dir[0] if run_dir else None, args.force)
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
        model, src_ids, labels = _random_model_and_ids(text)
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
        from pathlib import Path

        Path(args.html).write_text(explain.render_html(result), encoding="utf-8")
        print(f"wrote {args.html}")
    return 0


# Subcommands, in the order `qkv --help` lists them.
COMMANDS: list = [
    _add_demo,
    _add_prepare,
    _add_train,
    _add_translate,
    _add_evaluate,
    _add_average,
    _add_attention,
    _add_explain,
]
