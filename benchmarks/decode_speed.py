"""Decoding speed: qkv's search against Hugging Face's MarianMTModel.generate and CTranslate2.

Every system decodes the same random sources (15 subwords + EOS) with models of the same dimensions and
random weights, generating exactly 20 tokens per sentence (min = max = 20), so each does the same work
whatever its weights say. Greedy searches keep no scores, as a translation does not need them:
CTranslate2's `translate_batch` computes none by default (`return_scores=False`: no softmax), qkv's
`greedy_search(..., scores=False)` none either (as `qkv translate` without `--scores`); beam search
needs the log-probabilities in every system. Each figure is sentences/s from the median of --repeats
timed runs after one warm-up run; the systems in this process take turns run by run, so that a drift
in the machine's speed reaches all of them alike.

- qkv: `qkv.search.beam_search` / `greedy_search` (KV cache) in fp32 and in bf16 (the model cast with
  `.to(torch.bfloat16)`), and in fp32 with the cache replaced by a full decoder pass over the prefix at
  every step ("no cache", tests/reference_engine.py). Each timed search is one batch of a file as `qkv
  translate` decodes it: the model is prepared for decoding once for the whole file
  (`qkv.inference.prepare_for_decoding`), not in every batch (`--pack-per-batch` times that instead).
- qkv compiled: the engine of `qkv translate --compile` (`qkv.inference.compiled`: a decoder step
  compiled by AOTInductor for batches of up to 5 rows and greedy batches of up to 32 sentences, and
  `qkv.inference.beam_program` for beams on more sentences), compiled in the untimed first run of
  each cell into this run's temporary folder. With `--device cuda`, the same engine replays its step as
  CUDA graphs (`qkv.inference.cuda_graphs`), recorded in the untimed first run.
- Hugging Face: `MarianMTModel(MarianConfig(...)).generate`, in the same process as qkv, in fp32 and in
  bf16 (cast like qkv's); "hf-static" in fp32 with its static cache (`cache_implementation="static"`),
  which on a GPU `generate` compiles (`torch.compile`, mode "reduce-overhead": CUDA graphs) in the
  untimed first run; on the CPU it is not compiled (not in the default systems there).
- CTranslate2: that Marian model converted by ctranslate2's own converter, run in a separate process
  that never imports torch: the two thread pools compete, and timed in a process where torch has run
  CTranslate2 was up to 5x slower. That process takes its turns with the others all the same: it times
  one search each time it is asked (over a pipe). Every process starts with a short OpenMP spin
  (GOMP_SPINCOUNT=20000, unless set: idle threads sleep within a millisecond) and the turns are 2 ms
  apart, so that no system's idle threads still spin on the cores (`timing.SHORT_SPIN`,
  `timing.PAUSE_SECONDS`). On an Intel CPU CTranslate2 multiplies with MKL; on a 2-core Xeon with AMX
  (benchmarks/README.md, session 39) MKL's fp32 products at 2 threads made its searches of one
  sentence 10x slower than with its oneDNN ones: `CT2_USE_MKL=0` (inherited by its process, named in
  the header) runs it with oneDNN's. Its int8 (MKL's) was fastest there on one thread, and its two
  threads slowed qkv's turns too (session 47): `--ct2-threads 1` gives CTranslate2 a thread count of
  its own, each system at its best. Then, on a virtual machine, the core CTranslate2 leaves idle may
  come back a host time slice late (~10 ms) in qkv's next turn: a short cell there (int8 greedy on
  one sentence, 2.5 ms) read 0.54x taking turns and 1.97x with each system alone (`--systems` one
  at a time; session 55, an AMD Zen 4). Read such a cell both ways.

Before anything is timed, glibc's allocator is settled (`timing.settle_allocator`), in this process and in
CTranslate2's: Hugging Face's speed otherwise depends on what ran before it in the process
(`--default-allocator` leaves it as it starts).

    pip install transformers ctranslate2          # benchmark-only dependencies
    python benchmarks/decode_speed.py                              # small and base, every cell
    python benchmarks/decode_speed.py --configs small --batches 32 --searches beam
    python benchmarks/decode_speed.py --threads 1       # every system on one thread (a busy machine)
    python benchmarks/decode_speed.py --systems qkv-int8-compiled ct2-int8 --ct2-threads 1
    python benchmarks/decode_speed.py --as-avx2         # every system as on an AVX2 CPU without bf16
    python benchmarks/decode_speed.py --device cuda --systems qkv qkv-bf16 hf hf-bf16   # on a GPU
    python benchmarks/decode_speed.py --device cuda --batches 1 --systems qkv-compiled hf-static

Results and what they mean: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from timing import (
    AS_AVX2,
    AS_AVX2_HELP,
    PAUSE_SECONDS,
    SHORT_SPIN,
    WorkerTurns,
    interleaved_median_seconds,
    run_as_avx2_if_asked,
    settle_allocator,
)

CONFIGS = {
    "small": dict(d_model=256, n_heads=4, d_ff=1024, n_layers=3),
    "base": dict(d_model=512, n_heads=8, d_ff=2048, n_layers=6),
}
VOCAB = 8000
PAD, UNK, BOS, EOS = 0, 1, 2, 3
NAMES = {
    "qkv": "qkv fp32",
    "qkv-bf16": "qkv bf16",
    "qkv-int8": "qkv int8",
    "qkv-nocache": "qkv fp32 no cache",
    "qkv-compiled": "qkv fp32 compiled",
    "qkv-int8-compiled": "qkv int8 compiled",
    "hf": "HF fp32",
    "hf-bf16": "HF bf16",
    "hf-static": "HF fp32 static cache",
    "ct2-fp32": "CT2 fp32",
    "ct2-int8": "CT2 int8",
    "qkv-ct2-fp32": "qkv → CT2 fp32",
    "qkv-ct2-int8": "qkv → CT2 int8",
    "qkv-onnx": "qkv → ONNX Runtime",
}
# Like against like: fp32 against fp32, and each system's fastest reduced precision against the other's.
RATIOS = [
    ("qkv", "hf"),
    ("qkv-bf16", "hf-bf16"),
    ("qkv-bf16", "hf"),
    ("qkv", "ct2-fp32"),
    ("qkv-compiled", "ct2-fp32"),
    ("qkv-compiled", "hf-static"),
    ("qkv-bf16", "ct2-int8"),
    ("qkv-int8", "ct2-int8"),
    ("qkv-int8-compiled", "ct2-int8"),
    ("qkv-ct2-fp32", "ct2-fp32"),
    ("qkv-ct2-int8", "ct2-int8"),
    ("qkv-onnx", "qkv"),
]
SRC_LEN = 16  # subwords, EOS included
NEW_TOKENS = 20
BEAM = 5
SYSTEMS = ("qkv", "qkv-bf16", "qkv-int8", "qkv-nocache", "qkv-compiled", "qkv-int8-compiled", "hf", "hf-bf16", "ct2-fp32", "ct2-int8",
           "qkv-ct2-fp32", "qkv-ct2-int8", "qkv-onnx", "hf-static")  # fmt: skip
# Not run unless asked: on the CPU Hugging Face does not compile its static cache's step.
ASKED_ONLY = ("hf-static",)
CT2_SYSTEMS = {  # system: (which model, compute type)
    "ct2-fp32": ("marian", "float32"),
    "ct2-int8": ("marian", "int8"),
    "qkv-ct2-fp32": ("qkv", "float32"),
    "qkv-ct2-int8": ("qkv", "int8"),
}


def sources(batch: int, seed: int = 0) -> list[list[int]]:
    """`batch` sources of SRC_LEN ids (random subwords, then EOS): plain Python, for every system."""
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(SRC_LEN - 1)] + [EOS] for _ in range(batch)]


def check_lengths(name: str, lengths: list[int]) -> None:
    if set(lengths) != {NEW_TOKENS}:
        raise SystemExit(f"{name} generated {sorted(set(lengths))} tokens, not {NEW_TOKENS}")


# ---------------------------------------------------------------------------------------------------
# qkv


def qkv_model(name: str, vocab_size: int = VOCAB):
    import torch

    from qkv.model import Transformer, TransformerConfig

    dims = CONFIGS[name]
    torch.manual_seed(0)
    config = TransformerConfig(
        src_vocab_size=vocab_size,
        tgt_vocab_size=vocab_size,
        d_model=dims["d_model"],
        n_heads=dims["n_heads"],
        d_ff=dims["d_ff"],
        n_encoder_layers=dims["n_layers"],
        n_decoder_layers=dims["n_layers"],
        share_embeddings=True,
    )
    return Transformer(config).eval()


def uncached_engine(model):
    """The tests' reference engine: the model over each row's whole history, no cache."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference_engine import UncachedEngine

    return UncachedEngine(model)


def qkv_runner(
    model, batch: list[list[int]], search: str, pack_per_batch: bool = False, int8: bool = False
):
    import torch

    from qkv.inference import prepare_for_decoding
    from qkv.model import Transformer
    from qkv.search import beam_search, greedy_search

    is_engine = not isinstance(
        model, Transformer
    )  # the uncached reference, ONNX: their own engines
    torch_model = model.model if is_engine else model
    device = next(torch_model.parameters()).device if torch_model is not None else "cpu"
    src = torch.tensor(batch, device=device)
    lengths = dict(max_len=NEW_TOKENS, min_len=NEW_TOKENS)
    # As `qkv translate` decodes a file: the weights are prepared (packed for oneDNN) once for all its
    # batches, not once per batch. pack_per_batch: time a search that prepares them itself.
    prepared = model if (pack_per_batch and not int8) or is_engine else None
    if prepared is None:
        with torch.inference_mode():
            prepared = prepare_for_decoding(model, int8=int8)  # int8: --precision int8's engine

    def run():
        if search == "beam":
            ids = beam_search(prepared, src, beam_size=BEAM, **lengths)[0][:, 0]
        else:
            ids = greedy_search(prepared, src, **lengths, scores=False)[0]
        return (ids != PAD).sum(dim=1).tolist()  # one copy back: the search is done on any device

    return run


# ---------------------------------------------------------------------------------------------------
# Hugging Face


def marian_model(name: str, dims: dict | None = None):
    """A MarianMTModel with the dimensions of `name` (or `dims`, keys as CONFIGS') and random weights.
    As in real Marian models, <pad> is the last id and starts the decoder, so ctranslate2's Marian
    converter takes it as it is."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    dims = dims or CONFIGS[name]
    config = MarianConfig(
        vocab_size=VOCAB + 1,
        decoder_vocab_size=VOCAB + 1,
        d_model=dims["d_model"],
        encoder_layers=dims["n_layers"],
        decoder_layers=dims["n_layers"],
        encoder_attention_heads=dims["n_heads"],
        decoder_attention_heads=dims["n_heads"],
        encoder_ffn_dim=dims["d_ff"],
        decoder_ffn_dim=dims["d_ff"],
        activation_function="relu",
        max_position_embeddings=256,
        scale_embedding=True,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=VOCAB,
        decoder_start_token_id=VOCAB,
        eos_token_id=EOS,
        forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    return MarianMTModel(config).eval()


def hf_runner(model, batch: list[list[int]], search: str, static: bool = False):
    """`generate`; `static`: over its static cache, which it compiles on a GPU (CUDA graphs)."""
    import torch

    src = torch.tensor(batch, device=model.device)
    options = dict(
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        num_beams=BEAM if search == "beam" else 1,
        do_sample=False,
    )
    if static:
        options["cache_implementation"] = "static"

    def run():
        with torch.inference_mode():
            ids = model.generate(src, attention_mask=torch.ones_like(src), **options)
        return (ids[:, 1:] != VOCAB).sum(dim=1).tolist()  # after the start token

    return run


# ---------------------------------------------------------------------------------------------------
# CTranslate2


class _Vocabulary:
    """What ctranslate2's Marian loader reads from a tokenizer: the token strings and two of them."""

    eos_token, unk_token = "</s>", "<unk>"

    def get_vocab(self) -> dict[str, int]:
        tokens = ["<blank>", "<unk>", "<s>", "</s>", *(f"t{i}" for i in range(4, VOCAB)), "<pad>"]
        return {token: i for i, token in enumerate(tokens)}


def export_qkv_to_ctranslate2(model, out_dir: Path) -> Path:
    """The qkv model as `qkv export --format ctranslate2` writes it (its spec, in float32; the worker
    asks for int8 at load time), with the benchmark's vocabulary; sources carry their EOS already."""
    from qkv.export.ctranslate2 import build_spec

    vocabulary = list(_Vocabulary().get_vocab())[:VOCAB]  # no <pad> at the end: qkv's pad is id 0
    spec = build_spec(model, vocabulary, {"unk": UNK, "bos": BOS, "eos": EOS})
    spec.config.add_source_eos = False
    spec.validate()
    spec.optimize()
    out_dir.mkdir(parents=True, exist_ok=True)
    spec.save(str(out_dir))
    return out_dir


def convert_to_ctranslate2(model, out_dir: Path) -> Path:
    """Convert the Marian model with ctranslate2's TransformersConverter (given our vocabulary, since
    a random model has no SentencePiece tokenizer to load)."""
    import ctranslate2

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):
            return model

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _Vocabulary()

    hf_dir = out_dir / "hf"
    model.config.save_pretrained(hf_dir)
    return Path(Converter(str(hf_dir)).convert(str(out_dir / "ct2"), force=True))


def ctranslate2_worker(model_dir, compute_type, batch: int, search, threads: int, device: str):
    """Runs in its own process (`ctranslate2_turns`): says {"ready": true} once its model is loaded and
    has generated the right lengths, then times one search for each line it reads, printing
    {"seconds": ...} as JSON, until its input ends."""
    import ctranslate2

    translator = ctranslate2.Translator(
        model_dir, device=device, compute_type=compute_type, intra_threads=threads
    )
    tokens = [[_token(i) for i in row] for row in sources(batch)]
    options = dict(
        beam_size=BEAM if search == "beam" else 1,
        max_decoding_length=NEW_TOKENS,
        min_decoding_length=NEW_TOKENS,
    )

    def run():
        results = translator.translate_batch(tokens, **options)
        return [len(result.hypotheses[0]) for result in results]

    check_lengths(f"CTranslate2 {compute_type}", run())
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        run()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def _token(i: int) -> str:
    return {UNK: "<unk>", BOS: "<s>", EOS: "</s>"}.get(i, f"t{i}")


def ctranslate2_turns(model_dir: Path, compute_type: str, batch: int, search: str, args):
    """A CTranslate2 system for one cell, in its own process (`ctranslate2_worker`), taking turns
    with the runs in this process (`timing.WorkerTurns`): each call times one search there."""
    import torch

    command = [sys.executable, __file__, "--ct2-worker", str(model_dir), compute_type, str(batch)]
    threads = args.ct2_threads or torch.get_num_threads()
    command += [search, str(threads), args.device.split(":")[0]]
    command.append("default" if args.default_allocator else "settled")
    # Ready ({"ready": true}) once loaded, and the lengths were right.
    return WorkerTurns(command, "CTranslate2 worker")


# ---------------------------------------------------------------------------------------------------


def benchmark_config(name: str, args) -> list[dict]:
    import torch

    device = torch.device(args.device)
    qkv = qkv_model(name).to(device)
    qkv_bf16 = qkv_model(name).to(device, torch.bfloat16)
    # On the CPU until converted for CTranslate2; not built (no transformers needed) for qkv alone.
    needs_marian = any(s.startswith(("hf", "ct2")) for s in args.systems)
    marian = marian_model(name) if needs_marian else None
    marian_bf16 = (
        marian_model(name).to(device, torch.bfloat16) if "hf-bf16" in args.systems else None
    )
    rows = []
    qkv_run = functools.partial(qkv_runner, pack_per_batch=args.pack_per_batch)
    with tempfile.TemporaryDirectory() as tmp:
        ct2_dirs = {}
        if any(s.startswith("ct2") for s in args.systems):
            ct2_dirs["marian"] = convert_to_ctranslate2(marian, Path(tmp))
        onnx_engine = None
        if "qkv-onnx" in args.systems:
            from qkv.export.onnx import export_graphs
            from qkv.onnx import OnnxEngine

            onnx_engine = OnnxEngine(export_graphs(qkv_model(name), Path(tmp) / "onnx"))
        compiled_engine = None
        if "qkv-compiled" in args.systems:
            from qkv.inference.compiled import CompiledEngine
            from qkv.inference.cuda_graphs import GraphedEngine

            # Compiled (on a GPU, its graphs recorded) in the untimed first run of a cell, kept in
            # this run's temporary folder; the engine `qkv translate --compile` takes on the device.
            kind = GraphedEngine if device.type == "cuda" else CompiledEngine
            compiled_engine = kind(qkv, cache_dir=Path(tmp) / "compiled")
        int8_compiled_engine = None
        if "qkv-int8-compiled" in args.systems:  # `--precision int8 --compile`, on the CPU
            from qkv.inference.compiled import CompiledEngine

            int8_compiled_engine = CompiledEngine(qkv, cache_dir=Path(tmp) / "compiled", int8=True)
        if any(s.startswith("qkv-ct2") for s in args.systems):
            ct2_dirs["qkv"] = export_qkv_to_ctranslate2(qkv_model(name), Path(tmp) / "qkv_ct2")
        if marian is not None:
            marian = marian.to(device)
        for batch_size in args.batches:
            batch = sources(batch_size)
            for search in args.searches:
                in_process = {
                    "qkv": (qkv_run, qkv),
                    "qkv-bf16": (qkv_run, qkv_bf16),
                    "qkv-int8": (functools.partial(qkv_run, int8=True), qkv),
                    "qkv-onnx": (qkv_run, onnx_engine),
                    "qkv-compiled": (qkv_run, compiled_engine),
                    "qkv-int8-compiled": (qkv_run, int8_compiled_engine),
                    "qkv-nocache": (qkv_run, uncached_engine(qkv)),
                    "hf": (hf_runner, marian),
                    "hf-bf16": (hf_runner, marian_bf16),
                    "hf-static": (functools.partial(hf_runner, static=True), marian),
                }
                runs = {}
                with contextlib.ExitStack() as workers:
                    for system in args.systems:
                        if system in in_process:
                            make_runner, model = in_process[system]
                            runs[system] = make_runner(model, batch, search)
                            check_lengths(system, runs[system]())
                        else:
                            which, compute_type = CT2_SYSTEMS[system]
                            turns = ctranslate2_turns(
                                ct2_dirs[which], compute_type, batch_size, search, args
                            )
                            runs[system] = workers.enter_context(turns)
                    elsewhere = any(system not in in_process for system in args.systems)
                    pause = PAUSE_SECONDS if elsewhere else 0.0
                    seconds = interleaved_median_seconds(runs, args.repeats, pause)
                row = dict(config=name, batch=batch_size, search=search)
                row.update({s: batch_size / t for s, t in seconds.items()})
                rows.append(row)
                print(format_row(row, args.systems), flush=True)
    return rows


def format_row(row: dict, systems) -> str:
    search = f"beam {BEAM}" if row["search"] == "beam" else "greedy"
    cells = [row["config"], str(row["batch"]), search]
    cells += [f"{row[s]:.1f}" if s in row else "-" for s in systems]
    for ours, theirs in RATIOS:
        if ours in row and theirs in row:
            cells.append(f"{row[ours] / row[theirs]:.2f}x")
    return "| " + " | ".join(cells) + " |"


def header(systems) -> str:
    columns = ["config", "batch", "search", *(NAMES[s] for s in systems)]
    columns += [f"{NAMES[o]} / {NAMES[t]}" for o, t in RATIOS if o in systems and t in systems]
    return "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ct2-worker":
        model_dir, compute_type, batch, search, threads, device, allocator = sys.argv[2:9]
        if allocator == "settled":
            settle_allocator()
        ctranslate2_worker(model_dir, compute_type, int(batch), search, int(threads), device)
        return
    # GOMP_SPINCOUNT: the user's if set, else a short spin for the turns (timing.SHORT_SPIN).
    run_as_avx2_if_asked(also={k: os.environ.get(k, v) for k, v in SHORT_SPIN.items()})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 1])
    parser.add_argument(
        "--searches", nargs="+", default=["beam", "greedy"], choices=["beam", "greedy"]
    )
    parser.add_argument(
        "--systems",
        nargs="+",
        default=[s for s in SYSTEMS if s not in ASKED_ONLY],
        choices=list(SYSTEMS),
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (median)")
    parser.add_argument(
        "--threads", type=int, help="threads for every system (default: torch's default, all cores)"
    )
    parser.add_argument(
        "--ct2-threads",
        type=int,
        help="threads for CTranslate2 alone (default: --threads): each system at its best thread "
        "count, as on the 2-core Xeon where CTranslate2's int8 (MKL) is fastest on one thread",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda: where every system runs (default cpu)"
    )
    parser.add_argument(
        "--pack-per-batch",
        action="store_true",
        help="qkv prepares its weights for oneDNN in every timed search, as a single search does "
        "(default: once for all, as `qkv translate` does for all the batches of a file)",
    )
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's allocator as it starts (default: settle it first, so that every system is "
        "timed in the same state whatever ran before it; see timing.settle_allocator)",
    )
    parser.add_argument(AS_AVX2, action="store_true", help=AS_AVX2_HELP)
    args = parser.parse_args()
    settled = not args.default_allocator and settle_allocator()  # before torch allocates anything

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from qkv.hardware import describe_cpu

    print(describe_cpu())
    where = f"{torch.get_num_threads()} threads"
    if args.device.startswith("cuda"):
        where = torch.cuda.get_device_name(args.device)
    print(
        f"torch {torch.__version__}, {where}; "
        f"source {SRC_LEN} tokens, exactly {NEW_TOKENS} generated, median of {args.repeats}; "
        f"allocator {'settled' if settled else 'as it starts'}; "
        f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}"
        + (f"; CT2_USE_MKL={os.environ['CT2_USE_MKL']}" if "CT2_USE_MKL" in os.environ else "")
        + (
            f"; CTranslate2 at {args.ct2_threads} thread{'s' * (args.ct2_threads > 1)}"
            if args.ct2_threads
            else ""
        )
    )
    print(header(args.systems))
    for name in args.configs:
        benchmark_config(name, args)


if __name__ == "__main__":
    main()
