"""Tests for reading run directories (rumor.runlog), plotting them (rumor.plotting) and the
``rumor plot`` command, on synthetic runs written the way nodes and the observer write them."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import rumor
from rumor.plotting import DPI, figure_size, plot_runs
from rumor.runlog import RunLoadError, load_run, read_jsonl

PLOT_CMD_FILE = Path(rumor.__file__).parent / "cli" / "plot_cmd.py"


def load_plot_cmd():
    """The command module, loaded by path: importing ``rumor.cli`` would import every command."""
    spec = importlib.util.spec_from_file_location("_rumor_plot_cmd_under_test", PLOT_CMD_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


T0 = 1_795_000_000.0
N_NODES = 4
N_ROUNDS = 20
START_GAP = 0.5  # node i starts i * START_GAP seconds after node 0
ROUND_S = 0.5
ROUND_BYTES = 1000


def node_start(i: int) -> float:
    return T0 + i * START_GAP


def round_time(i: int, r: int) -> float:
    return node_start(i) + 0.2 + r * ROUND_S


def loss_of(i: int, r: int, scale: float = 1.0) -> float:
    return 2.0 * math.exp(-0.15 * scale * r) + 0.05 * i


def accuracy_of(i: int, r: int, scale: float = 1.0) -> float:
    return 0.1 + 0.8 * (1.0 - math.exp(-0.2 * scale * r)) + 0.01 * i


def bytes_in_of(i: int, r: int) -> int:
    return (r + 1) * ROUND_BYTES * (i + 1)


def bytes_out_of(i: int, r: int) -> int:
    return (r + 1) * ROUND_BYTES


def consensus_of(k: int) -> float:
    return 2.0 * math.exp(-0.3 * k)


def _line(record: dict) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


def write_run(
    root: Path,
    *,
    nodes: int = N_NODES,
    rounds: int = N_ROUNDS,
    scale: float = 1.0,
    cluster: bool = True,
    algorithm: str = "gossip",
) -> Path:
    """A run directory as a real cluster leaves it: node metrics files, cluster.jsonl, and a
    torn last line in the last node's file (killed mid-write)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(nodes):
        node = f"node-{i}"
        start = node_start(i)
        lines = [
            _line(
                {
                    "t": start,
                    "elapsed": 0.0,
                    "node": node,
                    "event": "start",
                    "address": f"127.0.0.1:{50051 + i}",
                    "algorithm": algorithm,
                    "params": {"lr": 0.1},
                }
            )
        ]
        for r in range(rounds):
            t = round_time(i, r)
            lines.append(
                _line(
                    {
                        "t": t,
                        "elapsed": round(t - start, 6),
                        "node": node,
                        "event": "round",
                        "round": r,
                        "loss": loss_of(i, r, scale),
                        "accuracy": accuracy_of(i, r, scale),
                        "test_loss": loss_of(i, r, scale) + 0.1,
                        "bytes_in": bytes_in_of(i, r),
                        "bytes_out": bytes_out_of(i, r),
                        "exchanges": r + 1,
                        "rejected": 0,
                        "digest": f"{i:02x}{r:04x}",
                        "neighbour_distance": None if r == 0 else math.exp(-0.2 * r),
                        "alive": 2,
                    }
                )
            )
        t_end = round_time(i, rounds - 1) + 0.1
        lines.append(
            _line(
                {
                    "t": t_end,
                    "elapsed": t_end - start,
                    "node": node,
                    "event": "finished",
                    "round": rounds,
                    "accuracy": accuracy_of(i, rounds - 1, scale),
                    "test_loss": None,
                }
            )
        )
        lines.append(
            _line(
                {
                    "t": t_end + 0.1,
                    "elapsed": t_end + 0.1 - start,
                    "node": node,
                    "event": "stop",
                    "round": rounds,
                    "bytes_in": bytes_in_of(i, rounds - 1) + 7,
                    "bytes_out": bytes_out_of(i, rounds - 1),
                    "exchanges": rounds,
                    "digest": "ff",
                }
            )
        )
        (root / f"node-{i}.metrics.jsonl").write_text("".join(lines), encoding="utf-8")
    if nodes:
        torn = f'{{"t":{T0 + 99:.3f},"elapsed":9.9,"node":"node-{nodes - 1}","event":"rou'
        with (root / f"node-{nodes - 1}.metrics.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(torn)
    if cluster:
        duration = round_time(nodes - 1, rounds - 1) - T0
        lines = []
        for k in range(int(duration) + 1):
            t = T0 + 1.0 + k
            lines.append(
                _line(
                    {
                        "t": t,
                        "elapsed": 1.0 + k,
                        "event": "observe",
                        "consensus_distance": consensus_of(k),
                        "mean_accuracy": 0.5,
                        "nodes_alive": nodes,
                        "round_min": 2 * k,
                        "round_max": 2 * k + 1,
                    }
                )
            )
        (root / "cluster.jsonl").write_text("".join(lines), encoding="utf-8")
    return root


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    return write_run(tmp_path / "2026-11-22T08-00-00")


def cluster_len() -> int:
    return int(round_time(N_NODES - 1, N_ROUNDS - 1) - T0) + 1


# ---------------------------------------------------------------------- runlog


def test_load_run_parses_directory_and_skips_torn_line(run_dir: Path) -> None:
    last_file = run_dir / f"node-{N_NODES - 1}.metrics.jsonl"
    assert not last_file.read_text().endswith("\n")  # the torn line is really there

    run = load_run(run_dir)
    assert run.name == "2026-11-22T08-00-00"
    assert list(run.nodes) == [f"node-{i}" for i in range(N_NODES)]
    for node, rounds in run.nodes.items():
        assert [rec["round"] for rec in rounds] == list(range(N_ROUNDS))
        assert all(rec["event"] == "round" for rec in rounds)
        assert [rec["event"] for rec in run.events[node]][-2:] == ["finished", "stop"]
    assert len(run.cluster) == cluster_len()
    assert run.t0 == pytest.approx(T0)
    assert run.rounds_max == N_ROUNDS - 1
    assert run.algorithm == "gossip"
    assert run.has_consensus()


def test_load_run_from_file_list(run_dir: Path) -> None:
    files = [run_dir / "node-0.metrics.jsonl", run_dir / "node-2.metrics.jsonl"]
    run = load_run(files, name="subset")
    assert run.name == "subset"
    assert list(run.nodes) == ["node-0", "node-2"]
    assert run.cluster == []
    with_cluster = load_run([*files, run_dir / "cluster.jsonl"])
    assert with_cluster.name == run_dir.name
    assert len(with_cluster.cluster) == cluster_len()


def test_final_summary(run_dir: Path) -> None:
    final = load_run(run_dir).final()
    assert final["n_nodes"] == N_NODES
    assert final["rounds_max"] == N_ROUNDS - 1
    last = N_ROUNDS - 1
    for i in range(N_NODES):
        node = final["nodes"][f"node-{i}"]
        assert node["round"] == last
        assert node["accuracy"] == pytest.approx(accuracy_of(i, last))
        assert node["loss"] == pytest.approx(loss_of(i, last))
        # the stop record counts bytes sent after the last round
        assert node["bytes"] == bytes_in_of(i, last) + 7 + bytes_out_of(i, last)
    expected_acc = np.mean([accuracy_of(i, last) for i in range(N_NODES)])
    assert final["mean_accuracy"] == pytest.approx(expected_acc)
    assert final["consensus_distance"] == pytest.approx(consensus_of(cluster_len() - 1))
    assert final["neighbour_distance"] == pytest.approx(math.exp(-0.2 * last))
    assert final["total_bytes"] == sum(final["nodes"][n]["bytes"] for n in final["nodes"])


def test_series_shapes_and_values(run_dir: Path) -> None:
    run = load_run(run_dir)

    by_round = run.series("loss", x="round")
    assert set(by_round) == set(run.nodes)
    for i in range(N_NODES):
        xs, ys = by_round[f"node-{i}"]
        assert xs.shape == ys.shape == (N_ROUNDS,)
        np.testing.assert_array_equal(xs, np.arange(N_ROUNDS))
        np.testing.assert_allclose(ys, [loss_of(i, r) for r in range(N_ROUNDS)])

    # wall time is relative to the run's first record, so late starters start late
    by_time = run.series("accuracy", x="time")
    for i in range(N_NODES):
        xs, _ = by_time[f"node-{i}"]
        np.testing.assert_allclose(xs, [round_time(i, r) - T0 for r in range(N_ROUNDS)])
    # ... while each node's own clock starts at zero
    by_elapsed = run.series("accuracy", x="elapsed")
    assert by_elapsed["node-3"][0][0] == pytest.approx(0.2)

    xs, ys = run.series("bytes", x="bytes")["node-1"]
    np.testing.assert_allclose(xs, ys)
    np.testing.assert_allclose(xs, [bytes_in_of(1, r) + bytes_out_of(1, r) for r in range(20)])

    # null neighbour distance in round 0 is dropped, not turned into zero
    xs, ys = run.series("neighbour_distance", x="round")["node-0"]
    assert xs[0] == 1 and len(xs) == N_ROUNDS - 1

    with pytest.raises(ValueError):
        run.series("loss", x="furlongs")


def test_mean_series(run_dir: Path) -> None:
    run = load_run(run_dir)

    xs, ys = run.mean_series("accuracy", x="round")
    np.testing.assert_array_equal(xs, np.arange(N_ROUNDS))
    expected = [np.mean([accuracy_of(i, r) for i in range(N_NODES)]) for r in range(N_ROUNDS)]
    np.testing.assert_allclose(ys, expected)

    # rounds happen at 0.2 + k * ROUND_S s into the run (node i in its round k - i); a grid
    # step of ROUND_S / 2 puts every other grid point on such a moment
    span = round_time(N_NODES - 1, N_ROUNDS - 1) - round_time(0, 0)
    points = round(span / (ROUND_S / 2)) + 1
    xs, ys = run.mean_series("accuracy", x="time", points=points)
    assert xs.shape == ys.shape == (points,)
    assert np.all(np.diff(xs) > 0)
    assert xs[0] == pytest.approx(0.2)
    assert xs[-1] == pytest.approx(round_time(N_NODES - 1, N_ROUNDS - 1) - T0)
    for k in range(N_ROUNDS + N_NODES - 1):
        assert xs[2 * k] == pytest.approx(0.2 + k * ROUND_S)
        # nodes not started yet do not count; finished nodes keep their last value
        running = [accuracy_of(i, min(k - i, N_ROUNDS - 1)) for i in range(N_NODES) if k >= i]
        assert ys[2 * k] == pytest.approx(np.mean(running)), k
    assert ys[-1] == pytest.approx(expected[-1])

    xs, ys = run.mean_series("loss", x="bytes", points=50)
    assert xs.shape == ys.shape == (50,)
    assert ys[0] > ys[-1]

    bx, by = run.total_bytes_series(x="round")
    np.testing.assert_array_equal(bx, np.arange(N_ROUNDS))
    assert by[-1] == sum(bytes_in_of(i, 19) + bytes_out_of(i, 19) for i in range(N_NODES))
    _, ty = run.total_bytes_series(x="time")
    assert ty[-1] == pytest.approx(by[-1]) and np.all(np.diff(ty) >= 0)

    cx, cy = run.cluster_series("consensus_distance", x="time")
    assert len(cx) == cluster_len() and cx[0] == pytest.approx(1.0)
    assert np.all(np.diff(cy) < 0)
    rx, _ = run.cluster_series("consensus_distance", x="round")
    assert rx[0] == pytest.approx(0.5)
    bx2, _ = run.cluster_series("consensus_distance", x="bytes")
    assert np.all(np.diff(bx2) >= 0) and bx2[-1] <= by[-1]


def test_tolerates_sparse_and_broken_records(tmp_path: Path) -> None:
    root = tmp_path / "messy"
    root.mkdir()
    (root / "node-0.metrics.jsonl").write_text(
        _line({"t": T0, "elapsed": 0, "node": "node-0", "event": "start"})
        + _line({"t": T0 + 1, "node": "node-0", "event": "round", "round": 0, "loss": 1.0})
        + _line({"t": T0 + 2, "node": "node-0", "event": "round", "round": 1, "loss": None})
        + "[1, 2, 3]\n"
        + "\n"
        + _line({"node": "node-0", "event": "round", "round": 2, "loss": 0.5, "accuracy": 0.7})
        + "{not json\n",
        encoding="utf-8",
    )
    (root / "node-10.metrics.jsonl").write_bytes(b'{"t": 1, "event": "start"}\n\xff\xfe{"t"')
    (root / "node-2.metrics.jsonl").write_text("", encoding="utf-8")
    (root / "cluster.jsonl").write_text(
        '{"t": %f, "elapsed": 1, "event": "observe", "consensus_distance": NaN}\n' % (T0 + 1),
        encoding="utf-8",
    )
    run = load_run(root)
    # natural order; node ids from the records, or from the file name
    assert list(run.nodes) == ["node-0", "node-2", "node-10"]
    assert len(run.nodes["node-0"]) == 3
    assert run.nodes["node-2"] == [] and run.nodes["node-10"] == []
    assert run.has_consensus() is False
    assert run.series("loss", x="round")["node-0"][1].tolist() == [1.0, 0.5]
    assert run.series("loss", x="time")["node-0"][1].tolist() == [1.0]  # no t, no time
    final = run.final()
    assert final["nodes"]["node-0"]["accuracy"] == 0.7
    assert final["nodes"]["node-2"] == {
        "round": None,
        "accuracy": None,
        "loss": None,
        "test_loss": None,
        "neighbour_distance": None,
        "bytes": None,
    }
    assert final["mean_accuracy"] == 0.7 and final["consensus_distance"] is None
    assert final["total_bytes"] is None
    assert run.mean_series("accuracy", x="time")[0].size == 0
    assert read_jsonl(root / "node-10.metrics.jsonl") == [{"t": 1, "event": "start"}]


def test_load_run_errors(tmp_path: Path) -> None:
    with pytest.raises(RunLoadError):
        load_run(tmp_path)
    with pytest.raises(RunLoadError):
        load_run(tmp_path / "missing")
    (tmp_path / "cluster.jsonl").write_text("{}\n")
    with pytest.raises(RunLoadError):
        load_run(tmp_path)


def test_modules_import_without_matplotlib() -> None:
    code = (
        "import importlib.util, sys, rumor.runlog, rumor.plotting;"
        f"s = importlib.util.spec_from_file_location('m', {str(PLOT_CMD_FILE)!r});"
        "s.loader.exec_module(importlib.util.module_from_spec(s));"
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------- plotting


def read_png(path: Path) -> np.ndarray:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def expected_pixels(n_panels: int) -> tuple[int, int]:
    w, h = figure_size(n_panels)
    return round(h * DPI), round(w * DPI)


def assert_not_blank(image: np.ndarray) -> None:
    rgb = image[..., :3]
    assert float(rgb.std()) > 0.05
    # lines of colour, not just black text on white
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert float((saturation > 0.3).mean()) > 0.002


def test_plot_single_run(run_dir: Path, tmp_path: Path) -> None:
    run = load_run(run_dir)
    out = plot_runs([run], tmp_path / "plots" / "single.png")
    assert out == tmp_path / "plots" / "single.png" and out.is_file()
    image = read_png(out)
    assert image.shape[:2] == expected_pixels(4) == (880, 1320)
    assert_not_blank(image)


def test_plot_two_runs_side_by_side(tmp_path: Path) -> None:
    fast = load_run(write_run(tmp_path / "fast", scale=2.0, algorithm="push-sum"))
    slow = load_run(write_run(tmp_path / "slow", scale=0.5, cluster=False))
    for x in ("round", "bytes"):
        out = plot_runs([fast, slow], tmp_path / f"compare-{x}.png", x=x)
        image = read_png(out)
        assert image.shape[:2] == expected_pixels(4)
        assert_not_blank(image)

    out = plot_runs(
        [fast, slow], tmp_path / "one.png", metrics=["accuracy"], x="time", per_node=False
    )
    image = read_png(out)
    assert image.shape[:2] == expected_pixels(1) == (440, 660)
    assert_not_blank(image)


def test_plot_without_observer_and_without_rounds(tmp_path: Path) -> None:
    no_observer = load_run(write_run(tmp_path / "a", cluster=False))
    assert not no_observer.has_consensus()
    out = plot_runs([no_observer], tmp_path / "a.png", metrics=("consensus", "loss", "bytes"))
    assert read_png(out).shape[:2] == expected_pixels(3)

    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "node-0.metrics.jsonl").write_text(_line({"t": T0, "event": "start"}))
    out = plot_runs([load_run(empty)], tmp_path / "empty.png")
    assert read_png(out).shape[:2] == expected_pixels(4)

    with pytest.raises(ValueError):
        plot_runs([], tmp_path / "none.png")
    with pytest.raises(ValueError):
        plot_runs([no_observer], tmp_path / "bad.png", x="parsecs")


# ---------------------------------------------------------------------- CLI


@pytest.fixture()
def cli() -> typer.Typer:
    app = typer.Typer()
    load_plot_cmd().register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps "plot" a named subcommand
        pass

    return app


def test_cli_json_matches_data(cli: typer.Typer, run_dir: Path, tmp_path: Path) -> None:
    other = write_run(tmp_path / "other", scale=0.5, cluster=False)
    result = CliRunner().invoke(cli, ["plot", str(run_dir), str(other), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    out = Path(data["out"])
    assert out == run_dir / "convergence.png" and out.is_file()
    assert read_png(out).shape[:2] == expected_pixels(4)

    first, second = data["runs"]
    assert first["name"] == run_dir.name and second["name"] == "other"
    assert first["nodes"] == N_NODES and first["rounds_max"] == N_ROUNDS - 1
    last_accuracies = []
    for i in range(N_NODES):
        rounds = [rec for rec in read_jsonl(run_dir / f"node-{i}.metrics.jsonl")]
        last_accuracies.append([r["accuracy"] for r in rounds if r["event"] == "round"][-1])
    assert first["final_mean_accuracy"] == pytest.approx(np.mean(last_accuracies))
    assert first["final_consensus_distance"] == pytest.approx(consensus_of(cluster_len() - 1))
    assert second["final_consensus_distance"] is None
    assert second["final_mean_accuracy"] == pytest.approx(
        np.mean([accuracy_of(i, N_ROUNDS - 1, 0.5) for i in range(N_NODES)])
    )


def test_cli_text_output_and_options(cli: typer.Typer, run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "c.png"
    result = CliRunner().invoke(
        cli,
        [
            *("plot", str(run_dir), "--out", str(target), "--x", "round"),
            *("--metrics", "loss,consensus", "--no-per-node"),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0] == str(target) and target.is_file()
    assert read_png(target).shape[:2] == expected_pixels(2)
    mean_acc = np.mean([accuracy_of(i, N_ROUNDS - 1) for i in range(N_NODES)])
    assert lines[1].startswith(f"{run_dir.name}: {N_NODES} nodes")
    assert f"final mean accuracy {mean_acc:.4f}" in lines[1]
    assert f"final consensus distance {consensus_of(cluster_len() - 1):.3g}" in lines[1]


def test_cli_errors(cli: typer.Typer, run_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["plot", str(run_dir), str(empty)])
    assert result.exit_code == 2
    assert "no node metrics files" in result.stderr and str(empty) in result.stderr
    assert not (run_dir / "convergence.png").exists()

    result = CliRunner().invoke(cli, ["plot", str(run_dir), "--x", "furlongs"])
    assert result.exit_code == 2
    result = CliRunner().invoke(cli, ["plot", str(run_dir), "--metrics", "loss,acuracy"])
    assert result.exit_code == 2 and "acuracy" in result.output
    result = CliRunner().invoke(cli, ["plot", str(run_dir), "--format", "yaml"])
    assert result.exit_code == 2
