"""Attention pictures: the weights of one sentence pair as heatmaps (PNG) and as a self-contained web page.

The weights come from the model's own forward pass (``return_attention=True``), so the pictures show the
same numbers the model computes when it translates. Everything here takes tensors and token labels, so
tests and notebooks can call it without a tokenizer or a run directory.

Indices of layers and heads are 0-based in this API (as in the lists the model returns); titles, the HTML
page and the CLI show them 1-based, as people count.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from qkv.atomic import atomic_write
from qkv.errors import QkvError
from qkv.kinds import KINDS
from qkv.model import Transformer

KIND_NAMES = {
    "encoder": "Encoder self-attention",
    "decoder": "Decoder self-attention",
    "cross": "Encoder-decoder attention",
}
READING = "each row is a query token, each column the key token it attends to"


@dataclass
class AttentionMaps:
    """All attention weights of one sentence pair.

    weights: kind -> (n_layers, n_heads, query_len, key_len); every row sums to 1 (0 where masked).
    src_labels: the source tokens (encoder positions); tgt_labels: the decoder's input tokens (BOS and
    the translation), one per decoder position.
    """

    weights: dict[str, Tensor]
    src_labels: list[str]
    tgt_labels: list[str]

    def labels(self, kind: str) -> tuple[list[str], list[str]]:
        """(query labels, key labels) of a kind: cross-attention asks from the target into the source."""
        if kind == "encoder":
            return self.src_labels, self.src_labels
        if kind == "decoder":
            return self.tgt_labels, self.tgt_labels
        return self.tgt_labels, self.src_labels

    @property
    def n_heads(self) -> int:
        return next(iter(self.weights.values())).size(1)

    def n_layers(self, kind: str) -> int:
        return self.weights[kind].size(0)


@torch.no_grad()
def collect_attention(
    model: Transformer,
    src_ids: list[int] | Tensor,
    tgt_ids: list[int] | Tensor,
    src_labels: list[str],
    tgt_labels: list[str],
) -> AttentionMaps:
    """One teacher-forced forward pass over (source, decoder input), keeping every attention weight.

    src_ids: (src_len,) source ids with EOS; tgt_ids: (tgt_len,) decoder input, BOS then the translation.
    """
    src = torch.as_tensor(src_ids).view(1, -1)
    tgt = torch.as_tensor(tgt_ids).view(1, -1)
    if len(src_labels) != src.size(1) or len(tgt_labels) != tgt.size(1):
        raise ValueError("one label per token is needed, for the source and for the target")
    was_training = model.training
    model.eval()  # no dropout: the weights the model uses when it translates
    try:
        _, weights = model(src, tgt, return_attention=True)
    finally:
        model.train(was_training)
    # Per kind: list over layers of (1, heads, q, k) -> (layers, heads, q, k)
    stacked = {kind: torch.stack([w[0] for w in weights[kind]]).float() for kind in KINDS}
    return AttentionMaps(stacked, list(src_labels), list(tgt_labels))


def source_ids(model: Transformer, tokenizer, sentence: str) -> list[int]:
    """Source ids as the model sees them in training: the subwords, then EOS."""
    ids = [*tokenizer.encode(sentence), tokenizer.eos_id]
    if len(ids) == 1:
        raise QkvError("the sentence is empty")
    if len(ids) > model.config.max_len:
        raise QkvError(
            f"the sentence has {len(ids)} tokens; the model takes at most {model.config.max_len}"
        )
    return ids


def greedy_decoder_input(
    model: Transformer, tokenizer, src_ids: list[int]
) -> tuple[list[int], str]:
    """The greedy translation as the decoder reads it (BOS, then the translation: position t predicts
    token t+1, the last one EOS), and as text."""
    from qkv.search import greedy_search

    ids, _ = greedy_search(model, torch.tensor([src_ids]))
    out_ids = [i for i in ids[0].tolist() if i != tokenizer.pad_id]  # padded after EOS
    words = out_ids[:-1] if out_ids[-1:] == [tokenizer.eos_id] else out_ids
    return [tokenizer.bos_id, *words], tokenizer.decode(out_ids)


def sentence_attention(model: Transformer, tokenizer, sentence: str) -> tuple[AttentionMaps, str]:
    """Translate `sentence` greedily and collect every attention weight the model used for it:
    the maps, labelled with subword pieces, and the translation as text."""
    src_ids = source_ids(model, tokenizer, sentence)
    tgt_ids, translation = greedy_decoder_input(model, tokenizer, src_ids)
    pieces = tokenizer.id_to_piece
    maps = collect_attention(
        model, src_ids, tgt_ids, [pieces(i) for i in src_ids], [pieces(i) for i in tgt_ids]
    )
    return maps, translation


def select(maps: AttentionMaps, kinds=KINDS, layer: int | None = None, head: int | None = None):
    """The panels to draw, as (kind, layer, head) triples in reading order, after checking the indices.

    One row of panels per (kind, layer), one column per head: ``layer=None`` takes every layer,
    ``head=None`` every head.
    """
    layers = {kind: maps.n_layers(kind) for kind in kinds if kind in KINDS}
    check_panels(kinds, layer, head, layers, maps.n_heads)
    rows = [
        (kind, lay)
        for kind in kinds
        for lay in ([layer] if layer is not None else range(maps.n_layers(kind)))
    ]
    heads = [head] if head is not None else list(range(maps.n_heads))
    return [[(kind, lay, h) for h in heads] for kind, lay in rows]


def check_panels(kinds, layer: int | None, head: int | None, layers: dict, n_heads: int) -> None:
    """A ValueError where a kind, `layer` or `head` (from 0) is not among a model's: `layers` holds
    each kind's number of layers."""
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown attention kind {kind!r}; choose one of {', '.join(KINDS)}")
        if layer is not None and not 0 <= layer < layers[kind]:
            raise ValueError(f"layer {layer + 1} does not exist: {kind} has {layers[kind]}")
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"head {head + 1} does not exist: the model has {n_heads} heads")


def model_layers(model: Transformer) -> dict[str, int]:
    """Each kind of attention's number of layers in `model`."""
    config = model.config
    decoder = config.n_decoder_layers
    return {"encoder": config.n_encoder_layers, "decoder": decoder, "cross": decoder}


def panel_title(kind: str, layer: int, head: int) -> str:
    return f"{KIND_NAMES[kind]}, layer {layer + 1}, head {head + 1}"


def plot_attention(
    maps: AttentionMaps,
    kinds=KINDS,
    layer: int | None = None,
    head: int | None = None,
    caption: str | None = None,
):
    """A matplotlib Figure of heatmaps: one row per (kind, layer), one column per head (see `select`).

    All panels share one colour scale, 0 to 1, so a dark cell means the same weight everywhere.
    caption: a line under the title, e.g. the sentence and its translation.
    """
    # A bare Figure, not pyplot: no global figure state and no GUI backend, so it works the same in a
    # terminal, a test and a notebook (whose own backend stays untouched).
    from matplotlib.figure import Figure

    grid = select(maps, kinds, layer, head)
    n_rows, n_cols = len(grid), len(grid[0])
    longest = max(len(maps.src_labels), len(maps.tgt_labels))
    side = max(2.4, 0.22 * longest + 1.2)  # inches per panel: room for every token label
    if n_rows * n_cols == 1:
        side = max(side, 4.0)  # a lone panel is the whole picture
    fig = Figure(figsize=(side * n_cols + 1.2, side * n_rows + 1.0), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for row, panels in enumerate(grid):
        for col, (kind, lay, h) in enumerate(panels):
            image = _draw_panel(axes[row][col], maps, kind, lay, h, first_column=col == 0)
    fig.colorbar(image, ax=axes, shrink=min(1.0, 4.0 / n_rows), label="attention weight")

    if n_rows * n_cols == 1:
        kind, lay, h = grid[0][0]
        title = f"{panel_title(kind, lay, h)}: {READING}"
        axes[0][0].set(title="", xlabel="key", ylabel="query")
    else:
        title = f"Attention weights, one panel per layer and head: in each panel {READING}"
    # About 13 characters of 10-point text per inch: wrap so a narrow figure keeps its whole title.
    width = int(fig.get_size_inches()[0] * 13)
    lines = [textwrap.fill(text, width) for text in (title, caption) if text]
    fig.suptitle("\n".join(lines), fontsize=10)
    return fig


def _draw_panel(ax, maps: AttentionMaps, kind: str, layer: int, head: int, first_column: bool):
    queries, keys = maps.labels(kind)
    image = ax.imshow(
        maps.weights[kind][layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto"
    )
    ax.set_title(f"{kind} L{layer + 1} H{head + 1}", fontsize=9)
    ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=7)
    ax.set_yticks(range(len(queries)), queries if first_column else [], fontsize=7)
    ax.tick_params(length=0)
    return image


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Write the figure as an image (format from the suffix) at exactly its size x dpi pixels."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The Agg renderer for PNG: no display needed. Whole or not at all, and in the format its suffix
    # names (`picture_format_problem`): given no suffix, matplotlib would add ".png" to the name.
    file_format = path.suffix.lstrip(".").lower()
    atomic_write(path, lambda file: fig.savefig(file, dpi=dpi, format=file_format))
    return path


def picture_format_problem(path: str | Path) -> str | None:
    """Why matplotlib cannot write a picture at `path` (its suffix names no format it writes), or
    None: asked before the work that makes the picture."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    if Path(path).suffix.lstrip(".").lower() in formats:
        return None
    names = ", ".join(f".{name}" for name in ("png", "svg", "pdf") if name in formats)
    others = "or another format that matplotlib writes"
    return f"a picture's format comes from its suffix: {names} ({others})"


# --- The web page ------------------------------------------------------------------------------------


def attention_html(maps: AttentionMaps, title: str, caption: str = "") -> str:
    """One self-contained HTML page (data and script inlined, nothing loaded from the network) where the
    reader picks kind, layer and head, and hovering a token highlights its weights."""
    data = {
        "kinds": {
            kind: {
                "name": KIND_NAMES[kind],
                "queries": maps.labels(kind)[0],
                "keys": maps.labels(kind)[1],
                # (layers, heads, q, k), 4 decimals: small, and still sums to 1 to display precision
                "weights": [
                    [[[round(w, 4) for w in row] for row in h] for h in layer]
                    for layer in maps.weights[kind].tolist()
                ],
            }
            for kind in KINDS
            if kind in maps.weights
        },
        "reading": READING,
    }
    from qkv import pages

    return pages.fill("attention.html", title=title, caption=caption, data=data)


def write_attention_html(
    path: str | Path, maps: AttentionMaps, title: str, caption: str = ""
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    page = attention_html(maps, title, caption).encode("utf-8")
    atomic_write(path, lambda file: file.write(page))
    return path
