"""Greedy, sampling and beam search: equal to naive references, batch-invariant, and honest about scores
and lengths."""

import math

import pytest
import torch
import torch.nn.functional as F

from qkv.checkpoint import load_model
from qkv.model import Transformer, TransformerConfig
from qkv.search import (
    beam_search,
    filter_top_k_top_p,
    greedy_search,
    length_penalty_factor,
    sample,
)
from toy_task import pad_rows, reverse

PAD, BOS, EOS = 0, 2, 3


def random_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    settings = dict(src_vocab_size=40, tgt_vocab_size=30, dropout=0.0, max_len=64)
    return Transformer(TransformerConfig.preset("tiny", **{**settings, **overrides})).eval()


def random_sources(lengths, vocab=40, seed=0) -> torch.Tensor:
    """Sources of the given lengths (EOS included), padded: (batch, max(lengths))."""
    generator = torch.Generator().manual_seed(seed)
    rows = [
        [*torch.randint(4, vocab, (n - 1,), generator=generator).tolist(), EOS] for n in lengths
    ]
    return pad_rows(rows, PAD)


@pytest.fixture(scope="module")
def reverser(toy_run):
    """The toy run's model, which reverses letter sequences, and sources for it."""
    from qkv.tokenizer import Tokenizer

    model, _ = load_model(toy_run)
    tokenizer = Tokenizer.load(toy_run)
    sentences = ["a b c d", "p o n", "e", "f g h i j", "c c d"]
    src = pad_rows([[*tokenizer.encode(s), EOS] for s in sentences], PAD)
    return model, tokenizer, src


def strip(ids: torch.Tensor) -> list[int]:
    """The tokens of one output row up to EOS (excluded)."""
    tokens = ids.tolist()
    return tokens[: tokens.index(EOS)] if EOS in tokens else [t for t in tokens if t != PAD]


def sequence_log_prob(model, src_row: torch.Tensor, out_row: torch.Tensor) -> tuple[float, int]:
    """Teacher-forced sum of log-probabilities of one output row (up to and including EOS), and its
    length: the reference every search score must agree with."""
    src = src_row[src_row != PAD][None]
    out = out_row[out_row != PAD]
    tgt_in = torch.cat([torch.tensor([BOS]), out[:-1]])[None]
    with torch.no_grad():
        log_probs = F.log_softmax(model(src, tgt_in).float(), dim=-1)[0]
    return log_probs.gather(1, out[:, None]).sum().item(), len(out)


def naive_greedy(model, src_row: torch.Tensor, max_len: int) -> list[int]:
    """Greedy decoding by a full forward pass over the whole prefix at every step, no cache."""
    src = src_row[src_row != PAD][None]
    out = [BOS]
    with torch.no_grad():
        for _ in range(max_len):
            logits = model(src, torch.tensor([out]))[0, -1]
            logits[[PAD, BOS]] = -math.inf
            out.append(int(logits.argmax()))
            if out[-1] == EOS:
                break
    return out[1:]


def test_the_reverser_reverses(reverser):
    """The fixture the other tests lean on has learned its task (it is right 99% of the time)."""
    model, tokenizer, _ = reverser
    sentences = ["a b c d", "p o n", "e", "f g h i j", "a b", "k l m n o", "h g f e d", "j a"]
    src = pad_rows([[*tokenizer.encode(s), EOS] for s in sentences], PAD)
    ids, _ = beam_search(model, src, beam_size=4)
    outputs = [tokenizer.decode(row[0].tolist()) for row in ids]
    assert sum(out == reverse(s) for out, s in zip(outputs, sentences, strict=True)) >= 6


def naive_beam(
    model, src_row, beam_size, max_len, min_len=0, n_best=1, style="gnmt", early_exit=False
):
    """Beam search as a textbook writes it, for one sentence, with a full forward pass per hypothesis and
    step: every extension of every live hypothesis competes; of the best 2 x beam_size, those among the
    best beam_size that end (EOS, or max_len reached) are finished, and the best beam_size that do not
    end live on (early_exit: until the best candidate of a step ends with n_best finished). Returns
    the n_best finished hypotheses, best first: [(score, tokens)]."""
    src = src_row[src_row != PAD][None]
    live, finished = [(0.0, [])], []
    with torch.no_grad():
        for length in range(1, max_len + 1):
            candidates = []
            for score, tokens in live:
                logits = model(src, torch.tensor([[BOS, *tokens]]))[0, -1]
                log_probs = F.log_softmax(logits.float(), dim=-1)
                log_probs[[PAD, BOS]] = -math.inf
                if length <= min_len:
                    log_probs[EOS] = -math.inf
                candidates += [
                    (score + lp, [*tokens, token])
                    for token, lp in enumerate(log_probs.tolist())
                    if lp > -math.inf
                ]
            candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * beam_size]
            for score, tokens in candidates[:beam_size]:
                if tokens[-1] == EOS or length == max_len:
                    penalty = length_penalty_factor(length, 0.6, style)
                    finished.append((score / penalty, tokens))
            live = [c for c in candidates if c[1][-1] != EOS][:beam_size]
            if early_exit and candidates[0][1][-1] == EOS and len(finished) >= n_best:
                break
    return sorted(finished, key=lambda c: -c[0])[:n_best]


@pytest.mark.parametrize("which", ["random", "trained"])
def test_cached_greedy_equals_naive_full_forward_loop(which, reverser):
    model, src = (
        (random_model(), random_sources([5, 9, 3, 7])) if which == "random" else reverser[::2]
    )
    ids, scores = greedy_search(model, src, max_len=12)
    for row in range(src.size(0)):
        expected = naive_greedy(model, src[row], max_len=12)
        got = [t for t in ids[row].tolist() if t != PAD]
        assert got == expected
        log_prob, _ = sequence_log_prob(model, src[row], ids[row])
        assert scores[row].item() == pytest.approx(log_prob, abs=1e-4)


@pytest.mark.parametrize("min_len", [0, 12], ids=["eos allowed", "eos held back"])
@pytest.mark.parametrize("which", ["random", "trained"])
def test_greedy_without_scores_computes_none_and_finds_the_same_ids(
    which, min_len, reverser, monkeypatch
):
    model, src = (
        (random_model(), random_sources([5, 9, 3, 7])) if which == "random" else reverser[::2]
    )
    ids, _ = greedy_search(model, src, max_len=12, min_len=min_len)
    without_ids, none = greedy_search(model, src, max_len=12, min_len=min_len, scores=False)
    assert none is None and torch.equal(without_ids, ids)
    if min_len:  # EOS banned until then: the best logit's token is never EOS
        assert (without_ids[:, :min_len] != EOS).all()

    def no_softmax(*args, **kwargs):
        raise AssertionError("greedy search without scores computed a softmax")

    monkeypatch.setattr(torch, "log_softmax", no_softmax)
    assert torch.equal(greedy_search(model, src, 12, min_len, scores=False)[0], ids)


@pytest.mark.parametrize("which", ["random", "trained"])
def test_beam_of_one_equals_greedy(which, reverser):
    model, src = (
        (random_model(), random_sources([5, 9, 3, 7])) if which == "random" else reverser[::2]
    )
    greedy_ids, greedy_scores = greedy_search(model, src, max_len=15)
    beam_ids, beam_scores = beam_search(model, src, beam_size=1, length_penalty=0.0, max_len=15)
    assert torch.equal(beam_ids[:, 0], greedy_ids)
    torch.testing.assert_close(beam_scores[:, 0], greedy_scores)


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_a_batch_equals_its_sentences_one_by_one(search, reverser):
    model, src = random_model(seed=3), random_sources([4, 11, 2, 8, 6], seed=3)
    run = {
        "greedy": lambda s: greedy_search(model, s, max_len=20),
        "beam": lambda s: beam_search(model, s, beam_size=4, n_best=3, max_len=20),
    }[search]
    batch_ids, batch_scores = run(src)
    for row in range(src.size(0)):
        alone = src[row : row + 1, : int((src[row] != PAD).sum())]
        ids, scores = run(alone)
        width = ids.size(-1)
        assert torch.equal(batch_ids[row, ..., :width], ids[0])
        assert (batch_ids[row, ..., width:] == PAD).all()
        torch.testing.assert_close(batch_scores[row], scores[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("style", ["gnmt", "fairseq"])
@pytest.mark.parametrize("which", ["random", "trained"])
def test_beam_scores_are_the_models_log_probs_over_the_length_penalty(style, which, reverser):
    """Checks that the cache follows the beams: a misplaced row would score other ids than returned."""
    model, src = (
        (random_model(), random_sources([5, 9, 3, 7])) if which == "random" else reverser[::2]
    )
    ids, scores = beam_search(model, src, beam_size=5, n_best=5, length_penalty_style=style)
    for row in range(src.size(0)):
        for rank in range(5):
            log_prob, length = sequence_log_prob(model, src[row], ids[row, rank])
            expected = log_prob / length_penalty_factor(length, 0.6, style)
            assert scores[row, rank].item() == pytest.approx(expected, abs=1e-4)


def test_beam_search_with_the_chunked_top_k_equals_torch_topk(monkeypatch):
    """With 5 beams of a 1000-word vocabulary a step takes `qkv.inference.topk`'s chunked path."""
    from qkv.inference import topk as topk_module

    model, src = random_model(tgt_vocab_size=1000), random_sources([5, 9, 3, 7])
    assert topk_module._topk_chunk(1000, 10, 5) is not None
    chunked = beam_search(model, src, beam_size=5, n_best=5)
    monkeypatch.setattr(topk_module, "_topk_chunk", lambda *args: None)
    plain = beam_search(model, src, beam_size=5, n_best=5)
    assert torch.equal(chunked[0], plain[0])
    assert torch.equal(chunked[1], plain[1])


@pytest.mark.parametrize(
    "beam_size, n_best, min_len, vocab, style",
    [
        (5, 1, 0, 30, "gnmt"),
        (4, 4, 2, 30, "fairseq"),
        (2, 2, 0, 30, "gnmt"),
        (5, 3, 0, 1000, "gnmt"),  # chunked top-k
        (5, 2, 0, 8, "gnmt"),  # fewer words than 2 x beam_size: the first step is padded to beams
    ],
)
def test_beam_search_equals_a_textbook_beam_search(beam_size, n_best, min_len, vocab, style):
    """The batched search (shared cache, one row per sentence at the first step, finished sentences
    leaving the batch) finds exactly the hypotheses of the plain algorithm, with their scores."""
    model = random_model(seed=5, tgt_vocab_size=vocab)
    src = random_sources([5, 9, 3, 7], seed=5)
    ids, scores = beam_search(
        model, src, beam_size, min_len=min_len, max_len=6, n_best=n_best, length_penalty_style=style
    )
    for row in range(src.size(0)):
        expected = naive_beam(model, src[row], beam_size, 6, min_len, n_best, style)
        assert [[t for t in hyp.tolist() if t != PAD] for hyp in ids[row]] == [
            tokens for _, tokens in expected
        ]
        assert scores[row].tolist() == pytest.approx([score for score, _ in expected], abs=1e-4)


@pytest.mark.parametrize("n_best", [1, 3])
def test_early_exit_equals_a_textbook_search_that_stops_when_its_best_candidate_ends(
    n_best, monkeypatch
):
    from qkv.inference import prepare_for_decoding

    model = random_model(seed=2, tgt_vocab_size=8)
    with torch.no_grad():  # EOS's logits scaled up: it comes first at different steps
        model.output.weight[EOS] *= 3
    src = random_sources([5, 9, 3, 7], seed=2)
    engine = prepare_for_decoding(model)
    rows = {True: 0, False: 0}  # decoder rows computed, over all steps
    for early_exit in (True, False):
        step = engine.step

        def counting_step(last_tokens, *args, step=step, early_exit=early_exit, **kwargs):
            rows[early_exit] += last_tokens.size(0)
            return step(last_tokens, *args, **kwargs)

        monkeypatch.setattr(engine, "step", counting_step)
        ids, scores = beam_search(engine, src, 5, max_len=40, n_best=n_best, early_exit=early_exit)
        monkeypatch.undo()
        for row in range(src.size(0)):
            expected = naive_beam(model, src[row], 5, 40, n_best=n_best, early_exit=early_exit)
            assert [[t for t in hyp.tolist() if t != PAD] for hyp in ids[row]] == [
                tokens for _, tokens in expected
            ]
            assert scores[row].tolist() == pytest.approx([score for score, _ in expected], abs=1e-4)
    assert rows[True] < rows[False], rows  # sentences left the batch sooner


@pytest.mark.parametrize("which", ["random", "trained"])
def test_beam_finds_at_least_greedys_score(which, reverser):
    model, src = (
        (random_model(), random_sources([5, 9, 3, 7, 4, 6])) if which == "random" else reverser[::2]
    )
    greedy_ids, _ = greedy_search(model, src)
    _, beam_scores = beam_search(model, src, beam_size=5)
    for row in range(src.size(0)):
        log_prob, length = sequence_log_prob(model, src[row], greedy_ids[row])
        greedy_score = log_prob / length_penalty_factor(length, 0.6, "gnmt")
        assert beam_scores[row, 0].item() >= greedy_score - 1e-5


def test_n_best_is_sorted_best_first_and_distinct(reverser):
    model, _, src = reverser
    ids, scores = beam_search(model, src, beam_size=5, n_best=5)
    assert ids.shape[:2] == scores.shape == (src.size(0), 5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    for row in range(src.size(0)):
        hypotheses = {tuple(strip(ids[row, rank])) for rank in range(5)}
        assert len(hypotheses) == 5


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_min_len_equal_to_max_len_gives_exactly_that_many_tokens(search, reverser):
    model, _, src = reverser  # it wants to stop early: min_len must hold it back
    if search == "greedy":
        ids, _ = greedy_search(model, src, max_len=20, min_len=20)
    else:
        ids = beam_search(model, src, beam_size=3, n_best=3, max_len=20, min_len=20)[0].flatten(
            0, 1
        )
    assert ids.size(-1) == 20
    assert not (ids == EOS).any() and not (ids == PAD).any()


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_min_len_holds_back_eos(search, reverser):
    model, _, src = reverser
    if search == "greedy":
        ids, _ = greedy_search(model, src, min_len=7)
    else:
        ids = beam_search(model, src, beam_size=3, n_best=3, min_len=7)[0].flatten(0, 1)
    for row in ids:
        assert len(strip(row)) >= 7
        assert EOS in row.tolist()  # it does stop once allowed


def test_default_max_len_is_source_length_plus_50_within_the_models_positions():
    model = random_model(max_len=64)
    src = random_sources([3, 10])  # source lengths, EOS included
    ids, _ = greedy_search(model, src, min_len=1000)  # never allowed to stop: runs to max_len
    assert [int((row != PAD).sum()) for row in ids] == [53, 60]
    long_src = random_sources([30])
    ids, _ = beam_search(model, long_src, beam_size=2, min_len=1000)
    assert ids.size(-1) == 64  # 30 + 50 would pass the model's 64 positions


def test_outputs_are_padded_after_eos(reverser):
    model, _, src = reverser
    ids, _ = beam_search(model, src, n_best=2)
    for row in ids.flatten(0, 1).tolist():
        end = row.index(EOS)
        assert all(t == PAD for t in row[end + 1 :])
        assert PAD not in row[:end] and BOS not in row


def test_deterministic(reverser):
    model = random_model(seed=5)
    src = random_sources([6, 3, 9], seed=5)
    first = beam_search(model, src, beam_size=5, n_best=2)
    second = beam_search(model, src, beam_size=5, n_best=2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_finished_sentences_leave_the_batch(reverser, monkeypatch):
    from qkv.inference import prepare_for_decoding

    model, _, src = reverser  # outputs of different lengths: "e" ends long before "f g h i j k"
    rows_per_step = []
    engine = prepare_for_decoding(model)
    step = engine.step

    def counting_step(last_tokens, *args, **kwargs):
        rows_per_step.append(last_tokens.size(0))
        return step(last_tokens, *args, **kwargs)

    monkeypatch.setattr(engine, "step", counting_step)
    beam_search(engine, src, beam_size=4)
    assert rows_per_step[0] == src.size(0)  # the first step: one row per sentence, not per beam
    assert rows_per_step[1] == 4 * src.size(0)
    assert rows_per_step[-1] < rows_per_step[1]


def test_search_leaves_a_training_model_in_training_mode(reverser):
    model = random_model().train()
    greedy_search(model, random_sources([4]))
    assert model.training


def test_bad_arguments_are_rejected():
    model, src = random_model(), random_sources([4])
    with pytest.raises(ValueError, match="length_penalty_style must be one of gnmt, fairseq"):
        beam_search(model, src, length_penalty_style="marian")
    with pytest.raises(ValueError, match="n_best must be between 1 and beam_size=2"):
        beam_search(model, src, beam_size=2, n_best=3)
    # ((5 + len) / 6) ** 1000 raised OverflowError mid-search; NaN ranked hypotheses at random
    for alpha in (1000.0, float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="length penalty must be a number between -10 and 10"):
            beam_search(model, src, length_penalty=alpha)


def test_length_penalty_styles():
    assert length_penalty_factor(7, 0.6, "gnmt") == pytest.approx(2**0.6)
    assert length_penalty_factor(7, 0.6, "fairseq") == pytest.approx(7**0.6)
    assert length_penalty_factor(7, 0.0, "gnmt") == 1.0


def test_sampling_with_top_k_1_is_greedy(reverser):
    model, _, src = reverser
    sampled, sampled_scores = sample(model, src, top_k=1, temperature=0.7)
    greedy, greedy_scores = greedy_search(model, src)
    assert torch.equal(sampled, greedy)
    torch.testing.assert_close(sampled_scores, greedy_scores)


def test_sampling_repeats_with_a_seeded_generator_and_varies_without():
    model, src = random_model(), random_sources([5] * 8)

    def draw(seed):
        return sample(model, src, generator=torch.Generator().manual_seed(seed), max_len=10)[0]

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = filter_top_k_top_p(logits, top_p=0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_top_k_top_p(logits, top_p=0.4).isfinite()  # the most likely token always stays
    assert kept.tolist() == [[True, False, False, False]]
    kept = filter_top_k_top_p(logits, top_k=3, top_p=1.0).isfinite()
    assert kept.tolist() == [[True, True, True, False]]
