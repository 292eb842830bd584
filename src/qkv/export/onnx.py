"""A trained qkv model as two ONNX graphs: the encoder, and one decoder step with the KV cache as
inputs and outputs. `qkv.onnx` runs them with ONNX Runtime under qkv's own search.

- encoder.onnx: src_ids (batch, src_len) -> cross_keys, cross_values (layers, batch, heads, src_len,
  d_head): the encoder output projected once for every decoder layer's encoder-decoder attention.
- decoder_step.onnx: tokens (rows,), self_keys and self_values (layers, rows, heads, past, d_head),
  cross_keys, cross_values, src_ids (rows, src_len) -> logits (rows, vocab) of the next token, and the
  self-attention keys and values with this position added (past + 1). The position is `past`.

batch, rows, src_len and past are dynamic axes. The graphs use the model's own modules (embeddings,
positions, LayerNorms, feed-forward networks, projections), post-LN or pre-LN; the exporter is
PyTorch's TorchScript-based one, opset OPSET. onnx and onnxruntime are the optional extra `qkv[export]`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from qkv.errors import QkvError
from qkv.export.folder import written_whole
from qkv.inference.engine import _merge_heads, _split_heads, attention_with_bias
from qkv.model import Transformer

OPSET = 17
ENCODER, DECODER_STEP, INFO = "encoder.onnx", "decoder_step.onnx", "qkv_onnx.json"


class EncoderGraph(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, src_ids: Tensor) -> tuple[Tensor, Tensor]:
        memory = self.model.encode(src_ids)  # (batch, src_len, d_model)
        keys, values = [], []
        for layer in self.model.decoder.layers:
            cross = layer.cross_attn
            keys.append(_split_heads(cross.k_proj(memory), cross.n_heads))
            values.append(_split_heads(cross.v_proj(memory), cross.n_heads))
        return torch.stack(keys), torch.stack(values)


class DecoderStepGraph(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        positions = model.tgt_positions
        table = positions.table if hasattr(positions, "table") else positions.embedding.weight
        self.register_buffer("positions", table.detach().clone(), persistent=False)

    def forward(self, tokens, self_keys, self_values, cross_keys, cross_values, src_ids):
        model = self.model
        past = torch.zeros(1, dtype=torch.long) + self_keys.shape[3]  # this token's position
        y = model.tgt_embed(tokens[:, None]) + self.positions[past][None]  # (rows, 1, d_model)
        pad = (src_ids == model.config.pad_id)[:, None, None, :]  # (rows, 1, 1, src_len)
        cross_bias = torch.zeros(pad.shape, dtype=y.dtype).masked_fill(pad, float("-inf"))
        new_keys, new_values = [], []
        for i, layer in enumerate(model.decoder.layers):

            def self_attention(x, i=i, layer=layer):
                attention = layer.self_attn
                q, k, v = (_split_heads(p(x), attention.n_heads) for p in
                           (attention.q_proj, attention.k_proj, attention.v_proj))  # fmt: skip
                k = torch.cat([self_keys[i], k], dim=2)
                v = torch.cat([self_values[i], v], dim=2)
                new_keys.append(k), new_values.append(v)
                return attention.out_proj(_merge_heads(attention_with_bias(q, k, v, None)))

            def cross_attention(x, i=i, layer=layer):
                attention = layer.cross_attn
                q = _split_heads(attention.q_proj(x), attention.n_heads)
                out = attention_with_bias(q, cross_keys[i], cross_values[i], cross_bias)
                return attention.out_proj(_merge_heads(out))

            if layer.norm_first:
                y = y + self_attention(layer.norm1(y))
                y = y + cross_attention(layer.norm2(y))
                y = y + layer.feed_forward(layer.norm3(y))
            else:
                y = layer.norm1(y + self_attention(y))
                y = layer.norm2(y + cross_attention(y))
                y = layer.norm3(y + layer.feed_forward(y))
        logits = model.output(model.decoder.final_norm(y))[:, 0]  # (rows, vocab)
        return logits, torch.stack(new_keys), torch.stack(new_values)


def export_graphs(model: Transformer, out_dir: str | Path, meta: dict | None = None) -> Path:
    """Write encoder.onnx, decoder_step.onnx and qkv_onnx.json (`meta`, the opset and the model's
    config) for `model`."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise QkvError('exporting to ONNX needs its package: pip install "qkv[export]"') from None
    model = model.float().eval()
    config = model.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers, heads, d_head = config.n_decoder_layers, config.n_heads, config.d_head
    src = torch.tensor([[5, 6, 7, config.eos_id], [8, 9, config.eos_id, config.pad_id]])
    cache = torch.zeros(layers, 2, heads, 3, d_head)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch announces its newer exporter; this one is kept
        cross_keys, cross_values = EncoderGraph(model)(src)
        torch.onnx.export(
            EncoderGraph(model), (src,), str(out_dir / ENCODER), dynamo=False,
            input_names=["src_ids"], output_names=["cross_keys", "cross_values"],
            dynamic_axes={"src_ids": {0: "batch", 1: "src_len"},
                          "cross_keys": {1: "batch", 3: "src_len"},
                          "cross_values": {1: "batch", 3: "src_len"}},
            opset_version=OPSET,
        )  # fmt: skip
        torch.onnx.export(
            DecoderStepGraph(model),
            (torch.tensor([5, 6]), cache, cache, cross_keys, cross_values, src),
            str(out_dir / DECODER_STEP), dynamo=False,
            input_names=["tokens", "self_keys", "self_values", "cross_keys", "cross_values",
                         "src_ids"],
            output_names=["logits", "new_self_keys", "new_self_values"],
            dynamic_axes={"tokens": {0: "rows"},
                          "self_keys": {1: "rows", 3: "past"}, "self_values": {1: "rows", 3: "past"},
                          "cross_keys": {1: "rows", 3: "src_len"},
                          "cross_values": {1: "rows", 3: "src_len"},
                          "src_ids": {0: "rows", 1: "src_len"},
                          "logits": {0: "rows"},
                          "new_self_keys": {1: "rows", 3: "next"},
                          "new_self_values": {1: "rows", 3: "next"}},
            opset_version=OPSET,
        )  # fmt: skip
    info = {**(meta or {}), "opset": OPSET, "model_config": config.to_dict()}
    (out_dir / INFO).write_text(json.dumps(info, indent=2))
    return out_dir


def export(path: str | Path, out_dir: str | Path, replace: bool = False) -> Path:
    """Write the model of a run directory or checkpoint as encoder.onnx and decoder_step.onnx in
    `out_dir`, with tokenizer.model and what the runner needs to know (qkv_onnx.json). `out_dir`
    must be new or empty, or with `replace` an earlier export (`qkv.export.folder`)."""
    from qkv.checkpoint import TOKENIZER, load_trained_model

    model, checkpoint_path, meta = load_trained_model(path)
    tokenizer_path = checkpoint_path.parent / TOKENIZER
    if not tokenizer_path.exists():
        raise QkvError(f"{checkpoint_path}: no {TOKENIZER} beside it")
    with written_whole(out_dir, replace) as staging:
        export_graphs(model, staging, {**meta, "source": str(checkpoint_path)})
        shutil.copyfile(tokenizer_path, staging / TOKENIZER)
    return Path(out_dir)
