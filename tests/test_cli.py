"""python -m executorch_wgpu: a help listing that says what each command does, --version, clear usage errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

import executorch_wgpu
from executorch_wgpu.__main__ import COMMANDS


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "executorch_wgpu", *args], capture_output=True, text=True,
                          timeout=60)


def test_help_lists_every_command_with_what_it_does_without_importing_the_tools():
    result = cli("--help")
    assert result.returncode == 0 and result.stderr == ""
    for name, (_, summary) in COMMANDS.items():
        assert name in result.stdout and summary.split()[0] in result.stdout
    probe = subprocess.run([sys.executable, "-c", "import sys; from executorch_wgpu.__main__ import main\n"
                            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                            "print(sorted(m for m in ('torch', 'torchao', 'wgpu') if m in sys.modules))"],
                           capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip().splitlines()[-1] == "[]"


def test_version_prints_the_package_version():
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"executorch_wgpu {executorch_wgpu.__version__}"


@pytest.mark.parametrize("args, words", [(("bogus",), "invalid choice: 'bogus'"),
                                         ((), "the following arguments are required: command")])
def test_a_wrong_command_is_a_usage_error_not_a_traceback(args, words):
    result = cli(*args)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
