"""The beam program's measured choice of products (qkv.inference.product_choice): what it times is
the step's own products both ways, the ratio is of the two timings, and the program takes what it
says, once, keeping the choice with the program it compiled."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from qkv.inference import aoti, buckets, native, packed_linear, prepare_for_decoding, product_choice
from qkv.inference import beam_program as beam_program_module
from qkv.inference.beam_program import MAX_SENTENCES
from qkv.inference.compiled import CompiledEngine
from test_beam_program import c_calls
from test_compiled import QUICK, assert_same_beams, encoder_uncompiled
from test_native import PRODUCT
from test_search import random_model, random_sources
from torch_versions import needs_compiled_step

needs_operator = pytest.mark.skipif(
    native.unavailable() is not None, reason=f"{native.unavailable()}"
)


@pytest.fixture
def measured_here(monkeypatch, tmp_path):
    """Beams on many sentences compiled here (as on `buckets.WIDE_VECTORS`), their products chosen
    by measuring (`packed_linear.MEASURED_ON`) on this CPU whatever its capability, programs
    compiled quickly into a fresh folder."""
    here = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(buckets, "WIDE_VECTORS", (here,))
    monkeypatch.setattr(packed_linear, "NATIVE_PRODUCTS_ON", ())
    monkeypatch.setattr(packed_linear, "MANY_ROWS_ON", ())
    monkeypatch.setattr(packed_linear, "MEASURED_ON", (here,))
    monkeypatch.setattr(aoti, "INDUCTOR_OPTIONS", QUICK)
    monkeypatch.setenv("QKV_COMPILE_CACHE", str(tmp_path / "compiled"))


@needs_operator
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_the_products_timed_are_the_steps_own_by_qkvs_kernel_and_by_onednn(activation):
    """Each pair is one map of the step, in the step's order: the same results both ways (a ReLU
    fused where the step fuses it, none before a GELU)."""
    model = random_model(seed=6, activation=activation, tgt_vocab_size=70)
    engine = CompiledEngine(model, warn=lambda line: None)
    step = engine.beam_programs.step
    maps = product_choice.linears(step)
    ours = engine.decoder_products().in_step_order()
    assert len(maps) == len(ours) == 6 * model.config.n_decoder_layers + 1
    assert [relu for _, _, relu in maps].count(True) == (
        model.config.n_decoder_layers if activation == "relu" else 0
    )
    generator = torch.Generator().manual_seed(1)
    for (weight, bias, relu), product in zip(maps, ours, strict=True):
        x = torch.randn(13, weight.size(1), generator=generator)
        theirs = product_choice.onednn_product(weight, bias, relu, rows=13)
        expected = torch.nn.functional.linear(x, weight, bias)
        expected = expected.relu() if relu else expected
        torch.testing.assert_close(product(x), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(theirs(x), expected, rtol=0, atol=1e-5)


def test_the_ratio_is_qkvs_median_time_over_onednns(monkeypatch):
    """A clock that each of qkv's products moves by 3 and each of oneDNN's by 2: 3/2. Each product
    is called once untimed and `ROUNDS` times timed, on `rows` rows of its input's width."""
    clock, calls = [0.0], []
    monkeypatch.setattr(product_choice.time, "perf_counter", lambda: clock[0])

    def moves(by, d_in):
        def product(x):
            assert x.shape == (10, d_in)
            calls.append(by)
            clock[0] += by

        return product

    model = random_model(seed=2)
    engine = CompiledEngine(model, warn=lambda line: None)
    step = engine.beam_programs.step
    widths = [weight.size(1) for weight, _, _ in product_choice.linears(step)]
    ours = [moves(3, d_in) for d_in in widths]
    products = SimpleNamespace(in_step_order=lambda: ours)
    theirs = iter([moves(2, d_in) for d_in in widths])
    monkeypatch.setattr(product_choice, "onednn_product", lambda *args, rows: next(theirs))
    assert product_choice.time_ratio(step, products, rows=10) == pytest.approx(1.5)
    assert calls.count(3) == calls.count(2) == len(widths) * (product_choice.ROUNDS + 1)


@pytest.mark.parametrize(
    "readings, takes, ratio",
    [
        ([0.9], True, 0.9),  # one reading below the line
        ([1.2, 0.9, 0.95], True, 0.95),  # one over it, two below: the median
        ([1.2, 1.1, 0.9], False, 1.1),
        ([1.05, 1.2, 0.8], False, 1.05),  # at the line is over it
    ],
)
def test_a_reading_over_the_line_is_read_twice_more_and_the_median_counts(
    monkeypatch, readings, takes, ratio
):
    given = iter(readings)
    monkeypatch.setattr(product_choice, "time_ratio", lambda step, products, rows: next(given))
    monkeypatch.setattr(product_choice, "TAKEN_BELOW", 1.05)
    assert product_choice.takes_qkvs(None, None, rows=160) == (takes, ratio)
    assert next(given, None) is None  # every reading taken, no more


@pytest.mark.parametrize(
    "capability, version, measures",
    [
        ("AVX512", "2.13.0", True),
        ("AVX512", "2.9.1", True),
        ("AVX512", "2.8.0", False),  # qkv's products unmeasured (`serves(None)`)
        ("AVX2", "2.13.0", False),  # qkv's products always
        ("DEFAULT", "2.13.0", False),
    ],
)
def test_the_choice_is_measured_on_avx512_where_inductor_packs_the_products(
    monkeypatch, capability, version, measures
):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch, "__version__", version)
    assert packed_linear.measures_beams() is measures


@needs_compiled_step
@needs_operator
def test_the_beam_program_takes_what_the_measure_says_and_keeps_the_choice_with_its_package(
    measured_here, monkeypatch
):
    model = random_model(seed=5)
    reference = prepare_for_decoding(model)
    asked = []

    def faster(step, products, rows):
        asked.append(rows)
        return 0.5

    monkeypatch.setattr(product_choice, "time_ratio", faster)
    engine = CompiledEngine(model)
    encoder_uncompiled(engine)
    src = random_sources([5, 8, 4, 6], seed=5)
    assert_same_beams(engine, reference, src, beam_size=4)
    programs = engine.beam_programs
    assert asked == [4 * MAX_SENTENCES] and programs.measured_ratio == 0.5
    assert programs.step.products is engine.decoder_products() is not None
    assert c_calls(PRODUCT, programs.package_path(4)) == 6 * model.config.n_decoder_layers + 1

    # A new engine finds the kept program: no measuring, nothing compiled, the same choice.
    monkeypatch.setattr(product_choice, "time_ratio", None)
    monkeypatch.setattr(beam_program_module, "compile_package", None)
    again = CompiledEngine(model)
    encoder_uncompiled(again)
    assert_same_beams(again, reference, src, beam_size=4)
    assert again.beam_programs.step.products is not None
    assert again.beam_programs.measured_ratio is None
    assert again.beam_programs.package_path(4) == programs.package_path(4)

    # Measured over `TAKEN_BELOW` (three readings): oneDNN's products, another program.
    slower = product_choice.TAKEN_BELOW * 1.01
    monkeypatch.setattr(product_choice, "time_ratio", lambda step, products, rows: slower)
    for package in programs.package_path(4).parent.glob("decoder-beam-step-*"):
        package.unlink()
    other = CompiledEngine(model)
    assert other.beam_programs.package_path(4) != programs.package_path(4)
    assert other.beam_programs.step.products is None
    assert other.beam_programs.measured_ratio == slower


@needs_operator
def test_where_onednn_cannot_be_timed_the_beam_program_takes_pytorchs_products(
    measured_here, monkeypatch
):
    def no_onednn(*args, rows):
        raise RuntimeError("mkldnn_reorder_linear_weight: not built with oneDNN")

    monkeypatch.setattr(product_choice, "onednn_product", no_onednn)
    engine = CompiledEngine(random_model(seed=5))
    engine.beam_programs.package_path(4)
    assert engine.beam_programs.step.products is None
    assert engine.beam_programs.measured_ratio is None
