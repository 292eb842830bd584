"""A trained model translating a test set in batches, as `qkv translate` and a server decode: qkv
against CTranslate2 on the same model, side by side.

decode_speed.py generates exactly 20 tokens for every sentence (random weights never end one), so it
never shows what a search does when the sentences of a batch end at different steps; here they do. The
sources (--src, default RUN_DIR/data/test.<source language>: Multi30k's test_2016_flickr for a
Multi30k recipe) are sorted by length and cut into batches of --batch sentences, or of --max-tokens
source tokens as `qkv translate` cuts a file. The systems:

- qkv: the engine of `qkv translate` (`qkv.search` on `Translator.engine()`), fp32. Greedy search
  keeps no scores, as `qkv translate` without `--scores` and CTranslate2's `translate_batch` (no
  `return_scores`) do not (before session 60 qkv's did here: a softmax a step, and with `--compile`
  the programs that return every logit rather than the screened ones);
- qkv-compiled: the engine of `qkv translate --compile` (its programs compile in the untimed first
  pass, into the run's compiled/ folder, as `qkv translate --compile` keeps them);
- ct2-fp32: the same model exported by `qkv export --format ctranslate2`, in a process of its own
  that never imports torch, timing each pass when asked (it takes turns with the others, as in
  decode_speed.py). Its sources are the same subwords; its length limit is a batch's longest
  source + 50, qkv's each source's own length + 50 (the paper's). A beam search ranks by the
  log-probability over the length (CTranslate2's default, qkv's `--length-penalty 1
  --length-penalty-style fairseq`), so that both search for the same hypotheses.

Each figure is milliseconds a sentence: the median of --repeats passes over the whole set, after one
untimed pass. The tokens each system generated are printed beside it: the systems decode the same
model, so they should be within a few of each other.

    python benchmarks/real_batches.py runs/de_en                          # greedy, batches of 32
    python benchmarks/real_batches.py runs/de_en --max-tokens 4096 --search beam --as-avx2
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

SYSTEMS = ("qkv", "qkv-compiled", "ct2-fp32")
MARGIN = 50  # tokens past the source's length (qkv.search.MAX_LEN_MARGIN)
RANKING = dict(length_penalty=1.0, length_penalty_style="fairseq")  # CTranslate2's default ranking


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    parser.add_argument("--src", help="sentences to translate (default RUN_DIR/data/test.<source>)")
    parser.add_argument("--sentences", type=int, help="only the first N of them")
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--batch", type=int, default=32, help="sentences a batch (default 32)")
    cut.add_argument("--max-tokens", type=int, help="source tokens a batch, as `qkv translate`")
    parser.add_argument("--search", choices=("greedy", "beam"), default="greedy")
    parser.add_argument("--beam", type=int, default=5, help="beam size of --search beam")
    parser.add_argument(
        "--early-exit", action="store_true", help="qkv's beam search as --early-exit"
    )
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="threads of every system (default torch's)")
    parser.add_argument(AS_AVX2, action="store_true", help=AS_AVX2_HELP)
    return parser.parse_args()


def batches_of(sources: list[list[int]], args) -> list[list[int]]:
    """Indices of the sources, sorted by length, cut into batches."""
    from qkv.translate import token_batches

    if args.max_tokens:
        return token_batches(sources, args.max_tokens)
    order = sorted((i for i, ids in enumerate(sources) if ids), key=lambda i: len(sources[i]))
    return [order[i : i + args.batch] for i in range(0, len(order), args.batch)]


def qkv_runner(engine, sources, batches, args):
    """One pass over the batches with qkv's search; returns the tokens generated (EOS included)."""
    import torch

    from qkv.search import beam_search, greedy_search

    pad = engine.config.pad_id
    tensors = []
    for batch in batches:
        src = torch.full((len(batch), max(len(sources[i]) for i in batch)), pad, dtype=torch.long)
        for row, index in enumerate(batch):
            src[row, : len(sources[index])] = torch.tensor(sources[index])
        tensors.append(src)

    def run() -> int:
        generated = 0
        with torch.inference_mode():
            for src in tensors:
                if args.search == "greedy":
                    ids = greedy_search(engine, src, scores=False)[0]  # as `qkv translate`
                else:
                    ids = beam_search(
                        engine, src, beam_size=args.beam, early_exit=args.early_exit, **RANKING
                    )[0][:, 0]
                generated += int((ids != pad).sum())
        return generated

    return run


def ctranslate2_turns(model_dir: Path, batches_file: Path, args, threads: int) -> WorkerTurns:
    """The exported model in a process of its own (`ctranslate2_worker`): each call has it translate
    every batch once (`timing.WorkerTurns`); `ready["generated"]`: the tokens a pass generates."""
    command = [sys.executable, __file__, "--ct2-worker", str(model_dir), str(batches_file)]
    command += [args.search, str(args.beam), str(threads)]
    return WorkerTurns(command, "CTranslate2 worker")


def ctranslate2_worker(model_dir: str, batches_file: str, search: str, beam: int, threads: int):
    """Loads the model, says how many tokens one pass generates (EOS included, as qkv counts), then
    times one pass for each line it reads."""
    import ctranslate2

    settle_allocator()
    translator = ctranslate2.Translator(
        model_dir, device="cpu", compute_type="float32", intra_threads=threads
    )
    batches = json.loads(Path(batches_file).read_text(encoding="utf-8"))
    width = beam if search == "beam" else 1

    def run() -> int:
        generated = 0
        for batch in batches:
            limit = max(map(len, batch)) + 1 + MARGIN  # the longest source with its EOS, + 50
            results = translator.translate_batch(
                batch, beam_size=width, max_decoding_length=limit, length_penalty=1.0
            )
            generated += sum(len(result.hypotheses[0]) + 1 for result in results)
        return generated

    print(json.dumps({"generated": run()}), flush=True)
    for _ in sys.stdin:
        start = time.perf_counter()
        run()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--ct2-worker":
        model_dir, batches_file, search, beam, threads = sys.argv[2:7]
        ctranslate2_worker(model_dir, batches_file, search, int(beam), int(threads))
        return
    args = parse_args()
    if min(args.batch, args.max_tokens or 1, args.repeats, args.sentences or 1) < 1:
        raise SystemExit("--batch, --max-tokens, --repeats and --sentences must be at least 1")
    run_as_avx2_if_asked(SHORT_SPIN)
    settle_allocator()
    import torch

    from qkv.hardware import describe_cpu
    from qkv.text import read_lines
    from qkv.translate import Translator

    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_cpu())
    translators = {
        name: Translator.load(args.run, compile=name == "qkv-compiled", say=_say)
        for name in args.systems
        if name.startswith("qkv")
    }
    reference = next(iter(translators.values()), None) or Translator.load(args.run)
    source_lang = reference.meta.get("src_lang", "src")
    path = Path(args.src) if args.src else Path(args.run) / "data" / f"test.{source_lang}"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (give the sentences to translate with --src)")
    lines = [line for line in read_lines(path) if line.strip()][: args.sentences]
    if not lines:
        raise SystemExit(f"{path}: no sentences")
    sources = reference.encode(lines, _say)
    batches = batches_of(sources, args)
    runs = {name: qkv_runner(t.engine(), sources, batches, args) for name, t in translators.items()}
    generated = {name: run() for name, run in runs.items()}  # untimed: the programs compile here
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as workers:
        if "ct2-fp32" in args.systems:
            ct2 = _start_ctranslate2(args, reference, sources, batches, Path(scratch))
            runs["ct2-fp32"] = workers.enter_context(ct2)
            generated["ct2-fp32"] = ct2.ready["generated"]
        seconds = interleaved_median_seconds(runs, args.repeats, pause=PAUSE_SECONDS)
    search = "greedy" if args.search == "greedy" else f"beam {args.beam}"
    search += ", qkv with --early-exit" if args.early_exit and args.search == "beam" else ""
    cut = f"--max-tokens {args.max_tokens}" if args.max_tokens else f"batches of {args.batch}"
    print(f"{len(lines)} sentences of {path}, {len(batches)} batches ({cut}), {search}")
    print("| system | ms a sentence | tokens generated | vs CT2 fp32 |")
    print("|---|---|---|---|")
    ct2_seconds = seconds.get("ct2-fp32")
    for name, value in seconds.items():
        versus = f"{ct2_seconds / value:.2f}x" if ct2_seconds else "-"
        print(f"| {name} | {value / len(lines) * 1e3:.3f} | {generated[name]} | {versus} |")


def _start_ctranslate2(args, translator, sources, batches, scratch: Path) -> WorkerTurns:
    import torch

    from qkv.export.ctranslate2 import export

    model_dir = export(args.run, scratch / "ct2")
    tokenizer, eos = translator.tokenizer, translator.model.config.eos_id
    # the same subwords, without the EOS qkv appends (the exported model adds its own)
    pieces = [
        [[tokenizer.id_to_piece(i) for i in sources[index] if i != eos] for index in batch]
        for batch in batches
    ]
    batches_file = scratch / "batches.json"
    batches_file.write_text(json.dumps(pieces), encoding="utf-8")
    return ctranslate2_turns(model_dir, batches_file, args, args.threads or torch.get_num_threads())


def _say(message: str) -> None:
    print(message, file=sys.stderr)


if __name__ == "__main__":
    main()
