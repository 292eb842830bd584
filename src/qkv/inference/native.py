"""qkv's own C++ operators for decoding on the CPU, compiled on the machine that runs them.

- `qkv::beam_self_attention`: a decoder layer's self-attention over `BeamCache`'s layout, where
  each beam reads only its own history. `BeamCache` keeps the keys and values of all of a
  sentence's beams side by side and masks each beam to its own, so Inductor's kernel for that
  formula (`beam_program.attend_with_new_together`) reads five slots a position for a beam of five,
  four of them masked out. In a beam search of 32 sentences on the small benchmark model, held to
  AVX2 on a Zen 4, its kernel took 403-457 µs a call, 23-26 ms of a 250-350 ms search; this
  operator 245-306 µs, 14-17 ms (benchmarks/README.md, session 31).
- `qkv::log_softmax_`: the log-probabilities of a step's logits, in place, with ATen's faster
  vectorised exponential (`exp_u20`, within 2e-6 of `torch.log_softmax` on logits of the small
  model's range): 160 x 8000 logits (beam 5 on 32 sentences) 305-396 µs against 545-650 for
  `torch.log_softmax` held to AVX2 on a Zen 4, 320 against 434-447 as the CPU comes.
- `qkv::pack_linear`, `qkv::packed_linear`: the products of a step's few rows by weights packed
  once, for the compiled steps on an AVX2 CPU (`qkv.inference.packed_linear` says why).
- `qkv::row_topk`: each row's k largest values and their indices, as `torch.topk` gives them, in
  one pass a row: a compiled step's beam candidates (`qkv.inference.topk.row_topk`). Called from
  a program, `torch.topk` of 5 x 1,600 values took ~15 µs (its second stage); this ~3.
- `qkv::log_softmax_topk`: the two before it in one call, a row at a time while it is in the first
  cache, the log-probabilities with the banned ids' bias added: the beam step of one sentence's
  log-probabilities and candidates (`qkv.inference.topk.log_softmax_topk`).
- `qkv::biased_argmax`: each row's argmax of the logits plus the banned ids' bias, as
  `torch.argmax` gives it, in two vector passes a row, the rows shared among the threads: the best
  tokens of a greedy step of many rows (`qkv.inference.topk.biased_argmax`).
- `qkv::pack_screen`, `qkv::screened_best`: a greedy step's next token at one row without every
  logit. An int8 copy of the output weights (each output feature quantised on its own) screens the
  vocabulary, each logit known within a bound; the few tokens whose bound reaches the best one's get
  their exact logits from `qkv::packed_linear`'s one-row loop over their panels, so the token is the
  full product's argmax, ties included (`packed_linear.ScreenedOutput`). The small benchmark model's
  output product read 2 MB instead of 8, its greedy search of one sentence 0.82-0.84x the time.
- `qkv::screened_best_rows`: the same for a greedy step of many rows, screened by qkv's int8 product
  (each row quantised on its own, its integer sums four to a lane), the candidates' exact logits each
  a dot product with the feature's own fp32 weights (`packed_linear.ScreenedRows`).
- `qkv::pack_int8_linear`, `qkv::packed_int8_linear`: qkv's own int8 product, by AMX's tiles,
  VNNI's dot products or AVX2's, each row quantised on its own (`qkv.inference.rowwise_int8` says
  why): the eager int8 engine's and the compiled int8 step's.

The compiled beam program (`qkv.inference.beam_program`) calls the first, and the compiled steps
the products, as C functions (`c_shims`), so a program that calls them needs them loaded in the
process; the beam program's engine calls the log-softmax after the program. `load` builds the
library with the C++ compiler that Inductor uses too (~10 s, once per machine, PyTorch and CPU
capability; its two sources compile side by side, ~7 s on a 2-core Intel Xeon against ~14 one after
the other), keeps it in `cache_dir()`, and loads it. Where it cannot (no compiler, another
platform, a failed build, or `QKV_NATIVE=0`), the programs compute all of it with PyTorch's
operators, as before.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

# The library's C++ files: the operators, and the int8 product (`qkv.inference.rowwise_int8`)
SOURCES = [Path(__file__).with_name(name) for name in ("operators.cpp", "rowwise_int8.cpp")]
# The operators a program calls: export traces them (`register_fake`)
OPERATOR = "qkv::beam_self_attention"
PRODUCT = "qkv::packed_linear"
ROWWISE_INT8_PRODUCT = "qkv::packed_int8_linear"
TOPK = "qkv::row_topk"
LOG_SOFTMAX_TOPK = "qkv::log_softmax_topk"
ARGMAX = "qkv::biased_argmax"
SCREENED = "qkv::screened_best"
SCREENED_ROWS = "qkv::screened_best_rows"
SWITCH = "QKV_NATIVE"  # 0: never build or load the operators; PyTorch's instead
CACHE_VARIABLE = "QKV_NATIVE_CACHE"
# The vector instructions each ATen capability allows, and the ATen vector type's own flavour of
# them (ATen/cpu/vec). Held to AVX2 (ATEN_CPU_CAPABILITY=avx2) on a machine with AVX-512, the
# operators are built for AVX2, as the rest of PyTorch then runs.
CAPABILITY_FLAGS = {
    "AVX512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
        "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
    ],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}  # fmt: skip

_loaded: dict[str, str | None] = {}  # the library's path -> None once loaded, else why not
_library_paths: dict[tuple, Path] = {}  # `library_path`'s answers, by what they depend on
# The library's `qkv_int8_takes_vnni` and `qkv_int8_takes_amx`, as C functions
_int8_takes: dict[str, object] = {}


def cache_dir() -> Path:
    """Where the built library is kept: `QKV_NATIVE_CACHE`, else beside qkv's compiled programs."""
    if directory := os.environ.get(CACHE_VARIABLE):
        return Path(directory)
    return Path.home() / ".cache" / "qkv" / "native"


def unavailable() -> str | None:
    """None if the operators can be built here, else why not (one line)."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    what = "qkv's operators"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"{what} are built on x86-64 Linux only, not {sys.platform} on {platform.machine()}"
    if (capability := torch.backends.cpu.get_cpu_capability()) not in CAPABILITY_FLAGS:
        return f"{what} are built for AVX2 and AVX-512, not {capability}"
    if compiler() is None:
        return "qkv's operators need a C++ compiler (c++, g++ or clang++)"
    return None


def compiler() -> str | None:
    return next((path for cc in ("g++", "c++", "clang++") if (path := shutil.which(cc))), None)


def compile_command(source: Path, output: Path) -> list[str]:
    """The compiler's command line that compiles one of `SOURCES` into the object `output`, for this
    PyTorch and CPU capability."""
    from torch.utils import cpp_extension

    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    return [*_compile_command(), "-c", str(source), "-o", str(output), *includes]


def link_command(objects: list[Path], output: Path) -> list[str]:
    """The command line that links the compiled `objects` into the library `output`."""
    from torch.utils import cpp_extension

    libraries = cpp_extension.library_paths()
    return [
        compiler(), *map(str, objects), "-o", str(output), "-shared", "-fopenmp",
        *(f"-L{path}" for path in libraries), *(f"-Wl,-rpath,{path}" for path in libraries),
        "-lc10", "-ltorch_cpu",
    ]  # fmt: skip


def _compile_command() -> list[str]:
    """A source's compile command without PyTorch's folders (which PyTorch's own place and version
    fix) and without the file names."""
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = CAPABILITY_FLAGS[torch.backends.cpu.get_cpu_capability()]
    return [
        compiler(), "-fPIC", "-O3", "-std=c++20", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *flags,
    ]  # fmt: skip


def library_path() -> Path:
    """The library's file, named by the source, PyTorch and the command that builds it. Worked out
    once for the same sources (by their size and time), folder, compiler and capability: `load` is
    asked for every int8 map an engine prepares (`rowwise_int8.unavailable`), and hashing the
    sources with the build command took ~0.1 ms."""
    sources = tuple((source.stat().st_mtime_ns, source.stat().st_size) for source in SOURCES)
    capability = torch.backends.cpu.get_cpu_capability()
    key = (sources, str(cache_dir()), compiler(), capability, torch.__version__)
    if key not in _library_paths:
        _library_paths[key] = _hashed_library_path()
    return _library_paths[key]


def _hashed_library_path() -> Path:
    # PyTorch's folders stand in the name by PyTorch's own place: asking `cpp_extension` for them
    # imports setuptools, ~100 ms of a cold `qkv translate --precision int8` (~1 s in all).
    digest = hashlib.blake2b(digest_size=8)
    for source in SOURCES:
        digest.update(source.read_bytes())
    digest.update(torch.__version__.encode())
    digest.update(str(Path(torch.__file__).parent).encode())
    digest.update(" ".join(_compile_command()).encode())
    return cache_dir() / f"operators-{digest.hexdigest()}.so"


def load(say=None) -> str | None:
    """Build (once, `say` told) and load the operators into this process: None if they are
    loaded, else why not (one line); the answer is kept for the process."""
    if why := unavailable():
        return why
    path = library_path()
    if str(path) not in _loaded:
        _loaded[str(path)] = _build_and_load(path, say)
    return _loaded[str(path)]


def _build_and_load(path: Path, say) -> str | None:
    if not path.exists():
        if say:
            say("building qkv's operators for decoding (once, ~10 s)")
        try:
            why = _build(path)
        except OSError as error:  # a cache folder that cannot be written
            why = f"qkv's operators could not be kept in {path.parent}: {error}"
        if why is not None:
            return why
    if not _registered():
        try:
            # Its C functions visible to the programs loaded after it, which call them (`c_shims`).
            library = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as error:  # built by another PyTorch, or damaged
            return f"qkv's operators did not load from {path}: {str(error).splitlines()[0]}"
        torch.library.register_fake(OPERATOR)(_shape_of_beam_self_attention)
        torch.library.register_fake(PRODUCT)(_shape_of_packed_linear)
        torch.library.register_fake(TOPK)(_shape_of_row_topk)
        torch.library.register_fake(LOG_SOFTMAX_TOPK)(_shape_of_log_softmax_topk)
        torch.library.register_fake(ARGMAX)(_shape_of_biased_argmax)
        torch.library.register_fake(SCREENED)(_shape_of_screened_best)
        torch.library.register_fake(SCREENED_ROWS)(_shape_of_screened_best_rows)
        torch.library.register_fake(ROWWISE_INT8_PRODUCT)(_shape_of_packed_int8_linear)
        for name in ("amx", "vnni"):
            _int8_takes[name] = function = getattr(library, f"qkv_int8_takes_{name}")
            function.argtypes, function.restype = [], ctypes.c_int
    return None


def _build(path: Path) -> str | None:
    """Build the library into `path`: None, or the compiler's first error (one line). The sources
    compile side by side (each ~7 s, most of it PyTorch's headers: ~14 s one after the other on a
    2-core Intel Xeon), then link."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built beside its final name and renamed: another process never loads half a library.
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        objects = [Path(scratch) / f"{source.stem}.o" for source in SOURCES]
        compiling = [
            subprocess.Popen(
                compile_command(source, obj),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for source, obj in zip(SOURCES, objects, strict=True)
        ]
        results = [(process.communicate(), process.returncode) for process in compiling]
        for (out, err), returncode in results:
            if returncode != 0:
                return _first_error(out, err)
        built = Path(scratch) / path.name
        result = subprocess.run(link_command(objects, built), capture_output=True, text=True)
        if result.returncode != 0:
            return _first_error(result.stdout, result.stderr)
        os.replace(built, path)
    return None


def _first_error(stdout: str, stderr: str) -> str:
    lines = (stderr or stdout).strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()] or lines or ["no output"]
    return f"qkv's operators did not build: {errors[0]}"


def _registered() -> bool:
    """Whether this process has the operators already (a library built in another cache folder)."""
    try:
        torch.ops.qkv.beam_self_attention.default  # noqa: B018 (looked up, or not there)
        torch.ops.qkv.packed_linear.default  # noqa: B018 (a library older than it: not these)
        torch.ops.qkv.row_topk.default  # noqa: B018
        torch.ops.qkv.log_softmax_topk.default  # noqa: B018
        torch.ops.qkv.biased_argmax.default  # noqa: B018
        torch.ops.qkv.screened_best.default  # noqa: B018
        torch.ops.qkv.screened_best_rows.default  # noqa: B018
        torch.ops.qkv.packed_int8_linear.default  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def int8_instructions() -> str | None:
    """The instructions of `qkv::packed_int8_linear` here: "amx" (Intel's tiles, from 3 rows;
    VNNI's below), "vnni" (the library built for AVX-512 on a CPU with AVX512-VNNI), else "avx2";
    None where the library was not loaded by `load`."""
    if not _int8_takes:
        return None
    return next((name for name, takes in _int8_takes.items() if takes()), "avx2")


def _shape_of_beam_self_attention(projected: Tensor, keys: Tensor, values: Tensor, bias: Tensor):
    """What export traces: the operator's output, (rows, 1, d_model)."""
    return projected.new_empty(projected.size(0), 1, keys.size(1) * keys.size(3))


def _shape_of_packed_linear(x: Tensor, packed: Tensor, out_features: int, relu: int):
    """What export traces: the product, (..., out_features)."""
    return x.new_empty(*x.shape[:-1], out_features)


def _shape_of_packed_int8_linear(
    x: Tensor, weights: Tensor, params: Tensor, out_features: int, relu: int
) -> Tensor:
    """What export traces: the product, (..., out_features)."""
    return x.new_empty(*x.shape[:-1], out_features)


def _shape_of_row_topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """What export traces: the values and their indices, (rows, k)."""
    return x.new_empty(x.size(0), k), x.new_empty(x.size(0), k, dtype=torch.long)


def _shape_of_log_softmax_topk(logits: Tensor, bias: Tensor, k: int) -> tuple[Tensor, ...]:
    """What export traces: the log-probabilities (rows, vocab), their k largest of each row and
    those's indices (rows, k)."""
    rows = logits.size(0)
    return logits.new_empty(logits.shape), *_shape_of_row_topk(logits.new_empty(rows, k), k)


def _shape_of_biased_argmax(logits: Tensor, bias: Tensor) -> Tensor:
    """What export traces: each row's best token, (rows,)."""
    return logits.new_empty(logits.size(0), dtype=torch.long)


def _shape_of_screened_best(x: Tensor, packed, q, scales, bias) -> Tensor:
    """What export traces: each row's best token, (rows,)."""
    return x.new_empty(x.numel() // x.size(-1), dtype=torch.long)


def _shape_of_screened_best_rows(x: Tensor, weight, weight_bias, weights, params, l1, bias):
    """What export traces: each row's best token, (rows,)."""
    return x.new_empty(x.numel() // x.size(-1), dtype=torch.long)


def c_shims() -> dict:
    """For AOTInductor (`aot_inductor.custom_ops_to_c_shims`): the operators a program calls, and
    the C functions of qkv's C++ files that the program calls for them directly, as it calls ATen's own
    operators; {} where it is not loaded. Through PyTorch's dispatcher instead (the "proxy
    executor" AOTInductor falls back on), each call cost more: beam search on 32 sentences held to
    AVX2 on a Zen 4, 0.99x the time with it (benchmarks/README.md, session 32)."""
    if not _registered():
        return {}
    attention = ", ".join(["AtenTensorHandle"] * 4 + ["AtenTensorHandle*"])
    product = ", ".join(["AtenTensorHandle"] * 2 + ["int64_t"] * 2 + ["AtenTensorHandle*"])
    rowwise_product = ", ".join(["AtenTensorHandle"] * 3 + ["int64_t"] * 2 + ["AtenTensorHandle*"])
    return {
        torch.ops.qkv.beam_self_attention.default: [
            f"AOTITorchError aoti_torch_cpu_beam_self_attention({attention})"
        ],
        torch.ops.qkv.packed_linear.default: [
            f"AOTITorchError aoti_torch_cpu_packed_linear({product})"
        ],
        torch.ops.qkv.row_topk.default: [
            "AOTITorchError aoti_torch_cpu_row_topk("
            "AtenTensorHandle, int64_t, AtenTensorHandle*, AtenTensorHandle*)"
        ],
        torch.ops.qkv.log_softmax_topk.default: [
            "AOTITorchError aoti_torch_cpu_log_softmax_topk(AtenTensorHandle, AtenTensorHandle, "
            "int64_t, AtenTensorHandle*, AtenTensorHandle*, AtenTensorHandle*)"
        ],
        torch.ops.qkv.biased_argmax.default: [
            "AOTITorchError aoti_torch_cpu_biased_argmax("
            "AtenTensorHandle, AtenTensorHandle, AtenTensorHandle*)"
        ],
        torch.ops.qkv.screened_best.default: [
            "AOTITorchError aoti_torch_cpu_screened_best("
            "AtenTensorHandle, AtenTensorHandle, AtenTensorHandle, AtenTensorHandle, "
            "AtenTensorHandle, AtenTensorHandle*)"
        ],
        torch.ops.qkv.screened_best_rows.default: [
            "AOTITorchError aoti_torch_cpu_screened_best_rows("
            + ", ".join(["AtenTensorHandle"] * 7 + ["AtenTensorHandle*"])
            + ")"
        ],
        torch.ops.qkv.packed_int8_linear.default: [
            f"AOTITorchError aoti_torch_cpu_packed_int8_linear({rowwise_product})"
        ],
    }
