"""Checkpoints are written atomically, load without executing code, and fail clearly when damaged."""

import re
from pathlib import Path

import pytest
import torch

from qkv.checkpoint import (
    ParametersNotDrawn,
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
    buffers = zip(loaded.named_buffers(), model.named_buffers(), strict=True)
    for (name, buffer), (_, saved) in buffers:  # the sinusoids' tables, which no checkpoint holds
        assert torch.equal(buffer, saved), name


def test_a_checkpoint_without_a_parameter_does_not_load(tmp_path):
    # Parameters are not drawn before loading (`ParametersNotDrawn`): one left out must not pass.
    checkpoint = model_checkpoint(tiny())
    del checkpoint["model"]["decoder.layers.0.cross_attn.q_proj.weight"]
    save_checkpoint(tmp_path / "best.pt", checkpoint)
    wrong = r"best\.pt: its weights do not fit its model_config: Missing key.*cross_attn\.q_proj\.weight"
    with pytest.raises(QkvError, match=wrong):
        load_model(tmp_path)


def damaged(tmp_path, damage) -> Path:
    """A run directory whose best.pt is the tiny model's checkpoint, changed by `damage`."""
    checkpoint = model_checkpoint(tiny())
    damage(checkpoint)
    save_checkpoint(tmp_path / "best.pt", checkpoint)
    return tmp_path


def test_a_model_config_this_qkv_cannot_build_is_one_line_naming_the_file(tmp_path):
    def unknown(checkpoint):
        checkpoint["model_config"]["rotary"] = True

    with pytest.raises(QkvError, match=r"best\.pt: .* settings this qkv does not know: rotary"):
        load_model(damaged(tmp_path, unknown))

    def not_a_table(checkpoint):
        checkpoint["model_config"] = [1, 2]

    with pytest.raises(QkvError, match=r"best\.pt: its model_config is not a table of settings"):
        load_model(damaged(tmp_path, not_a_table))

    def impossible(checkpoint):
        checkpoint["model_config"]["n_heads"] = 5

    with pytest.raises(QkvError, match=r"best\.pt: its model_config is not a valid one: .*n_heads"):
        load_model(damaged(tmp_path, impossible))

    def no_weights(checkpoint):
        checkpoint["model"] = "weights"

    with pytest.raises(QkvError, match=r"best\.pt: checkpoint has no weights"):
        load_model(damaged(tmp_path, no_weights))


def test_weights_of_another_size_name_a_few_misfits_not_all(tmp_path):
    def wider(checkpoint):
        checkpoint["model_config"]["d_model"] = 128

    with pytest.raises(QkvError) as error:
        load_model(damaged(tmp_path, wider))
    message = str(error.value)
    assert "do not fit its model_config: size mismatch" in message
    assert re.search(r" \.\.\. and \d+ more$", message) and len(message) < 1000, message


def test_parameters_not_drawn_leaves_parameters_only():
    parameter = torch.nn.Parameter(torch.full((3,), 7.0))
    with ParametersNotDrawn():
        torch.nn.init.xavier_uniform_(parameter.view(1, 3))  # a view is not the parameter: drawn
        assert not torch.equal(parameter, torch.full((3,), 7.0))
        parameter.data.fill_(7.0)
        torch.nn.init.normal_(parameter)
        torch.nn.init.zeros_(tensor=parameter)
        parameter.uniform_()
        parameter.zero_()
        other = torch.empty(3).fill_(2.0)  # not a parameter: filled
        linear = torch.nn.Linear(4, 4)
    assert torch.equal(parameter, torch.full((3,), 7.0))
    assert torch.equal(other, torch.full((3,), 2.0))
    linear.weight.data.fill_(1.0)
    torch.nn.init.zeros_(linear.weight)  # outside it, as always
    assert not linear.weight.any()


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
