"""What every search (`qkv.search`, `qkv.beam_search`) shares: running on an engine in inference
mode (`on_engine`), each sentence's length limit (`max_lengths`), the ids that may not come next
(`banned_ids`), and the rows still being decoded with their cache (`Batch`)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from qkv.inference import DecodingEngine, prepare_for_decoding
from qkv.inference.engine import NextToken
from qkv.model import Transformer

MAX_LEN_MARGIN = 50  # the paper: "maximum output length ... input length + 50"


def on_engine(function):
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


class Batch:
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
