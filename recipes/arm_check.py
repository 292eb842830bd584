"""What a CPU without qkv's operators takes (an Arm CPU above all), checked end to end on a random
tiny model: PyTorch's int8 engine (the first that works, `qkv.inference.linear.int8_works`), the
eager engines against the model's own forward pass, and the compiled step against the eager one
(or, where PyTorch cannot compile here, the line that says so and the eager results). Exits 1 on
the first result that differs. recipes/arm_emulated.sh runs it on an emulated aarch64; it runs on
any CPU:

    python recipes/arm_check.py [--no-compile]

Under an emulator each compile takes minutes (~1 on a 2-core Intel Xeon emulating a Neoverse V1).
"""

from __future__ import annotations

import argparse
import functools
import platform
import sys
import tempfile
import time

import torch

from qkv.beam_search import beam_search
from qkv.config import TransformerConfig
from qkv.hardware import describe_cpu
from qkv.inference import linear, native, prepare_for_decoding, rowwise_int8
from qkv.model import Transformer
from qkv.search import greedy_search


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def check(passed: bool, what: str) -> None:
    say(("ok: " if passed else "FAILED: ") + what)
    if not passed:
        sys.exit(1)


def random_model(seed: int = 3) -> Transformer:
    torch.manual_seed(seed)
    config = TransformerConfig.preset(
        "tiny", src_vocab_size=40, tgt_vocab_size=30, dropout=0.0, max_len=64
    )
    return Transformer(config).eval()


def sources(model: Transformer, lengths: list[int]) -> torch.Tensor:
    """Random sources of these lengths (EOS included), padded: (batch, max(lengths))."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    src = torch.full((len(lengths), max(lengths)), config.pad_id)
    for row, n in enumerate(lengths):
        src[row, : n - 1] = torch.randint(4, config.src_vocab_size, (n - 1,), generator=generator)
        src[row, n - 1] = config.eos_id
    return src


def check_int8(model: Transformer, src: torch.Tensor) -> None:
    if rowwise_int8.unavailable() is None:
        say("int8 by qkv's own product (qkv.inference.rowwise_int8)")
    elif (why := linear.int8_works()) is not None:
        say(f"int8 does not run here: {why}")
        return
    else:
        engine = torch.backends.quantized.engine
        say(linear.int8_engine_switch() or f"int8 by PyTorch's quantised engine {engine!r}")
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(9, 256, generator=generator), torch.randn(384, 256, generator=generator)
    product = linear.PreparedLinear(weight, None, int8=True)(x)
    check(
        linear._int8_product_is_close(product, torch.nn.functional.linear(x, weight)),
        "an int8 product within quantisation error of fp32's",
    )
    ids, scores = greedy_search(prepare_for_decoding(model, int8=True), src, max_len=12)
    check(
        ids.shape[0] == src.shape[0] and bool(torch.isfinite(scores).all()),
        "int8 greedy search runs",
    )


def check_same(engine, reference, search, lines: list[str], what: str, scores: bool) -> None:
    """`search` by `engine` and by `reference` alike: the ids (and the scores, if `scores`); what
    the engine said on the way (`lines`) told first, then forgotten."""
    start = time.time()
    (ids, engine_scores), (ref_ids, ref_scores) = search(engine), search(reference)
    for line in lines:
        say(f"  qkv: {line}")
    lines.clear()
    same = torch.equal(ids, ref_ids)
    if scores:
        same = same and torch.allclose(engine_scores, ref_scores, atol=1e-4)
    check(same, f"{what} ({time.time() - start:.0f} s)")


def check_compiled(model: Transformer, src: torch.Tensor, eager) -> None:
    from qkv.inference.compiled import CompiledEngine

    one = src[:1]
    greedy = functools.partial(greedy_search, src_ids=one, max_len=12)
    beams = functools.partial(beam_search, src_ids=one, beam_size=5, max_len=12)
    with tempfile.TemporaryDirectory() as cache:
        lines: list[str] = []
        engine = CompiledEngine(model, warn=lines.append, cache_dir=cache, say=lines.append)
        check_same(engine, eager, greedy, lines, "compiled greedy on one sentence = eager", True)
        check_same(engine, eager, beams, lines, "compiled beam 5 on one sentence = eager", False)
        if linear.int8_works() is None:
            engine = CompiledEngine(model, lines.append, cache, lines.append, int8=True)
            int8 = prepare_for_decoding(model, int8=True)
            what = "compiled int8 greedy on one sentence = eager int8"
            check_same(engine, int8, greedy, lines, what, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled step")
    args = parser.parse_args()
    say(f"{platform.machine()}: {describe_cpu()}")
    say(f"qkv's operators: {native.unavailable() or 'built and loaded'}")
    model = random_model()
    src = sources(model, [7, 5, 9])
    with torch.inference_mode():
        eager = prepare_for_decoding(model)
        ids, scores = greedy_search(eager, src, max_len=12)
        ref_ids, ref_scores = greedy_search(model, src, max_len=12)
        check(
            torch.equal(ids, ref_ids) and torch.allclose(scores, ref_scores, atol=1e-4),
            "the eager engine's greedy = the model's own",
        )
        beams, ref_beams = (beam_search(m, src, beam_size=4, max_len=12) for m in (eager, model))
        check(torch.equal(beams[0], ref_beams[0]), "the eager engine's beams = the model's own")
        check_int8(model, src)
        if not args.no_compile:
            check_compiled(model, src, eager)
    say("all checks passed")


if __name__ == "__main__":
    main()
