"""Inductor's private tables and hooks, which `qkv.inference.aoti` sets while it compiles a program:
extra register blocks for AVX2, a name of its own for each constant, products chosen by the size of
their weights, and only the options this PyTorch has. Each is PyTorch's, not a public API, and
changes between releases: where one is not as expected, the compile goes on without it
(`recipes/torch_versions.sh` runs the suite on other releases)."""

from __future__ import annotations

import contextlib

import torch

AVX2_ROW_BLOCK = (5, 16, 1)  # rows, columns, depth of a register block (`five_row_blocks_on_avx2`)
# The oldest PyTorch whose Inductor packs an fp32 product's weight for oneDNN where the product's rows
# are a dynamic dimension (the beam program of many sentences, the encoder of many). PyTorch 2.8's
# leaves such a product to MKL's `addmm`, which copies the weight into its own layout at every call:
# the beam program of 32 sentences spent ~48% of its time in MKL's kernel and copies there, where
# 2.13's runs oneDNN's JIT code, and took 1.13-1.35x 2.13's time on a Zen 4 (benchmarks/README.md,
# session 58). 2.9.1, 2.10.0, 2.11.0 and 2.12.0 pack them, as 2.13 does (their
# `fx_passes/mkldnn_fusion.py`).
PACKS_PRODUCTS_OF_ANY_ROWS_FROM = (2, 9)


@contextlib.contextmanager
def five_row_blocks_on_avx2():
    """While it lasts, Inductor may also build its fp32 products on AVX2 from register blocks of 5
    rows x 16 columns (`AVX2_ROW_BLOCK`). Its own AVX2 blocks are 4 x 24, 4 x 16 and 8 x 8, and it
    ranks 4 x 16 first for 5 rows (a beam of 5 on one sentence), which then takes two passes over the
    weights, the second for one row: the small model's program at 5 rows took 498-522 µs, against
    299-301 µs with 5 x 16 blocks (10 accumulators of 8 floats, 13 of AVX2's 16 registers), and the
    same ~195 µs at one row. A private table of PyTorch's: where it is not as this expects, the
    compile goes on without the extra blocks."""
    try:
        # Inductor's own import order: cpp_micro_gemm on its own meets a circular import.
        import torch._inductor.select_algorithm
        from torch._inductor.codegen import cpp_micro_gemm
        from torch._inductor.cpu_vec_isa import VecAVX2

        blocks = cpp_micro_gemm.micro_gemm_configs[cpp_micro_gemm.CppMicroGemmFP32Vec]
        extra = cpp_micro_gemm.generate_gemm_config(
            VecAVX2, [AVX2_ROW_BLOCK], input_dtype=torch.float
        )
    except (ImportError, AttributeError, KeyError, TypeError):
        yield
        return
    blocks.extend(extra)
    try:
        yield
    finally:
        for block in extra:
            blocks.remove(block)


@contextlib.contextmanager
def constants_known_apart():
    """While it lasts, each constant that Inductor makes itself (its own products' packed weights)
    is known to the program by a name of its own. Inductor names them `constant<n>` after how many
    constants it holds, and two can get one name (stored as `constant<n>` and `constant<n>_0`, two
    products' weights), by which the program gives only one (`extract_constants_map`): then none of
    them could be moved to cache lines (`aligned_runner`), and a 32-row program with Inductor's
    products, its packed weights 16 bytes past a line, was 0.93-0.95x the one with oneDNN's
    (benchmarks/README.md, session 27). A private method of PyTorch's: where it is not as this
    expects, the compile goes on with Inductor's names."""
    try:
        from torch._inductor.graph import GraphLowering

        allocate = GraphLowering.allocate_non_dup_const_name
    except (ImportError, AttributeError):
        yield
        return

    def allocate_apart(graph, name, data):
        before = set(graph.constants)
        allocated = allocate(graph, name, data)
        names = getattr(graph, "allocated_constant_name", None)
        if name is None and allocated not in before and isinstance(names, dict):
            names[allocated] = allocated  # its own name, not the count it was made at
        return allocated

    GraphLowering.allocate_non_dup_const_name = allocate_apart
    try:
        yield
    finally:
        GraphLowering.allocate_non_dup_const_name = allocate


@contextlib.contextmanager
def products_by_weight(own_up_to: int | None):
    """While it lasts, where Inductor chooses how to compute a product of fixed shape, it takes its
    own C++ if the weight has at most `own_up_to` elements and the library's (oneDNN) if more,
    without measuring (None: its choices as they come). Through Inductor's hook for filtering
    choices (`torch._inductor.select_algorithm.add_preprocessing_fn`); where it is missing, the
    compile goes on with Inductor's choices (PyTorch 2.8 has no such hook)."""
    found = _algorithm_selector()
    if own_up_to is None or found is None:
        yield
        return
    selector, library_type = found

    def by_weight(choices: list) -> list:
        library = [choice for choice in choices if isinstance(choice, library_type)]
        own = [choice for choice in choices if not isinstance(choice, library_type)]
        if not (library and own):
            return choices
        weight = _weight_elements(library[0])
        if weight is None:  # a shape not fixed: as Inductor has them
            return choices
        return own if weight <= own_up_to else library

    selector.add_preprocessing_fn(by_weight)
    try:
        yield
    finally:
        selector.preprocessing_fns.remove(by_weight)


def chooses_products_by_weight() -> bool:
    """Whether this PyTorch's Inductor lets a compile choose its products by the size of their
    weights (`products_by_weight`)."""
    return _algorithm_selector() is not None


def _algorithm_selector() -> tuple[object, type] | None:
    """Inductor's cache of algorithm choices, with its hook for filtering them, and the type of a
    library's product among the choices; None where this PyTorch has no such hook."""
    try:
        from torch._inductor import select_algorithm

        selector = select_algorithm.get_algorithm_selector_cache()
        library_type = select_algorithm.ExternKernelCaller
    except (ImportError, AttributeError):
        return None
    return (selector, library_type) if hasattr(selector, "preprocessing_fns") else None


def _weight_elements(choice) -> int | None:
    """The elements of the weight of a library product (output columns x the input's last
    dimension), or None where a size is not a plain integer."""
    try:
        columns = choice.layout.size[-1]
        depth = choice.input_nodes[0].get_size()[-1]
        return int(columns) * int(depth)
    except (AttributeError, IndexError, TypeError):
        return None


def packs_products_of_any_rows() -> bool:
    """Whether this PyTorch's Inductor packs fp32 products whose rows are a dynamic dimension for
    oneDNN (`PACKS_PRODUCTS_OF_ANY_ROWS_FROM`), rather than leaving them to MKL unpacked."""
    return torch_older_than(PACKS_PRODUCTS_OF_ANY_ROWS_FROM) is None


def torch_older_than(least: tuple[int, int], version: str | None = None) -> str | None:
    """This PyTorch's version (`version`, default `torch.__version__`) where it is older than
    `least` (major, minor), else None."""
    version = torch.__version__ if version is None else version
    major, minor = (int(part) for part in version.split(".")[:2])
    return version if (major, minor) < least else None


def options_known_here(options: dict) -> dict:
    """A copy of `options` without those this PyTorch's Inductor does not have. Each is a choice of
    speed or of what Inductor prints, none of what a program computes, and Inductor stops at an
    option it does not know: PyTorch 2.8 has no `max_autotune_report_choices_stats` (session 57)."""
    return {name: value for name, value in options.items() if _inductor_has(name)}


def _inductor_has(name: str) -> bool:
    """Whether Inductor's configuration has the option `name` ("freezing", "cpp.min_chunk_size")."""
    from torch._inductor import config

    found = config
    for part in name.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            return False
    return True
