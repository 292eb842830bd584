"""The compiled decoder step as a package on disk: AOTInductor's options, the package's key, its
compilation and its loading (`qkv.inference.compiled` exports the step and uses these)."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from qkv.atomic import atomic_write
from qkv.errors import QkvError
from qkv.inference import huge_pages, inductor_hooks, native, static_cache, topk
from qkv.inference.digests import TensorDigests, weights_digest

# Inductor splits a loop of its own kernels (not the products) across the threads when each thread
# would get at least `cpp.min_chunk_size` elements: 512 by default, so a layer norm of 5 x 256 values
# ran on two threads with three barriers, which cost more than its arithmetic. With 16K, the norms, the
# embedding and attention over the slots of a short sentence run on one thread: the small model's
# program at 5 rows 320 -> 249 µs (AVX-512) and 561 -> 433 µs (AVX2), at one row 208 -> 178 µs; a
# trained model's sentences 5-6% faster with beam 5, 2-7% greedy (benchmarks/README.md, "Fewer
# barriers").
SERIAL_LOOP_ELEMENTS = 16384  # per thread
INDUCTOR_OPTIONS = {
    "freezing": True,
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP,ATEN",
    "autotune_num_choices_displayed": 0,  # no table of timings on stderr for each product
    "max_autotune_report_choices_stats": False,
    "cpp.min_chunk_size": SERIAL_LOOP_ELEMENTS,
}
# Programs of this many rows or more take oneDNN's products only, none of Inductor's own. Autotuning
# measures each product alone, its weights in the processor's cache, where Inductor's C++ won some of
# the 32-row products; inside the step, the weights come from memory, and there oneDNN's were faster:
# the small model's 32-row greedy program 4.16-4.28 -> 3.53-3.57 ms a step held to AVX2 on a Zen 4,
# the same (3.00 ms) as the CPU comes; at 16 rows the same held to AVX2 and 1.80 -> 1.87 ms as the
# CPU comes, at 8 rows 1.49 -> 1.69 (benchmarks/README.md, session 21). Fewer programs to measure
# while compiling, too.
LIBRARY_PRODUCTS_FROM_ROWS = 32
# ...except, where ATen's capability is AVX2, the products of a weight of at most this many elements,
# which take Inductor's C++ (`own_products_up_to`). oneDNN spends ~13 µs setting up each call on the
# calling thread while the other waits (a 32 x 16 x 16 product: 16 µs, MKL's 3.5), more than it gains
# on a small weight: in the small model's 32-row greedy program, held to AVX2 on a Zen 4, Inductor's
# took 132 µs against oneDNN's 161 for 32 x 256 x 768 and 52-53 against 62 for 32 x 256 x 256, but
# 208-211 against 167-174 for 256 x 1024 and 1024 x 256; a greedy search of 32 sentences 1.008-1.043x
# (0.992x once) in five runs of two engines taking turns. As the CPU comes (AVX-512), 0.91-0.93x: there,
# oneDNN's only (benchmarks/README.md, session 27).
OWN_PRODUCTS_UP_TO = 256 * 768  # elements of the weight
AUTOTUNE_VARIABLE = "QKV_COMPILE_AUTOTUNE"  # 0: no measuring while compiling (`measures_products`)
CACHE_LINE = 64  # bytes: where a program's constants start (`aligned_runner`)
# A kept program that no process has loaded for this many days is deleted (`forget_unused`)
UNUSED_DAYS = 30


def default_cache_dir() -> Path:
    """Where compiled programs are kept when no run directory is given."""
    if directory := os.environ.get("QKV_COMPILE_CACHE"):
        return Path(directory)
    return Path.home() / ".cache" / "qkv" / "compiled"


def program_key(step: nn.Module, digests: TensorDigests | None = None) -> str:
    """What a compiled program depends on, hashed: the weights and configuration, qkv's code it is
    traced from (`code_files`), PyTorch, the CPU's capability, the threads (Inductor's products are
    made for that many), the options, and whether it calls qkv's own operators (`native`) and
    products (`packed_linear`). digests: the weights' digests known so far (an engine's)."""
    digest = hashlib.blake2b(digest_size=8)
    context = {
        "config": step.model.config.to_dict(),
        "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "options": INDUCTOR_OPTIONS,
        "measures_products": measures_products(),
        "native": getattr(step, "native", False),
        "own_products": getattr(step, "products", None) is not None,  # `packed_linear`
        "writes_cache": getattr(step, "writes_cache", False),
        "native_topk": getattr(step, "native_topk", False),
        "code": [Path(f).read_text(encoding="utf-8") for f in code_files(step)],
    }
    if getattr(step, "int8", False):  # int8 products (`qkv.inference.int8_products`)
        context["int8"] = True
    digest.update(json.dumps(context, sort_keys=True, default=str).encode())
    digest.update(weights_digest(step, digests or TensorDigests()))
    return digest.hexdigest()


def load_package(path: Path):
    """The program of an AOTInductor package, as a function of the step's arguments. PyTorch's own
    runner runs the package's C++ directly: no import of the compiler (~2 s from a cold process,
    against a few ms) and no flattening of the arguments at each call (~30 µs). Its weights are
    moved to memory aligned to 64 bytes (`aligned_runner`)."""
    runner, constants = aligned_runner(path)
    if runner is None:  # another PyTorch, or another kind of package: PyTorch's own loader
        try:
            runner = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
        except (AttributeError, TypeError):  # another PyTorch's signature: its public way
            return torch._inductor.aoti_load_package(str(path))

    def run(*arguments: Tensor) -> tuple[Tensor, ...]:
        return tuple(runner.run(list(arguments)))

    run.constants = constants  # the program reads them and does not own them: kept with it

    return run


def aligned_runner(path: Path) -> tuple[object, dict[str, Tensor] | None]:
    """The package's program and its constants (the weights, packed for oneDNN or not) moved to
    memory aligned to 64 bytes, a cache line (None if they were already there, or if they cannot
    all be read: a program with Inductor's own products, below); (None, None) where this PyTorch's
    runner or the package is not as expected.

    AOTInductor copies the constants into one block from `malloc`, which glibc aligns to 16 bytes,
    each constant a multiple of 64 bytes from the block's start, so every weight started where the
    block did: 0, 16, 32 or 48 bytes past a line, as the heap had it, from one process to the
    next. 16 bytes past, the output projection of the small benchmark model (160 x 256 by 256 x
    8000, oneDNN's AVX2 kernel) took 4.19-4.21 ms against 3.51-3.65 aligned (held to AVX2 on a
    Zen 4; the same with AVX-512: benchmarks/README.md, session 23). Each constant is copied to a
    line of its own in one block on the system's huge pages where it has them (`huge_pages`: a step
    reads thousands of small pages, each a walk of the page tables), which the program then reads;
    AOTInductor's block is freed."""
    runner_type = getattr(torch._C._aoti, "AOTIModelContainerRunnerCpu", None)
    if runner_type is None:
        return None, None
    with zipfile.ZipFile(path) as package:
        libraries = [name for name in package.namelist() if name.endswith(".so")]
        if len(libraries) != 1:
            return None, None
        # A program that calls an operator of qkv's own (`qkv.inference.native`) has, beside its
        # library, the calls' description (`.json`), which the runner reads when it is made.
        calls = [name for name in package.namelist() if name == libraries[0][:-3] + ".json"]
        with tempfile.TemporaryDirectory() as scratch:  # the library stays mapped once loaded
            for name in calls:
                package.extract(name, scratch)
            runner = runner_type(package.extract(libraries[0], scratch), 1)
    originals = runner.get_constant_names_to_original_fqns()  # the program's names -> the model's
    if len(set(originals.values())) < len(originals):
        # Two constants under one name (Inductor's own, in a package compiled without
        # `inductor_hooks.constants_known_apart`), of which only one can be read: leave them where
        # they are.
        return runner, None
    try:
        constants = runner.extract_constants_map(False)  # by the model's names
        aligned_already = all(_address(t) % CACHE_LINE == 0 for t in constants.values())
        if aligned_already and not huge_pages.available():
            return runner, None
        by_name = {name: constants[original] for name, original in originals.items()}
        aligned = huge_pages.copies_in_one_block(by_name)
    except (AttributeError, RuntimeError, KeyError):  # not as this PyTorch's: leave them be
        return runner, None
    # Into the second buffer (every constant, or an error), which then becomes the first; the block
    # is freed with the other.
    runner.update_constant_buffer(aligned, True, True, True)
    runner.swap_constant_buffer()
    runner.free_inactive_constant_buffer()
    return runner, aligned


def _address(t: Tensor) -> int:
    return torch.ops.mkldnn.data_ptr(t) if t.layout == torch._mkldnn else t.data_ptr()


def load_or_compile(path: Path, compile_to, what: str, say=None):
    """The program of the package `path`, compiled first by `compile_to(path)` if it is not there
    (`say`, if given, is told that `what` compiles, how long it took and where it is kept)."""
    if not path.exists():
        started = time.perf_counter()
        if say:
            say(f"compiling {what} (once, ~20-40 s)")
        compile_to(path)
        if say:
            say(f"compiled in {time.perf_counter() - started:.1f} s, kept in {path}")
        forget_unused(path.parent, keep=path)
    else:
        with contextlib.suppress(OSError):  # a folder this process may not write: as it is
            os.utime(path)  # used now (`forget_unused`)
    return load_package(path)


def forget_unused(folder: Path, keep: Path | None = None, days: float = UNUSED_DAYS) -> None:
    """Delete the programs (`*.pt2`) of `folder` that no process has loaded for `days`, but `keep`.
    A program is never loaded again once qkv's code, PyTorch or the weights change
    (another key): each such change left ~100-300 MB a run directory behind. Called when a new
    program is kept."""
    too_old = time.time() - days * 86400
    for program in folder.glob("*.pt2"):
        with contextlib.suppress(OSError):  # gone already, or not ours to delete
            if program != keep and program.stat().st_mtime < too_old:
                program.unlink()


def measures_products() -> bool:
    """Whether programs of fewer than `LIBRARY_PRODUCTS_FROM_ROWS` rows (and one sentence's
    encoder) choose between Inductor's own products and oneDNN's by measuring them while compiling:
    `AUTOTUNE_VARIABLE`, 1 (the default) or 0. With 0 they take oneDNN's, as larger programs do: a
    first compile ~40% shorter (a small model's program of 2 rows 31.4 -> 18.3 s on a Zen 4), its
    steps at one sentence maybe slower (benchmarks/README.md, session 21)."""
    value = os.environ.get(AUTOTUNE_VARIABLE, "1")
    if value not in ("0", "1"):
        raise QkvError(f"{AUTOTUNE_VARIABLE} must be 0 or 1, got {value!r}")
    return value == "1"


def options_for(rows: int | None = None) -> dict:
    """Inductor's options for a program of `rows` rows (None: one sentence's encoder):
    `INDUCTOR_OPTIONS`, with oneDNN's products only from `LIBRARY_PRODUCTS_FROM_ROWS` rows (but
    those `own_products_up_to` gives), or at any size where `measures_products()` says not to
    measure. A function of `rows`, of that, of the CPU's capability and of this file's code, which
    the package's name and key hold."""
    options = dict(INDUCTOR_OPTIONS)
    large = rows is not None and rows >= LIBRARY_PRODUCTS_FROM_ROWS
    if (large and own_products_up_to(rows) is None) or not measures_products():
        options["max_autotune_gemm_backends"] = "ATEN"
    return options


def library_options() -> dict:
    """Inductor's options for a program whose products are all oneDNN's, whatever its size (the
    beam program of many sentences, `qkv.inference.beam_program`)."""
    return dict(INDUCTOR_OPTIONS, max_autotune_gemm_backends="ATEN")


def own_products_up_to(rows: int | None) -> int | None:
    """In a program of `rows` rows (fixed), the largest weight (elements) whose product is
    Inductor's own C++ rather than oneDNN's, chosen by size while compiling (`package`), not by
    measuring: `OWN_PRODUCTS_UP_TO` from `LIBRARY_PRODUCTS_FROM_ROWS` rows where ATen's capability
    is AVX2 and `measures_products()`; else None (the products as `options_for` has them)."""
    if rows is None or rows < LIBRARY_PRODUCTS_FROM_ROWS or not measures_products():
        return None
    return OWN_PRODUCTS_UP_TO if torch.backends.cpu.get_cpu_capability() == "AVX2" else None


def export_and_package(
    module: nn.Module,
    arguments: tuple,
    dynamic_shapes: dict,
    path: Path,
    options: dict | None = None,
    own_products_up_to: int | None = None,
):
    """`torch.export` the module for arguments like these (the `dynamic_shapes` dimensions free),
    then `package` it into `path` (with `options`, default `options_for()`, and
    `own_products_up_to`)."""
    with torch.inference_mode(False), torch.no_grad():
        # Copies made outside inference mode: export traces, and must not meet inference tensors.
        examples = tuple(pytree.tree_map(Tensor.clone, arguments))  # lists of tensors too
        exported = torch.export.export(module, examples, dynamic_shapes=dynamic_shapes)
    options = options_for() if options is None else options
    package(exported, path, options, own_products_up_to)


def package(exported, path: Path, options: dict, own_products_up_to: int | None = None) -> None:
    """Compile an exported program with AOTInductor (Inductor's `options`) into the package
    `path`, written atomically; with `own_products_up_to`, each product whose weight has at most
    that many elements is Inductor's, each larger one oneDNN's (`_products_by_weight`). In
    inference mode whatever the caller's: outside it, `freezing`
    did not fold the weights into the program, and its products went to MKL's plain `addmm` instead
    of oneDNN's packed ones (a beam step of 160 rows, held to AVX2 on a Zen 4: 13-17 ms a call
    against 10-13; benchmarks/README.md, session 22). qkv's engines compile inside a search, in
    inference mode already."""
    with (
        torch.inference_mode(),
        tempfile.TemporaryDirectory() as scratch,
        inductor_hooks.five_row_blocks_on_avx2(),
        inductor_hooks.constants_known_apart(),
        inductor_hooks.products_by_weight(own_products_up_to),
        # qkv's own operators called as C functions, not through the dispatcher (`native`)
        torch._inductor.config.patch({"aot_inductor.custom_ops_to_c_shims": native.c_shims()}),
    ):
        made = torch._inductor.aoti_compile_and_package(
            exported,
            package_path=str(Path(scratch) / "step.pt2"),
            # A copy: PyTorch adds its own keys to the dict it is given, which would change
            # the caller's (`INDUCTOR_OPTIONS`, and with it every later `program_key`).
            inductor_configs=inductor_hooks.options_known_here(options),
        )
        atomic_write(path, lambda file: file.write(Path(made).read_bytes()))
        _remove_what_the_package_holds(Path(made))


def _remove_what_the_package_holds(package: Path) -> None:
    """Remove from Inductor's cache folder what AOTInductor wrote there for this package, which holds
    it all: its C++ and, in its library, the weights. Left there, each program of the base model
    kept ~125 MB in /tmp/torchinductor_USER (the first compile of a program never looks them up
    again: its key is new). The rest of that folder (precompiled headers, measured products) is
    kept: without it, a process's first compile took 68 s against 42. Files are found by the
    package's names, which hash their content: only a process compiling this very program at this
    moment could lose them (its compile then fails, and it says so and decodes eagerly)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    try:
        with zipfile.ZipFile(package) as archive:
            names = {Path(name).name for name in archive.namelist() if "/aotinductor/" in name}
    except zipfile.BadZipFile:  # not the package this expects: nothing is known to remove
        return
    cache = Path(cache_dir())
    for name in names:
        for made in cache.glob(f"*/{name}"):
            made.unlink(missing_ok=True)
            # the library's own folder beside it (made empty for a build it did not need)
            with contextlib.suppress(OSError):
                made.with_name(name.split(".")[0]).rmdir()
            with contextlib.suppress(OSError):
                made.parent.rmdir()  # only if nothing else is left in it


def code_files(step: nn.Module) -> list[str]:
    """The files of qkv's code that a program is traced from: the step's own, the helpers its
    `forward` calls (`qkv.inference.engine`'s attention, `compiled_encoder`'s shared pieces,
    `topk`'s candidates), the caches that shape its inputs, this file and `inductor_hooks` (how it
    compiles), and the file of every qkv module inside the step (the model's embeddings and norms,
    whose own `forward` is traced too). A change to any of them makes another key, so a program
    made by older code is never loaded."""
    from qkv.inference import beam_cache, compiled_encoder, engine  # they import this module

    files = {inspect.getfile(type(step)), engine.__file__, compiled_encoder.__file__}
    files |= {static_cache.__file__, beam_cache.__file__, topk.__file__, __file__}
    files.add(inductor_hooks.__file__)
    if getattr(step, "native", False) or getattr(step, "native_topk", False):
        # it calls qkv's own operators: their source too
        files |= {native.__file__, *map(str, native.SOURCES)}
    for module in step.modules():
        if type(module).__module__.split(".")[0] == "qkv":
            files.add(inspect.getfile(type(module)))
    return sorted(files)
