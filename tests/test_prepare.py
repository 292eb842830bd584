import datetime
import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import REPO, qkv_env
from qkv.datasets import synthetic_pairs
from qkv.errors import QkvError
from qkv.prepare import load_prepared, prepare


def write_corpus(folder, name, pairs, langs=("de", "en")):
    folder.mkdir(parents=True, exist_ok=True)
    for side, lang in enumerate(langs):
        (folder / f"{name}.{lang}").write_text("".join(p[side] + "\n" for p in pairs))
    return folder / name


@pytest.fixture
def corpus(tmp_path):
    """A small corpus in files (the dates task stands in for two languages): train, valid, test."""
    pairs = synthetic_pairs(700, seed=11)
    folder = tmp_path / "corpus"
    return {
        "train": write_corpus(folder, "train", pairs[:500]),
        "valid": write_corpus(folder, "valid", pairs[500:600]),
        "test": write_corpus(folder, "test", pairs[600:]),
    }


def test_prepared_folder_holds_what_training_needs(corpus, tmp_path):
    out = tmp_path / "prepared"
    prepare(
        out,
        trainpref=corpus["train"],
        validpref=corpus["valid"],
        testpref=corpus["test"],
        src_lang="de",
        tgt_lang="en",
        vocab_size=150,
        progress=False,
    )
    names = {p.name for p in out.iterdir()}
    assert names == {
        "tokenizer.model", "tokenizer.vocab", "prepare.json",
        "train.pt", "val.pt", "test.pt", "val.de", "val.en", "test.de", "test.en",
        "train.de", "train.en",
    }  # fmt: skip
    info = json.loads((out / "prepare.json").read_text())
    assert info["src_lang"] == "de" and info["tgt_lang"] == "en" and info["vocab_size"] == 150
    assert info["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert info["splits"]["train"]["read"] == info["splits"]["train"]["kept"] == 500

    data = load_prepared(out)
    assert (len(data.train), len(data.val), len(data.test)) == (500, 100, 100)
    assert data.val.src_text == corpus["valid"].with_suffix(".de").read_text().splitlines()
    assert data.test.tgt_text == corpus["test"].with_suffix(".en").read_text().splitlines()
    for i in range(0, 100, 7):  # the saved ids are the text, encoded with the saved tokenizer
        assert data.tokenizer.decode(data.val.src[i]) == data.val.src_text[i]
        assert data.tokenizer.decode(data.val.tgt[i]) == data.val.tgt_text[i]
    # The training text is kept for BPE-dropout, which segments it anew each epoch.
    assert data.train.src_text == corpus["train"].with_suffix(".de").read_text().splitlines()
    assert data.tokenizer.decode(data.train.tgt[3]) == data.train.tgt_text[3]
    # Plain tensors: loading executes nothing from the file.
    assert torch.load(out / "train.pt", weights_only=True)["src"].dtype == torch.int32


def test_dropped_pairs_are_counted_by_reason(corpus, tmp_path):
    pairs = synthetic_pairs(200, seed=2)
    pairs += [("", "x"), ("x", "   "), ("one " * 40, "two " * 40), ("a b c d e f g h i j k", "k")]
    prefix = write_corpus(tmp_path / "c", "train", pairs)
    summary = prepare(
        tmp_path / "out", trainpref=prefix, validpref=corpus["valid"], src_lang="de",
        tgt_lang="en", vocab_size=100, max_len=30, max_ratio=5, progress=False,
    )  # fmt: skip
    train = summary.splits[0]
    assert (train.dropped.empty, train.dropped.too_long, train.dropped.ratio) == (2, 1, 1)
    assert (train.read, train.kept) == (204, 200)
    info = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert info["splits"]["train"]["dropped"] == {"empty": 2, "too_long": 1, "ratio": 1}


def test_without_validation_files_a_seeded_slice_of_train_is_held_out(corpus, tmp_path):
    def held_out(seed):
        out = tmp_path / f"seed{seed}"
        summary = prepare(
            out, trainpref=corpus["train"], src_lang="de", tgt_lang="en",
            vocab_size=150, valid_size=40, seed=seed, progress=False,
            force=True,  # the same seed is prepared twice into its folder
        )  # fmt: skip
        return summary, load_prepared(out)

    summary, data = held_out(seed=1)
    assert summary.notes == [
        "val: 40 pairs held out from train (seed 1), because no validation files were given"
    ]
    assert summary.splits[1].origin == "held out from train"
    assert (len(data.train), len(data.val)) == (460, 40)
    train = set(zip(map(tuple, data.train.src), map(tuple, data.train.tgt), strict=True))
    val = set(zip(map(tuple, data.val.src), map(tuple, data.val.tgt), strict=True))
    assert not train & val
    assert held_out(seed=1)[1].val.src_text == data.val.src_text
    assert held_out(seed=2)[1].val.src_text != data.val.src_text


def test_a_corpus_too_small_to_hold_out_from_says_what_to_give(tmp_path):
    """It said "cannot hold out 0 of 2 ... a --valid-size below the number of pairs" (0 was the
    default's tenth, and --valid-size 0 is refused)."""
    prefix = write_corpus(tmp_path / "c", "train", [("a b", "b a"), ("c d", "d c")])
    options = dict(trainpref=prefix, src_lang="de", tgt_lang="en", vocab_size=8, progress=False)
    with pytest.raises(QkvError) as error:
        prepare(tmp_path / "o", **options)
    assert str(error.value) == (
        "2 training pairs are too few to hold a tenth out for validation: give --validpref, or "
        "--valid-size between 1 and 1"
    )
    with pytest.raises(QkvError) as error:
        prepare(tmp_path / "o", valid_size=2, **options)
    assert str(error.value) == (
        "--valid-size 2 would leave none of the 2 training pairs to train on: give a size between "
        "1 and 1, or --validpref"
    )
    assert not (tmp_path / "o").exists()


def test_synthetic_task_prepares_with_a_small_vocabulary(tmp_path):
    summary = prepare(
        tmp_path, dataset="synthetic", train_size=2000, valid_size=50, test_size=50, progress=False
    )
    assert (summary.src_lang, summary.tgt_lang, summary.vocab_size) == ("words", "iso", 200)
    data = load_prepared(tmp_path)
    for ids, text in zip(data.test.tgt, data.test.tgt_text, strict=True):
        assert data.tokenizer.decode(ids) == text
        datetime.date.fromisoformat(text)
    assert len(data.test.tgt[0]) <= 11, "one token a digit or dash (plus a word boundary)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "give either a dataset (--dataset) or training files (--trainpref)"),
        ({"dataset": "multi30k", "trainpref": "x"}, "give either a dataset"),
        ({"dataset": "multi30k", "validpref": "x", "src_lang": "de", "tgt_lang": "en"},
         "--validpref and --testpref go with --trainpref, not with --dataset"),
        ({"dataset": "multi30k", "src_lang": "de"}, "name both languages: --src-lang and --tgt-lang"),
        ({"dataset": "multi30k", "src_lang": "de", "tgt_lang": "de"},
         "source and target language are both 'de'"),
        ({"dataset": "synthetic", "src_lang": "de"}, "the synthetic task translates words to iso"),
        ({"dataset": "wmt", "src_lang": "de", "tgt_lang": "en"}, "unknown dataset 'wmt'"),
        # 0 was taken for "the default" (8000), -5 training pairs made 891, 0 a KeyError
        ({"dataset": "synthetic", "vocab_size": 0}, "--vocab-size must be at least 8, not 0"),
        ({"dataset": "synthetic", "train_size": -5}, "--train-size must be at least 1, not -5"),
        ({"dataset": "synthetic", "test_size": 0}, "--test-size must be at least 1, not 0"),
        ({"dataset": "synthetic", "max_len": 0}, "--max-len must be at least 1, not 0"),
        ({"dataset": "synthetic", "max_ratio": float("nan")},
         "--max-ratio must be a number of at least 1, not nan"),
        # SentencePiece's own words, which named its --character_coverage
        ({"dataset": "synthetic", "train_size": 300, "vocab_size": 20},
         "training the tokenizer failed: --vocab-size 20 is below the "),
        ({"dataset": "synthetic", "train_size": 300, "vocab_size": 5000},
         "training the tokenizer failed: --vocab-size 5000 is more than this text gives: at most "),
    ],
)  # fmt: skip
def test_bad_requests_are_explained(kwargs, message, tmp_path):
    with pytest.raises(QkvError) as error:
        prepare(tmp_path / "out", progress=False, **kwargs)
    assert str(error.value).startswith(message)


def test_every_pair_dropped_is_an_error(tmp_path):
    prefix = write_corpus(tmp_path / "c", "train", [("a", "b c")] * 30 + [("", "")] * 5)
    with pytest.raises(QkvError) as error:
        prepare(tmp_path / "o", trainpref=prefix, src_lang="de", tgt_lang="en", vocab_size=8,
                max_len=1, progress=False)  # fmt: skip
    assert (
        str(error.value)
        == f"{prefix}: every pair was dropped (5 empty, 27 too long, 0 length ratio)"
    )
    # Nothing written (a tokenizer left there was refused by the next prepare, --force or not)
    assert not (tmp_path / "o").exists()
    prepare(tmp_path / "o", trainpref=prefix, src_lang="de", tgt_lang="en", vocab_size=8,
            progress=False)  # fmt: skip
    assert load_prepared(tmp_path / "o").tokenizer.vocab_size == 8


def test_loading_a_folder_that_is_not_prepared(tmp_path):
    with pytest.raises(QkvError) as error:
        load_prepared(tmp_path)
    assert str(error.value) == (
        f"{tmp_path} is not a prepared data folder (no prepare.json): run qkv prepare"
    )


# --- the command line ------------------------------------------------------------------------


def test_cli_prints_the_summary_table(run_qkv, tmp_path):
    pairs = [*synthetic_pairs(300, seed=4), ("", "leer"), ("zu " * 60, "lang " * 60)]
    prefix = write_corpus(tmp_path / "c", "train", pairs)
    result = run_qkv(
        "prepare", "--trainpref", prefix, "--src-lang", "de", "--tgt-lang", "en",
        "--vocab-size", "120", "--max-len", "50", "--valid-size", "30", "--out", tmp_path / "o",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for header in ("split", "read", "kept", "empty", "too long", "bad ratio", "src tokens"):
        assert header in out
    train_row = next(line for line in out.splitlines() if "│ train" in line)
    cells = [cell.strip() for cell in train_row.split("│")[1:-1]]
    assert cells[2:7] == ["272", "270", "1", "1", "0"]  # read, kept, empty, too long, bad ratio
    assert "vocabulary: 120 subwords (bpe), joint de+en" in out
    assert (
        "val: 30 pairs held out from train (seed 0), because no validation files were given" in out
    )
    assert "qkv prepare: training a bpe tokenizer with 120 subwords" in result.stderr


def test_cli_error_names_the_files_without_a_traceback(run_qkv, tmp_path):
    (tmp_path / "train.de").write_text("eins\nzwei\ndrei\n")
    (tmp_path / "train.en").write_text("one\ntwo\n")
    result = run_qkv(
        "prepare", "--trainpref", tmp_path / "train", "--src-lang", "de", "--tgt-lang", "en",
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        f"qkv: error: {tmp_path}/train.de has 3 lines but {tmp_path}/train.en has 2"
    )
    assert "Traceback" not in result.stderr


def test_cli_help_teaches_by_example(run_qkv):
    result = run_qkv("prepare", "--help")
    assert result.returncode == 0
    assert "qkv prepare --dataset multi30k --src-lang de --tgt-lang en --out" in result.stdout
    assert "qkv prepare --dataset synthetic --out" in result.stdout


def readme_data_commands() -> str:
    """The bash block of README's Data section, as a reader would paste it."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Data\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


def test_readme_data_examples_run(shared_data, tmp_path):
    """Runs README's `qkv prepare` examples as written, including Multi30k (its tokenizer must train
    in under 30 s here) and checks each wrote a prepared folder."""
    script = f'qkv() {{ "{sys.executable}" -m qkv "$@"; }}\nset -e\n' + readme_data_commands()
    result = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, env=qkv_env(QKV_DATA_DIR=str(shared_data)),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("vocabulary: ") == 3
    for name in ("multi30k.de-en", "dates", "en-fr"):
        assert load_prepared(tmp_path / "prepared" / name).train
    multi30k = json.loads((tmp_path / "prepared" / "multi30k.de-en" / "prepare.json").read_text())
    assert multi30k["vocab_size"] == 8000 and multi30k["splits"]["train"]["kept"] == 29000
    print(f"\nMulti30k de+en tokenizer trained in {multi30k['tokenizer_seconds']:.2f} s")
    assert multi30k["tokenizer_seconds"] < 30
