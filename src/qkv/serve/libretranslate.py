"""LibreTranslate's API (`POST /translate`, `GET /languages`, `GET /frontend/settings`), so that its
clients work unchanged: a request's fields as JSON, as a form or in the query string, `q` one text or
a list, `format` text or html (the text between the tags translated, the tags kept), `alternatives`,
and `source` "auto" where one model translates into the target."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request

from qkv.serve.html_text import join_html, split_html, text_nodes
from qkv.serve.openapi import LIBRETRANSLATE_BODY
from qkv.serve.service import ApiError, Service

LANGUAGE_NAMES = {"de": "German", "en": "English", "fr": "French", "cs": "Czech"}
LANGUAGE_NAMES |= {"words": "Dates in words", "iso": "ISO dates"}  # the built-in task


def add_routes(app: FastAPI, service: Service) -> None:
    """LibreTranslate's routes on `app`, over `service`'s models."""

    @app.get("/languages")
    async def languages():
        """Every language of the server, each with those it translates into (none for a language
        that is only a target): clients such as Weblate look for both of a pair among the codes."""
        targets: dict[str, list[str]] = {}
        for model in service.models:
            targets.setdefault(model.source, []).append(model.target)
        for model in service.models:
            targets.setdefault(model.target, [])
        return [
            {"code": code, "name": LANGUAGE_NAMES.get(code, code), "targets": into}
            for code, into in targets.items()
        ]

    @app.get("/frontend/settings")
    async def frontend_settings():
        """LibreTranslate's settings for a page: the character limit and whether a key is needed
        (this server's page reads `keyRequired`)."""
        first = service.models[0]
        return {
            "charLimit": service.max_chars,
            "frontendTimeout": 500,
            "apiKeys": service.api_keys is not None,
            "keyRequired": service.api_keys is not None,
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
        service.check_key(fields.get("api_key"))
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
        # qkv's own field, as in /v1/translate (None: the server's, `qkv serve --early-exit`)
        exit_early = _boolean(fields.get("early_exit"), "early_exit")
        service.check_size(texts)
        index = service.pick_model(fields.get("source"), fields.get("target"))
        search_beam = max(service.beam, alternatives + 1)
        if text_format == "html":
            pages = [split_html(text) for text in texts]
            nodes = [text_nodes(parts) for parts in pages]
            flat = [node for page_nodes in nodes for node in page_nodes]
            page_numbers = [n for n, page_nodes in enumerate(nodes, start=1) for _ in page_nodes]
            service.check_lengths(index, flat, page_numbers)
            search = (search_beam, 1, 0.6, exit_early)
            results = await service.translate(index, flat, *search, scores=False) if flat else []
            translated, start = [], 0
            for parts, page_nodes in zip(pages, nodes, strict=True):
                node_results = results[start : start + len(page_nodes)]
                translated.append(join_html(parts, [r[0].text for r in node_results]))
                start += len(page_nodes)
            best, others = translated, [[] for _ in texts]  # as LibreTranslate: none for html
        else:
            service.check_lengths(index, texts)
            search = (search_beam, alternatives + 1, 0.6, exit_early)
            results = await service.translate(index, texts, *search, scores=False)
            best = [hypotheses[0].text for hypotheses in results]
            others = [[h.text for h in hypotheses[1:]] for hypotheses in results]
        single = isinstance(q, str)
        answer: dict = {"translatedText": best[0] if single else best}
        if alternatives:
            answer["alternatives"] = others[0] if single else others
        if fields.get("source") == "auto":
            detected = {"confidence": 100.0, "language": service.models[index].source}
            answer["detectedLanguage"] = detected if single else [detected] * len(texts)
        return answer


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


def _boolean(value, name: str) -> bool | None:
    """`value` (JSON's true or false, or a form's text) as a truth value; None where not given."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "false", "0"):
        return value.lower() in ("true", "1")
    raise ApiError(400, f"{name} must be true or false, not {value!r}")
