"""README examples run as written."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# The suite as README runs it: a process for each core, up to 4 (pytest-xdist)
PYTEST = "pytest -q -n auto --maxprocesses 4"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_library_example_runs():
    (example,) = [block for block in code_blocks("python") if "TransformerConfig" in block]
    exec(compile(example, "README.md", "exec"), {})


def test_quick_start_is_two_commands_with_torch_pinned_first():
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert len(commands) == 2
    for command in commands:
        assert command.startswith("pip install torch==2.13.0 && pip install -e ")
    assert commands[0].strip().endswith("qkv demo")
    assert commands[1].strip().endswith(PYTEST)


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0" in ci
    assert f"python3 -m {PYTEST}\n" in ci


def test_ci_runs_the_suite_on_the_oldest_pytorch_pyproject_accepts():
    repo = Path(__file__).resolve().parents[1]
    (least,) = re.findall(r'"torch>=(\d+\.\d+)"', (repo / "pyproject.toml").read_text())
    ci = (repo / ".ci" / "run").read_text()
    assert re.search(rf"^recipes/torch_versions\.sh {re.escape(least)}\.\d+$", ci, re.MULTILINE)


def _avx2_pass(text: str) -> tuple[set[str], list[str]]:
    """The test files and the environment variables of the pass held to AVX2 in `text`: the
    variables from ONEDNN_MAX_CPU_ISA's, the files of the pytest command after them."""
    start = text.index("ONEDNN_MAX_CPU_ISA=AVX2")
    pytest_at = text.index(PYTEST, start)
    lines = text[pytest_at:].splitlines()
    command = [lines[0]]
    for line in lines[1:]:  # its continuation lines
        if not command[-1].rstrip().endswith("\\"):
            break
        command.append(line)
    files = set(re.findall(r"tests/test_\w+\.py", "\n".join(command)))
    return files, re.findall(r"\b[A-Z_]+=(?:AVX2|avx2)\b", text[start:pytest_at])


def test_readme_holds_to_avx2_as_ci_does():
    """A reader who repeats CI's AVX2 pass from README runs the same files, held the same way."""
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    readme_files, readme_variables = _avx2_pass(README)
    ci_files, ci_variables = _avx2_pass(ci)
    assert readme_files == ci_files and len(ci_files) > 5
    assert sorted(readme_variables) == sorted(ci_variables) and len(ci_variables) == 4
