"""Self-attention step by step, on the model's own numbers.

`explain` takes one attention sublayer of a model (encoder self-attention, decoder self-attention or
encoder-decoder attention, in any layer), records the input it receives in a real forward pass, and
recomputes its output one step of the paper at a time:

    X  ->  Q = X W^Q, K = X W^K, V = X W^V  ->  Q K^T  ->  / sqrt(d_k)  ->  softmax  ->  Z = softmax(...) V
       ->  Concat(Z_1, ..., Z_h)  ->  Concat(...) W^O

Every intermediate matrix is kept with a one-line description, for the terminal (`render_text`) or a web
page (`render_html`). The last step equals the sublayer's output in the forward pass (tests check it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qkv.attention import MultiHeadAttention, causal_mask
from qkv.kinds import KINDS
from qkv.model import Transformer


@dataclass
class Matrix:
    """A labelled 2-D matrix: rows are tokens; columns are tokens (for weights) or feature indices."""

    label: str
    values: Tensor  # (rows, cols)
    row_labels: list[str]
    col_labels: list[str] | None = None  # None: the columns are features 0..cols-1


@dataclass
class Step:
    name: str
    description: str
    matrices: list[Matrix]
    scale: str = (
        "diverging"  # how a picture colours it: "weights" (0 to 1) or "diverging" (around 0)
    )


@dataclass
class Explanation:
    title: str
    steps: list[Step]
    output: Tensor  # (q_len, d_model): the sublayer's output, as in the forward pass
    notes: list[str] = field(default_factory=list)


@dataclass
class SublayerInput:
    """What one attention sublayer received in the forward pass (batch item 0)."""

    x: Tensor  # (q_len, d_model): the queries' input
    memory: Tensor | None  # (k_len, d_model) for cross-attention, else None (keys come from x)
    mask: Tensor  # (q_len, k_len) bool, True = may attend (padding and causality combined)


def attention_module(model: Transformer, kind: str, layer: int) -> MultiHeadAttention:
    """The MultiHeadAttention of a kind ('encoder', 'decoder', 'cross') and 0-based layer."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; choose {', '.join(KINDS)}")
    stack = model.encoder.layers if kind == "encoder" else model.decoder.layers
    if not 0 <= layer < len(stack):
        raise ValueError(f"layer {layer + 1} does not exist: the {kind} stack has {len(stack)}")
    return stack[layer].cross_attn if kind == "cross" else stack[layer].self_attn


@torch.no_grad()
def record_sublayer(
    model: Transformer, src: Tensor, tgt: Tensor | None, kind: str, layer: int
) -> tuple[SublayerInput, Tensor]:
    """Run the model once (eval mode) and record one attention sublayer's input and output.

    A forward hook (a public PyTorch API, not a patch) sees exactly what the layer passes in, so the
    input is right whatever the layer does before attention: post-LN passes the previous layer's output,
    pre-LN its LayerNorm, and decoder cross-attention the output of the self-attention sublayer.
    src: (1, src_len); tgt: (1, tgt_len) decoder input, needed for the decoder kinds.
    Returns (input, output (q_len, d_model)).
    """
    module = attention_module(model, kind, layer)
    seen = {}

    def keep(_module, args, kwargs, output):
        seen.update(args=args, kwargs=kwargs, output=output[0])

    handle = module.register_forward_hook(keep, with_kwargs=True)
    was_training = model.training
    model.eval()
    try:
        if kind == "encoder":
            model.encode(src)
        else:
            if tgt is None:
                raise ValueError(f"{kind} attention needs the decoder input tgt")
            model(src, tgt)
    finally:
        handle.remove()
        model.train(was_training)

    x, memory = seen["args"][0], (seen["args"][1] if len(seen["args"]) > 1 else None)
    memory = seen["kwargs"].get("memory", memory)
    k_len = (memory if memory is not None else x).size(1)
    mask = torch.ones(1, 1, x.size(1), k_len, dtype=torch.bool)
    if seen["kwargs"].get("mask") is not None:
        mask = mask & seen["kwargs"]["mask"][:1]
    if seen["kwargs"].get("causal"):
        mask = mask & causal_mask(x.size(1), k_len)
    recorded = SublayerInput(x[0], None if memory is None else memory[0], mask[0, 0])
    return recorded, seen["output"][0]


def _linear_name(mha: MultiHeadAttention, which: str) -> str:
    return f"X W^{which}" + (f" + b^{which}" if mha.q_proj.bias is not None else "")


@torch.no_grad()
def explain_attention(
    mha: MultiHeadAttention,
    inputs: SublayerInput,
    query_labels: list[str],
    key_labels: list[str],
    heads: list[int] | None = None,
    input_description: str = "the input vectors, one row per token",
) -> Explanation:
    """Recompute one attention sublayer step by step; `heads` (0-based) are the heads to show (all are
    computed, since the concatenation needs them all)."""
    n_heads, d_head = mha.n_heads, mha.d_head
    heads = list(range(n_heads)) if heads is None else heads
    x = inputs.x  # (q_len, d_model)
    source = (
        x if inputs.memory is None else inputs.memory
    )  # (k_len, d_model): where K and V come from
    # nn.Linear stores W as (out, in): X W^Q is x @ weight.T (+ bias).
    q, k, v = (
        torch.nn.functional.linear(t, proj.weight, proj.bias)
        for t, proj in ((x, mha.q_proj), (source, mha.k_proj), (source, mha.v_proj))
    )  # (q_len | k_len, d_model) each

    def head_slice(t: Tensor, h: int) -> Tensor:  # head h owns features h*d_head .. (h+1)*d_head
        return t[:, h * d_head : (h + 1) * d_head]

    scores, scaled, weights, z = [], [], [], []
    for h in range(n_heads):
        s = head_slice(q, h) @ head_slice(k, h).T  # (q_len, k_len)
        s_scaled = s / math.sqrt(d_head)
        w = torch.softmax(s_scaled.masked_fill(~inputs.mask, torch.finfo(s.dtype).min), dim=-1)
        w = w.masked_fill(~inputs.mask, 0.0)
        scores.append(s), scaled.append(s_scaled), weights.append(w)
        z.append(w @ head_slice(v, h))  # (q_len, d_head)
    concat = torch.cat(z, dim=-1)  # (q_len, d_model)
    output = torch.nn.functional.linear(concat, mha.out_proj.weight, mha.out_proj.bias)

    def per_head(name: str, tensors: list[Tensor], rows: list[str], cols: list[str] | None):
        return [Matrix(f"{name}, head {h + 1}", tensors[h], rows, cols) for h in heads]

    q_rows, k_rows = query_labels, key_labels
    kv_from = "X" if inputs.memory is None else "M"  # M: the encoder output (memory)
    kv_note = (
        "" if inputs.memory is None else " (M = the encoder output: keys come from the source)"
    )
    masked = bool((~inputs.mask).any())
    steps = [
        Step("X", input_description, [Matrix("X", x, q_rows)]),
        Step(
            "Q = " + _linear_name(mha, "Q"),
            f"each token's query: what it looks for; each head has its own {d_head} of the "
            f"{n_heads * d_head} features",
            per_head("Q", [head_slice(q, h) for h in range(n_heads)], q_rows, None),
        ),
        Step(
            "K = " + _linear_name(mha, "K").replace("X", kv_from, 1),
            "each token's key: what it offers to be found by" + kv_note,
            per_head("K", [head_slice(k, h) for h in range(n_heads)], k_rows, None),
        ),
        Step(
            "V = " + _linear_name(mha, "V").replace("X", kv_from, 1),
            "each token's value: what it passes on when attended to",
            per_head("V", [head_slice(v, h) for h in range(n_heads)], k_rows, None),
        ),
        Step(
            "Q K^T",
            "dot product of every query with every key: how well they match (row = query, column = key)",
            per_head("Q K^T", scores, q_rows, k_rows),
        ),
        Step(
            f"/ sqrt(d_k) = / {math.sqrt(d_head):.2f}",
            f"scaled by sqrt(d_k), d_k = {d_head}, so large dot products do not saturate the softmax",
            per_head("Q K^T / sqrt(d_k)", scaled, q_rows, k_rows),
        ),
        Step(
            "softmax",
            "each row turned into weights that are positive and sum to 1"
            + ("; masked positions (later or padding tokens) get weight 0" if masked else ""),
            per_head("softmax(Q K^T / sqrt(d_k))", weights, q_rows, k_rows),
            scale="weights",
        ),
        Step(
            "Z = softmax(...) V",
            "each token's new vector: the values, averaged with its attention weights",
            per_head("Z", z, q_rows, None),
        ),
        Step(
            "Concat(Z_1, ..., Z_h)",
            f"the {n_heads} heads' outputs side by side: {n_heads} x {d_head} = {n_heads * d_head} features",
            [Matrix("Concat", concat, q_rows)],
        ),
        Step(
            "Concat(...) W^O" + (" + b^O" if mha.out_proj.bias is not None else ""),
            "mixed back into d_model features by W^O: the attention sublayer's output",
            [Matrix("MultiHead(Q, K, V)", output, q_rows)],
        ),
    ]
    notes = []
    if len(heads) < n_heads:
        shown = ", ".join(str(h + 1) for h in heads)
        notes.append(
            f"showing head(s) {shown} of {n_heads}; every head is computed for the concatenation"
        )
    return Explanation("", steps, output, notes)


def describe_input(model: Transformer, kind: str, layer: int) -> str:
    """One line saying where X of a sublayer comes from, for this model's layout (post-LN or pre-LN)."""
    pre_ln = model.config.norm_first
    if kind == "cross":
        what = "the decoder's state after its self-attention sublayer"
        what += " (pre-LN: layer-normalised)" if pre_ln else ""
        return f"X: {what}; keys and values come from the encoder output"
    side = "source" if kind == "encoder" else "target"
    if layer == 0:
        what = f"the {side} token embeddings x sqrt(d_model) plus the position encodings"
    else:
        what = f"the output of {kind} layer {layer}"
    if pre_ln:
        what = f"LayerNorm of {what} (pre-LN)"
    return f"X: {what}, one row per token"


def explain(
    model: Transformer,
    src_ids: list[int],
    src_labels: list[str],
    kind: str = "encoder",
    layer: int = 0,
    heads: list[int] | None = None,
    tgt_ids: list[int] | None = None,
    tgt_labels: list[str] | None = None,
) -> Explanation:
    """The step-by-step of one attention sublayer (0-based layer and heads) on one sentence."""
    src = torch.as_tensor(src_ids).view(1, -1)
    tgt = None if tgt_ids is None else torch.as_tensor(tgt_ids).view(1, -1)
    if heads is not None:
        for h in heads:
            if not 0 <= h < model.config.n_heads:
                raise ValueError(
                    f"head {h + 1} does not exist: the model has {model.config.n_heads}"
                )
    inputs, _ = record_sublayer(model, src, tgt, kind, layer)
    queries = src_labels if kind == "encoder" else tgt_labels
    keys = tgt_labels if kind == "decoder" else src_labels
    result = explain_attention(
        attention_module(model, kind, layer),
        inputs,
        queries,
        keys,
        heads,
        input_description=describe_input(model, kind, layer),
    )
    names = {"encoder": "Encoder self-attention", "decoder": "Decoder self-attention"}
    result.title = (
        f"{names.get(kind, 'Encoder-decoder attention')}, layer {layer + 1}, step by step"
    )
    return result


# --- Rendering ----------------------------------------------------------------------------------------


def _visible(n: int, limit: int) -> list[int | None]:
    """Indices to print when at most `limit` fit: the first and last ones, None for the elided middle."""
    if n <= limit:
        return list(range(n))
    head = (limit + 1) // 2
    return [*range(head), None, *range(n - (limit - head), n)]


def format_matrix(m: Matrix, max_rows: int = 12, max_cols: int = 8, digits: int = 2) -> str:
    """A matrix as aligned text, rounded, with wide or tall matrices elided in the middle (…)."""
    rows, cols = m.values.shape
    col_names = m.col_labels or [str(j) for j in range(cols)]
    width = max(digits + 5, *(len(c[:10]) for c in col_names))
    label_width = max(len(r[:14]) for r in m.row_labels) if m.row_labels else 0
    lines = [f"{m.label}  ({rows} x {cols})"]
    col_index = _visible(cols, max_cols)
    header = [" " * label_width] + [
        "…".rjust(width) if j is None else col_names[j][:10].rjust(width) for j in col_index
    ]
    lines.append(" ".join(header))
    for i in _visible(rows, max_rows):
        if i is None:
            lines.append("⋮".rjust(label_width))
            continue
        cells = [
            "…".rjust(width) if j is None else f"{float(m.values[i, j]):.{digits}f}".rjust(width)
            for j in col_index
        ]
        lines.append(" ".join([m.row_labels[i][:14].ljust(label_width), *cells]))
    return "\n".join(lines)


def render_text(explanation: Explanation, **limits) -> str:
    """The walk-through for a terminal: each step's name, its one-line description, its matrices."""
    out = [explanation.title, "=" * len(explanation.title), *explanation.notes, ""]
    for number, step in enumerate(explanation.steps, 1):
        out.append(f"{number}. {step.name}")
        out.append(f"   {step.description}")
        for matrix in step.matrices:
            out.append("")
            out.extend("   " + line for line in format_matrix(matrix, **limits).splitlines())
        out.append("")
    return "\n".join(out)


def to_dict(explanation: Explanation, digits: int = 4) -> dict:
    """The walk-through as plain JSON-able data (what the server's /v1/explain answers and the pages
    draw), values rounded to `digits` decimals: 1e-4 is below what a picture shows."""

    def rounded(values: Tensor) -> list:
        return torch.round(values.float(), decimals=digits).tolist()

    return {
        "title": explanation.title,
        "notes": explanation.notes,
        "steps": [
            {
                "name": step.name,
                "description": step.description,
                "scale": step.scale,
                "matrices": [
                    {
                        "label": matrix.label,
                        "shape": list(matrix.values.shape),
                        "values": rounded(matrix.values),
                        "row_labels": matrix.row_labels,
                        "col_labels": matrix.col_labels,
                    }
                    for matrix in step.matrices
                ],
            }
            for step in explanation.steps
        ],
        "output": rounded(explanation.output),
    }


def render_html(explanation: Explanation) -> str:
    """The walk-through as one self-contained web page (nothing from the network): each matrix drawn
    as a coloured grid with its shape and the number on hover, by the drawing `qkv serve`'s page uses."""
    from qkv import pages

    return pages.fill("explain.html", title=explanation.title, data=to_dict(explanation))


def random_model(text: str) -> tuple[Transformer, list[int], list[str]]:
    """A seeded, randomly initialised tiny model whose vocabulary is the words of `text`, with the
    text's ids and labels (EOS last): the steps of attention without a training run. Its special ids
    are the tokenizer's (`qkv.tokenizer.SPECIALS`); each distinct word gets the next id."""
    from qkv.errors import QkvError
    from qkv.model import TransformerConfig
    from qkv.tokenizer import SPECIALS

    words = text.split()
    if not words:
        raise QkvError("the text is empty")
    first_id = max(SPECIALS.pad, SPECIALS.unk, SPECIALS.bos, SPECIALS.eos) + 1
    vocab = {word: first_id + i for i, word in enumerate(dict.fromkeys(words))}
    torch.manual_seed(0)
    size = first_id + len(vocab)
    config = TransformerConfig.preset(
        "tiny",
        src_vocab_size=size,
        tgt_vocab_size=size,
        pad_id=SPECIALS.pad,
        bos_id=SPECIALS.bos,
        eos_id=SPECIALS.eos,
    )
    model = Transformer(config).eval()
    return model, [vocab[w] for w in words] + [config.eos_id], [*words, "</s>"]
