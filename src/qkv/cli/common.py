"""What the commands share: messages on stderr, checks of the files they would write, writing lines."""

from __future__ import annotations

import contextlib
import gc
import math
import sys
from pathlib import Path

from qkv.errors import QkvError


def log(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def import_torch() -> None:
    """Import PyTorch with Python's cycle collector off, then put what the imports made out of its
    reach (`gc.freeze`; those objects live as long as the process). Each full collection walked all
    of PyTorch's objects: three of 10-45 ms came before the first translation of a cold `qkv
    translate` (~1 s in all). A command that translates calls this first."""
    if "torch" in sys.modules:
        return
    collecting = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401

        import qkv.translate  # noqa: F401  (what loading a model imports)
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


def add_force(parser) -> None:
    parser.add_argument(
        "--force", action="store_true", help="replace the -o file if it exists (never an input)"
    )


def check_output(args, inputs: list) -> None:
    """Before any work: refuse an -o that is an input (the model's files included) or that exists
    without --force; then delete what an earlier write of it, cut short by a kill, left beside it
    (`.NAME.RANDOM.partial`: it never replaced anything)."""
    check_written_files({"-o": args.output}, args.model, args.force, inputs)
    if args.output:
        from qkv.atomic import remove_partial_writes_of

        output = Path(args.output)
        for path in remove_partial_writes_of(output.parent, [output.name]):
            log(f"removed {path}, left by a write that was cut short")


def check_written_files(outputs: dict, model: str | None, force: bool, inputs: list = ()) -> None:
    """`qkv.outputs.check_output_file` for each output given ({option: path or None}), with the
    model's checkpoint and tokenizer among the inputs."""
    from qkv.checkpoint import TOKENIZER, resolve_checkpoint
    from qkv.outputs import check_output_file, same_file

    model_files = []
    if model is not None:
        with contextlib.suppress(QkvError):  # a missing model is reported when it is loaded
            checkpoint = resolve_checkpoint(model)
            model_files = [checkpoint, checkpoint.parent / TOKENIZER]
    sources = [*(path for path in inputs if path), *model_files]
    given = [(option, output) for option, output in outputs.items() if output]
    for index, (option, output) in enumerate(given):
        check_output_file(output, sources, force, option)
        for other_option, other in given[index + 1 :]:
            if same_file(output, other) or Path(output).resolve() == Path(other).resolve():
                raise QkvError(f"{option} and {other_option} both name {output}: give two files")


def write_lines(lines: list[str], path: str | None) -> None:
    text = "".join(f"{line}\n" for line in lines)
    if path is None:
        sys.stdout.write(text)
        return
    from qkv.atomic import atomic_write

    def write(file) -> None:
        with compressed_as_named(file, path) as out:
            out.write(text.encode("utf-8"))

    atomic_write(path, write)


@contextlib.contextmanager
def compressed_as_named(file, path: str | Path):
    """`file` (binary, being written), through gzip where `path` ends in .gz: an -o file named so is
    one, as -i and --src read such a file (the text had gone in plain)."""
    if not str(path).endswith(".gz"):
        yield file
        return
    import gzip

    with gzip.GzipFile(filename="", mode="wb", fileobj=file, mtime=0) as compressed:
        yield compressed


# The widest beam the commands and the server search: the API's bound too (qkv.serve.app). Far wider
# beams only ran out of memory (--beam 100000 asked for 640 GB), and translate no better.
MAX_BEAM = 64


def check_at_least(values: dict[str, float | None], least: int) -> None:
    """A QkvError naming the first option ({option: value, None if not given}) below `least`, or
    not a finite number: argparse's float takes "nan" and "inf" (`serve --max-wait-ms inf` kept a
    lone request waiting for ever, and nan, false against any limit, passed the check)."""
    for option, value in values.items():
        if value is None:
            continue
        if not math.isfinite(value):
            raise QkvError(f"{option} must be a finite number, got {value}")
        if value < least:
            raise QkvError(f"{option} must be at least {least}, got {value}")


def check_beam(beam: int) -> None:
    if not 1 <= beam <= MAX_BEAM:
        raise QkvError(f"--beam must be between 1 and {MAX_BEAM}, got {beam}")
