"""README examples run as written."""

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


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
    assert commands[1].strip().endswith("pytest -q")


def test_ci_runs_the_readme_test_command():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "pip install --quiet torch==2.13.0" in ci
    assert "pytest -q" in ci
