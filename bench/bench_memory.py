"""Peak resident memory of node processes, against a bare ``import torch`` process.

Starts a :class:`~rumor.local_cluster.LocalCluster` of 4 ``rumor node`` processes in a ring
(``dpsgd``, digits data, one SGD step of batch 32 per round, evaluation with the default
period) with a ReLU MLP of about ``--mb`` MB of float32 parameters (default 1 MB), runs
``--rounds`` rounds, and keeps the nodes alive for ``--linger`` seconds after their last
round. While they run, ``VmHWM`` (the kernel's peak resident set) and ``VmRSS`` are read
from ``/proc/<pid>/status`` every 50 ms; the largest VmHWM seen is the node's peak.

Reference, measured in the same run: the VmHWM of a bare ``python -c "import torch"``
process (and, for context, of one that imports everything a node imports). Target: at most
300 MiB peak per node. MiB = 2^20 bytes.

``--stages`` starts each node through this file (``--worker``), which runs the real
``rumor node --config`` command line and records VmRSS/VmHWM when the trainer is about to be
built, once it is built, and at every metrics event (start, each round, finished), to show
what the peak is made of; the file imports nothing at module level that a node does not.
``--candidate lite-sgd`` additionally replaces the ``sgd`` optimizer by a minimal SGD defined
here (same update, no ``torch.optim``): the first ``torch.optim.Optimizer`` makes torch import
``torch._dynamo``, sympy and ``torch.distributed``, and this shows what that costs.

Run: ``.venv/bin/python bench/bench_memory.py [--mb 1] [--rounds 60] [--runs 1] [--stages]
[--candidate none|lite-sgd] [--out]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import MB, MIB, Results, Summary, add_out_argument, machine_info, print_table

# Nothing that a node process does not import is imported at module level: the instrumented
# nodes run this file, and their memory must be that of ``rumor node``.

N_NODES = 4
TARGET_MIB = 300.0
POLL_S = 0.05

BASELINES = {
    "python -c 'import torch'": "import torch",
    "python importing a node's modules": (
        "import torch, uvloop, grpc, rumor.api, rumor.protocol.grpc_transport, "
        "rumor.node.trainer, rumor.node.models, rumor.node.data, rumor.algorithms.gossip"
    ),
}


def read_status(pid: int) -> dict[str, int] | None:
    """VmHWM and VmRSS of ``pid`` in bytes, or None when it has exited."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024  # kB
    return out if len(out) == 2 else None


def baseline(code: str) -> dict[str, int]:
    """Peak memory of a fresh interpreter that runs ``code`` and then waits."""
    env_code = f"{code}\nimport sys\nprint('ready', flush=True)\nsys.stdin.readline()\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", env_code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"baseline process failed: {code}")
        status = read_status(proc.pid)
        if status is None:
            raise RuntimeError("baseline process exited early")
        proc.stdin.write("\n")
        proc.stdin.flush()
        return status
    finally:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def worker_cluster(configs: list[Any], run_dir: Path, worker_args: list[str]) -> Any:
    """A LocalCluster whose nodes run this file's instrumented worker."""
    from rumor.local_cluster import LocalCluster

    class WorkerCluster(LocalCluster):
        def start_node(self, node_id: str) -> None:
            log = (self.run_dir / f"{node_id}.log").open("ab")
            self._logs[node_id] = log
            env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            cmd = [self.python, __file__, "--worker", str(self.config_path(node_id))]
            self.procs[node_id] = subprocess.Popen(
                [*cmd, *worker_args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )

    return WorkerCluster(configs, run_dir)


def run_cluster(
    mb: float,
    rounds: int,
    linger: float,
    run_dir: Path,
    stages: bool = False,
    candidate: str = "none",
) -> dict[str, Any]:
    import networkx as nx

    from rumor.cluster import cluster_configs, free_ports
    from rumor.config import NodeConfig
    from rumor.local_cluster import LocalCluster
    from rumor.node.models import count_bytes, mlp_of_size

    model = mlp_of_size(int(mb * MB), 64, 10)
    width, model_bytes = model[0].out_features, count_bytes(model)
    ports = free_ports(N_NODES)
    base = NodeConfig(
        algorithm="dpsgd",
        params={"local_steps": 1},
        rounds=rounds,
        dataset="digits",
        model=f"mlp:{width}x{width}",
        batch_size=32,
        init="shared",
        linger=linger,
    )
    configs = cluster_configs(nx.cycle_graph(N_NODES), base, lambda i: f"127.0.0.1:{ports[i]}")
    if stages or candidate != "none":
        cluster = worker_cluster(configs, run_dir, ["--candidate", candidate])
    else:
        cluster = LocalCluster(configs, run_dir)
    peaks: dict[str, dict[str, int]] = {}
    timeout = 120 + rounds + linger
    try:
        cluster.start()
        end = time.monotonic() + timeout
        while cluster.running() and time.monotonic() < end:
            for nid, proc in cluster.procs.items():
                status = read_status(proc.pid)
                if status is None:
                    continue
                seen = peaks.setdefault(nid, {"VmHWM": 0, "VmRSS": 0})
                seen["VmHWM"] = max(seen["VmHWM"], status["VmHWM"])
                seen["VmRSS"] = max(seen["VmRSS"], status["VmRSS"])
            time.sleep(POLL_S)
        finished = not cluster.running()
    finally:
        codes = cluster.stop(grace=10.0)
    if not finished:
        raise RuntimeError(f"cluster did not finish within {timeout:.0f} s (see {run_dir})")
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad:
        raise RuntimeError(f"nodes exited with errors {bad} (see {run_dir})")
    stage_data = {}
    for nid in cluster.configs:
        path = run_dir / f"{nid}.memory.json"
        if path.exists():
            stage_data[nid] = json.loads(path.read_text())
    return {"width": width, "model_bytes": model_bytes, "peaks": peaks, "stages": stage_data}


# ----------------------------------------------------------------------------- worker


class LiteSGD:
    """SGD with torch's update rule (momentum without dampening or Nesterov, L2 weight
    decay) that does not derive from ``torch.optim.Optimizer``, so building it imports
    nothing. Has what :class:`~rumor.node.trainer.Trainer` uses: ``param_groups``,
    ``zero_grad`` and ``step``."""

    def __init__(
        self, params: list[Any], lr: float, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        self.param_groups = [
            {"params": list(params), "lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        ]
        self._momentum: dict[int, Any] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def step(self) -> None:
        import torch

        with torch.no_grad():
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                grads = [p.grad for p in params]
                if not params:
                    continue
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                if group["momentum"]:
                    bufs = []
                    for p, g in zip(params, grads, strict=True):
                        buf = self._momentum.get(id(p))
                        if buf is None:
                            buf = self._momentum[id(p)] = g.detach().clone()
                        else:
                            buf.mul_(group["momentum"]).add_(g)
                        bufs.append(buf)
                    grads = bufs
                torch._foreach_add_(params, grads, alpha=-group["lr"])


def worker(config_path: str, candidate: str) -> None:
    """``rumor node --config CONFIG`` through the real command line, recording its memory at
    each stage (and, with ``candidate == "lite-sgd"``, using :class:`LiteSGD`)."""
    from rumor import api
    from rumor.node import metrics, trainer

    stages: list[dict[str, Any]] = []

    def sample(label: str) -> None:
        st = read_status(os.getpid()) or {}
        stages.append(
            {
                "stage": label,
                "VmRSS_MiB": st.get("VmRSS", 0) / MIB,
                "VmHWM_MiB": st.get("VmHWM", 0) / MIB,
                "dynamo_imported": "torch._dynamo" in sys.modules,
            }
        )

    if candidate == "lite-sgd":
        trainer.OPTIMIZERS["sgd"] = lambda p, lr, m, wd: LiteSGD(p, lr, m, wd)
    make_trainer = api.make_trainer

    def make_trainer_sampled(*args: Any, **kwargs: Any) -> Any:
        sample("runtime loaded")  # command line, node runtime, event loop and gRPC
        out = make_trainer(*args, **kwargs)
        sample("trainer built")
        return out

    api.make_trainer = make_trainer_sampled  # type: ignore[assignment]
    write = metrics.MetricsLog.write

    def write_sampled(self: Any, event: str, **fields: Any) -> dict[str, Any]:
        out = write(self, event, **fields)
        sample(event if event != "round" else f"round {fields.get('round')}")
        return out

    metrics.MetricsLog.write = write_sampled  # type: ignore[method-assign]
    from rumor.config import load

    node_id = load(config_path).node_id
    sys.argv = ["rumor", "node", "--config", config_path]
    try:
        from rumor.cli import main as cli_main

        cli_main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        Path(config_path).with_name(f"{node_id}.memory.json").write_text(json.dumps(stages))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=1.0, help="model size, MB (10^6 bytes)")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--linger", type=float, default=2.0, help="seconds alive after last round")
    ap.add_argument("--runs", type=int, default=1, help="cluster runs (peaks pooled)")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument("--stages", action="store_true", help="memory at each stage of a node")
    ap.add_argument("--candidate", choices=["none", "lite-sgd"], default="none")
    ap.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    add_out_argument(ap, "memory")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.candidate)
        return []
    res = Results("memory", args.out)
    res.add(event="machine", **machine_info())
    rows: list[dict[str, Any]] = []
    root = Path(tempfile.mkdtemp(prefix="rumor-bench-memory-"))
    base_rows = []
    for label, code in BASELINES.items():
        st = baseline(code)
        row = {"what": label, "VmHWM_MiB": st["VmHWM"] / MIB, "VmRSS_MiB": st["VmRSS"] / MIB}
        base_rows.append(row)
        res.add(kind="baseline", **row)
    torch_peak = base_rows[0]["VmHWM_MiB"]
    node_peaks: list[float] = []
    stage_tables: list[dict[str, Any]] = []
    for run in range(args.runs):
        out = run_cluster(
            args.mb, args.rounds, args.linger, root / f"run{run}", args.stages, args.candidate
        )
        stage_tables.append(out["stages"])
        for nid, seen in sorted(out["peaks"].items()):
            peak = seen["VmHWM"] / MIB
            node_peaks.append(peak)
            row = {
                "run": run,
                "node": nid,
                "model_bytes": out["model_bytes"],
                "width": out["width"],
                "VmHWM_MiB": peak,
                "VmRSS_max_MiB": seen["VmRSS"] / MIB,
                "over_torch_MiB": peak - torch_peak,
                "target_MiB": TARGET_MIB,
                "met": peak <= TARGET_MIB,
                "candidate": args.candidate,
            }
            rows.append(row)
            res.add(kind="node", **row)
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"run folders under {root}")
    table = [
        [b["what"], f"{b['VmHWM_MiB']:.0f}", f"{b['VmRSS_MiB']:.0f}", "-", "-"] for b in base_rows
    ]
    for r in rows:
        table.append(
            [
                f"node {r['node']} (run {r['run']}), {r['model_bytes'] / MB:.2f} MB model",
                f"{r['VmHWM_MiB']:.0f}",
                f"{r['VmRSS_max_MiB']:.0f}",
                f"{r['over_torch_MiB']:+.0f}",
                "met" if r["met"] else "MISSED",
            ]
        )
    peaks = Summary.of(node_peaks)
    print_table(
        f"Peak resident memory (MiB) of {N_NODES} node processes, {args.rounds} rounds; "
        f"target: peak <= {TARGET_MIB:g} MiB per node",
        ["process", "VmHWM", "VmRSS max", "vs import torch", ""],
        table,
    )
    print(
        f"\nnode peak VmHWM: median {peaks.median:.0f} MiB (min {peaks.min:.0f}, max "
        f"{peaks.max:.0f}); bare import torch: {torch_peak:.0f} MiB; ratio "
        f"{peaks.median / torch_peak:.2f}x"
    )
    for run, per_node in enumerate(stage_tables):
        if not per_node:
            continue
        nid = sorted(per_node)[0]
        stages = per_node[nid]
        keep = [s for s in stages if not s["stage"].startswith("round ")]
        rounds_only = [s for s in stages if s["stage"].startswith("round ")]
        keep[3:3] = rounds_only[:2] + ([rounds_only[-1]] if len(rounds_only) > 2 else [])
        print_table(
            f"Memory of {nid} by stage (run {run}, optimizer: "
            f"{'LiteSGD' if args.candidate == 'lite-sgd' else 'torch.optim.SGD'})",
            ["after", "VmRSS MiB", "VmHWM MiB", "torch._dynamo imported"],
            [
                [s["stage"], f"{s['VmRSS_MiB']:.0f}", f"{s['VmHWM_MiB']:.0f}", s["dynamo_imported"]]
                for s in keep
            ],
        )
        res.add(kind="stages", run=run, node=nid, stages=stages)
    res.add(
        kind="summary",
        node_VmHWM_MiB=peaks,
        torch_VmHWM_MiB=torch_peak,
        candidate=args.candidate,
        malloc_arena_max=os.environ.get("MALLOC_ARENA_MAX"),
    )
    res.write()
    return rows


if __name__ == "__main__":
    main()
