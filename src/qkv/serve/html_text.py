"""LibreTranslate's `format: "html"`: translate the text between the tags, keep the markup as it was.

The page is cut into markup (tags, comments, declarations, and the insides of <script> and <style>,
copied as they are) and text nodes; each text node with a word in it is translated as one sentence,
its leading and trailing whitespace kept, and written back escaped.
"""

from __future__ import annotations

import html
from html.parser import HTMLParser

RAW_TAGS = {"script", "style"}


class _Splitter(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[tuple[bool, str]] = []  # (is_text, content)
        self.raw_depth = 0

    def handle_starttag(self, tag, attrs):
        self.parts.append((False, self.get_starttag_text()))
        self.raw_depth += tag in RAW_TAGS

    def handle_startendtag(self, tag, attrs):
        self.parts.append((False, self.get_starttag_text()))

    def handle_endtag(self, tag):
        self.parts.append((False, f"</{tag}>"))
        self.raw_depth -= tag in RAW_TAGS and self.raw_depth > 0

    def handle_data(self, data):
        self.parts.append((not self.raw_depth, data))

    def handle_comment(self, data):
        self.parts.append((False, f"<!--{data}-->"))

    def handle_decl(self, decl):
        self.parts.append((False, f"<!{decl}>"))

    def handle_pi(self, data):
        self.parts.append((False, f"<?{data}>"))

    def unknown_decl(self, data):
        self.parts.append((False, f"<![{data}]>"))


def split_html(page: str) -> list[tuple[bool, str]]:
    """[(is_text, content)]: markup verbatim, text unescaped."""
    splitter = _Splitter()
    splitter.feed(page)
    splitter.close()
    return splitter.parts


def text_nodes(parts: list[tuple[bool, str]]) -> list[str]:
    """The text nodes worth translating (with a word in them), stripped, in order."""
    return [content.strip() for is_text, content in parts if is_text and content.strip()]


def join_html(parts: list[tuple[bool, str]], translations: list[str]) -> str:
    """The page with each text node worth translating replaced by its translation, in order."""
    translated = iter(translations)
    out = []
    for is_text, content in parts:
        if is_text and content.strip():
            lead = content[: len(content) - len(content.lstrip())]
            trail = content[len(content.rstrip()) :]
            out.append(lead + html.escape(next(translated), quote=False) + trail)
        else:
            out.append(content)
    return "".join(out)
