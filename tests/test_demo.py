"""`qkv demo` as a newcomer runs it: the full recipe, its accuracy, and README's commands after it."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, qkv_env
from torch_versions import TOO_OLD_TO_COMPILE

README = (REPO / "README.md").read_text()


def test_the_demo_reaches_90_percent_on_dates_it_never_saw(demo_run):
    cwd, result = demo_run
    # Chance is ~0: an exact ISO date out of ~73,000 possible days.
    match = re.search(r"exact-match accuracy on (\d+) test sentences: ([\d.]+)%", result.stdout)
    assert match, result.stdout
    assert int(match.group(1)) == 500
    assert float(match.group(2)) >= 90.0, result.stdout
    assert "Test sentences the model never saw" in result.stdout
    assert "run directory: runs/demo " in result.stdout
    assert (cwd / "runs" / "demo" / "best.pt").is_file()
    assert (cwd / "runs" / "demo" / "attention.png").read_bytes()[:4] == b"\x89PNG"
    assert "attention picture: runs/demo/attention.png" in result.stdout


def test_the_demo_shows_live_progress(demo_run):
    _, result = demo_run
    bar = re.split(r"[\r\n]", result.stderr)
    assert len([frame for frame in bar if "tok/s" in frame and "loss" in frame]) >= 3, result.stderr


HAS_EXPORT = all(importlib.util.find_spec(name) for name in ("ctranslate2", "onnx", "onnxruntime"))


def readme_commands_on_the_demo() -> list[str]:
    """Every README bash line that uses the demo's run directory, except those that train it again
    and the server (which runs until stopped: tests/test_serve.py runs one), and the export's when
    the export extra (ctranslate2, onnx, onnxruntime) is not installed."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL):
        for line in block.splitlines():
            runs_the_demo = "runs/demo" in line and not re.search(r"qkv (train|demo|serve)\b", line)
            exports = re.search(r"qkv export|runs/demo/(ct2|onnx)", line)
            if runs_the_demo and (HAS_EXPORT or not exports):
                lines.append(line.split("  #")[0].rstrip())
    return lines


def test_readme_lists_the_commands_a_newcomer_runs_after_the_demo():
    commands = " ".join(readme_commands_on_the_demo())
    for command in ("translate", "evaluate", "average", "explain", "attention"):
        assert f"qkv {command} runs/demo" in commands


def test_readme_commands_run_as_written_after_the_demo(demo_run, qkv_command):
    cwd, _ = demo_run
    commands = readme_commands_on_the_demo()
    # `python -m qkv`, as conftest's other tests run it.
    qkv = " ".join(shlex.quote(part) for part in qkv_command)
    script = f'qkv() {{ {qkv} "$@"; }}\nset -e\n' + "\n".join(commands)
    # `--compile` without measuring the products while compiling (~40% shorter; README says how):
    # tests/test_compiled.py compiles programs that measure them.
    result = subprocess.run(
        ["bash", "-c", script], cwd=cwd, env=qkv_env(QKV_COMPILE_AUTOTUNE="0"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # The first command is README's `echo "the third of may nineteen ninety" | qkv translate runs/demo`.
    assert result.stdout.splitlines()[0] == "1990-05-03", result.stdout
    for written in (
        "test.hyp",
        "test.int8.hyp",
        "runs/demo/averaged.pt",
        "explain.html",
        "attention.png",
        "head.png",
    ):
        assert (cwd / written).is_file(), written
    # README's `--precision int8` line: a translation for each test line, as fp32's (test.hyp) are
    test_lines = (cwd / "runs/demo/data/test.words").read_text().splitlines()
    int8_lines = (cwd / "test.int8.hyp").read_text().splitlines()
    assert len(int8_lines) == len(test_lines) and all(int8_lines), int8_lines[:5]
    # README's `qkv translate runs/demo --compile --beam 1`: its program, kept beside the checkpoint
    # (tests/test_compiled.py checks that the command translates as without --compile); on a PyTorch
    # too old to compile the step, one line that says so (tests/test_translate.py).
    programs = list((cwd / "runs/demo/compiled").glob("decoder-step-1-rows-*.pt2"))
    if TOO_OLD_TO_COMPILE is None:
        assert len(programs) == 1
        assert "qkv: compiling the decoder step for 1 row, greedy (once" in result.stderr, (
            result.stderr
        )
    else:
        assert programs == [] and f"or later, not {TOO_OLD_TO_COMPILE}: decoding" in result.stderr
    if HAS_EXPORT:
        assert (cwd / "runs/demo/ct2_int8/model.bin").is_file()
        assert (cwd / "runs/demo/onnx/decoder_step.onnx").is_file()


def test_readme_python_examples_run_after_the_demo(demo_run):
    cwd, _ = demo_run
    blocks = [block for block in re.findall(r"```python\n(.*?)```", README, re.DOTALL)]
    namespaces = []
    before = Path.cwd()
    os.chdir(cwd)
    try:
        for block in [block for block in blocks if '"runs/demo"' in block]:
            namespaces.append({})
            exec(compile(block, "README.md", "exec"), namespaces[-1])
    finally:
        os.chdir(before)
    loaded, inside = namespaces  # `qkv.load(...)`, then the look inside
    sentence = "the third of may nineteen ninety"
    assert loaded["translator"].translate([sentence], beam=5) == ["1990-05-03"]
    assert inside["result"].steps and (cwd / "cross.png").is_file()


def test_the_demo_writes_runs_demo_where_the_readme_looks_then_numbered_folders(tmp_path):
    from qkv.demo import default_demo_dir

    assert default_demo_dir(tmp_path) == tmp_path / "demo"
    (tmp_path / "demo").mkdir()
    assert default_demo_dir(tmp_path) == tmp_path / "demo-2"
    (tmp_path / "demo-2").mkdir()
    assert default_demo_dir(tmp_path) == tmp_path / "demo-3"


def test_a_demo_into_a_run_says_what_the_demo_can_do(demo_run, capsys):
    """It said "pass --resume", which `qkv demo` does not take; --steps 0 named train.max_steps."""
    from qkv.cli import main

    run_dir = demo_run[0] / "runs" / "demo"
    capsys.readouterr()
    assert main(["demo", "--out", str(run_dir), "--steps", "5"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"qkv: error: --out {run_dir} already holds a run: choose another --out (without --out, "
        "the demo takes runs/demo, then runs/demo-2, -3, ...)"
    )
    assert main(["demo", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == "qkv: error: --steps must be at least 1, got 0"


def readme_curl_examples() -> list[tuple[list[str], str]]:
    """README's `curl` commands to the server (its Serve section), each with the comment after it."""
    section = (REPO / "README.md").read_text(encoding="utf-8").split("\n## Serve\n")[1]
    block = next(b for b in section.split("```bash\n")[1:] if b.startswith("curl"))
    lines, examples = block.split("```")[0].splitlines(), []
    while lines:
        command = lines.pop(0)
        while command.endswith("\\"):
            command = command[:-1] + lines.pop(0)
        comment = command.partition("#")[2] if "#" in command else ""
        while lines and lines[0].lstrip().startswith("#"):
            comment += lines.pop(0).lstrip()[1:]
        examples.append((shlex.split(command, comments=True), comment.strip()))
    return examples


def test_readme_serve_examples_answer_as_written_on_the_demo_model(demo_run):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from qkv.serve import load_models
    from qkv.serve.app import create_app

    cwd, _ = demo_run
    examples, answers, shown = readme_curl_examples(), {}, {}
    with TestClient(create_app(load_models([str(cwd / "runs" / "demo")]))) as client:
        for args, comment in examples:
            assert args[:2] == ["curl", "-s"] and args[2].startswith("localhost:5000/"), args
            route = args[2].removeprefix("localhost:5000")
            options = dict(zip(args[3::2], args[4::2], strict=True))
            if "-d" in options:
                name, _, value = options["-H"].partition(": ")
                answer = client.post(route, content=options["-d"], headers={name: value})
            else:
                answer = client.get(route)
            assert answer.status_code == 200, (args, answer.text)
            answers[route] = answer
            if comment.startswith(("{", "[")):  # the answer README shows, then words about it
                shown[route], _ = json.JSONDecoder().raw_decode(comment)
    assert list(answers) == ["/translate", "/languages", "/v1/translate", "/v1/explain", "/metrics"]
    assert shown == {route: answers[route].json() for route in ("/translate", "/languages")}
    # What README says in words: two hypotheses (n_best 2), layer 2's steps, Prometheus' counts
    hypotheses = answers["/v1/translate"].json()["translations"][0]["hypotheses"]
    assert hypotheses[0]["text"] == "1990-05-03" and len(hypotheses) == 2
    assert answers["/v1/explain"].json()["title"].startswith("Encoder self-attention, layer 2")
    assert "qkv_requests_total" in answers["/metrics"].text
