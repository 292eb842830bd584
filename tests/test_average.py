"""Checkpoint averaging: the mean of the parameters, exact for copies, tied weights kept tied."""

import pytest
import torch

from qkv.checkpoint import (
    average_checkpoints,
    load_checkpoint,
    load_model,
    model_checkpoint,
    save_checkpoint,
)
from qkv.errors import QkvError
from qkv.model import Transformer, TransformerConfig


def tiny(seed, **overrides):
    torch.manual_seed(seed)
    config = TransformerConfig.preset("tiny", src_vocab_size=20, tgt_vocab_size=20, **overrides)
    return Transformer(config).eval()


def test_averaging_copies_of_one_checkpoint_gives_its_weights_exactly(toy_run):
    path = toy_run / "best.pt"
    averaged = average_checkpoints([path, path, path])
    original = load_checkpoint(path)["model"]
    assert averaged["model"].keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(averaged["model"][name], tensor), name


def test_average_is_the_mean_and_keeps_ties(tmp_path):
    models = [tiny(seed) for seed in (1, 2, 3)]
    paths = [tmp_path / f"checkpoint_{i}.pt" for i in range(3)]
    for model, path in zip(models, paths, strict=True):
        save_checkpoint(path, model_checkpoint(model, step=int(path.stem[-1]), meta={"x": 1}))
    averaged = average_checkpoints(paths)
    name = "decoder.layers.0.feed_forward.linear1.weight"
    expected = sum(m.state_dict()[name] for m in models) / 3
    torch.testing.assert_close(averaged["model"][name], expected)
    state = averaged["model"]
    assert state["output.weight"] is state["tgt_embed.embedding.weight"]  # saved once, still tied
    assert averaged["step"] == 2 and averaged["meta"] == {"x": 1}
    save_checkpoint(tmp_path / "avg.pt", averaged)
    model, _ = load_model(tmp_path / "avg.pt")
    assert model.output.weight is model.tgt_embed.embedding.weight


def test_average_rejects_different_models(tmp_path):
    save_checkpoint(tmp_path / "a.pt", model_checkpoint(tiny(0)))
    save_checkpoint(tmp_path / "b.pt", model_checkpoint(tiny(0, d_ff=128)))
    with pytest.raises(QkvError, match=r"b\.pt: model configuration differs"):
        average_checkpoints([tmp_path / "a.pt", tmp_path / "b.pt"])


def test_cli_average_last_n_translates_like_the_original(run_qkv, toy_run, tmp_path):
    out = tmp_path / "averaged" / "model.pt"
    result = run_qkv("average", toy_run, "--last", "2", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "checkpoint_100.pt, checkpoint_200.pt" in result.stderr
    assert (out.parent / "tokenizer.model").is_file()  # copied, so the average translates alone
    averaged = run_qkv("translate", out, input="a b c\np o n\n")
    original = run_qkv("translate", toy_run, input="a b c\np o n\n")
    assert averaged.returncode == 0, averaged.stderr
    assert averaged.stdout == original.stdout == "c b a\nn o p\n"


def test_cli_average_asks_for_enough_checkpoints(run_qkv, toy_run, tmp_path):
    result = run_qkv("average", toy_run, "--last", "5", "-o", tmp_path / "x.pt")
    assert result.returncode == 2
    assert "asked for the last 5 checkpoints but it has 2" in result.stderr
    checkpoint = toy_run / "checkpoint_100.pt"
    result = run_qkv("average", checkpoint, "--last", "2", "-o", tmp_path / "x.pt")
    assert result.returncode == 2
    assert f"{checkpoint}: is a checkpoint; --last N takes a run directory" in result.stderr


def test_average_into_a_folder_with_another_tokenizer_is_refused_before_writing(toy_run, tmp_path):
    """It averaged, said so, and left a checkpoint that `qkv translate` refused: the tokenizer beside
    it (1000 subwords) was not the run's (200)."""
    from qkv.checkpoint import save_average, step_checkpoints

    (tmp_path / "tokenizer.model").write_bytes(b"another run's tokenizer")
    with pytest.raises(QkvError) as error:
        save_average(step_checkpoints(toy_run), tmp_path / "model.pt")
    assert str(error.value) == (
        f"{tmp_path / 'tokenizer.model'} is not {toy_run}'s tokenizer: the average would not "
        "translate with it; choose another -o folder"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tokenizer.model"]
    # The run's own tokenizer there already: averaged, nothing copied.
    (tmp_path / "tokenizer.model").write_bytes((toy_run / "tokenizer.model").read_bytes())
    assert save_average(step_checkpoints(toy_run), tmp_path / "model.pt") is None
    assert (tmp_path / "model.pt").is_file()
