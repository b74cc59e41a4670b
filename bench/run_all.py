"""Run every benchmark in this folder and print one summary of targets met and missed.

Each benchmark runs in its own interpreter, one after the other (they must not share the
two cores; before each one, up to 30 s are given for the CPU pressure left by the previous
one to fade), with its defaults or, with ``--quick``, smaller sizes and fewer repetitions.
Each one measures its own reference in the same run (loopback TCP, memcpy or a bare
``import torch`` process); the summary repeats the headline ratio against it and the target:

- ``bench_exchange.py``: gRPC model exchange, % of loopback TCP (target >= 30 % at 100 MB);
- ``bench_round.py``: D-PSGD round time on a 4-process ring (targets 10 / 75 / 400 ms for
  1 / 10 / 50 MB models), as a multiple of TCP moving the same bytes;
- ``bench_memory.py``: peak RSS per node process with a 1 MB model (target <= 300 MiB);
- ``bench_average.py``: ``weighted_average_`` throughput, % of memcpy (target >= 70 %);
- ``bench_codec.py``: codec and framing CPU cost against memcpy (no target; printed as is).

Run: ``.venv/bin/python bench/run_all.py [--quick] [--out]`` (``make bench``). With
``--out`` each benchmark appends its JSON lines to ``bench/results/<name>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import BENCH_DIR, RESULTS_DIR, cpu_pressure, print_table

#: name -> (script, default arguments, quick arguments, writes JSON lines)
BENCHMARKS: dict[str, tuple[str, list[str], list[str], bool]] = {
    "exchange": ("bench_exchange.py", [], ["--sizes", "10,100", "--reps", "3"], True),
    "round": ("bench_round.py", [], ["--sizes", "1,10", "--rounds", "30"], True),
    "memory": ("bench_memory.py", [], ["--rounds", "20"], True),
    "average": (
        "bench_average.py",
        [],
        ["--mb", "25", "--ks", "2,4", "--reps", "3"],
        True,
    ),
    "codec": ("bench_codec.py", [], ["--mb", "25", "--reps", "3"], False),
}


def run_one(name: str, quick: bool, out_dir: Path, timeout: float) -> dict[str, Any]:
    script, full, small, jsonl = BENCHMARKS[name]
    args = [sys.executable, str(BENCH_DIR / script), *(small if quick else full)]
    out_path = out_dir / f"{name}.jsonl"
    if jsonl:
        args += ["--out", str(out_path)]
    waited = settle()
    print(f"\n=== {name}: {' '.join(args[1:])}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=BENCH_DIR.parent)
    lines: list[str] = []

    def echo() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGINT first: the benchmark's finally blocks then stop the processes it started.
        print(f"\n=== {name}: no result after {timeout:.0f} s, interrupting", flush=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        rc = -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
    records = []
    if jsonl and out_path.exists():
        started = time.time() - (time.monotonic() - t0) - 1
        with out_path.open() as fh:
            for line in fh:
                rec = json.loads(line)
                if rec.get("t", 0) >= started:
                    records.append(rec)
    return {
        "rc": rc,
        "seconds": time.monotonic() - t0,
        "settle_s": waited,
        "records": records,
        "stdout": lines,
    }


def settle(limit_s: float = 30.0, below_pct: float = 5.0) -> float:
    """Wait (up to ``limit_s``) for the cores to calm down after the previous benchmark;
    return the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        pressure = cpu_pressure()
        if pressure is None or pressure < below_pct:
            break
        time.sleep(2.0)
    return time.monotonic() - t0


def summarize(name: str, res: dict[str, Any]) -> list[list[str]]:
    """Summary rows: benchmark, case, result, reference, ratio, target, verdict."""
    recs = res["records"]
    if res["rc"] != 0:
        return [[name, "-", f"FAILED (exit {res['rc']})", "-", "-", "-", "-"]]
    rows: list[list[str]] = []
    if name == "exchange":
        tcp = {r["size_mb"]: r for r in recs if r.get("mode") == "tcp"}
        for r in recs:
            if not str(r.get("mode", "")).startswith("rumor/"):
                continue
            mb = r["size_mb"]
            target = "30 %" if mb == 100 else "-"
            verdict = "-" if mb != 100 else ("met" if r["pct_of_tcp"] >= 30 else "MISSED")
            rows.append(
                [
                    name,
                    f"{mb:g} MB",
                    f"{r['MBps']['median']:,.0f} MB/s",
                    f"TCP {tcp[mb]['MBps']['median']:,.0f} MB/s",
                    f"{r['pct_of_tcp']:.0f} %",
                    target,
                    verdict,
                ]
            )
    elif name == "round":
        for r in recs:
            if "round_ms" not in r:
                continue
            target = r.get("target_ms")
            rows.append(
                [
                    name,
                    f"{r['size_mb']:g} MB model",
                    f"{r['round_ms']['median']:.1f} ms",
                    f"TCP 2x model {r['tcp_2x_model_ms']['median']:.2f} ms",
                    f"{r['multiple_of_tcp']:.0f}x",
                    "-" if target is None else f"<= {target:g} ms",
                    "-" if target is None else ("met" if r["met"] else "MISSED"),
                ]
            )
    elif name == "memory":
        for r in recs:
            if r.get("kind") != "summary":
                continue
            peak = r["node_VmHWM_MiB"]["median"]
            torch_peak = r["torch_VmHWM_MiB"]
            rows.append(
                [
                    name,
                    "node peak RSS, 1 MB model",
                    f"{peak:.0f} MiB",
                    f"import torch {torch_peak:.0f} MiB",
                    f"{peak / torch_peak:.2f}x",
                    "<= 300 MiB",
                    "met" if peak <= 300 else "MISSED",
                ]
            )
    elif name == "average":
        for r in recs:
            if r.get("variant") != "weighted_average_":
                continue
            memcpy = next(
                m
                for m in recs
                if m.get("variant") == "memcpy"
                and m["k"] == r["k"]
                and m["threads"] == r["threads"]
            )
            ratio = 100 * r["ratio_to_memcpy"]
            rows.append(
                [
                    name,
                    f"k={r['k']}, {r['threads']} thread(s)",
                    f"{r['GBps_read']['median']:.1f} GB/s",
                    f"memcpy {memcpy['GBps_read']['median']:.1f} GB/s",
                    f"{ratio:.0f} %",
                    ">= 70 %",
                    "met" if ratio >= 70 else "MISSED",
                ]
            )
    elif name == "codec":
        for line in res["stdout"]:
            if line.startswith("framing frames"):
                parts = line.split()
                result = f"{parts[-4]} MB/s"
                rows.append([name, "frames -> assembler", result, "memcpy", parts[-1], "-", "-"])
    return rows or [[name, "-", "no results", "-", "-", "-", "-"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    ap.add_argument(
        "--out", action="store_true", help=f"keep JSON lines in {RESULTS_DIR}/<name>.jsonl"
    )
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset to run")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="rumor-bench-")
    out_dir = RESULTS_DIR if tmp is None else Path(tmp.name)
    results = {}
    try:
        for name in names:
            results[name] = run_one(name, args.quick, out_dir, args.timeout)
    finally:
        if tmp is not None:
            tmp.cleanup()
    rows = [row for name in names for row in summarize(name, results[name])]
    print_table(
        "Summary (medians; every reference measured in the same run)"
        + (" [quick mode: smaller sizes]" if args.quick else ""),
        ["benchmark", "case", "result", "reference", "ratio", "target", ""],
        rows,
    )
    took = sum(r["seconds"] for r in results.values())
    waited = sum(r["settle_s"] for r in results.values())
    print(
        f"\n{len(names)} benchmarks in {took:.0f} s, plus {waited:.0f} s waiting for the cores "
        "to settle between them"
    )
    return 1 if any(r["rc"] != 0 for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
