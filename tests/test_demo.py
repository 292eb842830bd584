"""`qkv demo` genuinely learns: on a shortened run, far above chance on test dates it never saw."""

import re


def test_demo_learns_the_built_in_task(run_qkv, tmp_path):
    result = run_qkv("demo", "--steps", "400", "--out", tmp_path / "demo")
    assert result.returncode == 0, result.stderr[-3000:]
    # Chance is ~0: an exact ISO date out of ~36,500 possible days.
    match = re.search(r"exact-match accuracy on (\d+) test sentences: ([\d.]+)%", result.stdout)
    assert match, result.stdout
    assert int(match.group(1)) == 500
    assert float(match.group(2)) >= 30.0
    assert "Test sentences the model never saw" in result.stdout
    assert f"run directory: {tmp_path / 'demo'}" in result.stdout
    assert (tmp_path / "demo" / "best.pt").is_file()
    assert (tmp_path / "demo" / "attention.png").read_bytes()[:4] == b"\x89PNG"
    assert f"attention picture: {tmp_path / 'demo' / 'attention.png'}" in result.stdout


def test_the_demo_writes_runs_demo_where_the_readme_looks_then_numbered_folders(tmp_path):
    from qkv.demo import default_demo_dir

    assert default_demo_dir(tmp_path) == tmp_path / "demo"
    (tmp_path / "demo").mkdir()
    assert default_demo_dir(tmp_path) == tmp_path / "demo-2"
    (tmp_path / "demo-2").mkdir()
    assert default_demo_dir(tmp_path) == tmp_path / "demo-3"
