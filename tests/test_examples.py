"""The Python-API example runs, over gRPC and in simulation, and learns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "python_api.py"


@pytest.mark.parametrize("mode", [[], ["--simulate"]], ids=["grpc", "simulated"])
def test_python_api_example_learns(mode: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), *mode], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr
    accs = [float(a) for a in re.search(r"accuracy per node: \[(.*)\]", out.stdout)[1].split(",")]
    assert len(accs) == 4 and min(accs) > 0.95
    cd = float(re.search(r"consensus distance: (\S+)", out.stdout)[1])
    assert cd < 0.05
