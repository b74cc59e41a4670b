"""rumor installs as one namespace (not editable too) and its committed stubs match the .proto."""

from __future__ import annotations

import filecmp
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_match_the_proto_sources(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "protocol"))
    try:
        import protogen
    finally:
        sys.path.pop(0)
    written = protogen.generate(tmp_path)
    assert written, "protoc produced nothing"
    committed = ROOT / "protocol" / "v1"
    for path in written:
        twin = committed / path.name
        assert twin.exists(), f"{path.name} is not committed; run `make proto`"
        assert filecmp.cmp(path, twin, shallow=False), f"{path.name} drifted; run `make proto`"
    generated = {p.name for p in written}
    stale = {p.name for p in committed.glob("*_pb2*.py*")} - generated
    assert not stale, f"stubs without a .proto: {stale}"


@pytest.mark.timeout(600)
def test_plain_install_into_a_fresh_venv_gives_a_working_cli(tmp_path: Path) -> None:
    """``pip install .`` (a wheel, not editable) into a new venv; the CLI runs elsewhere.

    The new venv borrows the already-installed dependencies through a path entry, so the
    test checks rumor's own packaging without downloading torch again.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = Path(
        subprocess.check_output(
            [py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
        )
        .decode()
        .strip()
    )
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    deps.append(sysconfig.get_path("purelib"))
    (purelib / "rumor-test-deps.pth").write_text("\n".join(sorted(set(deps))) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", str(ROOT)],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    installed = {p.name for p in purelib.iterdir()}
    assert "rumor" in installed
    assert not {"node", "protocol", "topology", "algorithms"} & installed
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run(
        [venv / "bin" / "rumor", "--help"], env=env, cwd=elsewhere, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    for command in ("node", "cluster", "simulate", "status", "topology", "plot"):
        assert command in out.stdout
    where = subprocess.check_output(
        [
            py,
            "-c",
            "import rumor, rumor.node.runtime, rumor.protocol.v1.node_pb2, rumor.algorithms.gossip,"
            " rumor.topology, rumor.protocol; import pathlib;"
            " print(pathlib.Path(rumor.protocol.__file__).parent)",
        ],
        env=env,
        cwd=elsewhere,
        text=True,
    ).strip()
    assert Path(where).is_relative_to(purelib), where
    assert (Path(where) / "proto" / "rumor" / "v1" / "node.proto").exists()
    analyze = subprocess.run(
        [venv / "bin" / "rumor", "topology", "analyze", "ring:6", "--format", "json"],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert analyze.returncode == 0 and '"chi_1"' in analyze.stdout, analyze.stderr
