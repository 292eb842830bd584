"""Greedy search, sampling and batched beam search, on the decoding engine (`qkv.inference`): beam
search in `qkv.beam_search` and what every search shares in `qkv.search_batch`, all three called
from here.

Every function takes a model (`qkv.model.Transformer`, prepared for decoding for that call) or an
engine already prepared (`qkv.inference.prepare_for_decoding`, kept across calls by `Translator`), and
source ids (batch, src_len): subword ids followed by EOS, padded with ``pad_id``;
special ids come from ``model.config``. Outputs are padded with ``pad_id`` after EOS.

Lengths count generated tokens, BOS not included, as Hugging Face's ``max_new_tokens``:

- ``max_len``: a hypothesis ends after this many tokens, EOS included (a hypothesis cut there has no EOS).
  Default: each sentence's own source length (non-pad tokens) + 50, as in the paper (section 6.1); never
  more than the model's ``max_len`` positions.
- ``min_len``: EOS is forbidden until this many tokens have been generated, so with
  ``min_len == max_len == 20`` exactly 20 non-EOS tokens come out.

Scores are the model's own log-probabilities: PAD and BOS, never valid outputs, and EOS before ``min_len``
are removed *after* the softmax, as Hugging Face's logits processors do, so a returned score is what a
teacher-forced forward pass gives for the returned ids.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qkv.beam_search import beam_search
from qkv.inference import DecodingEngine
from qkv.inference.beam_cache import holes_filled
from qkv.length_penalty import length_penalty_factor
from qkv.model import Transformer
from qkv.search_batch import MAX_LEN_MARGIN, Batch, banned_ids, max_lengths, on_engine

__all__ = [
    "MAX_LEN_MARGIN",
    "banned_ids",
    "beam_search",
    "filter_top_k_top_p",
    "greedy_search",
    "length_penalty_factor",
    "max_lengths",
    "sample",
]

# ---------------------------------------------------------------------------------------------------
# One hypothesis per sentence: greedy and sampling


@on_engine
def greedy_search(
    model: Transformer | DecodingEngine,
    src_ids: Tensor,
    max_len: int | None = None,
    min_len: int = 0,
    scores: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The most likely next token at every step.

    src_ids (batch, src_len) -> ids (batch, out_len) padded with pad_id after EOS, and scores (batch,):
    the sum of the log-probabilities of the ids (EOS included; no length penalty). scores=False: the
    same ids and None for the scores, which are then never computed: no softmax over the vocabulary
    at any step (as CTranslate2 without return_scores; ~2% of a step of the small benchmark model).
    """
    return _one_best(model, src_ids, None, max_len, min_len, scores)


@on_engine
def sample(
    model: Transformer | DecodingEngine,
    src_ids: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_len: int | None = None,
    min_len: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw each next token from the model's distribution, for generation tasks rather than translation.

    temperature: divides the logits (< 1 sharper, > 1 flatter); top_k: draw from the k most likely
    tokens only (0: all); top_p: from the smallest set whose probability reaches p (nucleus sampling).
    Returns ids (batch, out_len) and scores (batch,) as `greedy_search`: the sum of the model's own
    (untempered) log-probabilities of the drawn ids. Pass a seeded `generator` to repeat a draw.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature} (use greedy_search)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")

    def choose(log_probs: Tensor) -> Tensor:
        logits = filter_top_k_top_p(log_probs / temperature, top_k, top_p)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)

    return _one_best(model, src_ids, choose, max_len, min_len)


def filter_top_k_top_p(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(rows, vocab) logits with every token outside the top k / the top-p nucleus set to -inf."""
    if 0 < top_k < logits.size(-1):
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach p; the most likely token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def _one_best(
    engine, src_ids, choose, max_len, min_len, with_scores: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Decode one hypothesis per sentence, picking each token with `choose((rows, vocab)) -> (rows,)`,
    or the most likely one if `choose` is None (its scores only `with_scores`)."""
    config = engine.config
    batch = Batch(engine, src_ids, max_len)
    n_sentences = src_ids.size(0)
    tokens = torch.full((n_sentences,), config.bos_id, device=src_ids.device)  # (rows,)
    # Each step's tokens and their sentences (None: every sentence, in order), laid out after the
    # search: right after a compiled step every tensor operation finds its caches cold (10-20 µs
    # each, a tenth of a one-sentence step of the small model; 20-300 µs at the start of a search
    # after another program ran), so the search does as few as it can.
    columns: list[tuple[Tensor | None, Tensor]] = []
    scores = None  # (sentences,) made at the first scores: none without them
    rows = None  # every sentence still decoded, in its own row
    for step in range(batch.longest):
        if choose is None:  # the most likely token, which the engine may find within its step
            tokens, token_log_probs = batch.next_best(tokens, step, min_len, with_scores)  # (rows,)
        else:
            log_probs = batch.next_log_probs(tokens, step, min_len)  # (rows, vocab)
            tokens = choose(log_probs)  # (rows,)
            token_log_probs = log_probs.gather(1, tokens[:, None]).squeeze(1)
        columns.append((rows, tokens))
        if token_log_probs is not None:
            if scores is None:
                scores = torch.zeros(n_sentences, device=src_ids.device)
            if rows is None:
                scores += token_log_probs
            else:
                scores[rows] += token_log_probs
        if step + 1 == batch.longest:  # every sentence is done (the loop ends)
            break
        # One copy to the host a step (the `if` on a tensor made one too); a sentence also ends
        # at its own max_len, and some does once the shortest one is reached.
        if config.eos_id in tokens.tolist() or step + 1 >= batch.shortest_max_len:
            done = (tokens == config.eos_id) | (batch.max_lens == step + 1)
            if done.all():
                break
            live = holes_filled(~done)
            batch.keep(live)
            rows = batch.sentence  # a slice writes, an index scatters
            tokens = tokens.index_select(0, live)
    ids = _laid_out(columns, n_sentences, config.pad_id, src_ids.device)
    if not with_scores:
        return ids, None
    return ids, torch.zeros(n_sentences, device=src_ids.device) if scores is None else scores


def _laid_out(columns: list[tuple[Tensor | None, Tensor]], n_sentences: int, pad_id: int, device):
    """Each step's tokens, with their sentences (None: all of them, in order) -> ids (n_sentences,
    steps), `pad_id` after a sentence's end. No column is all padding (PAD is never chosen: it is
    banned), so none needs trimming."""
    every = [tokens for rows, tokens in columns if rows is None]  # the first steps: one copy
    if len(every) == len(columns) and columns:  # every sentence to the last step
        return torch.stack(every, dim=1)
    out = torch.full((n_sentences, len(columns)), pad_id, device=device)
    if every:
        out[:, : len(every)] = torch.stack(every, dim=1)
    for step, (rows, tokens) in enumerate(columns[len(every) :], start=len(every)):
        out[rows, step] = tokens
    return out
