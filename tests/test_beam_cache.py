"""qkv.inference.beam_cache: beams that share their sentence's cache decode exactly as beams that run
the reference model over their own whole history."""

import gc
import weakref

import pytest
import torch

from qkv.inference import BeamCache, prepare_for_decoding
from qkv.inference.beam_cache import holes_filled
from qkv.model import Transformer, TransformerConfig
from qkv.search import beam_search, greedy_search
from reference_engine import UncachedEngine
from toy_task import pad_rows

PAD, EOS = 0, 3


def random_model(seed=0, vocab=12) -> Transformer:
    """A small vocabulary, so that EOS comes often and sentences finish at different steps."""
    torch.manual_seed(seed)
    # share_embeddings=False: the weights these tests were written against (TransformerConfig's
    # default shares them when the two vocabularies have one size).
    config = TransformerConfig.preset(
        "tiny",
        src_vocab_size=vocab,
        tgt_vocab_size=vocab,
        dropout=0.0,
        max_len=64,
        share_embeddings=False,
    )
    return Transformer(config).eval()


def random_sources(lengths, vocab=12, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rows = [
        [*torch.randint(4, vocab, (n - 1,), generator=generator).tolist(), EOS] for n in lengths
    ]
    return pad_rows(rows, PAD)


@pytest.mark.parametrize("beam_size,n_best", [(1, 1), (3, 2), (5, 5)])
def test_beam_search_equals_beam_search_without_a_cache(beam_size, n_best):
    model = random_model()
    src = random_sources([5, 9, 2, 7, 12, 3], seed=1)  # different max lengths: sentences leave
    ids, scores = beam_search(model, src, beam_size=beam_size, n_best=n_best)
    plain = UncachedEngine(model)
    plain_ids, plain_scores = beam_search(plain, src, beam_size=beam_size, n_best=n_best)
    assert torch.equal(ids, plain_ids)
    torch.testing.assert_close(scores, plain_scores, rtol=0, atol=1e-5)
    assert (ids == EOS).any()  # the comparison covered hypotheses that finish early


def test_long_outputs_outgrow_the_initial_capacity():
    model = random_model(seed=8)
    src = random_sources([4, 6], seed=8)
    lengths = dict(min_len=45, max_len=45)  # more positions than the cache holds at first (32)
    ids, scores = beam_search(model, src, beam_size=3, **lengths)
    plain_ids, plain_scores = beam_search(UncachedEngine(model), src, beam_size=3, **lengths)
    assert ids.size(-1) == 45 and torch.equal(ids, plain_ids)
    torch.testing.assert_close(scores, plain_scores, rtol=0, atol=1e-5)


def test_greedy_search_equals_greedy_search_without_a_cache():
    model = random_model(seed=2)
    src = random_sources([4, 11, 6, 1], seed=2)
    ids, scores = greedy_search(model, src)
    plain_ids, plain_scores = greedy_search(UncachedEngine(model), src)
    assert torch.equal(ids, plain_ids)
    torch.testing.assert_close(scores, plain_scores, rtol=0, atol=1e-5)


def decode_steps(engine, src, cache, steps, parents):
    """Decode `steps` positions; before step t > 0 reorder the cache with `parents[t]` (old rows)."""
    memory, src_mask = engine.encode(src)
    tokens = torch.full((src.size(0),), 2)  # BOS
    all_logits = []
    for step in range(steps):
        if step > 0:
            rows = parents[step]
            cache.reorder(rows)
            tokens = tokens[rows]
        logits = engine.step(tokens, memory, src_mask, cache)[:, -1]
        all_logits.append(logits)
        tokens = logits.argmax(dim=-1)
    return all_logits


def decode_steps_without_reorder(engine, src, cache, steps):
    return decode_steps(
        engine, src, cache, steps, {t: torch.arange(src.size(0)) for t in range(steps)}
    )


def shared_and_plain(model):
    """The engine over a BeamCache, and the reference: the model over each row's whole history."""
    return prepare_for_decoding(model), UncachedEngine(model)


def test_reordering_growing_and_dropping_sentences_match_a_plain_cache():
    """Beams forking from the same parent, the cache outgrowing its capacity (2 positions at first),
    and a sentence leaving the batch in the middle."""
    model = random_model(seed=3)
    src = random_sources([6, 3, 8], seed=3)
    beams = 3
    parents = {
        1: torch.arange(3).repeat_interleave(beams),  # one row per sentence -> three beams each
        2: torch.tensor([0, 0, 1, 5, 3, 3, 8, 6, 7]),
        3: torch.tensor([2, 1, 0, 3, 3, 3, 6, 7, 8]),
        4: torch.tensor([0, 1, 1, 7, 6, 6]),  # the second sentence leaves
        5: torch.tensor([0, 2, 1, 5, 4, 3]),
        6: torch.tensor([3, 4, 5]),  # the first leaves too
    }
    with torch.inference_mode():
        engine, reference = shared_and_plain(model)
        shared = decode_steps(engine, src, BeamCache(2, max_beams=beams, max_len=2), 7, parents)
        plain = decode_steps(reference, src, reference.new_cache(), 7, parents)
    for step, (a, b) in enumerate(zip(shared, plain, strict=True)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {step}")


def test_sentences_that_fill_the_places_of_those_that_left_match_a_plain_cache():
    """Drops in the order the searches make them (`holes_filled`): the last sentences take the
    places of those that left and move within the cache's buffers; a drop of the last sentence
    moves nothing; any other order (a sentence moved back to an earlier place) is copied."""
    model = random_model(seed=8)
    src = random_sources([5, 3, 7, 4, 6], seed=8)
    parents = {
        1: torch.tensor([0, 4, 2, 3]),  # the second leaves, the last takes its place
        2: torch.tensor([0, 1, 2]),  # the last leaves: nothing moves
        3: torch.tensor([2, 0]),  # another order: a copy
        4: torch.tensor([0, 1]),
    }
    with torch.inference_mode():
        engine, reference = shared_and_plain(model)
        cache = BeamCache(2, max_beams=1, max_len=3)  # outgrown after the drops
        shared = decode_steps(engine, src, cache, 5, parents)
        plain = decode_steps(reference, src, reference.new_cache(), 5, parents)
    for step, (a, b) in enumerate(zip(shared, plain, strict=True)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"step {step}")


def test_a_drop_in_the_searches_order_moves_only_the_sentences_that_fill_a_place():
    model = random_model(seed=9)
    src = random_sources([4, 5, 3, 6], seed=9)
    cache = BeamCache(2, max_beams=1)
    with torch.inference_mode():
        decode_steps_without_reorder(prepare_for_decoding(model), src, cache, 2)
        keys = cache.self_attn[0].key
        before = keys.clone()
        cache.reorder(holes_filled(torch.tensor([True, False, True, True])))  # [0, 3, 2]
        after = cache.self_attn[0].key
        assert after.data_ptr() == keys.data_ptr()  # the same buffer, not a copy
        torch.testing.assert_close(after[:, :, :2], before[[0, 3, 2], :, :2], rtol=0, atol=0)
        cache.reorder(torch.tensor([1, 0]))  # another order: a new buffer
        assert cache.self_attn[0].key.data_ptr() != keys.data_ptr()
        torch.testing.assert_close(
            cache.self_attn[0].key[:, :, :2], before[[3, 0], :, :2], rtol=0, atol=0
        )


def test_every_layer_reads_one_source_mask_selected_once_at_a_drop(monkeypatch):
    model = random_model(seed=10)
    src = random_sources([4, 6, 3, 5], seed=10)  # padded: the bias masks something
    cache = BeamCache(2, max_beams=1)
    built = []
    set_source_mask = BeamCache.set_source_mask
    monkeypatch.setattr(
        BeamCache, "set_source_mask", lambda c, *a: built.append(1) or set_source_mask(c, *a)
    )
    with torch.inference_mode():
        engine = prepare_for_decoding(model)
        decode_steps_without_reorder(engine, src, cache, 2)
        assert len(built) == 1  # at the first step, for both layers
        first, second = cache.cross_attn
        assert first.bias is second.bias and first.mask is second.mask
        cache.reorder(holes_filled(torch.tensor([True, False, True, True])))  # [0, 3, 2]
        assert len(built) == 2  # once for the drop, not once a layer
        real = src[[0, 3, 2]] != PAD
        assert torch.equal(first.mask.view(3, -1), real)
        assert torch.equal(second.bias.view(3, -1) == 0, real)


def test_holes_filled_keeps_the_live_rows_in_place_and_fills_the_rest_from_the_end():
    live = torch.tensor([True, False, True, True, False, True, True])
    assert holes_filled(live).tolist() == [0, 5, 2, 3, 6]
    assert holes_filled(torch.tensor([True, True, False])).tolist() == [0, 1]
    assert holes_filled(torch.tensor([False, False, True])).tolist() == [2]
    assert holes_filled(torch.tensor([True, True])).tolist() == [0, 1]


def test_a_source_without_tokens_gives_no_nan():
    model = random_model(seed=4)
    src = random_sources([4, 6], seed=4)
    src[1] = PAD  # a row that is all padding: cross-attention has nothing to attend to
    with torch.inference_mode():
        engine, reference = shared_and_plain(model)
        shared = decode_steps_without_reorder(engine, src, BeamCache(2, max_beams=1), 3)
        plain = decode_steps_without_reorder(reference, src, reference.new_cache(), 3)
    for a, b in zip(shared, plain, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_one_row_per_sentence_is_the_greedy_case():
    model = random_model(seed=5)
    src = random_sources([3, 7, 5], seed=5)
    with torch.inference_mode():
        engine, reference = shared_and_plain(model)
        shared = decode_steps_without_reorder(engine, src, BeamCache(2, max_beams=1), 5)
        plain = decode_steps_without_reorder(reference, src, reference.new_cache(), 5)
    for a, b in zip(shared, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_reorders_that_break_the_contract_are_refused():
    model = random_model(seed=6)
    src = random_sources([3, 4], seed=6)
    cache = BeamCache(2, max_beams=2)
    with torch.inference_mode():
        decode_steps_without_reorder(prepare_for_decoding(model), src, cache, 1)
        cache.reorder(torch.tensor([0, 0, 1, 1]))  # expand to 2 beams: allowed
        with pytest.raises(ValueError, match="stay together"):
            cache.reorder(torch.tensor([0, 2, 1, 3]))  # rows of two sentences mixed
        with pytest.raises(ValueError, match="max_beams"):
            cache.reorder(torch.tensor([0, 0, 0, 2, 2, 2]))  # three beams each
        with pytest.raises(ValueError, match="not repeat"):
            cache.reorder(torch.tensor([0, 1, 2, 3, 0, 1]))  # the first sentence twice
        with pytest.raises(ValueError, match="row count"):
            cache.reorder(torch.tensor([0, 1]), cross_attention=False)
    with pytest.raises(ValueError, match="max_beams"):
        BeamCache(2, max_beams=0)


def test_a_finished_search_frees_its_cache_at_once():
    """No reference cycle between the cache and its layers: with one, every search's keys and values
    stayed until Python's cyclic collector ran, and a server's memory grew by hundreds of MB."""
    cache = BeamCache(n_layers=2, max_beams=4)
    gone = weakref.ref(cache)
    del cache
    assert gone() is None  # freed by its reference count alone
    engine = prepare_for_decoding(random_model(3))
    src = random_sources([5, 3, 4])
    gc.collect()
    gc.disable()
    try:
        greedy_search(engine, src, max_len=6)
        beam_search(engine, src, beam_size=3, max_len=6)
        assert gc.collect() == 0  # nothing the searches left needed the cyclic collector
    finally:
        gc.enable()
