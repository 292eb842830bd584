"""Beam search on many sentences through one compiled program a step (qkv.inference.beam_program),
over the eager engine's own cache: the same beams as the eager engine, as the sentences finish and
leave the batch; the eager step where it cannot compile."""

from __future__ import annotations

import math
import zipfile

import pytest
import torch

from qkv.inference import BeamCache, aoti, buckets, native, prepare_for_decoding
from qkv.inference import beam_program as beam_program_module
from qkv.inference.beam_program import BeamPrograms
from qkv.inference.compiled import CompiledEngine
from qkv.inference.step_programs import BEAMS
from test_compiled import QUICK, assert_same_beams, broken_compile, encoder_uncompiled, uncompiled
from test_search import random_model, random_sources
from torch_versions import needs_compiled_step

pytestmark = [pytest.mark.threads(2), needs_compiled_step]


@pytest.fixture(autouse=True)
def compile_cache(tmp_path, monkeypatch):
    """Compiled programs go to a fresh folder, never to the user's cache; quick options; beam
    programs whatever the CPU (measured on AVX2 and AVX-512 only, where they are taken)."""
    monkeypatch.setenv("QKV_COMPILE_CACHE", str(tmp_path / "compiled"))
    monkeypatch.setattr(aoti, "INDUCTOR_OPTIONS", QUICK)
    here = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(buckets, "WIDE_VECTORS", (*buckets.WIDE_VECTORS, here))


def sentences_of_each_call(engine) -> list[tuple[int, int]]:
    """Record (sentences, beams) of each call of the engine's beam programs."""
    calls = []
    program_of = engine.beam_programs.program

    def program(arguments):
        calls.append(tuple(arguments[0].shape))
        return program_of(arguments)

    engine.beam_programs.program = program
    return calls


@pytest.mark.parametrize(
    "overrides",
    [{}, {"norm_first": True}, {"positional": "learned"}, {"share_embeddings": False}],
    ids=["post-LN", "pre-LN", "learned positions", "own target embeddings"],
)
def test_the_beam_step_gives_the_eager_engines_beams(overrides):
    """The step's module run eagerly: its formulas are the eager engine's, whatever the model's
    layout."""
    model = random_model(**overrides)
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    calls = sentences_of_each_call(engine)
    src = random_sources([5, 8, 4, 6])  # padded: the source mask is an additive bias
    assert_same_beams(engine, reference, src, beam_size=3, max_len=9, n_best=3)
    assert calls and all(shape == (4, 3) for shape in calls)  # every step after the first
    assert len(calls) == 8
    # Sources of one length: nothing masked, the cache keeps no bias and the step gets zeros.
    assert_same_beams(engine, reference, random_sources([6, 6, 6]), beam_size=3, max_len=6)
    assert calls[-1] == (3, 3)


def test_the_compiled_beam_step_follows_the_sentences_as_they_finish(monkeypatch):
    monkeypatch.setattr(beam_program_module, "MAX_SENTENCES", 5)  # 7 sentences: eager at first
    model = random_model(seed=2)
    engine, reference = CompiledEngine(model), prepare_for_decoding(model)
    encoder_uncompiled(engine)  # the beam program's steps only
    calls = sentences_of_each_call(engine)
    src = random_sources([5, 8, 4, 6, 7, 3, 9], seed=1)
    # Each sentence's own limit (its length + 50, cut at the model's 64): some end early by EOS,
    # the others at their limits, so the batch shrinks; min_len bans EOS at first.
    assert_same_beams(engine, reference, src, beam_size=5, min_len=3)
    assert engine.unavailable is None and set(engine.beam_programs.programs) == {5}
    # Its attention by qkv's own operator where it builds, called from the compiled program.
    assert engine.beam_programs.step.native is (native.unavailable() is None)
    if engine.beam_programs.step.native:  # as a C function, not through the dispatcher
        path = engine.beam_programs.package_path(5)
        assert c_calls("aoti_torch_cpu_beam_self_attention", path) == model.config.n_decoder_layers
    sentences = [n for n, _ in calls]
    assert sentences[0] <= 5 and min(sentences) < sentences[0], sentences  # one program, any number
    assert sentences == sorted(sentences, reverse=True)
    assert engine.beam_programs.package_path(5).name.startswith("decoder-beam-step-5-beams-")
    # Kept in the cache folder: another engine loads them instead of compiling.
    again = CompiledEngine(model)
    encoder_uncompiled(again)
    assert_same_beams(again, reference, src, beam_size=5, min_len=3)
    assert again.beam_programs.compile_seconds[5] < engine.beam_programs.compile_seconds[5]


def package_code(path) -> str:
    """The C++ source a package keeps of its program."""
    with zipfile.ZipFile(path) as package:
        names = [name for name in package.namelist() if name.endswith(".cpp")]
        return "".join(package.read(name).decode() for name in names)


def c_calls(function: str, path) -> int:
    """How many times a package's program calls the C function `function` (every program declares
    qkv's, `native.c_shims`: the declaration is not a call)."""
    return package_code(path).count(f"AOTI_TORCH_ERROR_CODE_CHECK({function}(")


def test_a_sentences_beams_attend_together_by_the_engines_formula():
    """The program's attention, written as broadcast products and sums, against the engine's
    (batched products): masked slots (-inf) and a new key and value of each beam's own."""
    from qkv.inference.beam_program import attend_together, attend_with_new_together
    from qkv.inference.engine import _merge_heads, attention_with_bias
    from qkv.inference.static_cache import attend_with_new

    generator = torch.Generator().manual_seed(0)
    sentences, heads, beams, slots, d_head = 3, 2, 4, 7, 8
    q, k, v = (
        torch.randn(sentences, heads, n, d_head, generator=generator) for n in (beams, slots, slots)
    )
    visible = torch.rand(sentences, 1, beams, slots, generator=generator) < 0.5
    visible[..., 0], visible[..., -1] = True, False  # every beam sees a slot, none the last
    bias = torch.zeros(visible.shape).masked_fill(~visible, -math.inf)
    expected = _merge_heads(attention_with_bias(q, k, v, bias))
    torch.testing.assert_close(attend_together(q, k, v, bias), expected, rtol=0, atol=1e-6)
    new_k, new_v = (torch.randn(sentences, heads, beams, d_head, generator=generator) for _ in "kv")
    expected = attend_with_new(q, k, v, bias, new_k, new_v)
    got = attend_with_new_together(q, k, v, bias, new_k, new_v)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # A slot no beam sees takes no weight: its value does not count.
    unseen = ~visible.any(dim=2)[..., None]  # (sentences, 1, slots, 1)
    assert unseen.any()
    torch.testing.assert_close(
        attend_together(q, k, v.masked_fill(unseen, 1e6), bias), attend_together(q, k, v, bias)
    )


def test_one_sentence_and_the_first_step_take_other_steps():
    cache = BeamCache(n_layers=2, max_beams=5)
    assert not BeamPrograms.takes(cache)  # nothing decoded yet
    cache.n_sentences, cache.width, cache.length = 3, 1, 1
    assert not BeamPrograms.takes(cache)  # one row a sentence: the first step's
    cache.width, cache.length = 5, 2
    assert BeamPrograms.takes(cache)
    cache.n_sentences = 1  # 5 rows: a program of `qkv.inference.compiled`, or the eager step
    assert not BeamPrograms.takes(cache)
    cache.n_sentences = beam_program_module.MAX_SENTENCES + 1  # the eager step, until some finish
    assert not BeamPrograms.takes(cache)
    cache.n_sentences = beam_program_module.MAX_SENTENCES
    assert BeamPrograms.takes(cache)
    cache.n_sentences, cache.has_empty_source = 3, True  # NaN as an additive mask: eager
    assert not BeamPrograms.takes(cache)
    assert not BeamPrograms.takes(BeamCache(n_layers=2, max_beams=1))  # greedy


def test_a_failed_beam_compile_says_so_once_and_decodes_as_the_eager_engine(monkeypatch):
    monkeypatch.setattr(beam_program_module, "compile_package", broken_compile)
    messages = []
    model = random_model()
    engine, reference = CompiledEngine(model, warn=messages.append), prepare_for_decoding(model)
    engine.program = lambda arguments, kind=BEAMS: engine.step_module(kind)
    encoder_uncompiled(engine)
    for _ in range(2):  # the search that met the failure, then one on the eager engine
        assert_same_beams(engine, reference, random_sources([6, 4, 5]), beam_size=3, max_len=8)
    assert len(messages) == 1 and "could not compile the beam step" in messages[0], messages
    assert "RuntimeError: InductorError: no such compiler flag" in messages[0]


def test_without_wide_vectors_beams_on_many_sentences_take_the_eager_step(monkeypatch):
    monkeypatch.setattr(buckets, "WIDE_VECTORS", ())  # as on Arm: not measured there
    model = random_model()
    engine, reference = CompiledEngine(model), prepare_for_decoding(model)
    engine.program = lambda arguments, kind=BEAMS: engine.step_module(kind)
    assert engine.sentences_per_program(5) == [1]  # one sentence's 5 rows only
    assert_same_beams(engine, reference, random_sources([6, 4, 5]), beam_size=3, max_len=8)
    assert engine.beam_programs.programs == {}
