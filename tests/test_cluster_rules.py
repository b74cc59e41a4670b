"""`rumor cluster up --algorithm RULE` for every seed rule: real node processes on loopback.

Each rule runs 3 nodes on a ring (a triangle: every node sees both others) for a few rounds
through the command a user types, and the test reads what the run folder kept: every node
exits 0, logs every round in order and says it finished, and the metrics show learning
(accuracy up on digits, test loss down on least squares). DADAO and DIGing get no
``--partition``: the command picks ``iid`` for regression data by itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RUMOR = [sys.executable, "-m", "rumor"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
NODES = 3
#: rounds per run: a DADAO round is a time unit (50 ms) and a DIGing round one gradient, so
#: the least-squares rules get more of them for the same wall time
ROUNDS = {"classify": 12, "regress": 40}

#: digits, default partition (dirichlet:0.5), an MLP: accuracy must rise
CLASSIFY = ["--eval-every", "1"]
#: least squares, a linear model, no --partition: test loss must fall
REGRESS = ["--dataset", "lsq:600:5:10", "--model", "linear:nobias", "--eval-every", "1"]

RULES: dict[str, list[str]] = {
    "dpsgd": [*CLASSIFY, "--param", "local_steps=5"],
    "dadao": REGRESS,
    "acid": [*CLASSIFY, "--param", "local_steps=5"],
    "diging": [*REGRESS, "--param", "alpha=0.2"],
    "dfedsam": [*CLASSIFY, "--param", "local_steps=5"],
    "dfedsam-mgs": [*CLASSIFY, "--param", "local_steps=5", "--param", "gossip_steps=2"],
    "variance-corrected": [*CLASSIFY, "--init", "independent", "--param", "local_steps=5"],
}


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cluster_up(rule: str, rounds: int, run_dir: Path) -> dict[str, Any]:
    cmd = [
        *RUMOR, "cluster", "up", "--nodes", str(NODES), "--topology", "ring",
        "--algorithm", rule, "--rounds", str(rounds), *RULES[rule],
        "--run-dir", str(run_dir), "--timeout", "120", "--no-plot", "--format", "json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=200, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


#: one rule per family in the default suite; their siblings (same loop, other parameters or
#: the same event machinery) only in the slow one, to keep the default suite short
SLOW = {"acid", "dfedsam-mgs"}


@pytest.mark.parametrize(
    "rule", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW else r for r in RULES]
)
def test_cluster_up_runs_every_rule_to_the_end_and_learns(rule: str, tmp_path: Path) -> None:
    regression = "--dataset" in RULES[rule]
    key = "test_loss" if regression else "accuracy"
    total = ROUNDS["regress" if regression else "classify"]
    run_dir = tmp_path / "run"
    report = _cluster_up(rule, total, run_dir)
    names = [f"node-{i}" for i in range(NODES)]
    assert report["exit_codes"] == dict.fromkeys(names, 0), report["exit_codes"]

    first, last = [], []
    for name in names:
        records = _records(run_dir / f"{name}.metrics.jsonl")
        start = next(r for r in records if r["event"] == "start")
        assert start["algorithm"] == rule
        rounds = [r for r in records if r["event"] == "round"]
        assert [r["round"] for r in rounds] == list(range(total)), name
        finished = [r for r in records if r["event"] == "finished"]
        assert len(finished) == 1 and finished[0]["round"] == total, name
        first.append(rounds[0][key])
        last.append(finished[0][key])

    mean_first, mean_last = sum(first) / NODES, sum(last) / NODES
    if regression:
        config = (run_dir / "node-0.toml").read_text().splitlines()
        assert 'partition = "iid"' in config  # picked for regression data
        # the mean test loss falls to under half of its value after the first round
        assert mean_last < 0.5 * mean_first, (first, last)
    else:
        assert mean_last > 0.5 and mean_last > mean_first + 0.1, (first, last)


def test_label_skew_on_regression_data_is_refused_before_any_process_starts(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        *RUMOR, "cluster", "up", "--nodes", "3", "--algorithm", "diging",
        "--dataset", "lsq:600:5:10", "--model", "linear:nobias",
        "--partition", "dirichlet:0.5", "--run-dir", str(run_dir), "--format", "json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2
    assert "--partition iid" in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()


def test_a_cluster_whose_every_node_fails_exits_nonzero_and_says_where_to_look(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    cmd = [
        *RUMOR, "cluster", "up", "--nodes", "3", "--algorithm", "dfedsam", "--param", "rho=-1",
        "--rounds", "2", "--run-dir", str(run_dir), "--timeout", "60", "--no-plot",
        "--format", "json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert set(json.loads(proc.stdout)["exit_codes"].values()) == {2}  # bad configuration
    assert "every node failed" in proc.stderr and str(run_dir) in proc.stderr
    assert "rho must be" in (run_dir / "node-0.log").read_text()
