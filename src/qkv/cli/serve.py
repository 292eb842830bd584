"""`qkv serve`."""

from __future__ import annotations

import argparse
import sys

from qkv.cli.common import check_at_least, check_beam, import_torch
from qkv.errors import QkvError

SERVE_EXAMPLES = """\
examples:
  qkv serve runs/demo
  qkv serve runs/de_en runs/en_de --port 5000 --beam 4
  curl -s localhost:5000/translate -H 'Content-Type: application/json' \\
      -d '{"q": "Ein Hund rennt.", "source": "de", "target": "en"}'

API: LibreTranslate's POST /translate, GET /languages and GET /frontend/settings (its clients
work unchanged), qkv's POST /v1/translate (hypotheses, scores, subword tokens, attention) and
POST /v1/explain (attention step by step), GET /health, GET /metrics (Prometheus), the page at /
(translate, then look at the attention) and the interactive documentation at /docs. Needs the
extra: pip install "qkv[serve]".
"""


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve trained models over HTTP (LibreTranslate's API, batched across requests)",
        description="Serve one or more trained models, each for the language pair it was trained "
        "on, over HTTP. Sentences of requests that arrive within --max-wait-ms are decoded in one "
        "batched search.",
        epilog=SERVE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("models", nargs="+", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    parser.add_argument("--port", type=int, default=5000, help="default 5000")
    parser.add_argument(
        "--beam",
        type=int,
        default=5,
        metavar="K",
        help="beam size of requests that give none (default 5; 1: greedy)",
    )
    parser.add_argument(
        "--early-exit",
        action="store_true",
        help="as for qkv translate: end a sentence's beam search when its best candidate ends "
        "(~30%% fewer steps; a request's early_exit says otherwise for it)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "int8"],
        default="auto",
        help="as for qkv translate (default auto)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="as for qkv translate: batches of up to 5 rows (one request with beam 5; with beam 1, "
        "up to 32 requests' sentences) through a compiled decoder step, every program a batch can "
        "take compiled (or loaded from the run's compiled/ folder) before the server starts: one "
        "with beam 5, up to eight with beam 1, and one sentence's encoder, ~20-40 s each the first "
        "time",
    )
    parser.add_argument(
        "--max-chars", type=int, default=5000, help="characters per request (default 5000)"
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        help="how long a request waits for others to share its batch (default 10; 0: no batching)",
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=4096, help="source tokens per batch (default 4096)"
    )
    parser.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting before 429 (default 256)"
    )
    parser.add_argument("--api-keys", metavar="FILE", help="require one of these keys (one a line)")
    parser.set_defaults(run=_run_serve)


def _run_serve(args) -> int:
    import_torch()
    try:
        import uvicorn

        from qkv.serve.app import create_app
    except ImportError as error:
        raise QkvError(f'qkv serve needs its extra: pip install "qkv[serve]" ({error})') from None
    from qkv.serve import compile_ahead, load_models, read_api_keys

    check_beam(args.beam)
    if not 0 <= args.port <= 65535:
        raise QkvError(f"--port must be between 0 and 65535, got {args.port}")
    # --max-queue 0 refused every request with a 429 that said to retry
    check_at_least(
        {"--max-chars": args.max_chars, "--max-batch-tokens": args.max_batch_tokens,
         "--max-queue": args.max_queue},
        1,
    )  # fmt: skip
    check_at_least({"--max-wait-ms": args.max_wait_ms}, 0)
    check_address(args.host, args.port)
    api_keys = read_api_keys(args.api_keys) if args.api_keys else None
    models = load_models(
        args.models,
        args.device,
        args.precision,
        warn=lambda message: print(f"qkv: warning: {message}", file=sys.stderr),
        compile=args.compile,
        say=lambda message: print(f"qkv serve: {message}", file=sys.stderr),
    )
    for model in models:
        print(f"qkv serve: {model.name}: {model.source} -> {model.target}", file=sys.stderr)
        if args.compile:  # every program a batch can run on: compiled now, not while a client waits
            compile_ahead(model.translator, args.beam)
    app = create_app(
        models,
        beam=args.beam,
        max_chars=args.max_chars,
        api_keys=api_keys,
        max_wait_ms=args.max_wait_ms,
        max_batch_tokens=args.max_batch_tokens,
        max_queue=args.max_queue,
        early_exit=args.early_exit,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def check_address(host: str, port: int) -> None:
    """A QkvError now, before the models load, where the server could not listen: uvicorn said so
    in its log after "Application startup complete", and exited with status 3."""
    import socket

    try:
        family, kind, protocol, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as error:
        raise QkvError(f"--host {host}: {error.strerror}") from None
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own socket
        try:
            probe.bind(address)
        except OSError as error:
            raise QkvError(f"cannot listen on {host}:{port}: {error.strerror}") from None
