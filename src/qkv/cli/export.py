"""`qkv export`."""

from __future__ import annotations

import argparse

from qkv.errors import QkvError

EXPORT_EXAMPLES = """\
examples:
  qkv export runs/de_en --format ctranslate2 -o runs/de_en/ct2
  qkv export runs/de_en --format ctranslate2 --quantization int8 -o runs/de_en/ct2_int8
  qkv translate runs/de_en/ct2 -i test.de           # translated by CTranslate2, same options

Needs ctranslate2: pip install "qkv[export]". The directory holds CTranslate2's model.bin,
config.json and vocabulary, and the run's tokenizer.model, so `ctranslate2.Translator(DIR)` (with
SentencePiece for the subwords) and `qkv translate DIR` both load it.
"""


def _add_export(subparsers) -> None:
    from qkv.export.ctranslate2 import QUANTIZATIONS

    parser = subparsers.add_parser(
        "export",
        help="write a trained model for another inference engine (CTranslate2)",
        description="Write the model of a run directory or checkpoint for another inference engine.",
        epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("--format", required=True, choices=["ctranslate2"], help="the engine")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write")
    parser.add_argument(
        "--quantization", choices=QUANTIZATIONS, help="weights' type (default: float32)"
    )
    parser.add_argument("--force", action="store_true", help="replace DIR's model if it exists")
    parser.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from pathlib import Path

    from qkv.export.ctranslate2 import export

    out = Path(args.output)
    if (out / "model.bin").exists() and not args.force:
        raise QkvError(f"{out} holds a model already: --force replaces it")
    if out.exists() and not out.is_dir():
        raise QkvError(f"{out} is a file, not a directory")
    export(args.model, out, args.quantization)
    kind = args.quantization or "float32"
    print(f"wrote {out}: a CTranslate2 model ({kind}) and its tokenizer.model")
    return 0
