"""Translating with the ONNX graphs of `qkv export --format onnx` (`qkv.export.onnx`) on ONNX Runtime.

`OnnxEngine` answers the decoding engine's calls (`encode`, `new_cache`, `step`) by running the
encoder graph once per batch and the decoder-step graph once per position, its KV cache held as
arrays between calls; so qkv's own searches (`qkv.search`: greedy and beam, every option) run on
it, and `OnnxTranslator` is `qkv.translate.Translator` on that engine: `qkv translate DIR` and
`qkv evaluate DIR` work on an exported directory as on a run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from qkv.checkpoint import TOKENIZER
from qkv.errors import QkvError
from qkv.export.onnx import DECODER_STEP, ENCODER, INFO
from qkv.inference.engine import NextToken
from qkv.model import TransformerConfig
from qkv.tokenizer import Tokenizer
from qkv.translate import Translator


def is_onnx_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and all((path / name).is_file() for name in (ENCODER, DECODER_STEP, INFO))


class OnnxCache:
    """The decoder's keys and values between steps, one row per hypothesis: self-attention's grow by
    one position a step; the encoder-decoder attention's and the source ids are set at the first."""

    def __init__(self):
        self.self_keys = self.self_values = None  # (layers, rows, heads, past, d_head)
        self.cross_keys = self.cross_values = self.src_ids = None

    def __len__(self) -> int:
        return 0 if self.self_keys is None else self.self_keys.shape[3]

    def reorder(self, index: Tensor, cross_attention: bool = True) -> None:
        """Keep rows `index`, in that order (qkv.inference.BeamCache's contract). cross_attention=False:
        beams moved within their sentences, whose encoder-side rows are equal: those stay."""
        rows = index.cpu().numpy()
        self.self_keys = np.take(self.self_keys, rows, axis=1)
        self.self_values = np.take(self.self_values, rows, axis=1)
        if cross_attention:
            self.cross_keys = np.take(self.cross_keys, rows, axis=1)
            self.cross_values = np.take(self.cross_values, rows, axis=1)
            self.src_ids = np.take(self.src_ids, rows, axis=0)


class OnnxEngine(NextToken):
    """The two graphs on ONNX Runtime, with the calls of `qkv.inference.DecodingEngine`."""

    model = None  # no PyTorch model: the searches leave train/eval alone

    def __init__(self, path: str | Path, threads: int | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise QkvError(
                f'{path} is an ONNX model: pip install "qkv[export]" to translate with it'
            ) from None
        path = Path(path)
        self.info = json.loads((path / INFO).read_text())
        self.config = TransformerConfig.from_dict(self.info["model_config"])
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Idle threads sleep rather than spin: spinning took the cores from PyTorch's own threads
        # (the search between steps), halving qkv's speed in the same process.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        self.encoder = onnxruntime.InferenceSession(
            str(path / ENCODER), options, providers=providers
        )
        self.decoder = onnxruntime.InferenceSession(
            str(path / DECODER_STEP), options, providers=providers
        )

    def encode(self, src_ids: Tensor) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        """src_ids (batch, src_len) -> ((cross keys, cross values), the source ids): what the first
        `step` stores in the cache (the search passes them through as memory and mask)."""
        ids = src_ids.cpu().numpy().astype(np.int64)
        keys, values = self.encoder.run(None, {"src_ids": ids})
        return (keys, values), ids

    def new_cache(
        self, max_beams: int = 1, max_len: int | None = None, sentences: int | None = None
    ) -> OnnxCache:
        return OnnxCache()

    def step(self, last_tokens: Tensor, memory, src_ids, cache: OnnxCache) -> Tensor:
        """(rows,) the newest token of each row -> (rows, 1, vocab) logits of the next one."""
        if cache.self_keys is None:  # the first step: rows are the encoder's rows
            cache.cross_keys, cache.cross_values = memory
            cache.src_ids = src_ids
            config = self.config
            shape = (config.n_decoder_layers, len(src_ids), config.n_heads, 0, config.d_head)
            cache.self_keys = cache.self_values = np.zeros(shape, dtype=np.float32)
        logits, cache.self_keys, cache.self_values = self.decoder.run(None, {
            "tokens": last_tokens.cpu().numpy().astype(np.int64),
            "self_keys": cache.self_keys, "self_values": cache.self_values,
            "cross_keys": cache.cross_keys, "cross_values": cache.cross_values,
            "src_ids": cache.src_ids,
        })  # fmt: skip
        return torch.from_numpy(logits)[:, None]


class OnnxTranslator(Translator):
    """`Translator` (hypotheses, translate, tokenizer, meta) on an exported ONNX directory."""

    def __init__(self, path: str | Path, tokenizer: str | Path | None = None, device: str = "cpu",
                 precision: str = "auto", warn=None, threads: int | None = None):  # fmt: skip
        path = Path(path)
        if device != "cpu" or precision not in ("auto", "fp32"):
            raise QkvError(f"{path}: the ONNX graphs run in fp32 on the CPU here")
        tokenizer_path = Path(tokenizer) if tokenizer else path / TOKENIZER
        if not tokenizer_path.exists():
            raise QkvError(f"{path}: no {TOKENIZER} in it; pass the tokenizer's path (--tokenizer)")
        self._engine = OnnxEngine(path, threads)
        self.model = self._engine  # what Translator reads of a model: its config
        self.tokenizer = Tokenizer.load(tokenizer_path)
        self.device = torch.device("cpu")
        self.meta = self._engine.info
        self.precision = "onnxruntime fp32"
        self._warn = warn

    def refresh(self) -> None:  # the graphs do not change
        pass
