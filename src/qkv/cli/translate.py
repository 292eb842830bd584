"""`qkv translate` and `qkv evaluate`: the same model loading and search options."""

from __future__ import annotations

import argparse
import sys

from qkv.cli.common import (
    MAX_BEAM,
    add_force,
    check_at_least,
    check_beam,
    check_output,
    compressed_as_named,
    import_torch,
    write_lines,
)
from qkv.errors import QkvError

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
    search.add_argument(
        "--beam",
        type=int,
        default=5,
        metavar="K",
        help=f"beam size, 1-{MAX_BEAM} (default 5; 1: greedy)",
    )
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
    search.add_argument(
        "--early-exit",
        action="store_true",
        help="end a sentence's beam search as soon as its best candidate ends, as OpenNMT-py "
        "does: ~30%% fewer steps one sentence at a time, and a hypothesis that might still have "
        "won is not explored (Multi30k: BLEU within 0.2). Default: search until no live beam can "
        "beat the best finished one",
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
        choices=["auto", "fp32", "bf16", "int8"],
        default="auto",
        help="auto: bf16 where the device computes it natively (a CPU with AVX512_BF16, AMX or Arm "
        "BF16; a recent GPU), else fp32. bf16 decodes 1.1-1.6x faster there, and many times "
        "slower on CPUs without it. int8: int8 weights in every linear map, on the CPU; with "
        "--compile, a compiled int8 step (default auto)",
    )
    model.add_argument(
        "--compile",
        action="store_true",
        help="batches of up to 5 rows (sentences x beams: one sentence at a time, as typed "
        "lines arrive), and greedy batches of up to 32 sentences of a small model, through a "
        "compiled decoder step, fp32 on the CPU (or int8 with --precision int8): 2.2-2.8x faster "
        "on one sentence of a small model, 1.2-1.5x of a base one, 1.0-1.16x on 32 sentences; "
        "compiled once per number of rows "
        "(1-5, then 8, 16 or 32, and greedy moves to 16, 8, 4 or 1 as sentences finish, and "
        "from the usual engine to them once 32 are left; greedy search has programs of its own, "
        "and one sentence's encoder one; ~20-40 s each, ~40%% less with QKV_COMPILE_AUTOTUNE=0) "
        "and kept in the run's compiled/ folder. "
        "Needs a C++ compiler (without one: a warning, and the usual engine). With --device "
        "cuda, the same step replayed as CUDA graphs (fp32; recorded at first use, no compiler)",
    )
    model.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads (default: torch's, all cores; 1 is much faster on a busy machine)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _search_options(args) -> dict:
    check_beam(args.beam)
    check_at_least(
        {"--max-tokens": args.max_tokens, "--max-len": args.max_len, "--threads": args.threads,
         "--n-best": getattr(args, "n_best", None)},
        1,
    )  # fmt: skip
    check_at_least({"--min-len": args.min_len}, 0)
    if args.max_len is not None and args.min_len > args.max_len:
        raise QkvError(f"--min-len {args.min_len} is more than --max-len {args.max_len}")
    return dict(
        beam=args.beam,
        max_tokens=args.max_tokens,
        length_penalty=args.length_penalty,
        length_penalty_style=args.length_penalty_style,
        max_len=args.max_len,
        min_len=args.min_len,
        early_exit=args.early_exit,
    )


def _load_translator(args):
    import torch

    import qkv

    if args.threads:
        torch.set_num_threads(args.threads)

    from qkv.hardware import precision_note

    def say(message: str) -> None:
        print(f"qkv: {message}", file=sys.stderr)

    translator = qkv.load(
        args.model,
        tokenizer=args.tokenizer,
        device=args.device,
        precision=args.precision,
        warn=lambda message: print(f"qkv: warning: {message}", file=sys.stderr),
        **({"compile": True} if args.compile else {}),
        # told what takes a while: compiling, or building qkv's operators for int8 (~10 s, once)
        **(
            {"say": None if args.quiet else say} if args.compile or args.precision == "int8" else {}
        ),
    )
    if not args.quiet:
        engine, _, compute = translator.precision.rpartition(" ")
        if engine:  # a directory of qkv export: "ctranslate2 float32", "onnxruntime fp32"
            note = f"{args.model}: exported, run by {engine} in {compute}"
        elif args.compile and args.precision == "auto" and translator.precision == "fp32":
            note = "precision fp32 (auto with --compile: the compiled step computes in fp32)"
        else:
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
    parser.add_argument("-i", "--input", metavar="FILE", help="input text (default stdin, as is -)")
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="output file, gzipped if it ends in .gz (default stdout, as is -)",
    )
    add_force(parser)
    parser.add_argument(
        "--n-best",
        type=int,
        metavar="K",
        help="write the K best translations of each line, at most --beam (default 1)",
    )
    parser.add_argument("--scores", action="store_true", help="write each translation's score")
    _add_search_options(parser)
    parser.set_defaults(run=_run_translate)


# Lines of a file translated at a time: memory holds one chunk (sorted by length inside, as batches
# are), whatever the file's size.
FILE_CHUNK_LINES = 10_000
# At most this many lines of stdin at a time: what has arrived while the previous chunk was translated.
STDIN_CHUNK_LINES = 1_000


def _run_translate(args) -> int:
    import_torch()
    from qkv.atomic import atomic_write
    from qkv.text import NotUtf8, arriving_chunks, count_lines, line_chunks
    from qkv.translate import _progress_bar

    options = _search_options(args)
    # "-": standard input and output, as other tools read it (else a file named "-" in the folder).
    args.input = None if args.input == "-" else args.input
    args.output = None if args.output == "-" else args.output
    check_output(args, [args.input])
    source_name = args.input or "stdin"
    if args.input:  # counted first: a missing or broken file fails before the model loads
        total = count_lines(args.input)
        chunks = line_chunks(args.input, FILE_CHUNK_LINES)
        bar = _progress_bar(total, enabled=not args.quiet)
    else:  # a terminal or a pipe: each line goes out as soon as it is translated
        chunks = arriving_chunks(sys.stdin.buffer, STDIN_CHUNK_LINES)
        bar = _progress_bar(None, enabled=False)
    translator = _load_translator(args)
    # The first line that is not UTF-8: the lines before it are still translated (to stdout)
    read_error = None

    def translate_all(write) -> None:
        nonlocal read_error
        first_line = 1
        try:
            for lines in chunks:
                results = translator.hypotheses(
                    lines, n_best=args.n_best or 1, progress=bar, warn=_warner(source_name),
                    first_line=first_line, scores=args.scores, **options,
                )  # fmt: skip
                write(_format_results(results, first_line, args))
                first_line += len(lines)
        except NotUtf8 as error:  # raised when the lines before it are written
            read_error = error
        bar.close()

    if args.output:

        def translate_into(file) -> None:
            with compressed_as_named(file, args.output) as out:
                translate_all(lambda text: out.write(text.encode()))
            if read_error is not None:  # a command that fails leaves -o as it was
                raise QkvError(f"{read_error}; {args.output} is left as it was")

        atomic_write(args.output, translate_into)
    else:

        def write_stdout(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        translate_all(write_stdout)
    if read_error is not None:
        raise read_error
    return 0


def _format_results(results, first_line: int, args) -> str:
    out = []
    for number, hypotheses in enumerate(results, start=first_line):
        for hypothesis in hypotheses if args.n_best else hypotheses[:1]:
            fields = [str(number)] if args.n_best else []
            fields += [f"{hypothesis.score:.4f}"] if args.scores else []
            out.append("\t".join([*fields, hypothesis.text]))
    return "".join(f"{line}\n" for line in out)


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
    data.add_argument(
        "--data-dir", metavar="DIR", help="data folder (default $QKV_DATA_DIR, else ~/.cache/qkv)"
    )
    data.add_argument("--src", metavar="FILE", help="source sentences, one a line (.gz ok)")
    data.add_argument("--ref", metavar="FILE", help="reference translations, aligned with --src")
    parser.add_argument("--json", action="store_true", help="print the scores as JSON")
    parser.add_argument(
        "-o", "--output", metavar="FILE", help="also write the translations here (.gz: gzipped)"
    )
    add_force(parser)
    _add_search_options(parser)
    parser.set_defaults(run=_run_evaluate)


def _run_evaluate(args) -> int:
    import_torch()
    import json

    from qkv.evaluate import format_scores, score
    from qkv.text import read_lines

    options = _search_options(args)
    if bool(args.dataset) == bool(args.src or args.ref):
        raise QkvError("give either --dataset (with --split) or both --src and --ref")
    if not args.dataset and not (args.src and args.ref):
        raise QkvError("--src and --ref go together: give both")
    check_output(args, [args.src, args.ref])
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
        write_lines(hypotheses, args.output)
    scores = score(hypotheses, references)
    if args.json:
        details = dict(checkpoint=args.model, source=str(src_path), reference=str(ref_path))
        search = {"beam": args.beam, "early_exit": args.early_exit}
        # what computed it: "int8" only where int8 ran (else the fp32 it fell back to, said once)
        engine = {"precision": translator.precision, "compile": args.compile}
        print(json.dumps({**scores, **details, **search, **engine}, indent=2))
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
