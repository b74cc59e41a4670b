"""`make demo`: a real 8-process cluster on 127.0.0.1 learning digits on a ring.

Eight `rumor node` processes, a ring, scikit-learn's digits split Dirichlet(0.5) across them,
a small MLP, synchronous gossip averaging. A live table shows each node while it runs; at the
end the script checks the mean test accuracy, writes the convergence plot, and makes sure no
node process is left behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

TARGET_ACCURACY = 0.90


def main() -> int:
    run_dir = Path("runs") / "demo"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [
        sys.executable, "-m", "rumor", "cluster", "up",
        "--nodes", "8", "--topology", "ring",
        "--dataset", "digits", "--partition", "dirichlet:0.5",
        "--model", "mlp", "--init", "independent",
        "--algorithm", "dpsgd", "--param", "local_steps=2",
        "--rounds", "200", "--lr", "0.05", "--momentum", "0.9", "--eval-every", "10",
        "--run-dir", str(run_dir),
    ]  # fmt: skip
    print("$", " ".join(cmd[2:]), flush=True)
    before = {p.pid for p in psutil.process_iter()}
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        print(f"cluster exited with {done.returncode}", file=sys.stderr)
        return 1
    summary = json.loads((run_dir / "summary.json").read_text())
    leftovers = [
        p for p in psutil.process_iter(["pid", "cmdline"])
        if p.info["pid"] not in before and "rumor" in " ".join(p.info["cmdline"] or [])
        and "node" in (p.info["cmdline"] or [])
    ]  # fmt: skip
    acc = summary["mean_accuracy"]
    print(f"\nmean node test accuracy: {acc:.4f} (target {TARGET_ACCURACY})")
    print(
        f"consensus distance: initial {summary['initial_consensus_distance']:.4g}, "
        f"final {summary['consensus_distance']:.4g}"
    )
    print(f"convergence plot: {summary['plot']}")
    print(f"node processes left running: {len(leftovers)}")
    ok = acc >= TARGET_ACCURACY and not leftovers and Path(summary["plot"]).exists()
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
