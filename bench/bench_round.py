"""Round time of synchronous gossip averaging (D-PSGD) on a 4-node ring of real processes.

Each size starts a :class:`~rumor.local_cluster.LocalCluster` of 4 ``rumor node`` processes
on 127.0.0.1 in a ring, running the ``dpsgd`` rule with one local SGD step of batch 32 per
round (``local_steps=1``, ``batch_size=32``) on the digits data (64 inputs, 10 classes), no
evaluation inside rounds (``eval_every=0``) and the default heartbeat. The model is a ReLU
MLP with two equal hidden layers sized by :func:`rumor.node.models.mlp_of_size` to about
``--sizes`` MB of float32 parameters (defaults 1, 10 and 50 MB).

Round duration comes from the nodes' own metrics files: the differences of consecutive
``round`` lines' ``elapsed`` per node, for rounds ``--warmup`` (default 2) and later; the
median is taken over all nodes and those rounds. Rounds in which a neighbour's model did not
arrive (``received < 2``) are counted and reported.

Reference, measured in the same run (before and after each cluster): raw loopback TCP
between two processes moving what one node sends per round, 2 neighbours x model bytes
(``sendall`` from and ``recv_into`` preallocated 1 MiB buffers, timed to the ack). The round
time is reported as a multiple of it. Targets: at most 10, 75 and 400 ms for 1, 10, 50 MB.
For scale, one node's SGD step is also timed alone in this process (one torch thread).

Second reference, also measured in the same run before each cluster: the bare grpc.aio ring
of ``ring_floor.py`` (4 processes moving the same bytes per round with the node's call
pattern and channel options, and doing nothing else). Its median round is the transport's
floor; ``(floor CPU + SGD step) x 4 / cores`` is a lower bound on any round of a node that
uses grpc.aio and trains, since the 4 processes share the machine's cores. ``--no-floor``
skips it.

``--phases`` runs the same cluster with an instrumented node entry point (this file with
``--worker``) that wraps, without changing them, the parts of a round: the SGD step, the
wait for neighbours' models, each send, the mix (and inside it the neighbour distance and
the weighted averages), ``end_round`` (model digest, metrics line), and on the transport
the encode digest, frame building and the receiver's decode, plus the CPU time the node
process used per round. The per-round medians show where the time goes. ``--profile`` adds
a cProfile of each node's event-loop thread over the measured rounds.

Run: ``.venv/bin/python bench/bench_round.py [--sizes 1,10,50] [--rounds 0] [--phases]
[--profile] [--no-floor] [--keep] [--out]`` (``--rounds 0`` picks a count per size that keeps
each run short).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import networkx as nx
from common import (
    MB,
    Results,
    Summary,
    TcpReference,
    add_out_argument,
    machine_info,
    print_table,
)
from ring_floor import ring_floor

from rumor.cluster import cluster_configs, free_ports
from rumor.config import NodeConfig
from rumor.local_cluster import LocalCluster
from rumor.node.metrics import read_metrics

N_NODES = 4
TARGET_MS = {1.0: 10.0, 10.0: 75.0, 50.0: 400.0}
PHASES_SUFFIX = ".phases.json"


def default_rounds(mb: float) -> int:
    """Enough rounds for a stable median while keeping a run to roughly half a minute."""
    if mb <= 2:
        return 150
    if mb <= 20:
        return 60
    return 30


def mlp_width(mb: float) -> tuple[int, int]:
    """Hidden width of the 2-hidden-layer MLP of about ``mb`` MB, and its exact bytes."""
    from rumor.node.models import count_bytes, mlp_of_size

    model = mlp_of_size(int(mb * MB), 64, 10)
    return model[0].out_features, count_bytes(model)


class PhaseCluster(LocalCluster):
    """A LocalCluster whose nodes run this file's instrumented worker."""

    worker_args: list[str] = []  # noqa: RUF012 (set per instance before start)

    def start_node(self, node_id: str) -> None:
        old = self.procs.get(node_id)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"{node_id} is still running")
        log = (self.run_dir / f"{node_id}.log").open("ab")
        self._logs[node_id] = log
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.procs[node_id] = subprocess.Popen(
            [
                self.python,
                str(Path(__file__).resolve()),
                "--worker",
                str(self.config_path(node_id)),
                *self.worker_args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )


def sgd_step_seconds(mb: float, reps: int = 10) -> list[float]:
    """One node's SGD step (batch 32, one torch thread) timed alone in this process."""
    import torch

    from rumor.api import make_trainer

    width = mlp_width(mb)[0]
    cfg = NodeConfig(model=f"mlp:{width}x{width}", dataset="digits", n_nodes=N_NODES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = make_trainer(cfg)
        trainer.train_steps(2)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            trainer.train_steps(1)
            times.append(time.perf_counter() - t0)
        return times
    finally:
        torch.set_num_threads(threads)


def run_cluster(
    mb: float,
    rounds: int,
    run_dir: Path,
    phases: bool,
    timeout: float,
    profile: bool = False,
    warmup: int = 2,
) -> dict[str, Any]:
    width, model_bytes = mlp_width(mb)
    graph = nx.cycle_graph(N_NODES)  # the ring topology
    ports = free_ports(N_NODES)
    base = NodeConfig(
        algorithm="dpsgd",
        params={"local_steps": 1},
        rounds=rounds,
        dataset="digits",
        model=f"mlp:{width}x{width}",
        batch_size=32,
        eval_every=0,
        init="shared",
        log_level="INFO",
    )
    configs = cluster_configs(graph, base, lambda i: f"127.0.0.1:{ports[i]}")
    cls = PhaseCluster if phases else LocalCluster
    cluster = cls(configs, run_dir)
    if isinstance(cluster, PhaseCluster):
        cluster.worker_args = ["--warmup", str(warmup)]
        if profile:
            cluster.worker_args.append("--profile")
    t0 = time.monotonic()
    try:
        cluster.start()
        done = cluster.wait(timeout)
    finally:
        codes = cluster.stop(grace=10.0)
    wall = time.monotonic() - t0
    if not done:
        raise RuntimeError(f"{mb} MB cluster did not finish within {timeout:.0f} s (see {run_dir})")
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad:
        raise RuntimeError(f"nodes exited with errors {bad} (see {run_dir})")
    return {"width": width, "model_bytes": model_bytes, "wall_s": wall, "cluster": cluster}


def round_durations(
    cluster: LocalCluster, warmup: int, field: str = "elapsed"
) -> tuple[list[float], int, int]:
    """Durations of rounds >= warmup over all nodes; rounds missing a model; rounds seen.

    ``field`` is ``elapsed`` (the node's clock, the event loop's time: 1 ms steps on uvloop)
    or ``t`` (wall clock read when the line is written, microseconds).
    """
    durations: list[float] = []
    short = seen = 0
    for nid in cluster.configs:
        rows = [r for r in read_metrics(cluster.metrics_path(nid)) if r.get("event") == "round"]
        rows.sort(key=lambda r: r["round"])
        for prev, cur in itertools.pairwise(rows):
            if cur["round"] < warmup or cur["round"] != prev["round"] + 1:
                continue
            durations.append(cur[field] - prev[field])
            seen += 1
            if (cur.get("received") or 0) < 2:
                short += 1
    return durations, short, seen


def phase_table(cluster: LocalCluster, warmup: int) -> dict[str, Summary]:
    """Per-round time of each phase (sum within a round), pooled over nodes and rounds."""
    pooled: dict[str, list[float]] = defaultdict(list)
    for nid in cluster.configs:
        path = cluster.run_dir / f"{nid}{PHASES_SUFFIX}"
        if not path.exists():
            continue
        per_round: list[dict[str, float]] = json.loads(path.read_text())
        for r, phases in enumerate(per_round):
            if r < warmup:
                continue
            for name, secs in phases.items():
                pooled[name].append(secs)
    return {name: Summary.of(v) for name, v in pooled.items()}


def top_functions(cluster: LocalCluster, rounds: float, count: int = 25) -> list[dict]:
    """The functions with the most own time (cProfile of the nodes' event-loop threads),
    summed over the nodes and given per node and round."""
    import pstats

    files = sorted(str(p) for p in cluster.run_dir.glob("*.phases.prof"))
    if not files:
        return []
    stats = pstats.Stats(*files)
    rows = []
    for (path, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(path).name}:{line}" if line else path
        rows.append(
            {
                "function": f"{func} ({where})",
                "calls_per_round": ncalls / len(files) / max(rounds, 1),
                "own_ms_per_round": 1e3 * tottime / len(files) / max(rounds, 1),
                "cum_ms_per_round": 1e3 * cumtime / len(files) / max(rounds, 1),
            }
        )
    rows.sort(key=lambda r: -r["own_ms_per_round"])
    return rows[:count]


def measure(
    sizes: list[float],
    rounds_arg: int,
    warmup: int,
    tcp_reps: int,
    phases: bool,
    profile: bool,
    keep: bool,
    res: Results,
    floor: bool = True,
) -> list[dict[str, Any]]:
    rows = []
    root = Path(tempfile.mkdtemp(prefix="rumor-bench-round-"))
    print(f"run folders under {root}")
    with TcpReference() as tcp:
        for mb in sizes:
            rounds = rounds_arg or default_rounds(mb)
            model_bytes = mlp_width(mb)[1]
            per_round_bytes = 2 * model_bytes
            tcp_times = [tcp.send(per_round_bytes) for _ in range(tcp_reps + 1)][1:]
            sgd = sgd_step_seconds(mb)
            bare = ring_floor(model_bytes, rounds, "stream") if floor else None
            run_dir = root / f"{mb:g}mb{'-phases' if phases else ''}"
            timeout = 120 + rounds * max(1.0, 0.05 * mb)
            out = run_cluster(mb, rounds, run_dir, phases, timeout, profile, warmup)
            tcp_times += [tcp.send(per_round_bytes) for _ in range(tcp_reps + 1)][1:]
            row = summarize_run(out, mb, rounds, warmup, tcp_times, phases, profile)
            row["sgd_step_alone_ms"] = Summary.of(t * 1e3 for t in sgd)
            if bare is not None:
                cores = os.cpu_count() or 1
                row["bare_ring_ms"] = Summary.of(t * 1e3 for t in bare["round_s"])
                row["bare_ring_cpu_ms"] = bare["cpu_per_round_s"] * 1e3
                row["cpu_bound_ms"] = (
                    N_NODES * (row["bare_ring_cpu_ms"] + row["sgd_step_alone_ms"].median) / cores
                )
            rows.append(row)
            res.add(**row)
    if not keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return rows


def floor_verdict(row: dict[str, Any]) -> str:
    """Whether the target lies below what grpc.aio alone, or the CPU, allows here."""
    target = row["target_ms"]
    below = []
    if target < row["bare_ring_ms"].median:
        below.append("bare ring")
    if target < row["cpu_bound_ms"]:
        below.append("CPU bound")
    return "below " + " and ".join(below) if below else "above both"


def summarize_run(
    out: dict[str, Any],
    mb: float,
    rounds: int,
    warmup: int,
    tcp_times: list[float],
    phases: bool,
    profile: bool,
) -> dict[str, Any]:
    durations, short, seen = round_durations(out["cluster"], warmup)
    rt = Summary.of(d * 1e3 for d in durations)
    rt_wall = Summary.of(d * 1e3 for d in round_durations(out["cluster"], warmup, "t")[0])
    ref = Summary.of(t * 1e3 for t in tcp_times)
    target = TARGET_MS.get(mb)
    row: dict[str, Any] = {
        "size_mb": mb,
        "model_bytes": out["model_bytes"],
        "width": out["width"],
        "rounds": rounds,
        "round_ms": rt,
        "round_ms_from_t": rt_wall,
        "wall_s": out["wall_s"],
        "tcp_2x_model_ms": ref,
        "multiple_of_tcp": rt.median / ref.median,
        "rounds_missing_a_model": short,
        "rounds_measured": seen,
        "target_ms": target,
        "met": None if target is None else rt.median <= target,
        "phases": phases,
    }
    if phases:
        row["phase_ms"] = {
            k: {"median": s.median * 1e3, "min": s.min * 1e3, "max": s.max * 1e3, "n": s.n}
            for k, s in phase_table(out["cluster"], warmup).items()
        }
    if profile:
        row["profile"] = top_functions(out["cluster"], seen / N_NODES)
    return row


# ----------------------------------------------------------------------------- worker


def worker(config_path: str, profile: bool = False, warmup: int = 2) -> None:
    """An instrumented ``rumor node``: the same node, with timers around the round's parts."""
    import functools

    import torch

    from rumor import api
    from rumor.algorithms import gossip, inbox, rounds
    from rumor.config import load
    from rumor.node import metrics, runtime
    from rumor.protocol import codec, framing

    cfg = load(config_path)
    torch.set_num_threads(max(1, cfg.torch_threads))
    api.setup_logging(cfg.log_level)
    now = time.perf_counter
    current: dict[str, float] = defaultdict(float)
    per_round: list[dict[str, float]] = []
    last_end = [now()]
    last_cpu = [time.process_time(), time.thread_time()]

    def timed_sync(owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:  # not part of this version of the runtime
            return

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = now()
            try:
                return fn(*args, **kwargs)
            finally:
                current[label] += now() - t0

        setattr(owner, name, wrapper)

    def timed_async(owner: Any, name: str, label: str) -> None:
        fn = getattr(owner, name, None)
        if fn is None:
            return

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = now()
            try:
                return await fn(*args, **kwargs)
            finally:
                current[label] += now() - t0

        setattr(owner, name, wrapper)

    from rumor.node.trainer import Trainer

    timed_sync(Trainer, "train_steps", "train_step")
    timed_async(runtime.NodeContext, "compute", "train_await")
    timed_async(inbox.RoundInbox, "gather", "gather_wait")
    timed_async(runtime.NodeContext, "send", "send_each")
    timed_async(gossip.DPSGD, "_mix", "mix")
    # the mixing step lives in rounds.py (shared by dpsgd, dfedsam and diging)
    timed_sync(rounds, "weighted_average_", "mix.weighted_average")
    timed_sync(rounds, "gossip_step_", "mix.gossip_step")
    timed_sync(runtime.Node, "model_digest", "end.digest")
    timed_sync(metrics.MetricsLog, "write", "end.metrics_write")
    timed_sync(codec, "encode", "tx.encode_digest")
    timed_sync(framing, "_chunk_frame_parts", "tx.frame_copies")
    timed_sync(framing.MessageAssembler, "feed", "rx.decode")
    timed_sync(gossip.DPSGD, "on_message", "rx.on_message")

    end_round = runtime.NodeContext.end_round
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()

    def end_round_wrapper(self: Any, round: int, **fields: Any) -> None:
        t0 = now()
        end_round(self, round, **fields)
        t1 = now()
        current["end_round"] += t1 - t0
        current["round_wall"] = t1 - last_end[0]
        cpu, loop_cpu = time.process_time(), time.thread_time()
        current["cpu_process"] = cpu - last_cpu[0]
        current["cpu_loop_thread"] = loop_cpu - last_cpu[1]
        last_end[0] = t1
        last_cpu[:] = [cpu, loop_cpu]
        per_round.append(dict(current))
        current.clear()
        if prof is not None and len(per_round) == warmup:
            prof.enable()  # profile the measured rounds only, not imports and start-up
        if prof is not None and cfg.rounds is not None and len(per_round) >= cfg.rounds:
            prof.disable()

    runtime.NodeContext.end_round = end_round_wrapper  # type: ignore[method-assign]
    try:
        api.run(api.run_node(cfg))
    finally:
        if prof is not None:
            prof.disable()
        out = Path(cfg.metrics or config_path).with_name(f"{cfg.node_id}{PHASES_SUFFIX}")
        out.write_text(json.dumps(per_round))
        if prof is not None:
            prof.dump_stats(str(out.with_suffix(".prof")))


# ----------------------------------------------------------------------------- main

PHASE_ORDER = [
    ("round_wall", "round (wall, end_round to end_round)"),
    ("cpu_process", "CPU time of the node process (all threads)"),
    ("cpu_loop_thread", "  of which the event-loop thread"),
    ("train_await", "SGD step, awaited (thread hop + lock)"),
    ("train_step", "  SGD step itself (worker thread)"),
    ("gather_wait", "wait for neighbours' models"),
    ("send_each", "sends, summed over both (overlap the wait)"),
    ("tx.encode_digest", "  encode: payload digest (both sends)"),
    ("tx.frame_copies", "  frame copies (both sends)"),
    ("rx.decode", "receive: landing copy + digest + finite check"),
    ("rx.on_message", "receive: compatibility check + inbox"),
    ("mix", "mix (DPSGD._mix, on the event loop)"),
    ("mix.weighted_average", "  weighted_average_"),
    ("mix.gossip_step", "  gossip_step_ (step + distance)"),
    ("end_round", "end_round"),
    ("end.digest", "  model digest"),
    ("end.metrics_write", "  metrics line"),
]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,10,50", help="model sizes, MB (10^6 bytes)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per run (0: by size)")
    ap.add_argument("--warmup", type=int, default=2, help="first round index that counts")
    ap.add_argument("--tcp-reps", type=int, default=5, help="TCP reps before and after each run")
    ap.add_argument("--phases", action="store_true", help="per-phase timing (instrumented nodes)")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="with --phases: cProfile each node's event-loop thread, print the top functions",
    )
    ap.add_argument("--keep", action="store_true", help="keep the run folders (logs, metrics)")
    ap.add_argument("--no-floor", action="store_true", help="skip the bare grpc.aio ring reference")
    ap.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    add_out_argument(ap, "round")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.profile, args.warmup)
        return []
    sizes = [float(x) for x in args.sizes.split(",")]
    res = Results("round", args.out)
    res.add(event="machine", **machine_info())
    phases = args.phases or args.profile
    rows = measure(
        sizes,
        args.rounds,
        args.warmup,
        args.tcp_reps,
        phases,
        args.profile,
        args.keep,
        res,
        floor=not args.no_floor,
    )
    table = []
    for r in rows:
        target = r["target_ms"]
        verdict = "-" if target is None else ("met" if r["met"] else "MISSED")
        table.append(
            [
                f"{r['size_mb']:g}",
                f"{r['model_bytes'] / MB:.2f}",
                f"{r['width']}x{r['width']}",
                r["round_ms"].fmt(1),
                f"{r['round_ms_from_t'].median:.1f}",
                r["tcp_2x_model_ms"].fmt(2),
                f"{r['multiple_of_tcp']:.1f}x",
                f"{r['sgd_step_alone_ms'].median:.1f}",
                f"{r['rounds_missing_a_model']}/{r['rounds_measured']}",
                "-" if target is None else f"{target:g}",
                verdict,
            ]
        )
    print_table(
        f"D-PSGD round time, {N_NODES}-node ring of processes (median (min-max) over nodes x "
        f"rounds >= {args.warmup}; TCP = raw loopback moving 2 x model bytes, same run)",
        [
            "MB",
            "model MB",
            "hidden",
            "round ms",
            "(from t)",
            "TCP 2x model ms",
            "x TCP",
            "SGD step alone ms",
            "short rounds",
            "target ms",
            "",
        ],
        table,
    )
    floors = [r for r in rows if "bare_ring_ms" in r]
    if floors:
        print_table(
            "Floors measured in the same run: the bare grpc.aio ring (ring_floor.py: same "
            "bytes, same call pattern, no learning) and the CPU bound "
            f"(bare ring CPU + SGD step alone) x {N_NODES} processes / {os.cpu_count()} cores",
            [
                "MB",
                "rumor round ms",
                "bare ring ms",
                "bare ring CPU ms",
                "CPU bound ms",
                "rumor - bare ring",
                "target ms",
                "target vs bounds",
            ],
            [
                [
                    f"{r['size_mb']:g}",
                    f"{r['round_ms'].median:.1f}",
                    r["bare_ring_ms"].fmt(1),
                    f"{r['bare_ring_cpu_ms']:.1f}",
                    f"{r['cpu_bound_ms']:.1f}",
                    f"{r['round_ms'].median - r['bare_ring_ms'].median:+.1f}",
                    "-" if r["target_ms"] is None else f"{r['target_ms']:g}",
                    "-" if r["target_ms"] is None else floor_verdict(r),
                ]
                for r in floors
            ],
        )
    for r in rows:
        if "phase_ms" not in r:
            continue
        ph = r["phase_ms"]
        prow = []
        for key, label in PHASE_ORDER:
            if key in ph:
                s = ph[key]
                prow.append([label, f"{s['median']:.2f}", f"{s['min']:.2f}", f"{s['max']:.2f}"])
        print_table(
            f"Where a round goes, {r['size_mb']:g} MB model (ms per round, per node; median "
            "over nodes x rounds)",
            ["phase", "median", "min", "max"],
            prow,
        )
        if "cpu_process" in ph:
            cores = os.cpu_count() or 1
            floor = N_NODES * ph["cpu_process"]["median"] / min(cores, N_NODES)
            print(
                f"{N_NODES} nodes x {ph['cpu_process']['median']:.1f} ms CPU per round / "
                f"{min(cores, N_NODES)} cores = {floor:.1f} ms: the shortest round possible while "
                f"the nodes share this machine's cores (measured: {r['round_ms'].median:.1f} ms)"
            )
        if r.get("profile"):
            print_table(
                f"Top functions by own time on the event-loop thread, {r['size_mb']:g} MB "
                "(cProfile, which inflates Python-heavy code; ms per round per node)",
                ["function", "calls/round", "own ms", "cum ms"],
                [
                    [
                        p["function"][:90],
                        f"{p['calls_per_round']:.1f}",
                        f"{p['own_ms_per_round']:.2f}",
                        f"{p['cum_ms_per_round']:.2f}",
                    ]
                    for p in r["profile"]
                ],
            )
    res.write()
    return rows


if __name__ == "__main__":
    main()
