from qkv import __version__


def test_version(run_qkv):
    result = run_qkv("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"qkv {__version__}"


def test_help_lists_usage(run_qkv):
    result = run_qkv("--help")
    assert result.returncode == 0
    assert "usage: qkv" in result.stdout
