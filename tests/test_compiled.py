"""The compiled decoder step (qkv.inference.compiled) is an engine choice, not a second model: the same
search over it gives the eager engine's ids (greedy, fp32) and beams, compiled or not, and where it
cannot compile it says so once and decodes as the eager engine does."""

from __future__ import annotations

import inspect
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import qkv
from qkv.errors import QkvError
from qkv.inference import (
    BeamCache,
    aoti,
    buckets,
    compiled_encoder,
    huge_pages,
    inductor_hooks,
    native,
    packed_linear,
    prepare_for_decoding,
    step_programs,
)
from qkv.inference import digests as digests_module
from qkv.inference import engine as engine_module
from qkv.inference import topk as topk_module
from qkv.inference.compiled import CompiledEngine, StaticCache
from qkv.inference.step_programs import BEAMS, GREEDY, GREEDY_EVERY_LOGIT
from qkv.search import beam_search, greedy_search, sample
from test_search import random_model, random_sources
from torch_versions import needs_compiled_step, torch_older_than

pytestmark = [pytest.mark.threads(2), needs_compiled_step]

# Freezing alone compiles in a few seconds; max_autotune measures ~2 s per product shape, so only the
# command-line test compiles with the options `qkv translate --compile` runs with.
QUICK = {"freezing": True}


@pytest.fixture(autouse=True)
def compile_cache(tmp_path, monkeypatch):
    """Compiled programs go to a fresh folder, never to the user's cache."""
    monkeypatch.setenv("QKV_COMPILE_CACHE", str(tmp_path / "compiled"))
    return tmp_path / "compiled"


@pytest.fixture
def quick_compile(monkeypatch):
    monkeypatch.setattr(aoti, "INDUCTOR_OPTIONS", QUICK)


def uncompiled(model) -> CompiledEngine:
    """The engine with its static step and encoder run eagerly (what a failed compile falls back
    to)."""
    engine = CompiledEngine(model)
    engine.program = lambda arguments, kind=BEAMS: engine.step_module(kind)
    encoder_uncompiled(engine)
    engine.beam_programs.program = lambda arguments: engine.beam_programs.step
    return engine


def encoder_uncompiled(engine: CompiledEngine) -> None:
    """The engine's encoder programs, one sentence's and many sentences', run eagerly."""
    engine.source.program = engine.source.module
    engine.source.batch_program = engine.source.batch_module


def assert_same_greedy(engine, reference, src, **lengths):
    ids, scores = greedy_search(engine, src, **lengths)
    ref_ids, ref_scores = greedy_search(reference, src, **lengths)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)
    # Without scores: no softmax after the program, the same ids.
    without_ids, none = greedy_search(engine, src, **lengths, scores=False)
    assert none is None and torch.equal(without_ids, ids)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"norm_first": True}, {"positional": "learned"}, {"share_embeddings": False}],
    ids=["post-LN", "pre-LN", "learned positions", "own target embeddings"],
)
def test_the_static_step_gives_the_eager_engines_greedy_ids_and_scores(overrides):
    model = random_model(**overrides)
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    src = random_sources([7, 3, 11])  # padding: sources of three lengths, 3 rows
    cache = engine.new_cache(max_beams=1, max_len=20, sentences=3)
    assert isinstance(cache, StaticCache)
    assert_same_greedy(engine, reference, src, max_len=20)
    assert_same_greedy(engine, reference, src[:1, :7], max_len=9, min_len=9)
    # 40 positions: the cache starts with 8 slots and grows (16, 32, 40).
    assert_same_greedy(engine, reference, src[:2, :7], max_len=40, min_len=40)


def test_sentences_that_finish_at_different_steps_leave_the_others_their_rows():
    """Each sentence its own length limit (its source's + 50): they finish one after another, and
    the rest go on in the rows they had, through greedy search's program and through the
    log-probabilities sampling reads (top-k 1: the same draws as greedy)."""
    model = random_model(seed=2)
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    src = random_sources([3, 9, 1, 6, 12], seed=8)
    ids, scores = greedy_search(engine, src)
    ref_ids, ref_scores = greedy_search(reference, src)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)
    assert len(set((ref_ids != model.config.pad_id).sum(dim=1).tolist())) > 1  # they did differ
    drawn, drawn_scores = sample(engine, src, top_k=1)
    assert torch.equal(drawn, ref_ids)
    torch.testing.assert_close(drawn_scores, ref_scores, rtol=0, atol=1e-4)


def test_the_static_step_bans_ids_and_finds_the_best_token_as_the_eager_engine_does():
    model = random_model(seed=4)
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    src = random_sources([5, 8], seed=6)
    banned = (model.config.pad_id, model.config.bos_id, model.config.eos_id)
    with torch.inference_mode():
        caches = [e.new_cache(max_beams=1, max_len=10, sentences=2) for e in (engine, reference)]
        assert isinstance(caches[0], StaticCache) and isinstance(caches[1], BeamCache)
        (memory, src_mask), tokens = reference.encode(src), torch.tensor([2, 2])
        for step in range(4):
            memory_now, mask_now = (memory, src_mask) if step == 0 else (None, None)
            log_probs, ref_log_probs = (
                e.next_log_probs(tokens, memory_now, mask_now, cache, banned[: 2 + step % 2])
                for e, cache in zip((engine, reference), caches, strict=True)
            )
            torch.testing.assert_close(log_probs, ref_log_probs, rtol=0, atol=1e-5)
            assert log_probs[:, list(banned[: 2 + step % 2])].eq(-torch.inf).all()
            assert step % 2 or log_probs[:, banned[2]].isfinite().all()  # only when asked
            tokens = ref_log_probs.argmax(dim=1)
        best, best_log_probs = engine.next_best(tokens, None, None, caches[0], banned)
        ref_log_probs = reference.next_log_probs(tokens, None, None, caches[1], banned)
        assert torch.equal(best, ref_log_probs.argmax(dim=1)) and best.tolist() != [2, 2]
        torch.testing.assert_close(
            best_log_probs, ref_log_probs.max(dim=1).values, rtol=0, atol=1e-5
        )


@pytest.mark.parametrize("beam_size, sentences", [(5, 1), (3, 1), (2, 2)])
def test_one_sentences_beams_take_the_steps_own_extensions_the_same_as_the_searchs(
    beam_size, sentences, monkeypatch
):
    """Beams of one sentence filling the program's rows take the extensions the step computes
    (from the second step: the first has one beam); beams of two sentences, the search's."""
    model = random_model(seed=7)
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    static_step, taken = engine._static_step, []

    def checked(last_tokens, cache, banned, greedy=False, scores=True, beam_scores=None):
        outputs = static_step(last_tokens, cache, banned, greedy, scores, beam_scores)
        if beam_scores is not None:
            k = engine.static_step.candidates
            expected = topk_module.extensions_of_rows(outputs[3], outputs[4], beam_scores[None], k)
            for got, wanted in zip(outputs[5:], expected, strict=True):
                assert torch.equal(got, wanted)
            taken.append(cache.length)
        return outputs

    monkeypatch.setattr(engine, "_static_step", checked)
    src = random_sources([6] * sentences, seed=beam_size)
    assert_same_beams(engine, reference, src, beam_size=beam_size, max_len=9, min_len=9)
    # the cache's length after each step that took them: every step but the first
    assert taken == ([] if sentences > 1 else list(range(2, 10)))


@pytest.mark.parametrize("rows", [3, 8], ids=["a row per sentence", "the last one repeated"])
def test_the_first_step_lays_out_the_encoders_keys_and_values_for_every_row(rows):
    model = random_model(seed=4)
    engine = CompiledEngine(model)  # nothing compiles: only the layout of the first step
    encoder_uncompiled(engine)
    src = random_sources([5, 9, 2], seed=2)  # 9 positions: padded to 16 slots
    with torch.inference_mode():
        memory, src_mask = engine.encode(src)
        cache = StaticCache(len(engine.decoder), rows=rows, max_beams=1, max_len=12)
        assert engine._start(cache, memory, src_mask)
        n_heads, d_head = model.config.n_heads, model.config.d_head
        assert cache.cross_kv.shape == (2, len(engine.decoder), rows, n_heads, 16, d_head)
        assert (cache.cross_kv[..., 9:, :] == 0).all()  # past the source: masked out, and finite
        sentence_of_row = [0, 1, 2, 2, 2, 2, 2, 2][:rows]
        for i, layer in enumerate(model.decoder.layers):
            attention = layer.cross_attn
            for j, projection in enumerate((attention.k_proj, attention.v_proj)):
                expected = projection(memory).view(3, 9, n_heads, d_head).transpose(1, 2)
                laid_out = cache.cross_kv[j, i, :, :, :9]
                torch.testing.assert_close(laid_out, expected[sentence_of_row])
    assert torch.equal(cache.cross_bias[:, 0, 0, :9] == 0, src_mask[sentence_of_row, 0, 0])
    assert (cache.cross_bias[..., 9:] == -torch.inf).all()


def test_the_static_cache_reorders_beams_as_the_beam_cache_does():
    model = random_model(seed=3)
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    src = random_sources([6, 9], seed=1)  # 2 sentences x beam 2 = 4 rows: the static cache
    for options in [dict(beam_size=2, max_len=12), dict(beam_size=2, n_best=2, length_penalty=0)]:
        ids, scores = beam_search(engine, src, **options)
        ref_ids, ref_scores = beam_search(reference, src, **options)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)


def as_projected(new_kv: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Keys and values (2, layers, rows, heads, d_head) as a step returns them: each layer's
    projection (rows, 1, 3 * d_model) of queries (random here), keys and values."""
    _, n_layers, rows, n_heads, d_head = new_kv.shape
    queries = torch.randn(rows, 1, n_heads, d_head, generator=generator)
    return tuple(
        torch.cat([queries, new_kv[0, i, :, None], new_kv[1, i, :, None]], dim=1).view(rows, 1, -1)
        for i in range(n_layers)
    )


def test_a_reorder_moves_the_ancestry_not_the_keys_and_the_gathered_history_is_the_moved_one():
    from qkv.inference.static_cache import gather_history

    generator = torch.Generator().manual_seed(0)
    for rows, max_beams in ((3, 3), (1, 1), (20, 5)):  # few rows write stacked, many per layer
        cache = StaticCache(n_layers=2, rows=rows, max_beams=max_beams, max_len=40)
        cache.start(torch.zeros(2, 2, rows, 2, cache.capacity, 4))
        moved = cache.self_kv.clone()  # the same history, reordered by moving it
        for step in range(37):  # the cache grows three times: 8, 16, 32, then 40 slots
            cache.make_room()
            moved = torch.cat([moved, torch.zeros_like(moved)], dim=4)[..., : cache.capacity, :]
            new_kv = torch.randn(2, 2, rows, 2, 4, generator=generator)
            cache.write(as_projected(new_kv, generator))
            moved[..., step, :] = new_kv
            index = torch.randint(0, rows, (rows,), generator=generator)
            keys_before = cache.self_kv.data_ptr()
            cache.reorder(index, cross_attention=False)
            moved = moved.index_select(2, index)
            assert cache.self_kv.data_ptr() == keys_before  # nothing moved
            history = gather_history(cache.self_kv, cache.ancestry)
            assert torch.equal(history[..., : step + 1, :], moved[..., : step + 1, :])


def test_a_programs_own_write_of_the_keys_and_values_is_the_caches():
    from qkv.inference.static_cache import position_input, write_new_slot

    generator = torch.Generator().manual_seed(1)
    for rows, max_beams in ((3, 3), (1, 1), (20, 5), (4, 1)):
        caches = [StaticCache(n_layers=2, rows=rows, max_beams=max_beams, max_len=20) for _ in "ab"]
        for cache in caches:
            cache.start(torch.zeros(2, 2, rows, 2, cache.capacity, 4))
        by_cache, by_program = caches
        for _ in range(17):  # grows twice: 8, 16, then 20 slots
            for cache in caches:
                cache.make_room()
            projected = as_projected(torch.randn(2, 2, rows, 2, 4, generator=generator), generator)
            by_cache.write(projected)
            at = position_input(by_program.length).view(1)
            write_new_slot(
                by_program.self_kv, by_program.ancestry, at, list(projected), 2, max_beams > 1
            )
            by_program.written()
            index = torch.randint(0, rows, (rows,), generator=generator)
            if max_beams == 1:  # one beam: rows stay, sentences leave (not here)
                index = torch.arange(rows)
            for cache in caches:
                cache.reorder(index, cross_attention=False)
            assert by_program.length == by_cache.length
            assert torch.equal(by_program.self_kv, by_cache.self_kv)
            assert torch.equal(by_program.ancestry, by_cache.ancestry)


def test_with_one_beam_the_ancestry_is_each_rows_own_as_the_cache_grows():
    from qkv.inference.static_cache import gather_history

    cache = StaticCache(n_layers=2, rows=3, max_beams=1, max_len=40)
    cache.start(torch.zeros(2, 2, 3, 2, cache.capacity, 4))
    for _ in range(37):  # the cache grows three times: 8, 16, 32, then 40 slots
        cache.make_room()
        cache.write(as_projected(torch.randn(2, 2, 3, 2, 4), torch.Generator()))
    assert cache.capacity > 32
    assert torch.equal(cache.ancestry, torch.arange(3)[:, None].expand(3, cache.capacity))
    assert torch.equal(gather_history(cache.self_kv, cache.ancestry), cache.self_kv)


def test_with_one_beam_finished_sentences_leave_their_rows_and_nothing_moves():
    cache = StaticCache(n_layers=2, rows=4, max_beams=1, max_len=10)
    cache.start(torch.zeros(2, 2, 4, 2, cache.capacity, 4))
    cache.cross_kv, cache.cross_bias = torch.randn(2, 2, 4, 2, 8, 4), torch.zeros(4, 1, 1, 8)
    held = cache.self_kv, cache.ancestry.clone(), cache.cross_kv, cache.cross_bias
    outputs = torch.arange(4) * 10  # what a program returns for each of its rows
    # Three sentences in a program of four rows: the last one repeated.
    assert cache.program_tokens(torch.tensor([5, 6, 7])).tolist() == [5, 6, 7, 7]
    assert cache.search_rows(outputs).tolist() == [0, 10, 20]
    cache.reorder(torch.tensor([0, 2]))  # the second sentence finished
    assert cache.program_tokens(torch.tensor([8, 9])).tolist() == [8, 6, 9, 7]
    assert cache.search_rows(outputs).tolist() == [0, 20]
    cache.reorder(torch.tensor([1]))  # then the first
    assert cache.program_tokens(torch.tensor([4])).tolist() == [8, 6, 4, 7]
    assert cache.search_rows(outputs).tolist() == [20]
    assert cache.self_kv is held[0] and torch.equal(cache.ancestry, held[1])  # each row its own
    assert cache.cross_kv is held[2] and cache.cross_bias is held[3]


def test_more_rows_than_max_rows_take_the_beam_cache_with_the_same_results():
    model = random_model()
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    assert isinstance(engine.new_cache(max_beams=5, max_len=10, sentences=1), StaticCache)
    assert isinstance(engine.new_cache(max_beams=3, max_len=10, sentences=2), BeamCache)
    # One beam on 33 sentences: the eager step, on a cache that may hand the search over later.
    many = engine.new_cache(max_beams=1, max_len=10, sentences=33)
    assert isinstance(many.fallback, BeamCache) and many.hands_over
    assert isinstance(engine.new_cache(max_beams=1, max_len=10), BeamCache)  # unknown: eager
    src = random_sources([5, 8, 4, 6, 7, 3] * 6)
    assert_same_greedy(engine, reference, src[:33], max_len=10)  # the eager step throughout
    beams = dict(beam_size=3, max_len=8)
    ids, scores = beam_search(engine, src[:2], **beams)
    ref_ids, ref_scores = beam_search(reference, src[:2], **beams)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)


def test_one_beam_on_more_sentences_takes_a_program_of_8_16_or_32_rows_with_the_same_results():
    model = random_model()
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    rows = {n: engine.program_rows(n, max_beams=1) for n in (1, 5, 6, 8, 9, 16, 17, 32, 33)}
    assert rows == {1: 1, 5: 5, 6: 8, 8: 8, 9: 16, 16: 16, 17: 32, 32: 32, 33: None}
    assert engine.program_rows(2, max_beams=5) is None  # beams: at most MAX_ROWS rows
    src = random_sources([5, 8, 4, 6, 7, 3, 9])  # 7 sentences: 8 rows, the last one repeated
    cache = engine.new_cache(max_beams=1, max_len=12, sentences=7)
    assert isinstance(cache, StaticCache) and cache.rows == 8
    # Each sentence's own limit (its length + 50): they finish at different steps, the cache grows.
    assert_same_greedy(engine, reference, src)
    assert_same_greedy(engine, reference, src, max_len=6, min_len=6)


def test_models_whose_weights_outgrow_the_cache_compile_one_row_only_without_wide_vectors(
    monkeypatch,
):
    assert set(buckets.WIDE_VECTORS) == {"AVX512", "AVX2"}  # the two measured
    model = random_model()
    engine = uncompiled(model)
    assert isinstance(engine.new_cache(max_beams=5, max_len=10, sentences=1), StaticCache)
    monkeypatch.setattr(buckets, "MAX_WEIGHT_BYTES_FOR_ROWS", engine.step_bytes - 1)
    capability = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(buckets, "WIDE_VECTORS", ())  # as on a CPU not measured (Arm)
    assert isinstance(engine.new_cache(max_beams=5, max_len=10, sentences=1), BeamCache)
    assert isinstance(engine.new_cache(max_beams=1, max_len=10, sentences=2), BeamCache)
    assert isinstance(engine.new_cache(max_beams=1, max_len=10, sentences=1), StaticCache)
    monkeypatch.setattr(buckets, "WIDE_VECTORS", (capability,))  # as on AVX-512, AVX2
    assert isinstance(engine.new_cache(max_beams=5, max_len=10, sentences=1), StaticCache)
    assert isinstance(engine.new_cache(max_beams=3, max_len=10, sentences=2), BeamCache)
    # One beam a sentence on more sentences: the programs of up to 32 rows, as for a model that fits
    rows = {n: engine.program_rows(n, max_beams=1) for n in (6, 9, 17, 32, 33)}
    assert rows == {6: 8, 9: 16, 17: 32, 32: 32, 33: None}
    assert engine.fewer_rows(32) == (1, 4, 8, 16)  # and the smaller ones as sentences finish


def test_a_source_without_tokens_takes_the_eager_step_for_that_search():
    model = random_model()
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    src = random_sources([5, 4])
    src[1] = 0  # every position padding: an additive mask would give NaN
    ids, scores = greedy_search(engine, src, max_len=6)
    ref_ids, ref_scores = greedy_search(reference, src, max_len=6)
    assert torch.equal(ids, ref_ids) and not scores.isnan().any()
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)


def test_the_compiled_step_gives_the_eager_ids_and_is_compiled_once_and_kept(
    quick_compile, compile_cache, monkeypatch
):
    # Two rows by Inductor's products on every CPU (on AVX2 and AVX-512 qkv's serve every greedy
    # program, `packed_linear.serves`): the screen runs without qkv's other products, as where a CPU's
    # capability is in none of `packed_linear`'s lists but qkv's operators load.
    monkeypatch.setattr(packed_linear, "FEW_ROWS_ON", ())
    model = random_model(seed=1)
    engine, reference = CompiledEngine(model), prepare_for_decoding(model)
    assert engine.unavailable is None, engine.unavailable
    encoder_uncompiled(engine)  # the decoder's programs only
    assert_same_greedy(engine, reference, random_sources([7, 4]), max_len=20)
    # Greedy search's own programs: only the best token, each row's history read in place; with
    # qkv's operators, one screens the output product and one computes every logit (for scores).
    kinds = (GREEDY, GREEDY_EVERY_LOGIT) if native.load() is None else (GREEDY,)
    names = {engine.package_path(2, kind).name for kind in kinds}
    assert {p.name for p in compile_cache.iterdir()} == names
    if len(kinds) == 2:  # by `qkv::screened_best_rows`, whatever the program's other products
        from test_beam_program import c_calls  # which imports this module

        screening, every_logit = (engine.package_path(2, kind) for kind in kinds)
        assert c_calls("aoti_torch_cpu_screened_best_rows", screening) == 1
        assert c_calls("aoti_torch_cpu_screened_best_rows", every_logit) == 0
        assert engine.step_module(GREEDY, 2).products is None
        assert c_calls("aoti_torch_cpu_packed_linear", screening) == 0
    # Other source lengths, another capacity, one sentence finishing early: the same program.
    assert_same_greedy(engine, reference, random_sources([12, 3], seed=2), max_len=30)
    assert_same_greedy(engine, reference, random_sources([3, 5], seed=3), max_len=9, min_len=9)
    assert_same_greedy(engine, reference, random_sources([6, 5], seed=5), max_len=40, min_len=40)
    assert engine.compiled_rows == {2} and engine.unavailable is None
    assert len(list(compile_cache.iterdir())) == len(kinds)
    # A new engine of the same weights loads the program: nothing is compiled again.
    monkeypatch.setattr(step_programs, "compile_package", None)
    again = CompiledEngine(model)
    encoder_uncompiled(again)
    assert_same_greedy(again, reference, random_sources([4, 9], seed=4), max_len=15)
    assert again.compiled_rows == {2} and again.unavailable is None
    # Other weights: another key, so a program of their own; another number of rows, another program.
    assert CompiledEngine(random_model(seed=9)).package_path(2) != engine.package_path(2)
    assert engine.package_path(1) != engine.package_path(2)
    assert engine.package_path(2, GREEDY) != engine.package_path(2)


def test_with_one_beam_the_live_sentences_move_to_a_smaller_program_in_the_searchs_order():
    cache = StaticCache(n_layers=2, rows=8, max_beams=1, max_len=10, fewer_rows=(4,))
    cache.start(torch.randn(2, 2, 8, 2, cache.capacity, 4))
    cache.cross_kv, cache.cross_bias = torch.randn(2, 2, 8, 2, 8, 4), torch.randn(8, 1, 1, 8)
    held = cache.self_kv, cache.cross_kv, cache.cross_bias
    cache.reorder(torch.tensor([0, 2, 3, 5, 6, 7]))  # six live sentences: eight rows still
    assert cache.rows == 8 and cache.self_kv is held[0]
    cache.reorder(torch.tensor([4, 1, 3]))  # three live, in rows 6, 2 and 5: they fit four rows
    assert cache.rows == 4 and cache.live_rows is None
    kept = torch.tensor([6, 2, 5, 5])  # in the search's order, the last repeated
    assert torch.equal(cache.self_kv, held[0].index_select(2, kept))
    assert torch.equal(cache.cross_kv, held[1].index_select(2, kept))
    assert torch.equal(cache.cross_bias, held[2].index_select(0, kept))
    assert torch.equal(cache.ancestry, torch.arange(4)[:, None].expand(4, cache.capacity))
    assert cache.program_tokens(torch.tensor([7, 8, 9])).tolist() == [7, 8, 9, 9]
    assert cache.search_rows(torch.arange(4) * 10).tolist() == [0, 10, 20]
    cache.reorder(torch.tensor([0, 2]))  # no smaller program: the rows stay, and nothing moves
    assert cache.rows == 4 and cache.live_rows.tolist() == [0, 2]


def rows_of_each_step(engine, reference, src) -> tuple[list[int], list[int]]:
    """Greedy search on `engine` (uncompiled) gives the reference's ids and scores; returns the rows
    of the program each of its steps ran on (none for an eager step), and the sentences still live
    at each step. The spy stays: a later search appends to the same list."""
    rows_run = []

    def program(arguments, kind=BEAMS):
        rows_run.append(arguments[0].size(0))
        return engine.step_module(kind)

    engine.program = program
    assert_same_greedy(engine, reference, src)
    lengths = (greedy_search(engine, src)[0] != engine.config.pad_id).sum(dim=1).tolist()
    rows_run.clear()
    greedy_search(engine, src)
    return rows_run, [sum(length > step for length in lengths) for step in range(max(lengths))]


def test_greedy_search_moves_to_smaller_programs_as_its_sentences_finish():
    model = random_model(seed=6, max_len=80)
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    assert engine.fewer_rows(32) == (1, 4, 8, 16) and engine.fewer_rows(8) == (1, 4)
    assert engine.fewer_rows(5) == ()  # a smaller program would gain less than its compile
    # Sources of 1-20 tokens, so limits of 51-70 tokens: from step 51 on, one sentence ends a step.
    src = random_sources(list(range(1, 21)), seed=6)
    rows_run, live = rows_of_each_step(engine, reference, src)
    # Each step on the smallest program its live sentences fit: from the first step after one fits.
    assert rows_run == [min(r for r in (1, 4, 8, 16, 32) if r >= n) for n in live]
    assert sorted(set(rows_run)) == [1, 4, 8, 16, 32]


def test_greedy_search_on_more_sentences_than_a_program_has_rows_hands_over_once_they_fit(
    monkeypatch,
):
    model = random_model(seed=6, max_len=80)
    engine, reference = uncompiled(model), prepare_for_decoding(model)
    # 40 sources of 1-40 tokens, so limits of 51-80 tokens: the eager step runs until 32 are left.
    src = random_sources(list(range(1, 41)), seed=7)
    rows_run, live = rows_of_each_step(engine, reference, src)
    eager_steps = sum(n > 32 for n in live)
    assert 0 < eager_steps < len(live)
    assert len(rows_run) == len(live) - eager_steps  # every step after the hand-over a program's
    assert rows_run[0] == 32 and all(
        r >= n for r, n in zip(rows_run, live[eager_steps:], strict=True)
    )
    assert rows_run == sorted(rows_run, reverse=True) and rows_run[-1] < 32  # then smaller ones
    # A source without a token leaves first (its limit is 50), on the eager step's formula, which
    # covers it; the hand-over comes after, once. While such a source is in the batch, none comes.
    src[3] = model.config.pad_id
    cache = engine.new_cache(max_beams=1, max_len=80, sentences=40)
    taken = []
    take_over = type(cache).take_over
    monkeypatch.setattr(
        type(cache), "take_over", lambda c, *a: taken.append(take_over(c, *a)) or taken[-1]
    )
    rows_run.clear()
    assert_same_greedy(engine, reference, src)
    # Once a search (with scores, then without), with 32 sentences left.
    assert taken == [True, True] and rows_run[0] == 32
    cache.fallback.n_sentences, cache.fallback.has_empty_source = 3, True
    assert not cache.take_over(4) and cache.fallback is not None and cache.self_kv is None


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_programs_of_32_rows_take_onednns_products_but_small_ones_on_avx2(monkeypatch, capability):
    """Inductor's products are measured alone, where they won at 32 rows; inside the step they lost
    there (benchmarks/README.md, session 21), except on AVX2 for small weights, where oneDNN's setup
    of each call costs more (session 27): those are chosen by size. Nothing is compiled here: the
    options are recorded."""
    made = {}

    def export_and_package(module, arguments, dynamic_shapes, path, options, own_products_up_to):
        made[arguments[0].size(0)] = options, own_products_up_to

    monkeypatch.setattr(aoti, "export_and_package", export_and_package)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    step = CompiledEngine(random_model()).greedy_step
    for rows in (1, 5, 8, 16, 32):
        step_programs.compile_package(step, (torch.zeros(rows, dtype=torch.long),), Path("-"))
    assert "CPP" in aoti.INDUCTOR_OPTIONS["max_autotune_gemm_backends"]
    assert all(made[rows] == (aoti.INDUCTOR_OPTIONS, None) for rows in (1, 5, 8, 16))
    libraries_only = dict(aoti.INDUCTOR_OPTIONS, max_autotune_gemm_backends="ATEN")
    if capability == "AVX2":
        assert made[32] == (aoti.INDUCTOR_OPTIONS, aoti.OWN_PRODUCTS_UP_TO)
    else:
        assert made[32] == (libraries_only, None)
    assert aoti.options_for() == aoti.INDUCTOR_OPTIONS  # one sentence's encoder
    assert aoti.library_options() == libraries_only  # the beam program of many sentences


class TwoProjections(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.Linear(48, 40)  # 1,920 weights
        self.large = nn.Linear(40, 300)  # 12,000 weights

    def forward(self, x):
        return self.large(torch.relu(self.small(x)))


def test_products_are_inductors_or_onednns_by_the_size_of_their_weight(tmp_path):
    """`own_products_up_to`: between the two weights' sizes, the small weight's product is
    Inductor's C++ and the large one's oneDNN's (the program calls the library once); above both,
    both are Inductor's. The module's results either way, and every constant has a name of its own
    (`inductor_hooks.constants_known_apart`), Inductor's packed weights too. Where PyTorch has no
    hook to choose them by (2.8), the products are as Inductor chooses, and the results the same."""
    by_weight = inductor_hooks.chooses_products_by_weight()
    # From the PyTorch the install steps pin (2.13) on, the hook is there: lost, it would cost speed
    # without a word.
    assert by_weight or torch_older_than((2, 13)) is not None
    torch.manual_seed(0)
    module, x = TwoProjections().eval(), torch.randn(32, 48)
    with torch.inference_mode():
        expected = module(x)
        for own_up_to, library_calls in ((4000, 1), (20000, 0)):
            path = tmp_path / f"two-{own_up_to}.pt2"
            aoti.export_and_package(
                module, (x,), {"x": None}, path, aoti.INDUCTOR_OPTIONS, own_up_to
            )
            with zipfile.ZipFile(path) as package:
                wrapper = [n for n in package.namelist() if n.endswith(".wrapper.cpp")]
                code = package.read(wrapper[0]).decode()
            if by_weight:
                assert code.count("aoti_torch_cpu__linear_pointwise(") == library_calls, own_up_to
            assert "aot_inductor.package" not in aoti.INDUCTOR_OPTIONS  # not changed by PyTorch
            torch.testing.assert_close(aoti.load_package(path)(x)[0], expected)
            runner, _ = aoti.aligned_runner(path)
            if runner is not None:
                names = runner.get_constant_names_to_original_fqns()
                assert len(set(names.values())) == len(names)


def test_a_product_of_any_number_of_rows_is_onednns_packed_where_inductor_packs_it(tmp_path):
    """`inductor_hooks.packs_products_of_any_rows` says what this PyTorch's Inductor does with a
    product whose rows are a dynamic dimension (the beam program of many sentences): oneDNN's packed
    product (2.9 on), or MKL's `addmm` (2.8), where the beam program takes qkv's products instead
    (`packed_linear.serves`). The module's results either way."""
    torch.manual_seed(0)
    linear, x = nn.Linear(48, 40).eval(), torch.randn(10, 48)
    rows = torch.export.Dim("rows", min=1, max=1 << 16)
    path = tmp_path / "any-rows.pt2"
    with torch.inference_mode():
        aoti.export_and_package(linear, (x,), {"input": {0: rows}}, path, aoti.library_options())
        from test_beam_program import c_calls  # which imports this module

        packed = c_calls("aoti_torch_cpu__linear_pointwise", path)
        assert packed == int(inductor_hooks.packs_products_of_any_rows()), torch.__version__
        other = torch.randn(7, 48)
        torch.testing.assert_close(aoti.load_package(path)(other)[0], linear(other))


def test_split_index_compiled_is_floor_division_and_remainder():
    """`topk.split_index` inside a compiled program gives Python's // and % of indices, as eagerly:
    PyTorch 2.8's Inductor got int64 floor division and % wrong on AVX2 (3 // 10 gave -1)."""
    index = torch.tensor([[3, 14, 25, 31, 47, 8, 12, 20, 33, 41, 0, 9, 10]])
    quotient, remainder = torch.compile(topk_module.split_index, fullgraph=True)(index, 10)
    assert quotient.tolist() == [[i // 10 for i in index[0].tolist()]]
    assert remainder.tolist() == [[i % 10 for i in index[0].tolist()]]


def test_options_this_pytorch_does_not_know_are_left_out_of_a_copy():
    options = dict(aoti.INDUCTOR_OPTIONS, **{"no_such_option": 1, "cpp.no_such_option": 2})
    known = inductor_hooks.options_known_here(options)
    assert known.items() <= options.items() and known is not options
    assert "no_such_option" not in known and "cpp.no_such_option" not in known
    # Those every PyTorch that compiles the step has (2.8 lacks `max_autotune_report_choices_stats`)
    for name in ("freezing", "max_autotune", "max_autotune_gemm_backends", "cpp.min_chunk_size"):
        assert known[name] == options[name]


def test_without_measuring_every_program_takes_onednns_products_and_another_key(monkeypatch):
    model = random_model()
    measured = CompiledEngine(model).package_path(5)
    monkeypatch.setenv(aoti.AUTOTUNE_VARIABLE, "0")
    libraries_only = dict(aoti.INDUCTOR_OPTIONS, max_autotune_gemm_backends="ATEN")
    assert all(aoti.options_for(rows) == libraries_only for rows in (None, 1, 5, 16, 32))
    # A program compiled the other way is not loaded for this one.
    assert CompiledEngine(model).package_path(5) != measured
    monkeypatch.setenv(aoti.AUTOTUNE_VARIABLE, "yes")
    with pytest.raises(QkvError, match="QKV_COMPILE_AUTOTUNE must be 0 or 1, got 'yes'"):
        CompiledEngine(model)


def test_a_package_is_compiled_in_inference_mode_whatever_the_callers(tmp_path, monkeypatch):
    """Outside inference mode Inductor's freezing left the weights unfolded and the products on
    MKL's plain addmm, not oneDNN's packed ones (benchmarks/README.md, session 22)."""
    modes = []

    def compile_and_package(exported, package_path, inductor_configs):
        modes.append(torch.is_inference_mode_enabled())
        Path(package_path).write_bytes(b"program")
        return package_path

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", compile_and_package)
    assert not torch.is_inference_mode_enabled()
    aoti.package(None, tmp_path / "outside.pt2", aoti.options_for())
    with torch.inference_mode():
        aoti.package(None, tmp_path / "inside.pt2", aoti.options_for())
    assert modes == [True, True]
    assert (tmp_path / "outside.pt2").read_bytes() == b"program"


def test_a_programs_key_covers_all_the_code_it_is_traced_from(tmp_path, monkeypatch):
    model = random_model(seed=1)
    engine = CompiledEngine(model)
    step, encoder = engine.static_step, compiled_encoder.StaticEncoder(model)
    for module in (step, encoder, engine.beam_programs.step):
        files = set(aoti.code_files(module))
        # the attention both programs call, the model's layers and embeddings, and their own files
        assert inspect.getfile(engine_module.attention_with_bias) in files
        assert inspect.getfile(topk_module.row_topk) in files  # the decoder step's candidates
        assert inspect.getfile(type(model.decoder.layers[0])) in files
        assert inspect.getfile(type(model.tgt_embed)) in files
        assert inspect.getfile(type(module)) in files
        assert inspect.getfile(BeamCache) in files  # the beam step reads its buffers as they are
        assert inductor_hooks.__file__ in files  # how it is compiled
    # Another version of any of those files: another key, so no program of the old code is loaded.
    copies = []
    for i, file in enumerate(aoti.code_files(step)):
        copies.append(tmp_path / f"{i}.py")
        copies[-1].write_text(Path(file).read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(aoti, "code_files", lambda module: copies)
    before = aoti.program_key(step)
    with copies[0].open("a", encoding="utf-8") as file:
        file.write("# changed\n")
    assert aoti.program_key(step) != before


def test_a_programs_key_follows_every_weight_each_hashed_once_an_engine(monkeypatch):
    model = random_model(seed=5)
    engine = CompiledEngine(model)
    hashed = []
    digest_of = digests_module._digest_of
    monkeypatch.setattr(
        digests_module, "_digest_of", lambda tensor: hashed.append(tensor) or digest_of(tensor)
    )
    keys = [engine.source.key, engine.package_path(5), engine.beam_programs.package_path(5)]
    # the encoder's, the step's and the beam step's programs: each of the model's weights hashed
    # once among them (the output projection and its tied embedding one tensor)
    assert len({id(t) for t in hashed}) == len(hashed) and len(set(keys)) == 3
    assert {id(p) for p in model.parameters()} <= {id(t) for t in hashed}
    changes = [  # another value of a weight of each kind: other keys
        "src_embed.embedding.weight",
        "tgt_embed.embedding.weight",
        "encoder.layers.1.feed_forward.linear2.bias",
        "decoder.layers.0.cross_attn.k_proj.weight",
        "decoder.layers.1.norm3.bias",
    ]
    for name in changes:
        other = random_model(seed=5)
        with torch.no_grad():
            dict(other.named_parameters())[name].view(-1)[-1] += 1
        changed = CompiledEngine(other)
        assert changed.source.key != keys[0] and changed.package_path(5) != keys[1], name


def test_programs_no_process_loaded_for_a_month_go_when_a_new_one_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(aoti, "load_package", lambda path: f"the program of {path.name}")
    month_ago = time.time() - (aoti.UNUSED_DAYS + 1) * 86400
    names = ("unused.pt2", "recent.pt2", "loaded.pt2", "notes.txt")
    unused, recent, loaded, notes = (tmp_path / name for name in names)
    for file in (unused, recent, loaded, notes):
        file.write_bytes(b"kept")
    for file in (unused, loaded, notes):
        os.utime(file, (month_ago, month_ago))
    # loading a kept program: used now
    assert aoti.load_or_compile(loaded, None, "a program") == "the program of loaded.pt2"
    assert loaded.stat().st_mtime > month_ago + 86400
    assert unused.exists()  # nothing compiled: nothing deleted
    # compiling a new one: the programs no process loaded for a month go, nothing else
    new = tmp_path / "new.pt2"
    aoti.load_or_compile(new, lambda path: path.write_bytes(b"made"), "a program")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["new.pt2", *names[1:]])


def assert_same_beams(engine, reference, src, **options):
    ids, scores = beam_search(engine, src, **options)
    ref_ids, ref_scores = beam_search(reference, src, **options)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)


def test_one_sentence_is_encoded_by_a_program_that_also_projects_it_for_the_first_step(
    quick_compile, compile_cache, monkeypatch
):
    model = random_model(seed=4)
    engine, reference = CompiledEngine(model), prepare_for_decoding(model)
    engine.program = lambda arguments, kind=BEAMS: engine.step_module(kind)  # the encoder only
    src = random_sources([9])
    memory, src_mask = engine.encode(src)
    ref_memory, ref_mask = reference.encode(src)
    assert engine.unavailable is None, engine.unavailable
    assert [p.name for p in compile_cache.iterdir()] == [engine.source.package_path.name]
    # What AOTInductor wrote in Inductor's cache folder for it (its C++, its library with the
    # weights) is in the package, and gone from there
    with zipfile.ZipFile(engine.source.package_path) as package:
        names = {Path(name).name for name in package.namelist() if "/aotinductor/" in name}
    assert any(name.endswith(".so") for name in names)
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir

    left = [f.name for f in Path(inductor_cache_dir()).rglob("*") if f.name in names]
    assert left == []
    torch.testing.assert_close(memory, ref_memory, rtol=0, atol=1e-5)
    assert torch.equal(src_mask, ref_mask)
    # The program's own projection of the memory it returned, once; of any other, the product.
    projected = engine.source.cross_kv(memory)
    torch.testing.assert_close(projected, engine.source.projection(ref_memory), rtol=0, atol=1e-5)
    assert engine.source.cross_kv(memory) is not projected
    # One token, padding after the source, the longest source the model has positions for.
    padded = random_sources([6, 3], seed=1)[1:]  # (1, 6): 3 tokens, then 3 pads
    for one in (src, random_sources([1]), padded, random_sources([model.config.max_len], seed=2)):
        assert engine.source.takes(one)
        assert_same_greedy(engine, reference, one, max_len=12)
        assert_same_beams(engine, reference, one, beam_size=3, max_len=12, n_best=3)
    assert engine.unavailable is None and len(list(compile_cache.iterdir())) == 1
    # A source of padding only, one longer than the positions, two sentences where many
    # sentences' encoder is not compiled: the eager encoder.
    too_long = random_sources([model.config.max_len + 1])
    engine.source.batches = False
    assert not any(engine.source.takes(s) for s in (src.repeat(2, 1), src * 0, too_long))
    monkeypatch.setattr(engine.source, "program", None)  # a call would fail
    monkeypatch.setattr(compiled_encoder, "compile_encoder", None)
    monkeypatch.setattr(compiled_encoder, "compile_batch_encoder", None)
    assert_same_greedy(engine, reference, random_sources([5, 7]), max_len=8)
    assert_same_greedy(engine, reference, src * 0, max_len=8)
    assert engine.unavailable is None
    # A new engine of the same weights loads the program: nothing is compiled again.
    again = CompiledEngine(model)
    again.program = lambda arguments, kind=BEAMS: again.step_module(kind)  # the encoder only
    assert_same_greedy(again, reference, random_sources([4], seed=5), max_len=10)
    assert again.source.program is not None and again.unavailable is None
    assert len(list(compile_cache.iterdir())) == 1


def test_many_sentences_are_encoded_by_a_program_of_their_own(quick_compile, compile_cache):
    """Any number of sentences of any length, padded, through one program whose products are
    oneDNN's (compiled once, loaded by the next engine); a batch with a source of padding only, or
    one longer than the positions, takes the eager encoder; so does every batch where beams on
    many sentences are not compiled."""
    model = random_model(seed=6)
    engine, reference = CompiledEngine(model), prepare_for_decoding(model)
    engine.source.batches = True  # whatever the CPU
    engine.program = lambda arguments, kind=BEAMS: engine.step_module(kind)  # the encoder only
    engine.beam_programs.program = lambda arguments: engine.beam_programs.step
    batches = [random_sources([5, 8, 3], seed=1), random_sources([2] * 2), random_sources([9] * 40)]
    for src in batches:
        assert engine.source.takes(src)
        memory, src_mask = engine.encode(src)
        ref_memory, ref_mask = reference.encode(src)
        torch.testing.assert_close(memory, ref_memory, rtol=0, atol=1e-5)
        assert torch.equal(src_mask, ref_mask)
    assert engine.unavailable is None and engine.source.unavailable is None
    assert [p.name for p in compile_cache.iterdir()] == [engine.source.batch_package_path.name]
    assert engine.source.program is None  # one sentence's was not needed
    assert_same_greedy(engine, reference, batches[0], max_len=10)
    assert_same_beams(engine, reference, batches[0], beam_size=3, max_len=10, n_best=2)
    # The next engine loads it; a source of padding only, or too long: the eager encoder.
    again = CompiledEngine(model)
    again.source.batches = True
    with_padding_only = torch.cat([batches[0], batches[0][:1] * 0])
    too_long = random_sources([4, model.config.max_len + 1])
    assert not again.source.takes(with_padding_only) and not again.source.takes(too_long)
    assert_same_greedy(again, reference, with_padding_only, max_len=8)
    assert again.source.batch_program is None
    torch.testing.assert_close(again.encode(batches[1])[0], reference.encode(batches[1])[0])
    assert again.source.batch_program is not None
    assert len(list(compile_cache.iterdir())) == 1
    again.source.batches = False  # as on a CPU outside `buckets.WIDE_VECTORS`
    assert not again.source.takes(batches[0]) and again.source.takes(batches[0][:1])


def test_a_failed_encoder_compile_says_so_once_and_the_encoder_is_eager_from_then_on(monkeypatch):
    def broken_compile(encoder, src_ids, path):
        raise RuntimeError("InductorError: no such compiler flag (as on an unusual platform)")

    monkeypatch.setattr(compiled_encoder, "compile_encoder", broken_compile)
    messages, programs = [], []
    model = random_model()
    engine, reference = CompiledEngine(model, warn=messages.append), prepare_for_decoding(model)
    # The decoder's programs, run eagerly here: only asked for
    engine.program = lambda arguments, kind=BEAMS: programs.append(kind) or engine.step_module(kind)
    src = random_sources([6])
    assert_same_greedy(engine, reference, src, max_len=10)  # the search that met the failure
    assert_same_beams(engine, reference, src, beam_size=2, max_len=10)  # later ones: eager
    assert len(messages) == 1 and "could not compile the encoder" in messages[0], messages
    assert "RuntimeError: InductorError: no such compiler flag" in messages[0]
    # The decoder step is still the compiled engine's: only the encoder is eager. (Greedy with
    # scores on one row takes GREEDY_EVERY_LOGIT where the one-row program screens.)
    assert engine.unavailable is None and set(programs) - {GREEDY_EVERY_LOGIT} == {BEAMS, GREEDY}


def test_a_beam_of_five_through_inductors_own_products_gives_the_eager_beams(monkeypatch):
    """Five beams of one sentence, five rows, every product Inductor's C++ (on AVX2 from register
    blocks of 5 rows): `qkv translate --compile` measures them against oneDNN's and takes the faster;
    here they are the only choice, so nothing is measured (a few seconds to compile). A vocabulary of
    4800 words: the program finds each row's candidates in chunks (`topk.row_topk`; not with qkv's
    operator, which tests/test_native.py tests)."""
    options = dict(aoti.INDUCTOR_OPTIONS, max_autotune_gemm_backends="CPP")
    monkeypatch.setattr(aoti, "INDUCTOR_OPTIONS", options)
    monkeypatch.setattr(CompiledEngine, "NATIVE_CANDIDATES", False)
    monkeypatch.setattr(packed_linear, "FEW_ROWS_ON", ())  # not qkv's products, on AVX-512 either
    model = random_model(seed=3, tgt_vocab_size=4800)
    candidates = CompiledEngine(model).static_step.candidates
    assert candidates == 2 * buckets.MAX_ROWS  # 2 x beam
    assert topk_module._topk_chunk(4800, candidates) is not None
    engine, reference = CompiledEngine(model), prepare_for_decoding(model)
    encoder_uncompiled(engine)  # the encoders' products are not Inductor's only
    src = random_sources([9])
    ids, scores = beam_search(engine, src, beam_size=5, max_len=12, n_best=5)
    ref_ids, ref_scores = beam_search(reference, src, beam_size=5, max_len=12, n_best=5)
    assert engine.compiled_rows == {5} and engine.unavailable is None
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)
    # Every constant has a name of its own, Inductor's packed weights too (two shared one as
    # Inductor names them: `inductor_hooks.constants_known_apart`), so all can be moved to cache
    # lines.
    # Loaded again with every constant taken for misaligned (aoti.aligned_runner): all are copies,
    # and the beams the same.
    runner, _ = aoti.aligned_runner(engine.package_path(5))
    if runner is None:
        pytest.skip("this PyTorch has no container runner: programs load through its loader")
    names = runner.get_constant_names_to_original_fqns()
    assert names and len(set(names.values())) == len(names)
    monkeypatch.setattr(aoti, "CACHE_LINE", 2**62)
    again = CompiledEngine(model)
    encoder_uncompiled(again)
    assert_same_beams(again, reference, src, beam_size=5, max_len=12, n_best=5)
    moved = again.programs[5, False].constants
    assert moved is not None and len(moved) == len(names)
    assert all(aoti._address(t) % 64 == 0 for t in moved.values())


def test_five_row_blocks_are_offered_while_a_step_compiles_and_only_then():
    import torch._inductor.select_algorithm  # Inductor's import order: before cpp_micro_gemm
    from torch._inductor.codegen import cpp_micro_gemm
    from torch._inductor.cpu_vec_isa import VecAVX2

    blocks = cpp_micro_gemm.micro_gemm_configs[cpp_micro_gemm.CppMicroGemmFP32Vec]
    before = list(blocks)
    with inductor_hooks.five_row_blocks_on_avx2():
        added = blocks[len(before) :]
        assert [tuple(block.register_blocking) for block in added] == [(5, 16, 1)]
        assert added[0].vec_isa_cls is VecAVX2 and added[0].input_dtype == torch.float
    assert blocks == before


def test_without_a_compiler_it_says_so_once_and_decodes_as_the_eager_engine(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    messages = []
    model = random_model()
    engine = CompiledEngine(model, warn=messages.append)
    assert isinstance(engine.new_cache(max_beams=1, max_len=10, sentences=1), BeamCache)
    src = random_sources([6])
    assert_same_greedy(engine, prepare_for_decoding(model), src, max_len=10)
    assert len(messages) == 1 and "C++ compiler" in messages[0], messages


def broken_compile(step, arguments, path):
    """A compile that fails as Inductor does on an unusual platform."""
    raise RuntimeError("InductorError: no such compiler flag (as on an unusual platform)")


def test_a_failed_compile_says_so_once_and_runs_the_same_step_uncompiled(monkeypatch):
    monkeypatch.setattr(step_programs, "compile_package", broken_compile)
    messages = []
    model = random_model()
    engine, reference = CompiledEngine(model, warn=messages.append), prepare_for_decoding(model)
    encoder_uncompiled(engine)  # the decoder step's failure only
    src = random_sources([6, 4])
    assert_same_greedy(engine, reference, src, max_len=10)  # the search that met the failure
    assert_same_greedy(engine, reference, src, max_len=10)  # later ones: the eager engine
    assert len(messages) == 1 and "could not compile the decoder step" in messages[0], messages
    assert "RuntimeError: InductorError: no such compiler flag" in messages[0]
    assert isinstance(engine.new_cache(max_beams=1, max_len=10, sentences=1), BeamCache)


class CppCompileError(RuntimeError):
    """Inductor's, by name: its first line says only that the compiler failed."""


def crashing_compiler(step, arguments, path):
    """A compile that fails as GCC 12 did on an (emulated) aarch64 with SVE, session 52."""
    header = "/venv/lib/python3.11/site-packages/torch/include/ATen/cpu/vec/sve/vec_float.h"
    raise CppCompileError(
        "C++ compile error\n\nCommand:\ng++ /tmp/torchinductor/kernel.cpp -march=armv8.6-a+sve\n\n"
        f"Output:\nduring GIMPLE pass: lower\nIn file included from {header}:7,\n"
        f"{header}:196:61: internal compiler error: Segmentation fault\n"
        "0x18e9577 internal_error(char const*, ...)\n"
    )


def test_a_failed_cpp_compile_names_the_compilers_own_error(monkeypatch):
    monkeypatch.setattr(step_programs, "compile_package", crashing_compiler)
    messages = []
    model = random_model()
    engine = CompiledEngine(model, warn=messages.append)
    encoder_uncompiled(engine)
    assert_same_greedy(engine, prepare_for_decoding(model), random_sources([5]), max_len=8)
    assert messages == [
        "PyTorch could not compile the decoder step here (CppCompileError: C++ compile error; "
        "vec_float.h:196:61: internal compiler error: Segmentation fault): decoding takes the eager "
        "step"
    ]


def test_a_compiler_that_fails_on_the_encoder_says_so_once_and_tries_nothing_more(monkeypatch):
    """Every program fails to compile, the C++ compiler crashing: the encoder's, the first, says so
    in one line and the whole engine is eager from then on (no second failed compile). Another
    failure of the encoder leaves the decoder's programs compiled (the test above)."""
    compiles = []

    def crash(*arguments, **options):
        compiles.append(arguments[3])  # the package's path
        crashing_compiler(None, None, None)

    monkeypatch.setattr(aoti, "export_and_package", crash)
    messages = []
    model = random_model()
    engine = CompiledEngine(model, warn=messages.append)
    reference = prepare_for_decoding(model)
    for src in (random_sources([5]), random_sources([6, 4])):
        assert_same_greedy(engine, reference, src, max_len=8)
        ids, scores = beam_search(engine, src, beam_size=3, max_len=8)
        ref_ids, ref_scores = beam_search(reference, src, beam_size=3, max_len=8)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-4)
    assert [path.name.split("-")[0] for path in compiles] == ["encoder"], compiles
    assert messages == [
        "PyTorch could not compile the encoder here (CppCompileError: C++ compile error; "
        "vec_float.h:196:61: internal compiler error: Segmentation fault): decoding takes the eager "
        "step"
    ]
    assert engine.source.unavailable == engine.unavailable
    assert engine.sentences_per_program(1) == []


def test_each_program_a_search_can_take_and_the_fewest_sentences_that_take_it(monkeypatch):
    here = torch.backends.cpu.get_cpu_capability()  # beam programs: on wide vectors only
    monkeypatch.setattr(buckets, "WIDE_VECTORS", (*buckets.WIDE_VECTORS, here))
    engine = uncompiled(random_model())  # a small model: its step fits MAX_WEIGHT_BYTES_FOR_ROWS
    # Greedy: 1-5 rows as they are, then rounded up to 8, 16 and 32.
    assert engine.sentences_per_program(1) == [1, 2, 3, 4, 5, 6, 9, 17]
    # Beams: up to 5 rows as they are; more, from 2 sentences, the beam program (beam_program.py).
    assert engine.sentences_per_program(2) == [1, 2, 3]  # 2 and 4 rows; 3 sentences are 6 rows
    assert engine.sentences_per_program(5) == [1, 2]
    assert engine.sentences_per_program(6) == [2]  # one sentence of 6 rows: the eager step
    engine.unavailable = "no compiler here"
    assert engine.sentences_per_program(1) == []


def test_translator_and_cli_compile_translate_as_without(toy_run, run_qkv, monkeypatch, tmp_path):
    """The process and the command compile with the same options (without measuring the products:
    test_products_are_inductors_or_onednns_by_the_size_of_their_weight measures them), into the run
    directory's compiled/ folder: the commands load the programs the process compiled, nothing
    compiled again (tests/test_demo.py's README command compiles, and says so, on stderr)."""
    monkeypatch.setenv(aoti.AUTOTUNE_VARIABLE, "0")  # the commands' too: they inherit it
    # A copy of the run without the programs other tests compiled into it, whatever ran before.
    toy_run = Path(
        shutil.copytree(toy_run, tmp_path / "run", ignore=shutil.ignore_patterns("compiled"))
    )
    lines = ["a b c d", "p o n", "k l m"]
    messages, said = [], []
    translator = qkv.load(toy_run, compile=True, warn=messages.append, say=said.append)
    assert isinstance(translator.engine(), CompiledEngine)
    assert translator.engine().cache_dir == toy_run / "compiled"
    assert translator.translate(lines, beam=1) == qkv.load(toy_run).translate(lines, beam=1)
    assert translator.engine().compiled_rows == {3} and messages == []
    assert said[0] == "compiling the encoder for many sentences (once, ~20-40 s)"
    assert said[1].startswith("compiled in ") and "compiled/encoder-sentences-" in said[1]
    assert said[2] == "compiling the decoder step for 3 rows, greedy (once, ~20-40 s)"
    assert said[3].startswith("compiled in ") and "compiled/decoder-step-3-rows-" in said[3]
    programs = sorted((toy_run / "compiled").iterdir())
    # Three lines, one batch: the programs of three rows and of many sentences' encoder.
    result = run_qkv("translate", toy_run, "--compile", "--beam", "1", input="a b c\nj a\np o n\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "c b a\na j\nn o p\n" and "warning" not in result.stderr
    assert "precision fp32 (auto with --compile" in result.stderr
    assert "compiling" not in result.stderr, result.stderr  # the process's programs, loaded
    assert sorted((toy_run / "compiled").iterdir()) == programs


class Projection(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(48, 40)
        self.register_buffer("scale", torch.linspace(1, 2, 40))  # a second dense constant

    def forward(self, x):
        return torch.relu(self.linear(x)) * self.scale


@pytest.fixture(scope="module")
def projection_package(tmp_path_factory):
    """A small program, compiled once for the tests that load it: (its path, its input, the
    module's output)."""
    torch.manual_seed(0)
    module, x = Projection().eval(), torch.randn(6, 48)
    path = tmp_path_factory.mktemp("projection") / "projection.pt2"
    with torch.inference_mode():
        aoti.export_and_package(module, (x,), {"x": None}, path, QUICK)
        return path, x, module(x)


@pytest.mark.parametrize("realign", [False, True], ids=["as loaded", "every constant moved"])
def test_a_programs_constants_are_aligned_to_cache_lines_and_give_its_results(
    projection_package, monkeypatch, realign
):
    path, x, expected = projection_package
    if realign:  # no address passes: every constant is copied, as a misaligned block's would be
        monkeypatch.setattr(aoti, "CACHE_LINE", 2**62)
    runner, moved = aoti.aligned_runner(path)
    if runner is None:
        pytest.skip("this PyTorch has no container runner: programs load through its loader")
    if realign:
        assert moved and len(moved) == len(runner.get_constant_names_to_original_fqns())
    constants = runner.extract_constants_map(False)
    assert constants and all(aoti._address(t) % 64 == 0 for t in constants.values())
    if realign:  # the program reads the copies
        assert {aoti._address(t) for t in constants.values()} == {
            aoti._address(t) for t in moved.values()
        }
    with torch.inference_mode():
        (out,) = runner.run([x])
        (loaded,) = aoti.load_package(path)(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)


def _mapping_of(address: int) -> dict[str, str]:
    """The fields of /proc/self/smaps for the mapping that holds `address`."""
    fields, inside = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside:
            fields[head.rstrip(":")] = line.split(":", 1)[1].strip()
    return fields


def test_a_programs_constants_lie_side_by_side_in_one_block_marked_for_huge_pages(
    projection_package,
):
    """Every constant copied, each on a line of its own, into one block that starts on a huge page
    and, where the system gives them (Linux, transparent huge pages not "never"), is marked for
    them; the program reads the copies and gives the module's output."""
    path, x, expected = projection_package
    runner, moved = aoti.aligned_runner(path)
    if runner is None:
        pytest.skip("this PyTorch has no container runner: programs load through its loader")
    if not huge_pages.available():
        assert moved is None or all(aoti._address(t) % 64 == 0 for t in moved.values())
        pytest.skip("no huge pages here: constants are moved only to align them")
    assert len(moved) == len(runner.get_constant_names_to_original_fqns())
    constants = runner.extract_constants_map(False)
    assert {aoti._address(t) for t in constants.values()} == {
        aoti._address(t) for t in moved.values()
    }
    # The dense ones (oneDNN's packed weights are copies in their own layout)
    dense = [t for t in moved.values() if t.layout == torch.strided]
    addresses = sorted(aoti._address(t) for t in dense)
    assert addresses[0] % huge_pages.HUGE_PAGE == 0 and all(a % 64 == 0 for a in addresses)
    nbytes = sum(t.numel() * t.element_size() for t in dense)
    span = addresses[-1] - addresses[0]
    assert len(dense) >= 2 and span < nbytes + 64 * len(dense)  # side by side
    if Path("/proc/self/smaps").exists():
        assert _mapping_of(addresses[0]).get("THPeligible") == "1"
    with torch.inference_mode():
        (out,) = runner.run([x])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
