"""Checkpoints are written atomically, load without executing code, and fail clearly when damaged."""

import pytest
import torch

from qkv.checkpoint import (
    load_checkpoint,
    load_model,
    model_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from qkv.errors import QkvError
from qkv.model import Transformer, TransformerConfig


def tiny():
    torch.manual_seed(0)
    return Transformer(
        TransformerConfig.preset("tiny", src_vocab_size=20, tgt_vocab_size=20)
    ).eval()


def test_round_trip_gives_the_same_model(tmp_path):
    model = tiny()
    save_checkpoint(tmp_path / "best.pt", model_checkpoint(model, step=7))
    loaded, path = load_model(tmp_path)
    assert path == tmp_path / "best.pt"
    assert loaded.config == model.config
    assert loaded.output.weight is loaded.tgt_embed.embedding.weight  # tying survives loading
    src, tgt = torch.randint(4, 20, (2, 5)), torch.randint(4, 20, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(src, tgt), model(src, tgt), rtol=0, atol=0)
    assert not list(tmp_path.glob("*.tmp"))  # no temporary file left behind


def test_run_directory_falls_back_to_last(tmp_path):
    save_checkpoint(tmp_path / "last.pt", model_checkpoint(tiny()))
    assert resolve_checkpoint(tmp_path) == tmp_path / "last.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(QkvError, match=r"neither best\.pt nor last\.pt"):
        resolve_checkpoint(empty)


def test_truncated_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, model_checkpoint(tiny()))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(QkvError, match=r"last\.pt: not a readable checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(QkvError, match="no such run directory or checkpoint"):
        resolve_checkpoint(tmp_path / "nope.pt")
