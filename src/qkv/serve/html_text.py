"""LibreTranslate's `format: "html"`: translate the text between the tags, keep the markup as it was.

The page is cut into markup (tags, comments, declarations, CDATA, and the insides of <script> and
<style>, copied from the page character for character) and text nodes; each text node with a word in
it is translated as one sentence, its leading and trailing whitespace kept, and written back escaped.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

RAW_TAGS = {"script", "style"}


class _Splitter(HTMLParser):
    """Where each piece of the page starts, and whether it is text (with the text unescaped).

    Python's parser hands over a bare `<` that opens no tag (`5 < 6`) as a piece of text of its
    own, and writes some markup back otherwise than it was (`</P>` as `</p>`; a CDATA section's
    end): so the text is joined across pieces, and markup is taken from the page by position."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.starts: list[tuple[int, int]] = []  # (line, column) where each piece starts
        self.texts: list[str | None] = []  # each piece's text, unescaped; None for markup
        self.raw_depth = 0

    def _piece(self, text: str | None) -> None:
        self.starts.append(self.getpos())  # the parser's position is the piece's start
        self.texts.append(text)

    def handle_starttag(self, tag, attrs):
        self._piece(None)
        self.raw_depth += tag in RAW_TAGS

    def handle_startendtag(self, tag, attrs):
        self._piece(None)

    def handle_endtag(self, tag):
        self._piece(None)
        self.raw_depth -= tag in RAW_TAGS and self.raw_depth > 0

    def handle_data(self, data):
        self._piece(data if not self.raw_depth else None)

    def handle_comment(self, data):
        self._piece(None)

    def handle_decl(self, decl):
        self._piece(None)

    def handle_pi(self, data):
        self._piece(None)

    def unknown_decl(self, data):
        self._piece(None)


def split_html(page: str) -> list[tuple[bool, str]]:
    """[(is_text, content)]: markup verbatim, text unescaped, text and markup taking turns."""
    splitter = _Splitter()
    splitter.feed(page)
    splitter.close()
    line_starts = [0] + [match.end() for match in re.finditer("\n", page)]  # as the parser counts
    offsets = [line_starts[line - 1] + column for line, column in splitter.starts] + [len(page)]
    parts: list[tuple[bool, str]] = []
    for index, text in enumerate(splitter.texts):
        is_text = text is not None
        content = text if is_text else page[offsets[index] : offsets[index + 1]]
        if parts and parts[-1][0] == is_text:
            parts[-1] = (is_text, parts[-1][1] + content)
        else:
            parts.append((is_text, content))
    return parts


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
