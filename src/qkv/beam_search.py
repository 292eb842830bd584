"""Batched beam search on the decoding engine (`qkv.inference`); its arguments, lengths and scores
as `qkv.search` describes them (and `qkv.search.beam_search` is this one).

How the beam search stays fast (as fairseq, Marian and CTranslate2 do it, and one step further):
- all beams of all sentences are rows of one tensor, and the engine decodes one position at a time on
  a KV cache, `qkv.inference.BeamCache`: the beams of a sentence share its keys and values, so
  reordering the beams moves a small mask, never the cache;
- the encoder and the cross-attention keys/values run once per sentence, and are kept once per sentence:
  the first step decodes one row per sentence, then each sentence gets `beam_size` rows;
- the candidates come from `qkv.inference.topk`, which searches only the parts of each row that can
  hold the best;
- each step keeps the best 2 x beam_size candidates, so `beam_size` of them continue even if all the
  beams just produced EOS;
- finished hypotheses are kept until no live beam can beat them, then the sentence leaves the batch and
  later steps run on fewer rows (with ``early_exit``: as soon as its best candidate ends).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from qkv.inference import DecodingEngine
from qkv.inference.beam_cache import holes_filled
from qkv.inference.topk import best_extensions
from qkv.length_penalty import alpha_problem, length_penalty_factor
from qkv.model import Transformer
from qkv.search_batch import Batch, on_engine


@on_engine
def beam_search(
    model: Transformer | DecodingEngine,
    src_ids: Tensor,
    beam_size: int = 5,
    length_penalty: float = 0.6,
    length_penalty_style: str = "gnmt",
    max_len: int | None = None,
    min_len: int = 0,
    n_best: int = 1,
    early_exit: bool = False,
) -> tuple[Tensor, Tensor]:
    """The `n_best` best hypotheses of a beam search, best first.

    src_ids (batch, src_len) -> ids (batch, n_best, out_len) padded with pad_id after EOS, and scores
    (batch, n_best): sum of log-probabilities / length_penalty(len), len counting EOS. The paper used beam
    4 and alpha 0.6 with the 'gnmt' style; `length_penalty=0` ranks by plain log-probability.

    A sentence ends when no live beam can beat its n_best-th finished hypothesis, or with `early_exit`
    (OpenNMT-py's rule) when its best candidate is EOS and it has n_best: ~30% fewer steps on Multi30k
    one sentence at a time, BLEU within 0.2 (benchmarks/README.md, "real sentences").
    """
    if not 1 <= n_best <= beam_size:
        raise ValueError(f"n_best must be between 1 and beam_size={beam_size}, got {n_best}")
    length_penalty_of = functools.partial(
        length_penalty_factor, alpha=length_penalty, style=length_penalty_style
    )
    length_penalty_of(1)  # reject an unknown style before any work
    if problem := alpha_problem(length_penalty):  # checked once, not at every step's penalty
        raise ValueError(f"the length penalty {problem}")
    search = _BeamSearch(model, src_ids, beam_size, length_penalty_of, max_len, min_len, n_best)
    return search.run(early_exit)


class _BeamSearch:
    """The state of one batched beam search. Rows of the decoder batch are (sentence, beam) pairs,
    sentence-major: the beams of live sentence i are rows i * beam_size ... (i + 1) * beam_size - 1."""

    def __init__(self, engine, src_ids, beam_size, length_penalty_of, max_len, min_len, n_best):
        self.config = engine.config
        self.beam_size, self.n_best, self.min_len = beam_size, n_best, min_len
        self.length_penalty_of = length_penalty_of
        self.batch = Batch(engine, src_ids, max_len, max_beams=beam_size)
        self.device = src_ids.device
        n_sentences = src_ids.size(0)
        # Each sentence's length penalty at its max_len (`cannot_improve`), by original index.
        self.max_len_penalty = length_penalty_of(self.batch.max_lens.float())
        # Finished hypotheses of every sentence, best first: normalised scores and ids.
        self.final_scores = torch.full((n_sentences, n_best), -math.inf, device=self.device)
        self.final_ids = torch.full(
            (n_sentences, n_best, self.batch.longest), self.config.pad_id, device=self.device
        )
        self.any_finished = False  # whether any sentence has a finished hypothesis yet
        self.early_exit = False  # a sentence ends when its best candidate does (`run`)
        self._first_rows: dict[tuple[int, int], Tensor] = {}  # `first_rows`, by shape

    def run(self, early_exit: bool = False) -> tuple[Tensor, Tensor]:
        self.early_exit = early_exit
        n_sentences, beam = self.final_scores.size(0), self.beam_size
        if n_sentences == 0 or self.batch.longest == 0:
            return self.final_ids, self.final_scores
        # Step 1 on one row per sentence (all its beams would be the same BOS), so the encoder output is
        # projected for cross-attention once per sentence, and the first candidates are the best
        # tokens of that one row; their choice makes every sentence beam_size rows (the cache shares
        # them, see qkv.inference.beam_cache).
        last_tokens = torch.full((n_sentences,), self.config.bos_id, device=self.device)
        vocab, candidates = self.config.tgt_vocab_size, None
        beam_scores = torch.zeros((n_sentences, 1), device=self.device)
        if vocab < 2 * beam:
            # Too few tokens for 2 x beam candidates from one row: give each sentence beam rows of
            # which only the first is live (-inf), as every later step has.
            log_probs = self.batch.next_log_probs(last_tokens, 0, self.min_len)
            self.batch.keep(torch.arange(n_sentences, device=self.device).repeat_interleave(beam))
            beam_scores = torch.full((n_sentences, beam), -math.inf, device=self.device)
            beam_scores[:, 0] = 0.0
            log_probs = log_probs.repeat_interleave(beam, dim=0)
            candidates = best_extensions(log_probs, beam_scores, min(2 * beam, beam * vocab))
        ids = torch.empty((beam_scores.numel(), 0), dtype=torch.long, device=self.device)
        for step in range(self.batch.longest):
            if candidates is None:  # every extension of every beam competes; 2 x beam go on
                n_cand = min(2 * beam, beam_scores.size(1) * vocab)
                args = (last_tokens, step, self.min_len, beam_scores, n_cand)
                candidates = self.batch.best_extensions(*args)
            beam_scores, ids, last_tokens = self.step(step + 1, beam_scores, candidates, ids)
            if beam_scores.numel() == 0:
                break
            candidates = None
        return _trim(self.final_ids, self.config.pad_id), self.final_scores

    def step(self, length: int, beam_scores: Tensor, candidates: tuple, ids: Tensor):
        """Extend every live beam by one token (the `length`-th) with the best `candidates` (sums,
        beams, tokens: (n_live, 2 x beam) each, best first), record hypotheses that finish, drop the
        sentences that are done, and reorder the cache. Returns the new (beam_scores, ids) and the
        newest token of each row."""
        beam = self.beam_size
        # Rows per sentence now: beam, or 1 at the first step (see `run`).
        n_live, width = beam_scores.shape
        cand_scores, cand_beam, cand_token = candidates
        # row in ids and in the batch (one sentence's rows start at 0: no arithmetic)
        cand_row = cand_beam if n_live == 1 else self.first_rows(n_live, width) + cand_beam
        # (n_live,) whether no more tokens are allowed; None while no sentence is at its max_len.
        at_max_len = None
        if length >= self.batch.shortest_max_len:
            at_max_len = self.batch.max_lens[::width] == length

        # A candidate among the best `beam` finishes if it is EOS, or if no more tokens are allowed.
        # Most steps have no EOS among the candidates: then nothing finishes before max_len, and the
        # best `beam` candidates live on as they are (a dozen small operations fewer a step). The
        # candidates as a list: one call, where a comparison, `any` and its answer were three.
        any_eos = self.config.eos_id in cand_token.flatten().tolist()
        is_eos = cand_token == self.config.eos_id if any_eos or at_max_len is not None else None
        best_finished = None  # with early_exit: (n_live,) whether the best candidate ended it
        if any_eos or at_max_len is not None:
            finishes = (
                is_eos[:, :beam] if at_max_len is None else is_eos[:, :beam] | at_max_len[:, None]
            )
            finishes &= cand_scores[:, :beam] > -math.inf
            if finishes.any():
                best = (cand_scores[:, :beam], cand_row[:, :beam], cand_token[:, :beam])
                self.record(length, *best, finishes, ids, width)
                if self.early_exit:
                    enough = self.final_scores[self.batch.sentence[::width], -1] > -math.inf
                    best_finished = finishes[:, 0] & enough

        if any_eos:
            # The best `beam` candidates that are not EOS live on (at least `beam` of 2 * beam).
            live_scores, pick = cand_scores.masked_fill(is_eos, -math.inf).topk(beam, dim=1)
            rows = cand_row.gather(1, pick)  # (n_live, beam) row each new beam extends
            tokens = cand_token.gather(1, pick)
        else:  # candidates come best first
            live_scores, rows, tokens = (t[:, :beam] for t in (cand_scores, cand_row, cand_token))
        rows_flat = rows.flatten()
        ids = torch.cat([ids.index_select(0, rows_flat), tokens.reshape(-1, 1)], dim=1)

        done = at_max_len  # None: no sentence is done
        if best_finished is not None:
            done = best_finished if done is None else done | best_finished
        if self.any_finished:  # before, the bound has nothing to beat
            cannot_improve = self.cannot_improve(length, live_scores[:, 0], width)
            done = cannot_improve if done is None else done | cannot_improve
        n_done = 0 if done is None else int(done.sum())
        if n_done == n_live:  # every sentence ends here (always, at the end of one sentence)
            return live_scores[:0], ids[:0], ids[:0, -1]
        if n_done:
            keep = holes_filled(~done)  # live sentences that go on
            live_scores, rows = live_scores[keep], rows[keep]
            ids = ids.view(n_live, beam, length)[keep].view(-1, length)
            # The per-row tensors of a sentence are equal: any of its rows will do for each new beam.
            kept_rows = (keep[:, None] * width).expand(-1, beam).flatten()
            self.batch.keep(kept_rows, cache_rows=rows.flatten())
            return live_scores, ids, ids[:, -1]
        if width < beam:
            self.batch.keep(rows_flat)  # the first step: beam rows per sentence from now on
        else:
            self.batch.cache.reorder(rows_flat, cross_attention=False)
        # the newest tokens, contiguous (a view at one sentence), as the engine takes them
        return live_scores, ids, tokens.reshape(-1)

    def first_rows(self, n_live: int, width: int) -> Tensor:
        """(n_live, 1) the first row of each live sentence, `width` rows each: made once for each
        shape (a new tensor right after a compiled step cost ~10 µs, its caches cold)."""
        key = (n_live, width)
        if key not in self._first_rows:
            first = torch.arange(0, n_live * width, width, device=self.device)
            self._first_rows[key] = first.unsqueeze(1)
        return self._first_rows[key]

    def record(self, length, cand_scores, cand_row, cand_token, finishes, ids, width) -> None:
        """Merge the candidates that finish into each live sentence's n_best finished hypotheses."""
        n_live, n_cand = cand_scores.shape
        normalised = cand_scores / self.length_penalty_of(length)
        normalised = normalised.masked_fill(~finishes, -math.inf)
        cand_ids = torch.cat([ids[cand_row.flatten()], cand_token.reshape(-1, 1)], dim=1)
        cand_ids = F.pad(cand_ids, (0, self.batch.longest - length), value=self.config.pad_id)
        sentence = self.batch.sentence[::width]  # (n_live,) original index of each
        all_scores = torch.cat([self.final_scores[sentence], normalised], dim=1)
        all_ids = torch.cat([self.final_ids[sentence], cand_ids.view(n_live, n_cand, -1)], dim=1)
        best_scores, best = all_scores.topk(self.n_best, dim=1)  # sorted, best first
        self.any_finished = True
        self.final_scores[sentence] = best_scores
        self.final_ids[sentence] = all_ids.gather(
            1, best[:, :, None].expand(-1, -1, self.batch.longest)
        )

    def cannot_improve(self, length: int, best_live: Tensor, width: int) -> Tensor:
        """(n_live,) True where no live beam can beat the n_best-th finished hypothesis any more.

        Log-probabilities only fall as a hypothesis grows, so a live beam's best possible final score is
        its score now over the largest length penalty it can still reach (the penalty is monotonic in
        the length, so that is at the next length or at max_len)."""
        sentence = self.batch.sentence[::width]
        at_max_len = self.max_len_penalty.index_select(0, sentence)
        largest_penalty = at_max_len.clamp(min=self.length_penalty_of(length + 1))
        return best_live / largest_penalty <= self.final_scores[:, -1].index_select(0, sentence)


def _trim(ids: Tensor, pad_id: int) -> Tensor:
    """Drop trailing columns that are padding in every row."""
    used = (ids != pad_id).flatten(0, -2).any(dim=0).tolist()  # of each column
    return ids[..., : max((i + 1 for i, column in enumerate(used) if column), default=0)]
