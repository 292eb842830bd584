"""Greedy search, sampling and batched beam search, on the decoding engine (`qkv.inference`).

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

from qkv.inference import DecodingEngine, prepare_for_decoding
from qkv.inference.beam_cache import holes_filled
from qkv.inference.engine import NextToken
from qkv.inference.topk import best_extensions
from qkv.length_penalty import alpha_problem, length_penalty_factor
from qkv.model import Transformer

MAX_LEN_MARGIN = 50  # the paper: "maximum output length ... input length + 50"


# ---------------------------------------------------------------------------------------------------
# Shared pieces


def _inference(function):
    """Run `function` on an engine, in inference mode, with the model in eval mode (restored
    afterwards). Given a model, the engine is prepared for this call. An engine without a PyTorch
    model (`engine.model` None, as `qkv.onnx.OnnxEngine`) runs as it is."""

    @functools.wraps(function)
    def wrapper(model_or_engine: Transformer | DecodingEngine, *args, **kwargs):
        given_a_model = isinstance(model_or_engine, Transformer)
        model = model_or_engine if given_a_model else model_or_engine.model
        # Switching every module's mode costs ~0.2 ms each way, 5% of a compiled search of one
        # sentence: only a model in training mode is switched (the engines use no dropout).
        was_training = model is not None and model.training
        if was_training:
            model.eval()
        try:
            with torch.inference_mode():
                engine = prepare_for_decoding(model) if given_a_model else model_or_engine
                return function(engine, *args, **kwargs)
        finally:
            if was_training:
                model.train()

    return wrapper


def max_lengths(
    model: Transformer | DecodingEngine, src_ids: Tensor, max_len: int | None
) -> Tensor:
    """(batch,) the most tokens each hypothesis may generate, EOS included."""
    # Token t (1-based) is predicted at decoder position t - 1: the positions bound the length.
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, got {max_len}")
        limit = min(max_len, model.config.max_len)
        return torch.full((src_ids.size(0),), limit, device=src_ids.device)
    src_lengths = (src_ids != model.config.pad_id).sum(dim=1)
    return (src_lengths + MAX_LEN_MARGIN).clamp(max=model.config.max_len)


def banned_ids(config, generated: int, min_len: int) -> tuple[int, ...]:
    """The ids that may not come next when `generated` tokens exist: PAD and BOS, never valid outputs,
    and EOS before `min_len`."""
    return (config.pad_id, config.bos_id) + ((config.eos_id,) if generated < min_len else ())


class _FromStep(NextToken):
    """`NextToken`'s calls for an engine that has only `step`."""

    def __init__(self, engine):
        self.step = engine.step


class _Batch:
    """The rows still being decoded, and the per-sentence tensors that shrink with them.

    Cross-attention reads the cache after the first step, which alone reads the encoder output."""

    def __init__(
        self, engine: DecodingEngine, src_ids: Tensor, max_len: int | None, max_beams: int = 1
    ):
        self.engine = engine
        # (batch, src_len, d_model), (batch, 1, 1, src_len)
        self.memory, self.src_mask = engine.encode(src_ids)
        self.max_lens = max_lengths(engine, src_ids, max_len)  # (batch,)
        n_sentences = src_ids.size(0)
        if max_len is not None and n_sentences:  # every sentence's the same: known, not asked
            self.shortest_max_len = self.longest = min(max_len, engine.config.max_len)
        else:
            # The smallest of max_lens, as a number: before it, no sentence checks its own.
            self.shortest_max_len = int(self.max_lens.min()) if n_sentences else 0
            self.longest = int(self.max_lens.max()) if n_sentences else 0  # of the whole batch
        self.sentence = torch.arange(n_sentences, device=src_ids.device)  # original row of each
        self.cache = engine.new_cache(
            max_beams=max_beams, max_len=self.longest or None, sentences=src_ids.size(0)
        )
        # An engine needs only `step`: `NextToken` makes the rest from it.
        self.next_token = engine if isinstance(engine, NextToken) else _FromStep(engine)

    def _ask(self, call, last_tokens: Tensor, generated: int, min_len: int, *args):
        """`call` (a `NextToken` method) on the newest token of each row, with the ids that may not
        come next when `generated` tokens already exist banned."""
        banned = banned_ids(self.engine.config, generated, min_len)
        answer = call(last_tokens, self.memory, self.src_mask, self.cache, banned, *args)
        self.memory = self.src_mask = None  # the cache holds the encoder's keys and values now
        return answer

    def next_log_probs(self, last_tokens: Tensor, generated: int, min_len: int) -> Tensor:
        """(rows,) the newest token of each row -> (rows, vocab) log-probabilities of the next one, with
        the tokens that may not come next at -inf."""
        return self._ask(self.next_token.next_log_probs, last_tokens, generated, min_len)

    def next_best(
        self, last_tokens: Tensor, generated: int, min_len: int, scores: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """(rows,) the newest token of each row -> the most likely next token of each row and its
        log-probability (as `next_log_probs` gives them; None without `scores`)."""
        return self._ask(self.next_token.next_best, last_tokens, generated, min_len, scores)

    def best_extensions(
        self, last_tokens: Tensor, generated: int, min_len: int, beam_scores: Tensor, k: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`NextToken.best_extensions`: each sentence's k best extensions, their beams and tokens."""
        call = self.next_token.best_extensions
        return self._ask(call, last_tokens, generated, min_len, beam_scores, k)

    def keep(self, rows: Tensor, cache_rows: Tensor | None = None) -> None:
        """Keep `rows` (in that order) of the current batch; the cache keeps `cache_rows` (default the
        same rows: they differ when beams are reordered, as their per-sentence tensors are equal)."""
        self.max_lens = self.max_lens.index_select(0, rows)
        self.shortest_max_len = int(self.max_lens.min()) if rows.numel() else 0
        self.sentence = self.sentence.index_select(0, rows)
        self.cache.reorder(rows if cache_rows is None else cache_rows)


# ---------------------------------------------------------------------------------------------------
# One hypothesis per sentence: greedy and sampling


@_inference
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


@_inference
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
    batch = _Batch(engine, src_ids, max_len)
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


def _trim(ids: Tensor, pad_id: int) -> Tensor:
    """Drop trailing columns that are padding in every row."""
    used = (ids != pad_id).flatten(0, -2).any(dim=0).nonzero()
    return ids[..., : int(used.max()) + 1 if used.numel() else 0]


# ---------------------------------------------------------------------------------------------------
# Beam search


@_inference
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
        self.batch = _Batch(engine, src_ids, max_len, max_beams=beam_size)
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
            beam_scores, ids = self.step(step + 1, beam_scores, candidates, ids)
            if beam_scores.numel() == 0:
                break
            last_tokens, candidates = ids[:, -1], None
        return _trim(self.final_ids, self.config.pad_id), self.final_scores

    def step(self, length: int, beam_scores: Tensor, candidates: tuple, ids: Tensor):
        """Extend every live beam by one token (the `length`-th) with the best `candidates` (sums,
        beams, tokens: (n_live, 2 x beam) each, best first), record hypotheses that finish, drop the
        sentences that are done, and reorder the cache. Returns the new (beam_scores, ids)."""
        beam = self.beam_size
        # Rows per sentence now: beam, or 1 at the first step (see `run`).
        n_live, width = beam_scores.shape
        cand_scores, cand_beam, cand_token = candidates
        first_rows = torch.arange(0, n_live * width, width, device=self.device)[:, None]
        cand_row = first_rows + cand_beam  # row in ids and in the batch
        # (n_live,) whether no more tokens are allowed; None while no sentence is at its max_len.
        at_max_len = None
        if length >= self.batch.shortest_max_len:
            at_max_len = self.batch.max_lens[::width] == length

        # A candidate among the best `beam` finishes if it is EOS, or if no more tokens are allowed.
        is_eos = cand_token == self.config.eos_id
        # Most steps have no EOS among the candidates: then nothing finishes before max_len, and the
        # best `beam` candidates live on as they are (a dozen small operations fewer a step).
        any_eos = bool(is_eos.any())
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
        ids = torch.cat([ids.index_select(0, rows.flatten()), tokens.reshape(-1, 1)], dim=1)

        done = at_max_len  # None: no sentence is done
        if best_finished is not None:
            done = best_finished if done is None else done | best_finished
        if self.any_finished:  # before, the bound has nothing to beat
            cannot_improve = self.cannot_improve(length, live_scores[:, 0], width)
            done = cannot_improve if done is None else done | cannot_improve
        if done is not None and done.any():
            keep = holes_filled(~done)  # live sentences that go on
            live_scores, rows = live_scores[keep], rows[keep]
            ids = ids.view(n_live, beam, length)[keep].view(-1, length)
            # The per-row tensors of a sentence are equal: any of its rows will do for each new beam.
            kept_rows = (keep[:, None] * width).expand(-1, beam).flatten()
            self.batch.keep(kept_rows, cache_rows=rows.flatten())
        elif width < beam:
            self.batch.keep(rows.flatten())  # the first step: beam rows per sentence from now on
        else:
            self.batch.cache.reorder(rows.flatten(), cross_attention=False)
        return live_scores, ids

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
