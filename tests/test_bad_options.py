"""Bad option values and output paths: one `qkv: error:` line naming the option (exit code 2),
never a traceback, and no file of the user's replaced or left half written."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkv
import qkv.atomic
from conftest import qkv_env
from qkv.cli import main
from qkv.tokenizer import Tokenizer

SENTENCE = "a b c"


def error_of(capsys, *args) -> str:
    capsys.readouterr()
    code = main([str(arg) for arg in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-len", "0"], "--max-len must be at least 1, got 0"),  # a ValueError's traceback
        (["--threads", "-2"], "--threads must be at least 1, got -2"),  # a RuntimeError's
        (["--beam", "100000"], "--beam must be between 1 and 64, got 100000"),  # 640 GB asked for
        (["--n-best", "0"], "--n-best must be at least 1, got 0"),  # taken for "not given"
        (["--min-len", "10", "--max-len", "5"], "--min-len 10 is more than --max-len 5"),
    ],
)
def test_translate_names_the_option_whose_value_cannot_be(options, message, toy_run, capsys):
    assert error_of(capsys, "translate", toy_run, *options) == f"qkv: error: {message}"


def test_serve_refuses_a_port_or_limit_that_cannot_be(toy_run, capsys):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    port = error_of(capsys, "serve", toy_run, "--port", "99999")  # an OverflowError's traceback
    assert port == "qkv: error: --port must be between 0 and 65535, got 99999"
    chars = error_of(capsys, "serve", toy_run, "--max-chars", "0")  # every request a 413
    assert chars == "qkv: error: --max-chars must be at least 1, got 0"
    with socket.create_server(("127.0.0.1", 0)) as taken:  # uvicorn's log lines, exit status 3
        busy = taken.getsockname()[1]
        line = error_of(capsys, "serve", toy_run, "--port", busy)
    assert line == f"qkv: error: cannot listen on 127.0.0.1:{busy}: Address already in use"
    assert error_of(capsys, "serve", toy_run, "--host", "999.1.1.1").startswith(
        "qkv: error: --host 999.1.1.1: "
    )
    queue = error_of(capsys, "serve", toy_run, "--max-queue", "0")  # a 429 for every request
    assert queue == "qkv: error: --max-queue must be at least 1, got 0"
    for wait in ("nan", "inf"):  # nan passed a check of "at least 0"; inf waits for ever
        message = error_of(capsys, "serve", toy_run, "--max-wait-ms", wait)
        assert message == f"qkv: error: --max-wait-ms must be a finite number, got {wait}"


def test_an_output_the_machine_refuses_is_one_line_naming_it(
    toy_run, tmp_path, capsys, monkeypatch
):
    """A folder without permission, a full disk: PermissionError and OSError tracebacks before."""
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text(f"{SENTENCE}\n")

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".out.txt.k2j4h5g6.partial"))

    with monkeypatch.context() as patch:
        patch.setattr(qkv.atomic.tempfile, "NamedTemporaryFile", refused)
        line = error_of(capsys, "translate", toy_run, "-i", source, "-o", output)
    assert (
        line == f"qkv: error: {output}: Permission denied"
    )  # the file asked for, not the temporary
    assert not output.exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_a_full_disk_under_stdout_is_one_line(toy_run, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text(f"{SENTENCE}\n" * 3)
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "qkv", "translate", str(toy_run), "-i", str(source)],
            stdout=full, stderr=subprocess.PIPE, text=True, env=qkv_env(), timeout=300,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "qkv: error: No space left on device"
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


def test_a_write_cut_short_is_cleared_by_the_next_run(toy_run, tmp_path, capsys):
    """A translate -o killed half way left `.out.txt.RANDOM.partial`, which the next run kept."""
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text(f"{SENTENCE}\n")
    left = tmp_path / ".out.txt.k2j4h5g6.partial"
    left.write_text("half of a translation")
    mine = tmp_path / ".notes.txt.k2j4h5g6.partial"  # not of this output: kept
    mine.write_text("mine")
    assert main(["translate", str(toy_run), "-i", str(source), "-o", str(output)]) == 0
    assert output.read_text() == "c b a\n"
    assert not left.exists() and mine.read_text() == "mine"


def test_an_output_under_a_file_is_named_before_any_work(toy_run, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    source = tmp_path / "in.txt"
    source.write_text(f"{SENTENCE}\n")
    under = notes / "out.txt"
    expected = f"{notes} is a file, not a folder"
    # FileExistsError and NotADirectoryError tracebacks, after translating or training
    assert error_of(capsys, "translate", toy_run, "-i", source, "-o", under).endswith(expected)
    picture = notes / "a.png"
    assert error_of(capsys, "attention", toy_run, SENTENCE, "-o", picture).endswith(expected)
    assert error_of(capsys, "train", "demo", "--out", notes / "run").endswith(expected)
    assert error_of(capsys, "train", "demo", "--out", notes) == (
        f"qkv: error: --out {notes} is a file, not a folder"
    )
    assert notes.read_text() == "mine\n"


def test_attention_writes_only_pictures_it_was_asked_for(toy_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.png").write_bytes(b"the user's picture")
    # matplotlib added ".png" to a name without a suffix and replaced mine.png, --force or not
    no_suffix = error_of(capsys, "attention", toy_run, SENTENCE, "-o", "mine")
    assert no_suffix.startswith("qkv: error: -o mine: a picture's format comes from its suffix")
    assert (tmp_path / "mine.png").read_bytes() == b"the user's picture"
    unknown = error_of(capsys, "attention", toy_run, SENTENCE, "-o", "mine.xyz")
    assert "a picture's format comes from its suffix: .png, .svg, .pdf" in unknown
    both = error_of(capsys, "attention", toy_run, SENTENCE, "-o", "same.png", "--html", "same.png")
    assert both == "qkv: error: -o and --html both name same.png: give two files"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine.png"]


def test_explain_writes_its_page_into_a_new_folder(tmp_path, capsys):
    page = tmp_path / "new" / "explain.html"  # a FileNotFoundError's traceback
    assert main(["explain", "thinking machines", "--html", str(page)]) == 0
    assert page.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_translate_with_a_bad_line_leaves_the_output_file_as_it_was(toy_run, tmp_path, capsys):
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_bytes(b"a b c\nd e\n\xff\n")
    output.write_text("the last good translation\n")
    message = error_of(capsys, "translate", toy_run, "-i", source, "-o", output, "--force")
    assert message == f"qkv: error: {source}:3: not valid UTF-8; {output} is left as it was"
    assert output.read_text() == "the last good translation\n"  # it held the first two lines


def test_a_device_or_tokenizer_that_cannot_serve_is_named_not_the_checkpoint(
    toy_run, tmp_path, capsys
):
    if not torch.cuda.is_available():  # was: "best.pt: not a readable checkpoint"
        cuda = error_of(capsys, "translate", toy_run, "--device", "cuda")
        assert (
            cuda
            == "qkv: error: --device cuda: PyTorch sees no GPU here (a CPU build, or no driver)"
        )
    nonsense = error_of(capsys, "translate", toy_run, "--device", "nonsense")
    assert nonsense == "qkv: error: --device nonsense: not a device; give cpu, cuda or cuda:N"
    assert qkv.load(toy_run, tokenizer=toy_run).translate(["a b c"]) == ["c b a"]  # a folder too
    missing = error_of(capsys, "translate", toy_run, "--tokenizer", tmp_path / "none.model")
    assert missing == f"qkv: error: --tokenizer {tmp_path / 'none.model'}: no such file"
    other = Tokenizer.train([["a b", "c d e"] * 20], tmp_path / "other.model", vocab_size=12)
    wrong = error_of(capsys, "translate", toy_run, "--tokenizer", tmp_path / "other.model")
    trained_with = qkv.load(toy_run).tokenizer.vocab_size  # was an IndexError's traceback
    assert wrong == (
        f"qkv: error: {tmp_path / 'other.model'}: {other.vocab_size} subwords, but "
        f"{toy_run / 'best.pt'} was trained with {trained_with}: give the tokenizer it was trained with"
    )


def test_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "config.pt").write_text("[model]\npreset = 'tiny'\n")
    empty = error_of(capsys, "translate", tmp_path / "empty.pt")
    assert (
        empty == f"qkv: error: {tmp_path / 'empty.pt'}: not a readable checkpoint (an empty file)"
    )
    # PyTorch's own message: a paragraph that suggests loading the file with weights_only=False
    text = error_of(capsys, "translate", tmp_path / "config.pt")
    assert text == (
        f"qkv: error: {tmp_path / 'config.pt'}: not a readable checkpoint (not one of qkv's: "
        "PyTorch cannot read it as tensors and plain data)"
    )


def test_every_command_says_qkvs_warnings_in_one_line(toy_run, tmp_path, run_qkv):
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    best = run / "best.pt"
    best.write_bytes(best.read_bytes()[:1000])  # damaged: the command takes last.pt, and says so
    result = run_qkv("attention", run, SENTENCE, "-o", tmp_path / "a.png")
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "best.pt" in line]
    assert len(warning) == 1 and warning[0].startswith("qkv: warning: "), result.stderr
    assert "UserWarning" not in result.stderr and "checkpoint.py" not in result.stderr


def test_a_training_whose_data_is_not_there_leaves_no_run_folder(tmp_path, capsys):
    """Both failed after making --out, and left it there, empty."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    line = error_of(capsys, "train", empty, "--out", tmp_path / "runs" / "a")
    assert line.startswith("qkv: error: the config names no data: set data.dataset")
    missing = tmp_path / "missing.toml"
    missing.write_text(
        f'[data]\ntrainpref = "{tmp_path / "nosuch"}"\nsrc_lang = "de"\ntgt_lang = "en"\n'
    )
    line = error_of(capsys, "train", missing, "--out", tmp_path / "runs" / "b")
    assert "nosuch" in line
    assert not (tmp_path / "runs" / "a").exists() and not (tmp_path / "runs" / "b").exists()


def test_training_into_a_prepared_data_folder_is_refused(tmp_path, capsys):
    """It advised --resume, which then trained into the data folder, beside prepare.json."""
    from qkv.prepare import prepare

    data = tmp_path / "prepared"
    prepare(data, dataset="synthetic", train_size=50, test_size=10, valid_size=10, progress=False)
    before = sorted(path.name for path in data.iterdir())
    for resume in ([], ["--resume"]):
        line = error_of(capsys, "train", "demo", "--out", data, *resume)
        assert line == (
            f"qkv: error: --out {data} is a prepared data folder (prepare.json): train from it with "
            f"--set data.prepared={data}, into another --out"
        )
    assert sorted(path.name for path in data.iterdir()) == before
