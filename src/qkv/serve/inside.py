"""What the API shows of the model's insides, as JSON: every attention weight of a translation, and
the step-by-step of one attention sublayer (`qkv.explain`), computed by the same code as the
command line's pictures and walk-throughs."""

from __future__ import annotations

import torch

from qkv import explain, visualize
from qkv.kinds import KINDS
from qkv.translate import Hypothesis, Translator

DIGITS = 4  # attention weights and vectors rounded for the wire: 1e-4 is below what a picture shows


def _rounded(values: torch.Tensor) -> list:
    return torch.round(values.float(), decimals=DIGITS).tolist()


def attention_json(translator: Translator, sentence: str, hypothesis: Hypothesis) -> dict:
    """Every attention weight the model uses to translate `sentence` into `hypothesis`: per kind
    (encoder, decoder, cross), (layers, heads, queries, keys), with the subword labels of both sides."""
    tokenizer, model = translator.tokenizer, translator.model
    src_ids = visualize.source_ids(model, tokenizer, sentence)
    tgt_ids = [tokenizer.bos_id, *hypothesis.ids]  # the decoder's input: BOS, then the translation
    pieces = tokenizer.id_to_piece
    maps = visualize.collect_attention(
        model, src_ids, tgt_ids, [pieces(i) for i in src_ids], [pieces(i) for i in tgt_ids]
    )
    return {
        "src_tokens": maps.src_labels,
        "tgt_tokens": maps.tgt_labels,
        **{kind: _rounded(maps.weights[kind]) for kind in KINDS},
    }


def explanation_json(
    translator: Translator,
    sentence: str,
    kind: str,
    layer: int,
    heads: list[int] | None,
    translation: str | None = None,
) -> dict:
    """`qkv.explain.explain` of one sublayer (layer and heads 0-based) on `sentence`, as JSON. The
    decoder's sublayers read `translation` (BOS, then its subwords, as the decoder reads a hypothesis)
    or, when it is None, the greedy translation."""
    tokenizer, model = translator.tokenizer, translator.model
    src_ids = visualize.source_ids(model, tokenizer, sentence)
    labels = [tokenizer.id_to_piece(i) for i in src_ids]
    tgt_ids = tgt_labels = None
    if kind != "encoder":
        if translation is None:
            tgt_ids, translation = visualize.greedy_decoder_input(model, tokenizer, src_ids)
        else:
            tgt_ids = [tokenizer.bos_id, *tokenizer.encode(translation)]
        tgt_labels = [tokenizer.id_to_piece(i) for i in tgt_ids]
    result = explain.explain(model, src_ids, labels, kind, layer, heads, tgt_ids, tgt_labels)
    return {**explain.to_dict(result, DIGITS), "translation": translation}
