"""Training: the paper's recipe, exact resume after SIGKILL, data parallelism, and a run directory a user
can rely on."""

import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import qkv_env
from qkv import hardware
from qkv.checkpoint import load_checkpoint, step_checkpoints
from qkv.config import load_config
from qkv.data import EncodedSplit
from qkv.distributed import Distributed, training_device
from qkv.errors import QkvError
from qkv.prepare import load_prepared, prepare
from qkv.schedule import learning_rate
from qkv.train import Trainer, train
from qkv.training_data import check_lengths


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The built-in task, small: prepared once for the whole module."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(out, dataset="synthetic", train_size=1500, valid_size=40, test_size=40, progress=False)
    return out


def tiny_config(prepared, *overrides):
    return load_config(
        None,
        [
            "model.preset=tiny",
            "model.dropout=0.0",
            f"data.prepared='{prepared}'",
            "train.max_steps=12",
            "train.max_tokens=512",
            "train.warmup_steps=10",
            "train.save_every=4",
            "train.keep_last=2",
            "train.log_every=2",
            "train.threads=1",
            "train.device='cpu'",  # bitwise-exact resume: CUDA's embedding backward is not deterministic
            "train.precision='fp32'",  # the same arithmetic on every CPU ('auto' has its own test)
            "eval.every_steps=6",
            "eval.max_sentences=8",
            *overrides,
        ],
    )


def parameters(path):
    return load_checkpoint(path)["model"]


def assert_bitwise_equal(state_a, state_b):
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


# -- the recipe ------------------------------------------------------------------------------------
def test_noam_schedule_warms_up_then_decays_as_in_the_paper():
    d_model, warmup = 512, 4000
    values = [learning_rate(s, "noam", 1.0, d_model, warmup) for s in (1, 2000, 4000, 16000)]
    assert values[0] < values[1] < values[2] > values[3]
    assert values[2] == pytest.approx(d_model**-0.5 * warmup**-0.5)
    assert values[3] == pytest.approx(values[2] / 2)  # inverse square root of the step
    assert learning_rate(4000, "inverse_sqrt", 5e-4, d_model, warmup) == pytest.approx(5e-4)
    assert learning_rate(16000, "inverse_sqrt", 5e-4, d_model, warmup) == pytest.approx(2.5e-4)


def test_cosine_schedule_warms_up_then_anneals_to_zero_at_max_steps():
    def lr(step):
        return learning_rate(step, "cosine", 5e-3, 64, warmup=30, max_steps=250)

    assert lr(15) == pytest.approx(2.5e-3)  # linear warm-up
    assert lr(30) == pytest.approx(5e-3)  # the peak is train.lr, whatever d_model
    assert lr(140) == pytest.approx(2.5e-3)  # half-way down the cosine
    assert lr(250) == pytest.approx(0.0, abs=1e-12)
    assert lr(300) == pytest.approx(0.0, abs=1e-12)  # past max_steps (a resumed run): stays at 0
    values = [lr(step) for step in range(30, 251)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    with pytest.raises(QkvError, match="max_steps"):
        learning_rate(10, "cosine", 5e-3, 64, warmup=30, max_steps=0)


def test_accumulated_update_equals_one_big_batch(prepared, tmp_path):
    """update_freq splits the batch, not the gradient: loss per token over the whole update."""
    data = load_prepared(prepared)
    config = tiny_config(prepared)
    first, second = data.train.collate(range(0, 6)), data.train.collate(range(6, 20))
    whole = data.train.collate(range(20))
    accumulated = Trainer(config, tmp_path, data, Distributed(), log=lambda *_: None)
    single = Trainer(config, tmp_path, data, Distributed(), log=lambda *_: None)
    gradients_accumulated, stats_accumulated = update_and_gradients(accumulated, [first, second])
    gradients_single, stats_single = update_and_gradients(single, [whole])
    assert stats_accumulated["loss"] == pytest.approx(stats_single["loss"], rel=1e-5)
    assert_same_gradients(gradients_accumulated, gradients_single)


def test_an_update_skips_the_padding_and_equals_one_over_every_position(prepared, tmp_path):
    data = load_prepared(prepared)
    batch = data.train.collate(range(0, 24, 2))  # ragged lengths: padding on both sides
    assert (batch.tgt_out == 0).any() and (batch.src == 0).any()
    skipping = quiet_trainer(tiny_config(prepared), tmp_path, data)
    every = quiet_trainer(tiny_config(prepared), tmp_path, data)
    every.config.train.compile = True  # as when compiled (no model wrapped here): every position
    logits, targets = skipping.logits(batch.src, batch.tgt_in, batch.tgt_out)
    assert logits.shape[0] == targets.shape[0] == batch.n_tgt_tokens
    assert every.logits(batch.src, batch.tgt_in, batch.tgt_out)[0].shape[:2] == batch.tgt_out.shape
    gradients_skipping, stats_skipping = update_and_gradients(skipping, [batch])
    gradients_every, stats_every = update_and_gradients(every, [batch])
    assert stats_skipping["loss"] == pytest.approx(stats_every["loss"], rel=1e-5)
    assert_same_gradients(gradients_skipping, gradients_every)


def update_and_gradients(trainer: Trainer, batches) -> tuple[dict, dict]:
    """One update of `trainer` over `batches`: the gradients its optimizer step took (by parameter
    name) and the update's statistics."""
    gradients, step = {}, trainer.optimizer.step

    def step_and_keep(*args, **kwargs):
        for name, parameter in trainer.model.named_parameters():
            gradients[name] = parameter.grad.detach().clone()
        return step(*args, **kwargs)

    trainer.optimizer.step = step_and_keep
    return gradients, trainer.update(batches)


def assert_same_gradients(gradients: dict, others: dict) -> None:
    """The same gradients up to summation order: within 1e-6 of the largest of any parameter. Not the
    parameters after the step: Adam's first step takes each gradient to ~lr times its sign, and some
    are zero but for rounding (a key's bias adds one number to all of a query's scores, which the
    softmax ignores): on PyTorch 2.8's oneDNN held to AVX2, the keys' biases came out 1e-3 apart
    (session 58)."""
    assert gradients.keys() == others.keys() and gradients
    largest = max(g.abs().max().item() for g in others.values())
    assert largest > 0
    for name, gradient in gradients.items():
        torch.testing.assert_close(
            gradient,
            others[name],
            atol=1e-6 * largest,
            rtol=1e-5,
            msg=lambda m, name=name: f"{name}: {m}",
        )


# -- BPE-dropout -----------------------------------------------------------------------------------


def quiet_trainer(config, run_dir, data):
    return Trainer(config, run_dir, data, Distributed(), log=lambda *_: None)


def test_subword_dropout_segments_each_epoch_anew_the_same_way_every_time(prepared, tmp_path):
    data = load_prepared(prepared)
    config = tiny_config(prepared, "data.subword_dropout=0.3")
    trainer = quiet_trainer(config, tmp_path, data)
    epoch_0, _ = trainer.epoch_split(0)
    epoch_1, sampler_1 = trainer.epoch_split(1)
    assert epoch_0.src != epoch_1.src  # (the targets are ISO dates: a token a character, no merges)
    assert epoch_0.src != data.train.src, "merges were dropped: not the prepared segmentation"
    assert sum(map(len, epoch_0.src)) > sum(map(len, data.train.src))
    for i in range(0, len(data.train), 97):  # another segmentation of the same text
        assert data.tokenizer.decode(epoch_1.src[i]) == data.train.src_text[i]
        assert data.tokenizer.decode(epoch_1.tgt[i]) == data.train.tgt_text[i]
    assert sampler_1.batches(1) != trainer.sampler.batches(1), "batches follow the new lengths"

    again = quiet_trainer(config, tmp_path, data)  # another process, or a resumed run
    assert again.epoch_split(1)[0].src == epoch_1.src and again.epoch_split(0)[0].tgt == epoch_0.tgt

    source_only = tiny_config(
        prepared, "data.subword_dropout=0.3", "data.subword_dropout_side='source'"
    )
    split, _ = quiet_trainer(source_only, tmp_path, data).epoch_split(1)
    assert split.src == epoch_1.src and split.tgt == data.train.tgt

    off = quiet_trainer(tiny_config(prepared), tmp_path, data)
    assert off.epoch_split(3)[0] is data.train


def test_subword_dropout_keeps_prepared_ids_where_a_sample_is_too_long(prepared, tmp_path):
    data = load_prepared(prepared)
    longest = max(max(len(s), len(t)) for s, t in zip(data.train.src, data.train.tgt, strict=True))
    config = tiny_config(prepared, "data.subword_dropout=0.5", f"data.max_len={longest}")
    split, _ = quiet_trainer(config, tmp_path, data).epoch_split(0)
    kept = [i for i in range(len(split)) if split.src[i] == data.train.src[i]]
    assert kept, "some samples of a 50% dropout are longer than the longest prepared pair"
    assert max(max(len(s), len(t)) for s, t in zip(split.src, split.tgt, strict=True)) <= longest


def test_subword_dropout_resumes_exactly(prepared, tmp_path):
    config = tiny_config(prepared, "data.subword_dropout=0.1", "model.dropout=0.1")
    train(config, tmp_path / "straight", log=lambda *_: None)
    train(tiny_config(prepared, "data.subword_dropout=0.1", "model.dropout=0.1",
                      "train.max_steps=5"), tmp_path / "resumed", log=lambda *_: None)  # fmt: skip
    train(config, tmp_path / "resumed", resume=True, log=lambda *_: None)
    assert_bitwise_equal(
        parameters(tmp_path / "resumed/last.pt"), parameters(tmp_path / "straight/last.pt")
    )


def test_subword_dropout_is_checked(prepared, tmp_path):
    data = load_prepared(prepared)
    # When the config is read, before any data.
    with pytest.raises(QkvError, match=r"data\.subword_dropout must be a probability in \[0, 1\)"):
        tiny_config(prepared, "data.subword_dropout=1.0")
    with pytest.raises(
        QkvError, match="subword_dropout_side must be one of 'both', 'source', not 'tgt'"
    ):
        tiny_config(prepared, "data.subword_dropout_side='tgt'")
    data.train.src_text = data.train.tgt_text = None  # as prepared by a qkv without training text
    with pytest.raises(QkvError, match=r"needs the raw training text.*prepare the data again"):
        quiet_trainer(tiny_config(prepared, "data.subword_dropout=0.1"), tmp_path, data)


# -- a run -----------------------------------------------------------------------------------------


def test_a_run_writes_everything_a_user_needs(prepared, tmp_path):
    run_dir = tmp_path / "run"
    summary = train(tiny_config(prepared), run_dir, log=lambda *_: None)
    assert summary["steps"] == 12
    for name in ("config.toml", "tokenizer.model", "last.pt", "best.pt", "metrics.jsonl"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in step_checkpoints(run_dir)] == ["checkpoint_8.pt", "checkpoint_12.pt"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "split" not in r and "event" not in r]
    valid_records = [r for r in records if r.get("split") == "valid"]
    assert [r["step"] for r in valid_records] == [6, 12]
    assert {"loss", "lr", "tokens_per_second", "epoch"} <= train_records[-1].keys()
    assert {"loss", "ppl", "bleu"} <= valid_records[-1].keys()
    assert records[0]["event"] == "start" and records[0]["step"] == 0
    assert records[0]["precision"] == records[0]["precision_asked"] == "fp32"
    assert records[0]["device"] == "cpu" and "ATen capability" in records[0]["hardware"]
    last = load_checkpoint(run_dir / "last.pt")
    assert last["step"] == 12 and {"optimizer", "progress", "rng"} <= last.keys()
    assert last["precision"] == load_checkpoint(run_dir / "best.pt")["precision"] == "fp32"
    assert last["meta"] == {"dataset": "synthetic", "src_lang": "words", "tgt_lang": "iso"}
    assert load_config(run_dir / "config.toml") == tiny_config(prepared)


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_trains_in_bf16_only_where_the_cpu_computes_it(
    prepared, tmp_path, monkeypatch, native
):
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: native)
    lines = []
    config = tiny_config(prepared, "train.precision='auto'", "train.max_steps=2")
    train(config, tmp_path, log=lines.append)
    expected = "bf16" if native else "fp32"
    assert any(f"precision {expected} (auto: " in line for line in lines)
    start = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert (start["event"], start["precision"], start["precision_asked"]) == (
        "start",
        expected,
        "auto",
    )
    assert load_checkpoint(tmp_path / "last.pt")["precision"] == expected
    assert load_config(tmp_path / "config.toml").train.precision == "auto"  # as asked


def test_bf16_on_a_cpu_without_it_warns_once_and_trains(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: False)
    monkeypatch.setattr(hardware, "_warned", set())
    lines = []
    train(
        tiny_config(prepared, "train.precision='bf16'", "train.max_steps=2"),
        tmp_path,
        log=lines.append,
    )
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "no bf16 instructions" in warnings[0]
    assert "many times slower than fp32" in warnings[0]
    assert load_checkpoint(tmp_path / "last.pt")["precision"] == "bf16"


def test_training_on_the_cpu_keeps_large_blocks_on_the_heap(prepared, tmp_path, monkeypatch):
    calls = []  # what that does to glibc: tests/test_allocator.py
    monkeypatch.setattr(
        sys.modules["qkv.train"], "keep_large_blocks_on_the_heap", lambda: calls.append(1)
    )
    train(tiny_config(prepared, "train.max_steps=1"), tmp_path, log=lambda *_: None)
    assert calls == [1]


def test_the_end_of_a_run_is_always_validated(prepared, tmp_path):
    """Even when the last step is a save step and no evaluation is due there."""
    config = tiny_config(prepared, "train.max_steps=4", "train.save_every=4", "eval.every_steps=0")
    summary = train(config, tmp_path, log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "valid"] == [4]
    assert summary["best_bleu"] >= 0 and (tmp_path / "best.pt").is_file()
    assert load_checkpoint(tmp_path / "last.pt")["progress"]["best_bleu"] == summary["best_bleu"]


def test_starting_over_an_existing_run_needs_resume(prepared, tmp_path):
    train(tiny_config(prepared, "train.max_steps=2"), tmp_path, log=lambda *_: None)
    with pytest.raises(QkvError, match="already holds a run"):
        train(tiny_config(prepared, "train.max_steps=2"), tmp_path, log=lambda *_: None)


def test_resume_with_another_model_is_refused_and_the_runs_config_kept(prepared, tmp_path):
    train(tiny_config(prepared, "train.max_steps=2"), tmp_path, log=lambda *_: None)
    config_text = (tmp_path / "config.toml").read_text()
    wider = tiny_config(prepared, "train.max_steps=4", "model.d_model=32", "model.n_heads=4")
    # Before: a traceback of ~100 "size mismatch" lines, config.toml already rewritten
    with pytest.raises(QkvError, match=r"last.pt: the run's model is not this config's \(d_model"):
        train(wider, tmp_path, resume=True, log=lambda *_: None)
    assert (tmp_path / "config.toml").read_text() == config_text
    # Dropout shapes no weight, and sinusoids are no checkpoint's: those may change
    same_weights = tiny_config(
        prepared, "train.max_steps=4", "model.dropout=0.3", "model.max_len=512"
    )
    logged = []
    assert train(same_weights, tmp_path, resume=True, log=logged.append)["steps"] == 4
    # Said, since the run's config.toml is replaced: a resume that forgot an earlier --set
    said = [line for line in logged if line.startswith("resuming with another config")]
    assert said == [
        "resuming with another config than the run's (model.dropout 0.0 -> 0.3, model.max_len "
        "unset -> 512, train.max_steps 2 -> 4): config.toml now says so"
    ], logged


def test_a_model_too_short_for_its_batches_is_named_before_any_step(prepared, tmp_path):
    # Batches pad to a multiple of 8: a max_len of 12 failed at the first batch of 9-16 positions,
    # with a ValueError's traceback from inside the model
    with pytest.raises(
        QkvError,
        match=r"positions, more than model.max_len = 12; set model.max_len to at least (16|24)",
    ):
        train(tiny_config(prepared, "model.max_len=12"), tmp_path, log=lambda *_: None)
    assert not (tmp_path / "last.pt").exists()


def test_validation_pairs_are_checked_as_validation_pads_them():
    # The Multi30k recipes pad training batches to a multiple of 1; validation pads to 8
    split = EncodedSplit(src=[[5] * 97], tgt=[[6] * 90])
    short = EncodedSplit(src=[[5] * 10], tgt=[[6] * 10])
    with pytest.raises(QkvError) as error:
        check_lengths(SimpleNamespace(train=short, val=split), 100, pad_multiple=1)
    assert str(error.value) == (
        "a val pair has 97 subwords: with its EOS or BOS, in batches padded to a multiple of 8, "
        "104 positions, more than model.max_len = 100; set model.max_len to at least 104"
    )  # no data.max_len to suggest: preparing drops only training pairs by length
    check_lengths(SimpleNamespace(train=split, val=short), 104, pad_multiple=1)


def test_resume_falls_back_past_a_corrupt_checkpoint(prepared, tmp_path):
    train(tiny_config(prepared, "train.max_steps=8"), tmp_path, log=lambda *_: None)
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "checkpoint_8.pt").unlink()
    messages = []
    summary = train(tiny_config(prepared), tmp_path, resume=True, log=messages.append)
    assert any("last.pt: not a readable checkpoint" in m for m in messages)
    assert any("resumed from" in m and "checkpoint_4.pt" in m for m in messages)
    assert summary["steps"] == 12 and summary["new_steps"] == 8


def test_non_finite_losses_skip_then_stop_with_the_checkpoint_intact(prepared, tmp_path):
    config = tiny_config(prepared, "train.max_steps=4")
    train(config, tmp_path, log=lambda *_: None)
    data = load_prepared(prepared)
    messages = []
    trainer = Trainer(tiny_config(prepared), tmp_path, data, Distributed(), log=messages.append)
    assert trainer.resume()
    with torch.no_grad():
        trainer.model.encoder.layers[0].feed_forward.linear1.weight.fill_(float("nan"))
    with pytest.raises(QkvError, match="5 non-finite losses in a row"):
        trainer.run()
    assert sum("loss is not finite; update skipped" in m for m in messages) == 5
    kept = load_checkpoint(tmp_path / "last.pt")
    assert kept["step"] == 4
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


# -- exact resume after a crash ---------------------------------------------------------------------


def run_train_cli(config_path, run_dir, *extra, wait=True):
    command = [
        sys.executable,
        "-m",
        "qkv",
        "train",
        str(config_path),
        "--out",
        str(run_dir),
        *extra,
    ]
    process = subprocess.Popen(
        command, env=qkv_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if wait:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    return process


def write_config(tmp_path, prepared, *overrides):
    from qkv.config import dump_toml

    path = tmp_path / "run.toml"
    path.write_text(dump_toml(tiny_config(prepared, *overrides)))
    return path


def test_sigkill_at_a_random_moment_then_resume_is_bitwise_exact(prepared, tmp_path):
    config = write_config(
        tmp_path, prepared, "train.max_steps=30", "train.save_every=3", "model.dropout=0.1"
    )
    run_train_cli(config, tmp_path / "straight")

    crashed = tmp_path / "crashed"
    process = run_train_cli(config, crashed, wait=False)
    deadline = time.time() + 300
    while not (crashed / "last.pt").exists() and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0.0, 1.0))  # anywhere: mid-step, mid-save, mid-eval
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = load_checkpoint(crashed / "last.pt")["step"]
    run_train_cli(config, crashed, "--resume")

    assert_bitwise_equal(parameters(crashed / "last.pt"), parameters(tmp_path / "straight/last.pt"))
    print(f"killed after checkpoint of step {killed_at}")


# -- many devices ----------------------------------------------------------------------------------


def test_a_gpu_device_always_gets_its_index():
    """torch.cuda.set_device refuses a bare 'cuda' (this failed on the first GPU run)."""
    assert training_device("cuda", local_rank=0, cuda_available=True) == torch.device("cuda:0")
    assert training_device("cuda", local_rank=3, cuda_available=True) == torch.device("cuda:3")
    assert training_device("auto", local_rank=1, cuda_available=True) == torch.device("cuda:1")
    assert training_device("cuda:2", local_rank=0, cuda_available=True) == torch.device("cuda:2")
    assert training_device("auto", local_rank=0, cuda_available=False) == torch.device("cpu")


def test_two_gloo_processes_equal_one_process_over_the_same_global_batches(prepared, tmp_path):
    overrides = (
        "train.max_steps=3",
        "train.save_every=3",
        "eval.every_steps=0",
        "train.device='cpu'",
    )
    config = write_config(tmp_path, prepared, *overrides)
    env = qkv_env(OMP_NUM_THREADS="1")
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "qkv", "train", str(config), "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single_config = write_config(tmp_path, prepared, *overrides, "train.update_freq=2")
    run_train_cli(single_config, tmp_path / "single")
    ddp_params = parameters(tmp_path / "ddp/last.pt")
    single_params = parameters(tmp_path / "single/last.pt")
    for name in single_params:
        torch.testing.assert_close(ddp_params[name], single_params[name], atol=1e-5, rtol=1e-5)
    assert not list((tmp_path / "ddp").glob("*.tmp"))


# -- the command line ------------------------------------------------------------------------------


def test_cli_rejects_unknown_keys_without_traceback(run_qkv, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[train]\nmax_step = 10\n")
    result = run_qkv("train", config, "--out", tmp_path / "run")
    assert result.returncode == 2
    assert "unknown key train.max_step" in result.stderr
    assert "Traceback" not in result.stderr


def test_learning_rate_in_metrics_follows_the_schedule(prepared, tmp_path):
    train(tiny_config(prepared, "train.max_steps=6", "train.log_every=1"), tmp_path, log=print)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for record in (r for r in records if "split" not in r and "event" not in r):
        expected = learning_rate(record["step"], "noam", 1.0, 64, 10)
        assert math.isclose(record["lr"], expected, rel_tol=1e-9)
    assert os.path.getsize(tmp_path / "last.pt") > 0


def test_a_start_cleans_what_a_killed_run_left_and_starts_its_metrics_anew(prepared, tmp_path):
    """Killed during a save, before its first checkpoint: hidden temporary files, and metrics lines
    that would draw a second curve."""
    stale = {"step": 2, "epoch": 0, "loss": 9.0, "nll": 9.0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(stale) + "\n")
    leftovers = [".checkpoint_4.pt.zd9q8eyv", ".last.pt.k2j4h5g6.partial", ".last.pt.link.tmp"]
    for name in leftovers:
        (tmp_path / name).write_bytes(b"half a checkpoint")
    (tmp_path / ".notes.txt").write_text("mine")
    lines = []
    train(tiny_config(prepared, "train.max_steps=2"), tmp_path, resume=True, log=lines.append)
    assert not any((tmp_path / name).exists() for name in leftovers)
    assert (tmp_path / ".notes.txt").read_text() == "mine"
    assert sum("left by a write that was cut short" in line for line in lines) == 3
    assert json.loads((tmp_path / "metrics.jsonl.1").read_text()) == stale
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["step"] == 0
    assert stale not in records
