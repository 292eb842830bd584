"""The benchmark scripts run and print what the speed targets are read from: a row per cell with each
system's figure and the ratios. Tiny settings; nothing here is timed against a threshold."""

import importlib.util
import json
import platform
import subprocess
import sys

import pytest

from conftest import REPO, qkv_env


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *args],
        env=qkv_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def assert_names_the_cpu(stdout: str) -> None:
    """The first line says what the figures were measured on: the CPU, ATen's capability, bf16."""
    first = stdout.splitlines()[0]
    assert first.startswith("CPU: ") and "; ATen capability " in first, first
    assert "; bf16 native: yes" in first or "; bf16 native: no" in first, first


def test_train_throughput_prints_both_systems_and_the_ratio():
    result = run_script(
        "train_throughput.py", "--configs", "small", "--precisions", "fp32",
        "--repeats", "1", "--warmup", "0", "--sentences", "4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert_names_the_cpu(result.stdout)
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("small")]
    assert [row[1] for row in rows] == ["qkv", "nn.Transformer"]
    assert rows[1][-1] == "1.00x"  # the reference against itself
    assert float(rows[0][-1].rstrip("x")) > 0 and float(rows[0][3].replace(",", "")) > 0
    assert "glibc's allocator as it starts" in result.stdout
    assert "of the positions padding; qkv: the padding skipped" in result.stdout


def test_train_throughput_can_set_glibc_as_qkv_train_does_and_leave_the_padding_out():
    result = run_script(
        "train_throughput.py", "--configs", "small", "--precisions", "fp32",
        "--repeats", "1", "--warmup", "0", "--sentences", "4", "--heap-allocator",
        "--full-length", "--every-position", "--own-loss",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    glibc = platform.libc_ver()[0] == "glibc"
    assert ("glibc's large blocks on its heap" in result.stdout) == glibc, result.stdout
    assert "(128 target tokens, 0% of the positions padding; qkv: every position)" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("small")]
    assert [row[1] for row in rows] == ["qkv", "nn.Transformer", "qkv+qkv.loss"]


HAS_HF = importlib.util.find_spec("transformers") is not None
# CTranslate2's model is Hugging Face's, converted.
HAS_CT2 = HAS_HF and importlib.util.find_spec("ctranslate2") is not None


@pytest.fixture(scope="module")
def decode_table() -> dict[tuple[str, str], dict[str, str]]:
    """One run of decode_speed.py for every decode test (each run pays ~8 s of start-up): the small
    config, 2 sentences, beam and greedy, every system the installed extras allow. Returns each
    row's cells by the header's column names, keyed by (batch, search). The compiled engines are
    left out: their first searches compile for minutes (tests/test_compiled.py proves them)."""
    systems = ["qkv", "qkv-nocache", "qkv-int8"]
    systems += ["hf", "hf-static"] if HAS_HF else []
    # CTranslate2 on one thread of its own (`--ct2-threads`), qkv on torch's default.
    ct2 = ["--ct2-threads", "1"] if HAS_CT2 else []
    systems += ["ct2-fp32", "ct2-int8"] if HAS_CT2 else []
    result = run_script(
        "decode_speed.py", "--configs", "small", "--batches", "2", "--searches", "beam", "greedy",
        "--repeats", "1", "--systems", *systems, *ct2,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert_names_the_cpu(result.stdout)
    # Every process starts with a short OpenMP spin, so that the turns do not meet spinning threads.
    assert "GOMP_SPINCOUNT=20000" in result.stdout.splitlines()[1]
    assert ("; CTranslate2 at 1 thread" in result.stdout.splitlines()[1]) == HAS_CT2
    lines = result.stdout.splitlines()
    columns = next(cells(line) for line in lines if line.startswith("| config |"))
    rows = [
        dict(zip(columns, cells(line), strict=True)) for line in lines if line.startswith("| small")
    ]
    assert [(row["config"], row["batch"], row["search"]) for row in rows] == [
        ("small", "2", "beam 5"), ("small", "2", "greedy"),
    ]  # fmt: skip
    return {(row["batch"], row["search"]): row for row in rows}


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def assert_ratio(row: dict[str, str], ours: str, theirs: str) -> None:
    """The ratio column is ours / theirs, to the rounding of the printed figures (0.1) and ratio
    (0.01)."""
    mine, other = float(row[ours]), float(row[theirs])
    ratio = float(row[f"{ours} / {theirs}"].rstrip("x"))
    assert mine > 0 and other > 0
    rounding = mine / other * (0.05 / mine + 0.05 / other) + 0.005
    assert ratio == pytest.approx(mine / other, abs=rounding)


def test_decode_speed_times_qkv_with_and_without_the_cache(decode_table):
    """Every search generated exactly the 20 tokens asked for (the script checks), in both cells."""
    for row in decode_table.values():
        assert float(row["qkv fp32"]) > 0 and float(row["qkv fp32 no cache"]) > 0


@pytest.mark.skipif(not HAS_HF, reason="transformers is not installed")
def test_decode_speed_prints_the_ratio_to_hugging_face(decode_table):
    for row in decode_table.values():
        assert_ratio(row, "qkv fp32", "HF fp32")


@pytest.mark.skipif(not HAS_HF, reason="transformers is not installed")
def test_decode_speed_times_hugging_faces_static_cache(decode_table):
    """ "hf-static": `generate` over its static cache (compiled on a GPU, the reference for the
    compiled step's CUDA graphs); every search still generated the 20 tokens (the script checks)."""
    assert all(float(row["HF fp32 static cache"]) > 0 for row in decode_table.values())


@pytest.mark.skipif(not HAS_CT2, reason="transformers or ctranslate2 is not installed")
def test_decode_speed_takes_turns_with_ctranslate2_in_its_own_process(decode_table):
    """CTranslate2 runs in a worker process that times one search per request, so it alternates with
    the systems in the benchmark's process; its figure and the ratio come out like theirs."""
    for row in decode_table.values():
        assert_ratio(row, "qkv fp32", "CT2 fp32")
        assert_ratio(row, "qkv int8", "CT2 int8")  # the int8 target: like against like


def test_serve_load_prints_a_row_per_client_count_with_and_without_batching(toy_run, tmp_path):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    sentences = tmp_path / "sentences.xx"
    sentences.write_text("a b c\nd e\nf g h i\n")
    result = run_script(
        "serve_load.py", str(toy_run), "--clients", "1", "3", "--seconds", "0.5",
        "--src", str(sentences), "--json", "--plot", str(tmp_path / "load.png"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert_names_the_cpu(result.stdout)
    report = json.loads(result.stdout.splitlines()[-1])
    assert [(row["batching"], row["clients"]) for row in report["rows"]] == [
        ("on", 1), ("on", 3), ("off", 1), ("off", 3), ("none", 1), ("none", 3)
    ]  # fmt: skip
    assert all(row["errors"] == 0 and row["per_second"] > 0 for row in report["rows"])
    assert set(report["one_batch_ms"]) == {"1", "3"} and min(report["one_batch_ms"].values()) > 0
    assert "batching on, 3 clients:" in result.stdout
    assert (tmp_path / "load.png").read_bytes()[:4] == b"\x89PNG"


def test_cold_start_times_fresh_processes_to_their_first_translation(toy_run):
    systems = ["python", "qkv-fp32"] + (["ct2-fp32"] if HAS_CT2 else [])
    result = run_script(
        "cold_start.py", "--run", str(toy_run), "--systems", *systems, "--repeats", "1"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert_names_the_cpu(result.stdout)
    rows = dict(
        line.strip("|").replace(" ", "").split("|")
        for line in result.stdout.splitlines()
        if line.startswith(tuple(f"| {system} " for system in systems))
    )
    assert set(rows) == set(systems)
    # a fresh qkv imports torch, loads and translates: longer than a bare interpreter
    assert float(rows["qkv-fp32"]) > float(rows["python"]) > 0
    if HAS_CT2:  # the issue's column: qkv's time to its first translation over CTranslate2's
        line = next(line for line in result.stdout.splitlines() if line.startswith("qkv-fp32 / "))
        assert line.startswith("qkv-fp32 / ct2-fp32: ") and line.endswith("x the time"), line
        ratio = float(line.split(": ")[1].split("x")[0])
        qkv_ms, ct2_ms = float(rows["qkv-fp32"]), float(rows["ct2-fp32"])
        rounding = qkv_ms / ct2_ms * (0.5 / qkv_ms + 0.5 / ct2_ms) + 0.005  # whole ms, as printed
        assert ratio == pytest.approx(qkv_ms / ct2_ms, abs=rounding) and ct2_ms > 0


def test_real_batches_translates_a_file_with_qkv_and_its_ctranslate2_export_side_by_side(
    toy_run, tmp_path
):
    pytest.importorskip("ctranslate2")
    sentences = tmp_path / "sentences.xx"
    sentences.write_text("a b c\nd e\nf g h i\nj k\nl m n\n")
    result = run_script(
        "real_batches.py", str(toy_run), "--src", str(sentences), "--batch", "2",
        "--systems", "qkv", "ct2-fp32", "--repeats", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert_names_the_cpu(result.stdout)
    assert "5 sentences of" in result.stdout and "3 batches (batches of 2), greedy" in result.stdout
    rows = {
        cells[0]: cells[1:]
        for line in result.stdout.splitlines()
        if line.startswith("| qkv") or line.startswith("| ct2")
        for cells in [line.strip("|").replace(" ", "").split("|")]
    }
    assert set(rows) == {"qkv", "ct2-fp32"}
    (qkv_ms, qkv_tokens, ratio), (ct2_ms, ct2_tokens, _) = rows["qkv"], rows["ct2-fp32"]
    # The same model, the same sources: the same translations, so as many tokens (EOS included).
    assert int(qkv_tokens) == int(ct2_tokens) > 5
    qkv_ms, ct2_ms = float(qkv_ms), float(ct2_ms)
    rounding = ct2_ms / qkv_ms * (0.0005 / qkv_ms + 0.0005 / ct2_ms) + 0.005  # as printed
    assert float(ratio.rstrip("x")) == pytest.approx(ct2_ms / qkv_ms, abs=rounding)
