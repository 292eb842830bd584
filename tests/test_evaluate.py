"""Scoring (sacreBLEU BLEU, chrF, lower-cased BLEU) and `qkv evaluate`."""

import json

import pytest

from qkv.checkpoint import load_checkpoint, save_checkpoint
from qkv.errors import QkvError
from qkv.evaluate import score
from toy_task import reverse

KEYS = {
    "bleu",
    "bleu_signature",
    "chrf",
    "chrf_signature",
    "bleu_lowercase",
    "bleu_lowercase_signature",
    "sentences",
}


def test_score_has_each_metric_with_its_signature():
    result = score(["The cat sat on the mat."], ["the cat sat on the mat."])
    assert set(result) == KEYS
    assert result["bleu_lowercase"] == pytest.approx(100.0)
    assert result["bleu"] < 100.0  # sacreBLEU's BLEU is cased
    assert "case:lc" in result["bleu_lowercase_signature"]
    assert "tok:13a" in result["bleu_signature"]
    assert "nc:6" in result["chrf_signature"]


def test_score_rejects_misaligned_input():
    with pytest.raises(QkvError, match="2 translations but 1 references"):
        score(["a", "b"], ["a"])


def test_evaluate_json(run_qkv, toy_run, tmp_path):
    sentences = ["a b c d", "p o n", "e f g", "k l", "h i j k", "m"]
    (tmp_path / "test.src").write_text("\n".join(sentences) + "\n")
    (tmp_path / "test.ref").write_text("\n".join(map(reverse, sentences)) + "\n")
    result = run_qkv(
        "evaluate",
        toy_run,
        "--src",
        tmp_path / "test.src",
        "--ref",
        tmp_path / "test.ref",
        "--json",
        "--beam",
        "3",
    )
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert set(scores) >= KEYS
    assert scores["sentences"] == 6 and scores["beam"] == 3 and scores["early_exit"] is False
    assert scores["chrf"] > 50  # the toy model reverses most sentences exactly


def test_evaluate_in_int8_says_so_in_its_json_and_scores_as_fp32_does(run_qkv, toy_run, tmp_path):
    sentences = ["a b c d", "p o n", "e f g", "k l", "h i j k", "m"]
    (tmp_path / "test.src").write_text("\n".join(sentences) + "\n")
    (tmp_path / "test.ref").write_text("\n".join(map(reverse, sentences)) + "\n")
    files = ("--src", tmp_path / "test.src", "--ref", tmp_path / "test.ref", "--json")
    results = {
        precision: run_qkv("evaluate", toy_run, *files, "--precision", precision)
        for precision in ("fp32", "int8")
    }
    assert all(result.returncode == 0 for result in results.values()), results["int8"].stderr
    fp32, int8 = (json.loads(results[precision].stdout) for precision in ("fp32", "int8"))
    assert fp32["precision"] == "fp32" and fp32["compile"] is False
    # int8 runs on every CPU the suite runs on (qkv's own product, else PyTorch's kernels)
    assert int8["precision"] == "int8", results["int8"].stderr
    assert int8["chrf"] > 50 and abs(int8["chrf"] - fp32["chrf"]) <= 10


def test_evaluate_on_a_dataset_needs_languages_when_the_checkpoint_has_none(
    run_qkv, toy_run, tmp_path
):
    checkpoint = load_checkpoint(toy_run / "best.pt")
    del checkpoint["meta"]
    save_checkpoint(tmp_path / "best.pt", checkpoint)
    (tmp_path / "tokenizer.model").write_bytes((toy_run / "tokenizer.model").read_bytes())
    result = run_qkv("evaluate", tmp_path, "--dataset", "multi30k", "--split", "val")
    assert result.returncode == 2
    assert "pass --src-lang and --tgt-lang" in result.stderr


def test_an_empty_test_set_is_a_clear_error_not_a_sacrebleu_traceback():
    with pytest.raises(QkvError, match="no sentences to score"):
        score([], [])
