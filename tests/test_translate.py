"""Translating text: the Python API (`qkv.load`), `qkv translate`, and batching that keeps input order."""

import gzip
import math
import platform
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qkv
from conftest import qkv_env
from qkv import hardware
from qkv.hardware import AVX2_ENVIRONMENT
from qkv.translate import Translator, token_batches
from torch_versions import TOO_OLD_TO_COMPILE
from toy_task import reverse

LINES = ["a b c d", "", "p o n", "e", "k l m n o", "j a", "", "h g f e d"]


@pytest.fixture(scope="module")
def translator(toy_run) -> Translator:
    return qkv.load(toy_run)


def test_importing_qkv_does_not_import_torch():
    code = "import sys, qkv; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=qkv_env()
    )
    assert result.stdout.strip() == "False"


def test_load_translates(translator):
    out = translator.translate(["a b c", "p o"], beam=5)
    assert out == ["c b a", "o p"]


def test_batching_keeps_input_order_and_empty_lines(translator):
    # max_tokens=8 forces several batches of length-sorted sentences
    together = translator.translate(LINES, beam=3, max_tokens=8)
    one_by_one = [translator.translate([line], beam=3)[0] for line in LINES]
    assert together == one_by_one
    assert together[1] == together[6] == ""
    assert sum(out == reverse(line) for out, line in zip(together, LINES, strict=True)) >= 6


def test_bf16_translates_too_and_warns_where_the_cpu_lacks_it(toy_run, monkeypatch):
    monkeypatch.setattr(hardware, "_warned", set())
    messages = []
    translator = qkv.load(toy_run, precision="bf16", warn=messages.append)
    assert translator.precision == "bf16"
    assert translator.translate(["a b c"], beam=2) == ["c b a"]
    assert len(messages) == (0 if hardware.cpu_bf16_native() else 1)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 settings")
def test_bf16_on_a_cpu_without_it_warns_once_and_translates_and_auto_takes_fp32(toy_run, run_qkv):
    """Under qkv.hardware.AVX2_ENVIRONMENT this CPU behaves as an AMD Zen 3 (no bf16 instructions),
    where `--precision bf16` once crashed inside oneDNN."""
    env = qkv_env(**AVX2_ENVIRONMENT)
    explicit = run_qkv("translate", toy_run, "--precision", "bf16", input="a b c\nj a\n", env=env)
    assert explicit.returncode == 0, explicit.stderr
    assert explicit.stdout == "c b a\na j\n"
    warnings = [line for line in explicit.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "no bf16 instructions" in warnings[0], explicit.stderr
    assert "qkv: precision bf16\n" in explicit.stderr
    auto = run_qkv("translate", toy_run, input="a b c\n", env=env)
    assert auto.returncode == 0 and auto.stdout == "c b a\n", auto.stderr
    assert "qkv: precision fp32 (auto: no native bf16 on cpu)" in auto.stderr
    assert "warning" not in auto.stderr


def test_int8_translates_as_fp32_does(toy_run, run_qkv):
    from qkv.inference.linear import int8_works

    if int8_works() is not None:
        pytest.skip(int8_works())
    translator = qkv.load(toy_run, precision="int8")
    assert translator.precision == "int8"
    assert translator.engine().int8
    assert translator.model.output.weight.dtype == torch.float32  # the model itself stays fp32
    fp32 = qkv.load(toy_run).translate(LINES, beam=3)
    int8 = translator.translate(LINES, beam=3)
    assert sum(a == b for a, b in zip(int8, fp32, strict=True)) >= len(LINES) - 1
    result = run_qkv("translate", toy_run, "--precision", "int8", input="a b c\n")
    assert result.returncode == 0 and result.stdout == "c b a\n", result.stderr
    assert "qkv: precision int8\n" in result.stderr and "warning" not in result.stderr


def test_int8_says_when_it_builds_qkvs_operators(toy_run, run_qkv, tmp_path):
    """The int8 engine takes qkv's own product where qkv's operators build (x86-64 Linux with a C++
    compiler): the first run on a machine builds them (~10 s), and says so."""
    from qkv.inference import native, rowwise_int8

    if rowwise_int8.unavailable() is not None:
        pytest.skip(rowwise_int8.unavailable())
    environment = {**qkv_env(), native.CACHE_VARIABLE: str(tmp_path / "native")}
    command = ("translate", toy_run, "--precision", "int8")
    result = run_qkv(*command, input="a b c\n", env=environment)
    assert result.returncode == 0 and result.stdout == "c b a\n", result.stderr
    assert "qkv: building qkv's operators for decoding (once, ~10 s)\n" in result.stderr
    again = run_qkv(*command, input="a b c\n", env=environment)  # built: nothing to say
    assert again.stdout == "c b a\n" and "building" not in again.stderr, again.stderr


def test_int8_where_the_kernels_do_not_run_warns_once_and_translates_in_fp32(
    toy_run, monkeypatch, tmp_path
):
    from qkv.inference import linear, rowwise_int8

    # Neither qkv's own int8 kernel (a CPU without VNNI) nor PyTorch's
    monkeypatch.setattr(rowwise_int8, "unavailable", lambda say=None: "no VNNI")
    monkeypatch.setattr(linear, "int8_works", lambda: "no quantised engine (as on some builds)")
    messages = []
    translator = qkv.load(toy_run, precision="int8", warn=messages.append)
    assert translator.translate(["a b c"], beam=2) == ["c b a"]
    assert translator.translate(["p o"], beam=2) == ["o p"]
    assert messages == ["no quantised engine (as on some builds): translating in fp32"]
    assert translator.precision == "fp32" and not translator.engine().int8
    # With --compile: the fp32 compiled engine, the same one warning.
    from qkv.inference.compiled import CompiledEngine

    monkeypatch.setenv("QKV_COMPILE_CACHE", str(tmp_path / "compiled"))
    messages.clear()
    compiled = qkv.load(toy_run, precision="int8", compile=True, warn=messages.append)
    engine = compiled.engine()
    assert isinstance(engine, CompiledEngine) and not engine.int8
    expected = ["no quantised engine (as on some builds): translating in fp32"]
    if (
        TOO_OLD_TO_COMPILE
    ):  # and --compile's own line (test_compile_on_a_pytorch_older_than_2_8_...)
        expected.append(f"{engine.unavailable}: decoding takes the eager step")
    assert messages == expected
    assert compiled.precision == "fp32"


def test_compile_on_a_pytorch_older_than_2_8_says_so_once_and_translates_as_without(
    toy_run, monkeypatch, tmp_path
):
    """Its AOTInductor cannot compile the step (`static_step.COMPILED_FROM_TORCH`): one line, at
    once, nothing traced or kept. Run as PyTorch 2.4.1 where this one is newer (.ci/run runs the
    suite on 2.4.1 itself)."""
    from qkv.inference import static_step

    if TOO_OLD_TO_COMPILE is None:
        monkeypatch.setattr(torch, "__version__", "2.4.1")
    version = torch.__version__
    monkeypatch.setenv("QKV_COMPILE_CACHE", str(tmp_path / "compiled"))
    run = Path(
        shutil.copytree(toy_run, tmp_path / "run", ignore=shutil.ignore_patterns("compiled"))
    )
    messages = []
    translator, plain = qkv.load(run, compile=True, warn=messages.append), qkv.load(run)
    assert static_step.COMPILED_FROM_TORCH == (2, 8)
    for beam in (1, 3):
        assert translator.translate(LINES, beam=beam) == plain.translate(LINES, beam=beam)
    assert messages == [
        f"the compiled step needs PyTorch 2.8 or later, not {version}: decoding takes the eager step"
    ]
    assert not (run / "compiled").exists() and not (tmp_path / "compiled").exists()


def test_int8_says_which_quantised_engine_took_over_from_one_that_failed(
    toy_run, monkeypatch, quantised_engine
):
    # As on PyTorch 2.13's aarch64 wheel, which starts with 'x86' (fbgemm), failing there
    from qkv.inference import rowwise_int8

    linear = quantised_engine
    if linear.int8_works() is not None:
        pytest.skip(linear.int8_works())
    engines = torch.backends.quantized.supported_engines
    if "qnnpack" not in engines:
        pytest.skip(f"this PyTorch has the quantised engines {engines}")
    honest = linear._engine_fails
    # PyTorch's kernels, not qkv's own
    monkeypatch.setattr(rowwise_int8, "unavailable", lambda say=None: "no VNNI")
    monkeypatch.setattr(
        linear, "_engine_fails", lambda e: "'x86' failed" if e == "x86" else honest(e)
    )
    linear.int8_works.cache_clear()
    torch.backends.quantized.engine = "x86"
    said, warned = [], []
    translator = qkv.load(toy_run, precision="int8", say=said.append, warn=warned.append)
    assert translator.translate(["a b c"], beam=2) == ["c b a"]
    assert translator.precision == "int8" and translator.engine().int8 and not warned
    assert said == ["int8 by PyTorch's quantised engine 'qnnpack': 'x86' failed"]
    assert torch.backends.quantized.engine == "qnnpack"


def test_prepared_weights_are_kept_across_calls_and_dropped_when_the_model_changes(toy_run):
    translator = qkv.load(toy_run)
    before = translator.translate(LINES, beam=3)
    prepared = translator.engine()
    assert translator.translate(LINES, beam=3) == before
    assert translator.engine() is prepared  # kept: nothing changed

    # Another model's weights, copied in place (load_state_dict): stale packed weights would still
    # translate like the old model.
    other = qkv.load(toy_run)
    with torch.no_grad():
        for parameter in other.model.parameters():
            parameter.mul_(-1.0)
    translator.model.load_state_dict(other.model.state_dict())
    changed = translator.translate(LINES, beam=3)
    assert translator.engine() is not prepared
    fresh = Translator(other.model, other.tokenizer)
    assert changed == fresh.translate(LINES, beam=3)
    assert changed != before


def test_n_best_hypotheses_are_sorted(translator):
    results = translator.hypotheses(["a b c d", "e f"], beam=4, n_best=3)
    for hypotheses in results:
        assert len(hypotheses) == 3
        scores = [h.score for h in hypotheses]
        assert scores == sorted(scores, reverse=True)


def test_greedy_keeps_scores_only_when_asked_and_translates_the_same(translator, run_qkv, toy_run):
    lines = ["a b c d", "", "p o n"]
    scored = translator.hypotheses(lines, beam=1)
    unscored = translator.hypotheses(lines, beam=1, scores=False)
    assert [h[0].text for h in unscored] == [h[0].text for h in scored]
    assert translator.translate(lines, beam=1) == [h[0].text for h in scored]
    assert all(math.isfinite(h[0].score) and h[0].score < 0 for h in (scored[0], scored[2]))
    assert all(math.isnan(h[0].score) for h in (unscored[0], unscored[2]))
    assert scored[1][0].score == unscored[1][0].score == 0.0  # an empty line: nothing to score
    # The command line asks for them with --scores only.
    result = run_qkv("translate", toy_run, "--beam", "1", "--scores", input="a b c\n")
    score, text = result.stdout.rstrip("\n").split("\t")
    assert result.returncode == 0 and text == "c b a" and float(score) < 0, result.stderr


def test_too_long_sentence_is_cut_with_a_warning(translator):
    too_long = " ".join(["a"] * 40)  # the toy model has 32 positions
    with pytest.warns(UserWarning, match=r"line 2: 40 subword tokens"):
        out = translator.translate(["a b", too_long], beam=2)
    assert len(out) == 2


def test_token_batches_respect_the_budget_and_cover_every_sentence():
    sources = [[1] * n for n in (5, 0, 3, 9, 2, 2, 7)]
    batches = token_batches(sources, max_tokens=10)
    assert sorted(i for batch in batches for i in batch) == [0, 2, 3, 4, 5, 6]  # not the empty one
    for batch in batches:
        assert len(batch) * max(len(sources[i]) for i in batch) <= 10 or len(batch) == 1
    lengths = [len(sources[i]) for batch in batches for i in batch]
    assert lengths == sorted(lengths)


# ---------------------------------------------------------------------------------------------------
# The command line


def test_cli_keeps_order_and_empty_lines_and_warns_with_the_line_number(
    run_qkv, toy_run, translator
):
    too_long = " ".join(["b"] * 40)
    lines = [*LINES[:3], too_long, *LINES[3:]]
    result = run_qkv("translate", toy_run, "--beam", "3", input="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout.split("\n")
    assert out[-1] == "" and len(out) - 1 == len(lines)
    assert out[:-1] == translator.translate(lines, beam=3, warn=lambda message: None)
    assert out[1] == "" and out[7] == ""
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "stdin: line 4: 40 subword tokens" in warnings[0]


def test_a_dash_is_stdin_and_stdout_as_other_tools_read_it(run_qkv, toy_run, tmp_path):
    result = run_qkv(
        "translate", toy_run, "-i", "-", "-o", "-", "--beam", "1", input="a b c\nd e\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "c b a\ne d\n"
    assert not (Path.cwd() / "-").exists() and not (tmp_path / "-").exists()


def test_cli_n_best_and_scores_format(run_qkv, toy_run, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("a b c\n\np o\n")
    out_file = tmp_path / "out.txt"
    result = run_qkv(
        "translate",
        toy_run,
        "-i",
        source,
        "-o",
        out_file,
        "--n-best",
        "2",
        "--scores",
        "--beam",
        "4",
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in out_file.read_text().splitlines()]
    assert [row[0] for row in rows] == ["1", "1", "2", "3", "3"]  # the empty line gives one
    assert all(len(row) == 3 for row in rows)
    assert rows[0][2] == "c b a" and rows[3][2] == "o p"
    assert float(rows[0][1]) >= float(rows[1][1])
    assert rows[2][1:] == ["0.0000", ""]
    gzipped = tmp_path / "out.txt.gz"  # a .gz is written as one, as -i reads it
    result = run_qkv("translate", toy_run, "-i", source, "-o", gzipped, "--beam", "4")
    assert result.returncode == 0, result.stderr
    assert gzip.decompress(gzipped.read_bytes()).decode() == "c b a\n\no p\n"


def test_cli_rejects_bad_input_clearly(run_qkv, toy_run, tmp_path):
    result = run_qkv("translate", toy_run, "--n-best", "3", "--beam", "2", input="a\n")
    assert result.returncode == 2
    assert "qkv: error: --n-best must be between 1 and the beam size 2" in result.stderr
    for alpha in ("1e308", "nan"):  # a traceback (OverflowError), and output at random
        result = run_qkv("translate", toy_run, f"--length-penalty={alpha}", input="a\n")
        assert result.returncode == 2 and result.stdout == ""
        assert "qkv: error: --length-penalty must be a number between -10 and 10" in result.stderr
    result = run_qkv("translate", tmp_path / "nothing", input="a\n")
    assert result.returncode == 2
    assert "no such run directory or checkpoint" in result.stderr


def test_a_run_with_a_damaged_best_checkpoint_translates_from_the_newest_good_one(
    toy_run, tmp_path, run_qkv
):
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    best = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes(best[: len(best) // 2])  # cut short
    messages = []
    translator = qkv.load(run, warn=messages.append)
    assert translator.translate(["a b c"], beam=2) == ["c b a"]
    assert len(messages) == 1 and "best.pt: not a readable checkpoint" in messages[0]
    assert "using last.pt" in messages[0]
    result = run_qkv("translate", run, input="a b c\n")
    assert result.returncode == 0 and result.stdout == "c b a\n", result.stderr
    assert result.stderr.count("qkv: warning: ") == 1 and "best.pt" in result.stderr
    # A damaged file given by name is an error, not a silent substitute.
    named = run_qkv("translate", run / "best.pt", input="a b c\n")
    assert named.returncode == 2 and "best.pt: not a readable checkpoint" in named.stderr


def test_stdin_is_translated_line_by_line_as_it_arrives(toy_run):
    """A person typing into `qkv translate` (or a slow pipe): each translation comes out before the
    next line is sent, and the process ends when the input does."""
    process = subprocess.Popen(
        [sys.executable, "-m", "qkv", "translate", str(toy_run), "--quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=qkv_env(), bufsize=1,
    )  # fmt: skip
    try:
        for line in ["a b c", "", "p o n"]:
            process.stdin.write(line + "\n")
            process.stdin.flush()
            # the translation comes before the next line is sent (reading all input first would
            # wait here for an end of input that never comes)
            ready, _, _ = select.select([process.stdout], [], [], 60)
            assert ready, f"no translation of {line!r} within 60 s of sending it"
            assert process.stdout.readline() == reverse(line) + "\n"
        process.stdin.close()
        assert process.wait(timeout=60) == 0, process.stderr.read()
        assert process.stdout.read() == ""
    finally:
        process.kill()


def test_an_error_while_stdin_is_still_open_exits_with_the_error_not_an_abort(toy_run):
    """The thread that reads stdin waits for more input while the translation fails (the beam is
    smaller than --n-best): the process must end with the error, not abort at shutdown on the lock of
    a reader that thread holds (it did 3 times in 30 with the input closed, and here, with it open)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "qkv", "translate", str(toy_run), "--n-best", "3", "--beam", "2"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=qkv_env(),
    )  # fmt: skip
    try:
        process.stdin.write(b"a b c\n")
        process.stdin.flush()  # and left open
        assert process.wait(timeout=60) == 2
        stderr = process.stderr.read().decode()
        assert "--n-best must be between 1 and the beam size 2" in stderr
        assert "Fatal Python error" not in stderr
    finally:
        process.kill()


def test_a_file_is_translated_in_chunks_in_input_order(toy_run, tmp_path, monkeypatch, capsys):
    from qkv.cli import main
    from qkv.cli import translate as translate_command

    lines = [*LINES, " ".join(["a"] * 40), *reversed(LINES), "k j"]  # line 9 is too long
    source = tmp_path / "in.txt"
    source.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(translate_command, "FILE_CHUNK_LINES", 4)  # 18 lines: 5 chunks
    chunks = []  # the lines each call translates: one chunk at a time, never the whole file
    hypotheses = Translator.hypotheses

    def counted(self, chunk, *args, **options):
        chunks.append(len(chunk))
        return hypotheses(self, chunk, *args, **options)

    monkeypatch.setattr(Translator, "hypotheses", counted)
    assert main(["translate", str(toy_run), "-i", str(source), "--beam", "3", "--quiet"]) == 0
    assert chunks == [4, 4, 4, 4, 2]
    monkeypatch.undo()
    out, err = capsys.readouterr()
    with pytest.warns(UserWarning):
        expected = qkv.load(toy_run).translate(lines, beam=3)
    assert out.splitlines() == expected
    assert f"{source}: line 9: 40 subword tokens" in err  # numbered in the file, not in its chunk


def test_a_line_that_is_not_utf8_ends_a_file_after_the_lines_before_it(run_qkv, toy_run, tmp_path):
    source = tmp_path / "in.txt"
    source.write_bytes(b"a b c\np o\n\xff\xfe\nj a\n")
    result = run_qkv("translate", toy_run, "-i", source, "--quiet")
    assert result.returncode == 2
    assert result.stdout == "c b a\no p\n"
    assert result.stderr.splitlines()[-1] == f"qkv: error: {source}:3: not valid UTF-8"


@pytest.mark.parametrize("command", ["translate", "evaluate"])
def test_early_exit_reaches_the_beam_search_from_the_command_line(
    command, toy_run, tmp_path, monkeypatch, capsys
):
    from qkv import translate as translate_module
    from qkv.cli import main

    searched = []  # early_exit of each beam search
    original = translate_module.beam_search

    def beam_search(*args, **kwargs):
        searched.append(kwargs["early_exit"])
        return original(*args, **kwargs)

    monkeypatch.setattr(translate_module, "beam_search", beam_search)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(LINES) + "\n")
    arguments = [command, str(toy_run), "--quiet", "--precision", "fp32"]
    if command == "translate":
        arguments += ["-i", str(source)]
    else:
        references = tmp_path / "ref.txt"
        references.write_text("\n".join(reverse(line) for line in LINES) + "\n")
        arguments += ["--src", str(source), "--ref", str(references)]
    capsys.readouterr()
    assert main([*arguments, "--early-exit"]) == 0
    out = capsys.readouterr().out
    assert searched and set(searched) == {True}
    if command == "translate":
        assert out.splitlines() == Translator.load(toy_run).translate(LINES, early_exit=True)
    searched.clear()
    assert main(arguments) == 0
    assert searched and set(searched) == {False}
