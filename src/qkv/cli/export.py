"""`qkv export`."""

from __future__ import annotations

import argparse

from qkv.errors import QkvError
from qkv.export import QUANTIZATIONS

EXPORT_EXAMPLES = """\
examples:
  qkv export runs/de_en --format ctranslate2 -o runs/de_en/ct2
  qkv export runs/de_en --format ctranslate2 --quantization int8 -o runs/de_en/ct2_int8
  qkv translate runs/de_en/ct2 -i test.de           # translated by CTranslate2, same options
  qkv export runs/de_en --format onnx -o runs/de_en/onnx
  qkv translate runs/de_en/onnx -i test.de          # qkv's search over ONNX Runtime

Needs the export extra: pip install "qkv[export]" (ctranslate2, onnx, onnxruntime). A CTranslate2
directory holds its model.bin, config.json and vocabulary; an ONNX one encoder.onnx and
decoder_step.onnx (the KV cache as inputs and outputs) and qkv_onnx.json. Both get the run's
tokenizer.model, so `qkv translate DIR` and `qkv evaluate DIR` load them.
"""


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a trained model for another inference engine (CTranslate2, ONNX)",
        description="Write the model of a run directory or checkpoint for another inference engine.",
        epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument(
        "--format", required=True, choices=["ctranslate2", "onnx"], help="the engine"
    )
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to write")
    parser.add_argument(
        "--quantization", choices=QUANTIZATIONS, help="CTranslate2's weights (default: float32)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export in DIR (a folder holding anything else is refused)",
    )
    parser.set_defaults(run=_run_export)


def _run_export(args) -> int:
    from pathlib import Path

    from qkv.export.folder import check_destination

    out = Path(args.output)
    check_destination(out, args.force)  # before any work; the export checks again as it writes
    if args.format == "onnx":
        from qkv.export.onnx import OPSET, export

        if args.quantization:
            raise QkvError("--quantization is for --format ctranslate2")
        export(args.model, out, args.force)
        print(f"wrote {out}: encoder.onnx and decoder_step.onnx (opset {OPSET}), tokenizer.model")
        return 0
    from qkv.export.ctranslate2 import export

    export(args.model, out, args.quantization, args.force)
    kind = args.quantization or "float32"
    print(f"wrote {out}: a CTranslate2 model ({kind}) and its tokenizer.model")
    return 0
