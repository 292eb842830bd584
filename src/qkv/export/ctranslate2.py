"""A trained qkv model as a CTranslate2 model, built through ctranslate2's own Python specs.

`export(run_or_checkpoint, out_dir, quantization)` writes the directory `ctranslate2.Translator` loads
(model.bin, config.json, the vocabularies) and copies `tokenizer.model` beside it, so that
`qkv translate DIR` translates with it (`qkv.export.ct2_translator`). What it writes, and why:

- the paper's post-LN (`pre_norm=False`) or pre-LN with its final LayerNorms;
- Q, K and V of self-attention fused into one matrix, K and V of encoder-decoder attention into
  another, as CTranslate2's attention expects;
- qkv's own position table (sinusoidal or learned) as the model's `encodings`: CTranslate2's built-in
  sinusoid lays out sines and cosines differently from the paper's interleaved table;
- the embeddings scaled by sqrt(d_model) as qkv's, shared and tied matrices as they are (ctranslate2
  stores a matrix used twice once), LayerNorm's epsilon;
- the SentencePiece vocabulary, its pieces in id order, with qkv's special ids named as CTranslate2's
  unknown, start and end tokens.

`ctranslate2` is the optional extra `qkv[export]`, imported only here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from qkv.errors import QkvError
from qkv.export import QUANTIZATIONS
from qkv.export.folder import MARKERS, written_whole
from qkv.model import Transformer

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which every LayerNorm of qkv's model uses


def _import_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise QkvError(
            'exporting to CTranslate2 needs its package: pip install "qkv[export]"'
        ) from None
    return ctranslate2


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _linear(spec, *linears: torch.nn.Linear) -> None:
    """One CTranslate2 linear from one or more of qkv's, stacked by output (fused projections)."""
    spec.weight = _array(torch.cat([linear.weight for linear in linears]))
    if linears[0].bias is not None:
        spec.bias = _array(torch.cat([linear.bias for linear in linears]))


def _norm(spec, norm: torch.nn.LayerNorm) -> None:
    if not isinstance(norm, torch.nn.LayerNorm):
        raise QkvError(f"CTranslate2 expects a LayerNorm here, not {type(norm).__name__}")
    if norm.eps != LAYER_NORM_EPS:
        raise QkvError(f"LayerNorm epsilon {norm.eps}: the export writes one epsilon for all")
    spec.gamma, spec.beta = _array(norm.weight), _array(norm.bias)


def _self_attention(spec, attention, norm: torch.nn.LayerNorm) -> None:
    """Q, K and V fused into CTranslate2's first linear, W^O its second, and the sublayer's norm."""
    _linear(spec.linear[0], attention.q_proj, attention.k_proj, attention.v_proj)
    _linear(spec.linear[1], attention.out_proj)
    _norm(spec.layer_norm, norm)


def _feed_forward(spec, feed_forward, norm: torch.nn.LayerNorm) -> None:
    _linear(spec.linear_0, feed_forward.linear1)
    _linear(spec.linear_1, feed_forward.linear2)
    _norm(spec.layer_norm, norm)


def _positions(spec, positions) -> None:
    if hasattr(positions, "table"):  # sinusoidal: the paper's table, as qkv computes it
        spec.encodings = _array(positions.table)
    else:  # learned
        spec.encodings = _array(positions.embedding.weight)


def check_exportable(model: Transformer) -> None:
    """An option of qkv that CTranslate2's Transformer cannot express is an error naming it."""
    config = model.config
    if config.activation not in ("relu", "gelu"):
        raise QkvError(f"activation {config.activation!r} has no CTranslate2 equivalent here")
    if model.output.bias is not None:
        raise QkvError("an output projection with a bias cannot be exported")


def build_spec(model: Transformer, vocabulary: list[str], specials: dict[str, int]):
    """The ctranslate2 TransformerSpec of `model`, its weights set, its vocabularies registered."""
    _import_ctranslate2()
    from ctranslate2.specs import common_spec, transformer_spec

    check_exportable(model)
    config = model.config
    if len(vocabulary) != config.src_vocab_size or len(vocabulary) != config.tgt_vocab_size:
        raise QkvError(
            f"the tokenizer has {len(vocabulary)} pieces but the model's vocabularies are "
            f"{config.src_vocab_size} and {config.tgt_vocab_size}"
        )
    activation = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU}
    spec = transformer_spec.TransformerSpec.from_config(
        (config.n_encoder_layers, config.n_decoder_layers),
        config.n_heads,
        pre_norm=config.norm_first,
        activation=activation[config.activation],
    )
    encoder, decoder = spec.encoder, spec.decoder
    encoder.embeddings[0].weight = _array(model.src_embed.weight)
    decoder.embeddings.weight = _array(model.tgt_embed.weight)
    encoder.scale_embeddings = decoder.scale_embeddings = True  # sqrt(d_model), as TokenEmbedding
    _positions(encoder.position_encodings, model.src_positions)
    _positions(decoder.position_encodings, model.tgt_positions)
    for layer_spec, layer in zip(encoder.layer, model.encoder.layers, strict=True):
        _self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        _feed_forward(layer_spec.ffn, layer.feed_forward, layer.norm2)
    for layer_spec, layer in zip(decoder.layer, model.decoder.layers, strict=True):
        _self_attention(layer_spec.self_attention, layer.self_attn, layer.norm1)
        cross = layer.cross_attn
        _linear(layer_spec.attention.linear[0], cross.q_proj)
        _linear(layer_spec.attention.linear[1], cross.k_proj, cross.v_proj)
        _linear(layer_spec.attention.linear[2], cross.out_proj)
        _norm(layer_spec.attention.layer_norm, layer.norm2)
        _feed_forward(layer_spec.ffn, layer.feed_forward, layer.norm3)
    if config.norm_first:  # pre-LN: each stack ends with a LayerNorm
        _norm(encoder.layer_norm, model.encoder.final_norm)
        _norm(decoder.layer_norm, model.decoder.final_norm)
    decoder.projection.weight = _array(model.output.weight)

    spec.config.unk_token = vocabulary[specials["unk"]]
    spec.config.bos_token = spec.config.decoder_start_token = vocabulary[specials["bos"]]
    spec.config.eos_token = vocabulary[specials["eos"]]
    spec.config.add_source_eos = True  # qkv's sources end with EOS
    spec.config.layer_norm_epsilon = LAYER_NORM_EPS
    spec.register_source_vocabulary(vocabulary)
    spec.register_target_vocabulary(vocabulary)
    return spec


def export(
    path: str | Path, out_dir: str | Path, quantization: str | None = None, replace: bool = False
) -> Path:
    """Write the model of a run directory or checkpoint as a CTranslate2 model in `out_dir`
    (quantised as `quantization`, one of QUANTIZATIONS, or kept in float32), with tokenizer.model.
    `out_dir` must be new or empty, or with `replace` an earlier export (`qkv.export.folder`)."""
    from qkv.checkpoint import TOKENIZER, load_trained_model
    from qkv.tokenizer import Tokenizer

    _import_ctranslate2()
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise QkvError(
            f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}"
        )
    model, checkpoint_path, meta = load_trained_model(path)
    tokenizer_path = checkpoint_path.parent / TOKENIZER
    if not tokenizer_path.exists():
        raise QkvError(f"{checkpoint_path}: no {TOKENIZER} beside it")
    tokenizer = Tokenizer.load(tokenizer_path)
    vocabulary = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    specials = {"unk": tokenizer.unk_id, "bos": tokenizer.bos_id, "eos": tokenizer.eos_id}
    spec = build_spec(model.eval(), vocabulary, specials)
    spec.validate()
    spec.optimize(quantization=quantization)
    with written_whole(out_dir, replace) as staging:
        spec.save(str(staging))
        shutil.copyfile(tokenizer_path, staging / TOKENIZER)
        (staging / MARKERS[0]).write_text(
            json.dumps(
                {
                    **meta,
                    "source": str(checkpoint_path),
                    "quantization": quantization,
                    "max_len": model.config.max_len,
                }
            )
        )
    return Path(out_dir)
