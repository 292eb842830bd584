import subprocess
import sys

from conftest import qkv_env
from qkv import __version__
from qkv.cli import COMMANDS


def test_version(run_qkv):
    result = run_qkv("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"qkv {__version__}"


def test_help_lists_usage(run_qkv):
    result = run_qkv("--help")
    assert result.returncode == 0
    assert "usage: qkv" in result.stdout


def test_help_of_every_command_imports_no_torch():
    """The parser is built without torch (~2 s of imports): `qkv --help` and each command's
    `--help` come at once."""
    code = (
        "import sys\n"
        "from qkv.cli import COMMANDS, main\n"
        "names = [c.__name__.removeprefix('_add_') for c in COMMANDS]\n"
        "for argv in [['--help']] + [[name, '--help'] for name in names]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as done:\n"
        "        assert done.code == 0, argv\n"
        "print(len(names), 'torch' in sys.modules, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=qkv_env()
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.split()[-2:] == [str(len(COMMANDS)), "False"]
    assert "usage: qkv export" in result.stdout and "--quantization" in result.stdout
