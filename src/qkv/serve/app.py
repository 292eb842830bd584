"""The HTTP API: LibreTranslate's (`POST /translate`, `GET /languages`: `qkv.serve.libretranslate`),
so that its clients work unchanged, and qkv's own (`POST /v1/translate` with hypotheses, scores, subword tokens and, when
asked, every attention weight; `POST /v1/explain`, the step-by-step of one attention sublayer), with
`GET /health` and Prometheus metrics at `GET /metrics`.

Every error is `{"error": "..."}`: 400 for a bad or missing field (named), 403 for a bad API key
(when keys are required: on every route that translates or looks inside), 413 over `max_chars`,
429 when the queue is full (with Retry-After). Input the client sent never causes a 500. As
LibreTranslate's, every answer allows any origin (CORS), so that pages elsewhere can call it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import asynccontextmanager

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
from qkv.kinds import KINDS
from qkv.length_penalty import MAX_ALPHA
from qkv.serve import libretranslate
from qkv.serve.inside import attention_json, explanation_json
from qkv.serve.openapi import openapi_with_our_errors
from qkv.serve.service import ApiError, ServedModel, Service


class TranslateRequest(BaseModel):
    """qkv's own request: sentences and the search."""

    text: list[str]
    source: str | None = None
    target: str | None = None
    # None: the server's (`qkv serve --beam`), widened to n_best, as /translate's alternatives
    beam: int | None = Field(None, ge=1, le=MAX_BEAM)
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
    service = Service(
        models, beam, max_chars, api_keys, early_exit, max_wait_ms, max_batch_tokens, max_queue,
        on_batch=batch_sizes.observe, on_tokens=tokens_out.inc,
    )  # fmt: skip
    batcher = service.batcher

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
        if any(problem["type"] == "json_invalid" for problem in error.errors()):
            return JSONResponse({"error": "the body is not valid JSON"}, 400)  # as /translate says
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

    libretranslate.add_routes(app, service)

    @app.post("/v1/translate")
    async def translate_v1(body: TranslateRequest):
        service.check_key(body.api_key)
        if body.beam is not None and body.n_best > body.beam:
            raise ApiError(400, f"n_best ({body.n_best}) must not exceed beam ({body.beam})")
        search_beam = max(beam, body.n_best) if body.beam is None else body.beam
        service.check_size(body.text)
        index = service.pick_model(body.source, body.target)
        service.check_lengths(index, body.text)
        translator = models[index].translator
        tokenizer = translator.tokenizer
        search = (search_beam, body.n_best, body.length_penalty, body.early_exit)
        results = await service.translate(index, body.text, *search)
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
                translation["attention"] = await service.inside(
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
        service.check_key(body.api_key)
        if body.kind not in KINDS:
            raise ApiError(400, f"kind must be one of {', '.join(KINDS)}, not {body.kind!r}")
        service.check_size([body.text])
        index = service.pick_model(body.source, body.target)
        service.check_lengths(index, [body.text])
        heads = None if body.heads is None else [head - 1 for head in body.heads]
        if heads is not None and any(head < 0 for head in heads):
            raise ApiError(400, "heads count from 1")
        translator = models[index].translator
        if body.translation is not None:
            service.check_size([body.text, body.translation])
        return await service.inside(
            explanation_json,
            translator, body.text, body.kind, body.layer - 1, heads, body.translation,
        )  # fmt: skip

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.openapi = lambda: openapi_with_our_errors(app)
    return app
