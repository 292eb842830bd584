"""The HTTP API: LibreTranslate's (`POST /translate`, `GET /languages`), so that its clients work
unchanged, and qkv's own (`POST /v1/translate` with hypotheses, scores, subword tokens and, when
asked, every attention weight; `POST /v1/explain`, the step-by-step of one attention sublayer), with
`GET /health` and Prometheus metrics at `GET /metrics`.

Every error is `{"error": "..."}`: 400 for a bad or missing field (named), 403 for a bad API key
(when keys are required: on every route that translates or looks inside), 413 over `max_chars`,
429 when the queue is full (with Retry-After). Input the client sent never causes a 500. As
LibreTranslate's, every answer allows any origin (CORS), so that pages elsewhere can call it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from qkv import pages
from qkv.cli.common import MAX_BEAM
from qkv.errors import QkvError
from qkv.kinds import KINDS
from qkv.length_penalty import MAX_ALPHA
from qkv.serve.batcher import Batcher, QueueFull
from qkv.serve.html_text import join_html, split_html, text_nodes
from qkv.serve.inside import attention_json, explanation_json
from qkv.serve.openapi import LIBRETRANSLATE_BODY, openapi_with_our_errors
from qkv.tokenizer import utf8_text
from qkv.translate import Translator

LANGUAGE_NAMES = {"de": "German", "en": "English", "fr": "French", "cs": "Czech"}
LANGUAGE_NAMES |= {"words": "Dates in words", "iso": "ISO dates"}  # the built-in task


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


class TranslateRequest(BaseModel):
    """qkv's own request: sentences and the search."""

    text: list[str]
    source: str | None = None
    target: str | None = None
    beam: int = Field(5, ge=1, le=MAX_BEAM)
    n_best: int = Field(1, ge=1, le=MAX_BEAM)
    length_penalty: float = Field(0.6, ge=-MAX_ALPHA, le=MAX_ALPHA, allow_inf_nan=False)
    early_exit: bool | None = None  # None: the server's (`qkv serve --early-exit`)
    attention: bool = False  # every attention weight of each best translation
    api_key: str | None = None  # where the server requires keys (`--api-keys`)


class ExplainRequest(BaseModel):
    """The step-by-step of one attention sublayer on one sentence; layer and heads count from 1."""

    text: str
    source: str | None = None
    target: str | None = None
    kind: str = "encoder"
    layer: int = Field(1, ge=1)
    heads: list[int] | None = None  # None: every head
    translation: str | None = None  # what the decoder reads (None: the greedy translation)
    api_key: str | None = None  # where the server requires keys (`--api-keys`)


def create_app(
    models: Sequence[ServedModel],
    beam: int = 5,
    max_chars: int = 5000,
    api_keys: set[str] | None = None,
    max_wait_ms: float = 10.0,
    max_batch_tokens: int = 4096,
    max_queue: int = 256,
    early_exit: bool = False,
) -> FastAPI:
    """The server's app for `models` (uvicorn runs it; tests call it with FastAPI's TestClient).
    early_exit: the beam search's, for requests that do not say (`qkv.search.beam_search`)."""
    registry = CollectorRegistry()
    requests = Counter("qkv_requests", "Requests, by route and status", ["route", "status"],
                       registry=registry)  # fmt: skip
    latency = Histogram("qkv_request_seconds", "Request latency", ["route"], registry=registry)
    batch_sizes = Histogram("qkv_batch_sentences", "Sentences per decoded batch",
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=registry)  # fmt: skip
    tokens_out = Counter("qkv_output_tokens", "Subword tokens generated", registry=registry)

    # One computation on the models at a time: the batcher's searches and the looks inside.
    model_lock = threading.Lock()

    def decode(key, sentences: list[str]) -> list:
        index, search_beam, n_best, length_penalty, exit_early = key
        translator = models[index].translator
        search = dict(beam=search_beam, n_best=n_best, length_penalty=length_penalty)
        with model_lock:
            return translator.hypotheses(sentences, **search, early_exit=exit_early)

    async def inside(function, *args):
        """`function(*args)` on a model, off the event loop; a ValueError or QkvError is a 400."""

        def locked():
            with model_lock:
                return function(*args)

        try:
            return await asyncio.to_thread(locked)
        except (ValueError, QkvError) as error:
            raise ApiError(400, str(error)) from None

    def measure(key, sentence: str) -> int:
        return len(models[key[0]].translator.tokenizer.encode(sentence)) + 1

    batcher = Batcher(
        decode, measure, max_wait_ms, max_batch_tokens, max_queue,
        on_batch=lambda n_sentences, n_requests: batch_sizes.observe(n_sentences),
    )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()  # SIGTERM: uvicorn stops accepting, the requests in flight finish

    app = FastAPI(
        title="qkv",
        description="Translation with a qkv Transformer: LibreTranslate's API and qkv's own.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return JSONResponse({"error": error.message}, error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        # FastAPI's own errors (a body it cannot parse, an unknown route) in the same shape
        return JSONResponse({"error": str(error.detail)}, error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception):
        # A fault of the server's, never of the input: in the same shape (the log has the
        # traceback), with CORS's header, which the middleware inside this handler cannot add
        body = {"error": f"internal error ({type(error).__name__})"}
        return JSONResponse(body, 500, headers={"Access-Control-Allow-Origin": "*"})

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'][1:]) or 'body'}: {problem['msg']}"
            for problem in error.errors()
        )
        return JSONResponse({"error": f"invalid request: {problems}"}, 400)

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        status = 500  # unless the route answers
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            # By the route's path as declared (FastAPI's own routes, /docs, leave none in the
            # scope): a path of the client's own (a 404) would add labels without end.
            route = getattr(request.scope.get("route"), "path", None) or request.url.path
            if route not in {getattr(known, "path", None) for known in app.routes}:
                route = "other"
            requests.labels(route, str(status)).inc()
            latency.labels(route).observe(time.perf_counter() - started)

    # As LibreTranslate's: pages of any origin may call it (an API key, where required, is in the
    # body); after `count`, so that a browser's preflight is answered here.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"],
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type"],
        max_age=86400,
    )

    def pick_model(source: str | None, target: str | None) -> int:
        if not target:
            raise ApiError(400, "missing field: target")
        if not source:
            raise ApiError(400, "missing field: source")
        for name, code in (("source", source), ("target", target)):
            if not isinstance(code, str):  # else "no model translates words->['iso']"
                raise ApiError(400, f"{name} must be a language code (a string), not {code!r}")
        if source == "auto":
            matches = [i for i, m in enumerate(models) if m.target == target]
            if len(matches) > 1:
                sources = ", ".join(models[i].source for i in matches)
                raise ApiError(400, f"source 'auto' is ambiguous for target {target!r}: "
                                    f"give one of {sources}")  # fmt: skip
        else:
            matches = [i for i, m in enumerate(models) if (m.source, m.target) == (source, target)]
        if not matches:
            pairs = ", ".join(f"{m.source}->{m.target}" for m in models)
            raise ApiError(400, f"no model translates {source}->{target}; this server has {pairs}")
        return matches[0]

    def check_size(texts: list[str]) -> None:
        """Within max_chars, and text that UTF-8 can hold (JSON may carry lone surrogates)."""
        chars = sum(len(text) for text in texts)
        if chars > max_chars:
            raise ApiError(413, f"{chars} characters, more than this server's limit of {max_chars}")
        for number, text in enumerate(texts, start=1):
            try:
                utf8_text(text)
            except QkvError as error:
                raise ApiError(400, f"text {number}: {error}") from None

    def check_lengths(index: int, texts: list[str], numbers: list[int] | None = None) -> None:
        """Each text within what the model reads (its max_len, EOS included): a longer one is
        refused, not cut as `qkv translate` cuts it with a warning, which a client never sees (it
        would keep the translation of a text's beginning as the whole's). `numbers`: each text's
        number in the request (default 1, 2, ...)."""
        translator = models[index].translator
        limit = translator.model.config.max_len - 1
        for number, text in zip(numbers or range(1, len(texts) + 1), texts, strict=True):
            subwords = len(translator.tokenizer.encode(text)) if text.strip() else 0
            if subwords > limit:
                raise ApiError(400, f"text {number}: {subwords} subword tokens, more than the "
                                    f"model reads ({limit}): split it, into sentences")  # fmt: skip

    def check_key(api_key) -> None:
        if api_keys is not None and api_key not in api_keys:
            raise ApiError(403, "invalid or missing api_key")

    async def translate(
        index: int, texts: list[str], search_beam: int, n_best: int, alpha: float, exit_early=None
    ):
        exit_early = early_exit if exit_early is None else exit_early
        try:
            results = await batcher.submit((index, search_beam, n_best, alpha, exit_early), texts)
        except QueueFull:
            raise ApiError(429, "too many requests waiting: retry shortly",
                           {"Retry-After": "1"}) from None  # fmt: skip
        except QkvError as error:
            raise ApiError(400, str(error)) from None
        tokens_out.inc(sum(len(h.ids) for hypotheses in results for h in hypotheses))
        return results

    page = pages.fill(
        "index.html", title="qkv: " + ", ".join(f"{m.source} \u2192 {m.target}" for m in models)
    )

    @app.head("/", include_in_schema=False)  # where a monitor checks that the server is up
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        """The page: translate, then look at the attention (qkv/web/index.html, self-contained)."""
        return page

    @app.head("/health", include_in_schema=False)
    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "models": [{"name": m.name, "source": m.source, "target": m.target} for m in models],
            "queued": batcher.queued,
        }

    @app.get("/languages")
    async def languages():
        """Every language of the server, each with those it translates into (none for a language
        that is only a target): clients such as Weblate look for both of a pair among the codes."""
        targets: dict[str, list[str]] = {}
        for model in models:
            targets.setdefault(model.source, []).append(model.target)
        for model in models:
            targets.setdefault(model.target, [])
        return [
            {"code": code, "name": LANGUAGE_NAMES.get(code, code), "targets": into}
            for code, into in targets.items()
        ]

    @app.get("/frontend/settings")
    async def frontend_settings():
        """LibreTranslate's settings for a page: the character limit and whether a key is needed
        (this server's page reads `keyRequired`)."""
        first = models[0]
        return {
            "charLimit": max_chars,
            "frontendTimeout": 500,
            "apiKeys": api_keys is not None,
            "keyRequired": api_keys is not None,
            "suggestions": False,
            "supportedFilesFormat": [],
            "language": {
                "source": {
                    "code": first.source,
                    "name": LANGUAGE_NAMES.get(first.source, first.source),
                },
                "target": {
                    "code": first.target,
                    "name": LANGUAGE_NAMES.get(first.target, first.target),
                },
            },
        }

    @app.post("/translate", openapi_extra={"requestBody": LIBRETRANSLATE_BODY})
    async def libretranslate(request: Request):
        fields = await _fields(request)
        check_key(fields.get("api_key"))
        q = fields.get("q")
        if q is None:
            raise ApiError(400, "missing field: q")
        texts = [q] if isinstance(q, str) else q
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "q must be a string or a list of strings")
        text_format = fields.get("format") or "text"
        if text_format not in ("text", "html"):
            raise ApiError(400, f"format must be 'text' or 'html', not {text_format!r}")
        # As LibreTranslate: fewer than none is none
        alternatives = max(0, _integer(fields.get("alternatives", 0), "alternatives", 16))
        check_size(texts)
        index = pick_model(fields.get("source"), fields.get("target"))
        search_beam = max(beam, alternatives + 1)
        if text_format == "html":
            pages = [split_html(text) for text in texts]
            nodes = [text_nodes(parts) for parts in pages]
            flat = [node for page_nodes in nodes for node in page_nodes]
            page_numbers = [n for n, page_nodes in enumerate(nodes, start=1) for _ in page_nodes]
            check_lengths(index, flat, page_numbers)
            results = await translate(index, flat, search_beam, 1, 0.6) if flat else []
            translated, start = [], 0
            for parts, page_nodes in zip(pages, nodes, strict=True):
                node_results = results[start : start + len(page_nodes)]
                translated.append(join_html(parts, [r[0].text for r in node_results]))
                start += len(page_nodes)
            best, others = translated, [[] for _ in texts]  # as LibreTranslate: none for html
        else:
            check_lengths(index, texts)
            results = await translate(index, texts, search_beam, alternatives + 1, 0.6)
            best = [hypotheses[0].text for hypotheses in results]
            others = [[h.text for h in hypotheses[1:]] for hypotheses in results]
        single = isinstance(q, str)
        answer: dict = {"translatedText": best[0] if single else best}
        if alternatives:
            answer["alternatives"] = others[0] if single else others
        if fields.get("source") == "auto":
            detected = {"confidence": 100.0, "language": models[index].source}
            answer["detectedLanguage"] = detected if single else [detected] * len(texts)
        return answer

    @app.post("/v1/translate")
    async def translate_v1(body: TranslateRequest):
        check_key(body.api_key)
        if body.n_best > body.beam:
            raise ApiError(400, f"n_best ({body.n_best}) must not exceed beam ({body.beam})")
        check_size(body.text)
        index = pick_model(body.source, body.target)
        check_lengths(index, body.text)
        translator = models[index].translator
        tokenizer = translator.tokenizer
        search = (body.beam, body.n_best, body.length_penalty, body.early_exit)
        results = await translate(index, body.text, *search)
        translations = []
        for sentence, hypotheses in zip(body.text, results, strict=True):
            translation: dict = {
                "hypotheses": [
                    {
                        "text": h.text,
                        "score": h.score,
                        "tokens": [tokenizer.id_to_piece(i) for i in h.ids],
                    }
                    for h in hypotheses
                ]
            }
            if body.attention and sentence.strip():
                translation["attention"] = await inside(
                    attention_json, translator, sentence, hypotheses[0]
                )
            translations.append(translation)
        return {
            "source": models[index].source,
            "target": models[index].target,
            "translations": translations,
        }

    @app.post("/v1/explain")
    async def explain_v1(body: ExplainRequest):
        check_key(body.api_key)
        if body.kind not in KINDS:
            raise ApiError(400, f"kind must be one of {', '.join(KINDS)}, not {body.kind!r}")
        check_size([body.text])
        index = pick_model(body.source, body.target)
        check_lengths(index, [body.text])
        heads = None if body.heads is None else [head - 1 for head in body.heads]
        if heads is not None and any(head < 0 for head in heads):
            raise ApiError(400, "heads count from 1")
        translator = models[index].translator
        if body.translation is not None:
            check_size([body.text, body.translation])
        return await inside(
            explanation_json,
            translator, body.text, body.kind, body.layer - 1, heads, body.translation,
        )  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: openapi_with_our_errors(app)
    return app


async def _fields(request: Request) -> dict:
    """A LibreTranslate request's fields, from JSON or from a form (a repeated q is a list), or as
    LibreTranslate also reads them, from the query string of a request with no body or a form."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        return _form_fields(request.query_params) | _form_fields(await request.form())
    body = await request.body()
    if not body:
        return _form_fields(request.query_params)
    try:
        fields = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON (or send a form)") from None
    if not isinstance(fields, dict):
        raise ApiError(400, "the body must be a JSON object with q, source and target")
    return fields


def _form_fields(form) -> dict:
    """A form's (or a query string's) fields: one value each, q a list where it is repeated."""
    fields = {key: form.get(key) for key in form}
    if len(form.getlist("q")) > 1:
        fields["q"] = form.getlist("q")
    return fields


def _integer(value, name: str, most: int) -> int:
    """`value` (JSON's number, or a form's text) as a whole number; true and 1.5 are not one (int()
    took them as 1)."""
    fractional = isinstance(value, float) and not value.is_integer()
    try:
        if isinstance(value, bool) or fractional:
            raise ValueError(value)
        number = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be a whole number, not {value!r}") from None
    if number > most:
        raise ApiError(400, f"{name} must be at most {most}, not {number}")
    return number
