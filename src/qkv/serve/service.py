"""What every route of the server shares: the models it serves, the checks of a request (the
model of a language pair, the size, each text's length, the API key) and the way to the models (one
computation at a time: the batcher's searches and the looks inside). A bad request is an `ApiError`,
which the app answers as `{"error": "..."}` with its status."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from qkv.errors import QkvError
from qkv.serve.batcher import Batcher, QueueFull
from qkv.tokenizer import utf8_text
from qkv.translate import Translator


@dataclass
class ServedModel:
    """A model and the language pair it was trained on."""

    name: str  # where it was loaded from
    translator: Translator
    source: str
    target: str


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class Service:
    """The `models` and the server's settings (`qkv.serve.app.create_app`'s), with a `Batcher`
    (started and stopped by the app) that decodes the requests' sentences in batches; `on_batch`
    and `on_tokens` are told each batch's sentences and each request's generated tokens (the
    metrics)."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        beam: int,
        max_chars: int,
        api_keys: set[str] | None,
        early_exit: bool,
        max_wait_ms: float,
        max_batch_tokens: int,
        max_queue: int,
        on_batch=lambda sentences: None,
        on_tokens=lambda tokens: None,
    ):
        self.models, self.beam, self.max_chars = models, beam, max_chars
        self.api_keys, self.early_exit, self.on_tokens = api_keys, early_exit, on_tokens
        # One computation on the models at a time: the batcher's searches and the looks inside.
        self.model_lock = threading.Lock()
        self.batcher = Batcher(
            self._decode, self._measure, max_wait_ms, max_batch_tokens, max_queue,
            on_batch=lambda n_sentences, n_requests: on_batch(n_sentences),
        )  # fmt: skip

    def _decode(self, key, sentences: list[str]) -> list:
        index, search_beam, n_best, length_penalty, exit_early, scores = key
        translator = self.models[index].translator
        search = dict(beam=search_beam, n_best=n_best, length_penalty=length_penalty)
        with self.model_lock:
            return translator.hypotheses(sentences, **search, early_exit=exit_early, scores=scores)

    def _measure(self, key, sentence: str) -> int:
        return len(self.models[key[0]].translator.tokenizer.encode(sentence)) + 1

    async def inside(self, function, *args):
        """`function(*args)` on a model, off the event loop; a ValueError or QkvError is a 400."""

        def locked():
            with self.model_lock:
                return function(*args)

        try:
            return await asyncio.to_thread(locked)
        except (ValueError, QkvError) as error:
            raise ApiError(400, str(error)) from None

    def pick_model(self, source: str | None, target: str | None) -> int:
        """The index of the model that translates `source` into `target` ("auto": the one model
        into `target`)."""
        if not target:
            raise ApiError(400, "missing field: target")
        if not source:
            raise ApiError(400, "missing field: source")
        for name, code in (("source", source), ("target", target)):
            if not isinstance(code, str):  # else "no model translates words->['iso']"
                raise ApiError(400, f"{name} must be a language code (a string), not {code!r}")
        if source == "auto":
            matches = [i for i, m in enumerate(self.models) if m.target == target]
            if len(matches) > 1:
                sources = ", ".join(self.models[i].source for i in matches)
                raise ApiError(400, f"source 'auto' is ambiguous for target {target!r}: "
                                    f"give one of {sources}")  # fmt: skip
        else:
            matches = [
                i for i, m in enumerate(self.models) if (m.source, m.target) == (source, target)
            ]
        if not matches:
            pairs = ", ".join(f"{m.source}->{m.target}" for m in self.models)
            raise ApiError(400, f"no model translates {source}->{target}; this server has {pairs}")
        return matches[0]

    def check_size(self, texts: list[str]) -> None:
        """Within max_chars, and text that UTF-8 can hold (JSON may carry lone surrogates)."""
        chars = sum(len(text) for text in texts)
        if chars > self.max_chars:
            raise ApiError(
                413, f"{chars} characters, more than this server's limit of {self.max_chars}"
            )
        for number, text in enumerate(texts, start=1):
            try:
                utf8_text(text)
            except QkvError as error:
                raise ApiError(400, f"text {number}: {error}") from None

    def check_lengths(self, index: int, texts: list[str], numbers: list[int] | None = None) -> None:
        """Each text within what the model reads (its max_len, EOS included): a longer one is
        refused, not cut as `qkv translate` cuts it with a warning, which a client never sees (it
        would keep the translation of a text's beginning as the whole's). `numbers`: each text's
        number in the request (default 1, 2, ...)."""
        translator = self.models[index].translator
        limit = translator.model.config.max_len - 1
        for number, text in zip(numbers or range(1, len(texts) + 1), texts, strict=True):
            subwords = len(translator.tokenizer.encode(text)) if text.strip() else 0
            if subwords > limit:
                raise ApiError(400, f"text {number}: {subwords} subword tokens, more than the "
                                    f"model reads ({limit}): split it, into sentences")  # fmt: skip

    def check_key(self, api_key) -> None:
        """Where the server requires keys, `api_key` is one of them."""
        if self.api_keys is not None and api_key not in self.api_keys:
            raise ApiError(403, "invalid or missing api_key")

    async def translate(
        self,
        index: int,
        texts: list[str],
        search_beam: int,
        n_best: int,
        alpha: float,
        exit_early=None,
        scores: bool = True,
    ):
        """Each text's hypotheses, decoded in a batch with other requests' texts of the same model
        and search (`Batcher`); `exit_early` None: the server's. scores=False: greedy search
        computes none (NaN; `Translator.hypotheses`), for an answer that shows none: on one
        sentence it then screens the output product (`qkv.inference.step_programs.GREEDY`)."""
        exit_early = self.early_exit if exit_early is None else exit_early
        try:
            results = await self.batcher.submit(
                (index, search_beam, n_best, alpha, exit_early, scores), texts
            )
        except QueueFull:
            raise ApiError(429, "too many requests waiting: retry shortly",
                           {"Retry-After": "1"}) from None  # fmt: skip
        except QkvError as error:
            raise ApiError(400, str(error)) from None
        self.on_tokens(sum(len(h.ids) for hypotheses in results for h in hypotheses))
        return results
