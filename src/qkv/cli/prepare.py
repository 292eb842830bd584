"""`qkv prepare`."""

from __future__ import annotations

import argparse

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
