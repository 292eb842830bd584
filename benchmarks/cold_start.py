"""Time to the first translation from a cold process: `qkv translate` against `ctranslate2.Translator`.

What a person waits for when they pipe one sentence into a fresh `qkv translate`: the interpreter,
the imports, loading the checkpoint and the tokenizer, preparing the weights, and decoding one sentence
(beam 5, exactly 20 tokens, as in decode_speed.py). Measured from starting the process to reading its
first line of output; each figure is the median of --repeats fresh processes, after one unmeasured
start that warms the file cache. CTranslate2 runs in a fresh `python -c` that imports ctranslate2,
loads the converted Marian model of the same dimensions (decode_speed.py's) and translates one
source of 16 tokens. "python" is the bare interpreter, for scale. "qkv-compiled" is `qkv translate
--compile`: its unmeasured first start compiles the decoder step (printed apart), the measured starts
load the compiled program from the run directory; "qkv-int8-compiled" is `--precision int8 --compile`.

The qkv run directory is built here: a randomly initialised model of the config's dimensions with
a SentencePiece tokenizer trained on the Multi30k copy ($QKV_DATA_DIR/multi30k, German and English,
8000 subwords), or --run RUN_DIR (any trained run; its dimensions are used for CTranslate2's model).

    python benchmarks/cold_start.py              # small: qkv fp32, int8, both compiled; CT2 fp32, int8
    python benchmarks/cold_start.py --config base --repeats 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import decode_speed
from timing import run_as_avx2_if_asked

REPO = Path(__file__).resolve().parents[1]
SENTENCE = "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt."
CT2_SCRIPT = """
import sys
import ctranslate2
model_dir, compute_type, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
translator = ctranslate2.Translator(model_dir, compute_type=compute_type, intra_threads=threads)
tokens = sys.argv[4].split()
result = translator.translate_batch([tokens], beam_size=5, max_decoding_length=20,
                                    min_decoding_length=20)
print(" ".join(result[0].hypotheses[0]), flush=True)
"""
SYSTEMS = (
    "python",
    "qkv-fp32",
    "qkv-int8",
    "qkv-compiled",
    "qkv-int8-compiled",
    "ct2-fp32",
    "ct2-int8",
)


def build_run(config: str, out: Path) -> Path:
    """A run directory with a random model of `config`'s dimensions and a Multi30k tokenizer."""

    from qkv.checkpoint import BEST, TOKENIZER, model_checkpoint, save_checkpoint
    from qkv.datasets import multi30k_file
    from qkv.text import read_lines
    from qkv.tokenizer import Tokenizer

    data_dir = os.environ.get("QKV_DATA_DIR", str(REPO.parent / "shared" / "data"))
    texts = [
        read_lines(multi30k_file("train", lang, data_dir, progress=False)) for lang in ["de", "en"]
    ]
    tokenizer = Tokenizer.train(texts, out / TOKENIZER, vocab_size=decode_speed.VOCAB)
    model = decode_speed.qkv_model(config, tokenizer.vocab_size)  # random, seeded
    save_checkpoint(out / BEST, model_checkpoint(model))
    return out


def run_dimensions(run_dir: Path) -> dict:
    from qkv.checkpoint import load_trained_model

    model, _, _ = load_trained_model(run_dir)
    config = model.config
    if config.n_encoder_layers != config.n_decoder_layers:
        raise SystemExit("the CTranslate2 model takes one layer count: the run's stacks differ")
    return dict(
        d_model=config.d_model, n_heads=config.n_heads, d_ff=config.d_ff,
        n_layers=config.n_encoder_layers,
    )  # fmt: skip


def first_line_ms(command: list[str], stdin_text: str | None) -> float:
    """Milliseconds from starting `command` to reading the first line it prints."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE if stdin_text is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    if stdin_text is not None:
        process.stdin.write(stdin_text)
        process.stdin.flush()
    line = process.stdout.readline()
    elapsed = (time.perf_counter() - started) * 1e3
    if stdin_text is not None:
        process.stdin.close()
        process.stdin = None  # closed: communicate() must not flush it
    _, errors = process.communicate(timeout=300)
    if process.returncode != 0 or not line:
        raise SystemExit(f"{' '.join(command[:4])}... failed:\n{errors[-2000:]}")
    return elapsed


def commands(
    run_dir: Path, ct2_dir: Path | None, threads: int
) -> dict[str, tuple[list[str], str | None]]:
    qkv = [sys.executable, "-m", "qkv", "translate", str(run_dir), "--quiet", "--beam", "5",
           "--min-len", "20", "--max-len", "20", "--threads", str(threads)]  # fmt: skip
    source = " ".join(decode_speed._token(i) for i in decode_speed.sources(1)[0])
    ct2 = [sys.executable, "-c", CT2_SCRIPT, str(ct2_dir), "{compute_type}", str(threads), source]
    return {
        "python": ([sys.executable, "-c", "print('ready', flush=True)"], None),
        "qkv-fp32": ([*qkv, "--precision", "fp32"], SENTENCE + "\n"),
        "qkv-int8": ([*qkv, "--precision", "int8"], SENTENCE + "\n"),
        # The unmeasured first start compiles the step into the run's compiled/ folder; the measured
        # ones load it from there.
        "qkv-compiled": ([*qkv, "--precision", "fp32", "--compile"], SENTENCE + "\n"),
        "qkv-int8-compiled": ([*qkv, "--precision", "int8", "--compile"], SENTENCE + "\n"),
        "ct2-fp32": ([part.replace("{compute_type}", "float32") for part in ct2], None),
        "ct2-int8": ([part.replace("{compute_type}", "int8") for part in ct2], None),
    }


def main() -> None:
    run_as_avx2_if_asked()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="small", choices=list(decode_speed.CONFIGS))
    parser.add_argument("--run", metavar="RUN_DIR", help="a trained run instead of a random model")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument(
        "--repeats", type=int, default=5, help="fresh processes per system (median)"
    )
    parser.add_argument("--threads", type=int, default=2, help="threads of each system (default 2)")
    parser.add_argument("--as-avx2", action="store_true", help="hold this CPU to AVX2 without bf16")
    args = parser.parse_args()

    from qkv.hardware import describe_cpu

    print(describe_cpu())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = Path(args.run) if args.run else build_run(args.config, tmp / "run")
        dims = run_dimensions(run_dir)
        ct2_dir = None
        if any(system.startswith("ct2") for system in args.systems):
            marian = decode_speed.marian_model(args.config, dims)
            ct2_dir = decode_speed.convert_to_ctranslate2(marian, tmp)
        runs = commands(run_dir, ct2_dir, args.threads)
        medians, first_starts = {}, {}
        for system in args.systems:
            command, stdin_text = runs[system]
            first_starts[system] = first_line_ms(command, stdin_text)  # warms the file cache
            times = [first_line_ms(command, stdin_text) for _ in range(args.repeats)]
            medians[system] = statistics.median(times)
    shape = (
        f"{dims['d_model']}/{dims['n_heads']}/{dims['d_ff']}/{dims['n_layers']}+{dims['n_layers']}"
    )
    print(f"model {shape}; one sentence, beam 5, 20 tokens; {args.threads} threads; "
          f"median of {args.repeats} fresh processes")  # fmt: skip
    print("| system | ms to the first translation |")
    print("|---|---|")
    for system, ms in medians.items():
        print(f"| {system} | {ms:.0f} |")
    for system in ("qkv-compiled", "qkv-int8-compiled"):
        if system in first_starts:
            print(f"{system}'s first start, compiling: {first_starts[system]:.0f} ms")
    for ours, theirs in (
        ("qkv-fp32", "ct2-fp32"),
        ("qkv-int8", "ct2-int8"),
        ("qkv-compiled", "ct2-fp32"),
        ("qkv-int8-compiled", "ct2-int8"),
    ):
        if ours in medians and theirs in medians:
            print(f"{ours} / {theirs}: {medians[ours] / medians[theirs]:.2f}x the time")


if __name__ == "__main__":
    main()
