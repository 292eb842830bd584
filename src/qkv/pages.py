"""qkv's web pages, each one self-contained file: a template from `qkv/web/` with the shared drawing of
matrices (`drawing.js`, `drawing.css`) and the page's data inlined, so that nothing is loaded from the
network (the pages work offline, from a file or from `qkv serve`)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

WEB = Path(__file__).with_name("web")


def asset(name: str) -> str:
    return (WEB / name).read_text(encoding="utf-8")


def script_json(data) -> str:
    """`data` as JSON that can sit inside a <script> element: "</" would end the element early, and
    JSON allows the escaped form "<\\/"."""
    return json.dumps(data, ensure_ascii=False).replace("</", "<\\/")


def fill(template: str, title: str = "qkv", data=None, **texts: str) -> str:
    """The template `qkv/web/<template>` with its {{placeholders}} replaced in one pass (so that text
    put in is never read as a placeholder): {{title}} and the `texts` HTML-escaped, {{data}} as JSON,
    {{drawing_js}} and {{drawing_css}} from the shared drawing."""
    values = {key: html.escape(text) for key, text in {"title": title, **texts}.items()}
    values["data"] = script_json(data)
    shared = {"drawing_js": "drawing.js", "drawing_css": "drawing.css"}  # read where used

    def value(match: re.Match) -> str:
        name = match.group(1)
        return asset(shared[name]) if name in shared else values[name]

    return re.sub(r"\{\{(\w+)\}\}", value, asset(template))
