"""`rumor cluster up` end to end: a live cluster, a node killed under it, status, plot, teardown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

RUMOR = [sys.executable, "-m", "rumor"]


def _wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _rounds_logged(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if '"event":"round"' in line)


def _alive(pids: list[int]) -> list[int]:
    return [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_cluster_up_survives_a_crashed_node_and_cleans_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        *RUMOR, "cluster", "up", "--nodes", "4", "--topology", "ring", "--rounds", "250",
        "--partition", "iid", "--init", "independent", "--eval-every", "25",
        "--run-dir", str(run_dir), "--param", "round_timeout=2", "--format", "json",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _rounds_logged(run_dir / "node-3.metrics.jsonl") >= 20, 120, "rounds")
        pids = json.loads((run_dir / "pids.json").read_text())
        os.kill(pids["node-3"], signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["exit_codes"]["node-3"] == -signal.SIGKILL
    assert all(report["exit_codes"][f"node-{i}"] == 0 for i in range(3))
    assert set(report["rounds"]) == {"node-0", "node-1", "node-2"}
    assert all(r == 250 for r in report["rounds"].values())
    assert report["mean_accuracy"] > 0.85
    assert report["consensus_distance"] < report["initial_consensus_distance"] / 10
    assert not _alive(list(pids.values()))

    # the run folder feeds the other read commands
    png = tmp_path / "plot.png"
    plot = subprocess.run(
        [*RUMOR, "plot", str(run_dir), "--out", str(png), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert plot.returncode == 0, plot.stderr
    with Image.open(png) as img:
        assert img.width > 600 and img.height > 400
        assert np.asarray(img.convert("L"), dtype=float).std() > 5  # not blank


def test_ctrl_c_stops_every_node(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        *RUMOR, "cluster", "up", "--nodes", "3", "--topology", "ring", "--rounds", "100000",
        "--run-dir", str(run_dir), "--no-plot", "--format", "json",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _rounds_logged(run_dir / "node-0.metrics.jsonl") >= 5, 120, "rounds")
        pids = list(json.loads((run_dir / "pids.json").read_text()).values())
        assert len(_alive(pids)) == 3
        status = subprocess.run(
            [*RUMOR, "status", "--run-dir", str(run_dir), "--format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stderr
        rows = json.loads(status.stdout)
        assert sorted(r["node_id"] for r in rows) == ["node-0", "node-1", "node-2"]
        assert all(r["round"] >= 1 and r["algorithm"] == "dpsgd" for r in rows)
        assert all(len(r["peers"]) == 2 for r in rows)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    _wait_for(lambda: not _alive(pids), 30, "node processes to exit")
    stops = [
        json.loads(line)
        for i in range(3)
        for line in (run_dir / f"node-{i}.metrics.jsonl").read_text().splitlines()
        if '"event":"stop"' in line
    ]
    assert len(stops) == 3  # each node shut down in order and said so
