"""Fixtures of the op tests: small host programs compiled against the kernels' headers (``modeling/ops/csrc``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[3] / "modeling" / "ops" / "csrc"


class HostPrograms:
    """Builds C++ programs that include the kernels' headers, and runs them on text input."""

    def __init__(self, compiler: str, directory: Path) -> None:
        self.compiler, self.directory = compiler, directory

    def build(self, name: str, source: str, flags: list[str]) -> Path:
        """Compiles ``source`` with ``-I csrc`` and ``flags``; fails the test with the compiler's output."""
        source_path = self.directory / f"{name}.cpp"
        source_path.write_text(source)
        binary = self.directory / name
        command = [self.compiler, *flags, "-Wall", f"-I{CSRC}", str(source_path), "-o", str(binary)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        return binary

    @staticmethod
    def run(binary: Path, lines: list[str]) -> list[str]:
        """The program's output lines for ``lines`` on its standard input."""
        result = subprocess.run([str(binary)], input="\n".join(lines), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()


@pytest.fixture(scope="session")
def host_programs(tmp_path_factory) -> HostPrograms:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler found")
    return HostPrograms(compiler, tmp_path_factory.mktemp("host_programs"))
