"""Averaging throughput of ``rumor.algorithms.averaging.weighted_average_`` against memcpy.

Averages k float32 models of ``--mb`` MB each (default 100 MB; 8 large weight matrices and 64
small vectors, the shape of a real state dict) the way D-PSGD mixes: the node's own model is
the target, updated in place with weight 1/k, and the k - 1 others are added with weight 1/k.
Throughput is counted as input bytes read, ``k x model bytes / time``.

Reference, measured in the same run and interleaved with the averaging (memcpy rep, average
rep, ...): ``np.copyto`` of the same k x model bytes (k distinct sources) into a buffer already
in use, which is the machine's copy bandwidth with page faults excluded. The ratio
average / memcpy is what the target (at least 70 %) is about. Both torch thread settings
(``--threads 1,2``) are measured; np.copyto always uses one thread.

A second variant, ``blocked`` (defined in this file, not used by rumor), does the same
arithmetic in cache-sized slices so the target is read and written once instead of k times;
it shows what a memory-bound average can reach on this machine.

Run: ``.venv/bin/python bench/bench_average.py [--mb 100] [--ks 2,4,8] [--reps 7]
[--threads 1,2] [--out]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import torch
from common import (
    MB,
    Memcpy,
    Results,
    Summary,
    add_out_argument,
    machine_info,
    make_state,
    now,
    print_table,
    state_nbytes,
)

from rumor.algorithms.averaging import weighted_average_

#: Elements per slice in the blocked variant: 256 KiB of float32, well inside one core's L2.
BLOCK = 1 << 16


@torch.no_grad()
def blocked_average_(
    target: Mapping[str, torch.Tensor],
    self_weight: float,
    others: list[tuple[float, Mapping[str, torch.Tensor]]],
    block: int = BLOCK,
) -> None:
    """``target <- self_weight * target + sum_j w_j * other_j`` slice by slice.

    Each slice of the target stays in cache while every input is added to it, so memory
    traffic is k reads and one write per element instead of about 3 per input. Tensors
    smaller than a slice go through the ``_foreach`` kernels in one batch.
    """
    small = [k for k, t in target.items() if t.numel() <= block]
    if small:
        dst = [target[k] for k in small]
        torch._foreach_mul_(dst, self_weight)
        for w, other in others:
            torch._foreach_add_(dst, [other[k] for k in small], alpha=w)
    for name, t in target.items():
        n = t.numel()
        if n <= block:
            continue
        flat = t.view(-1)
        srcs = [(w, other[name].view(-1)) for w, other in others]
        for start in range(0, n, block):
            stop = min(n, start + block)
            d = flat[start:stop]
            d.mul_(self_weight)
            for w, s in srcs:
                d.add_(s[start:stop], alpha=w)


VARIANTS = {"weighted_average_": weighted_average_, "blocked": blocked_average_}


def run(
    mb: float, ks: list[int], reps: int, threads: list[int], res: Results
) -> list[dict[str, object]]:
    out = []
    base = make_state(int(mb * MB))
    model_bytes = state_nbytes(base)
    for k in ks:
        models = [base] + [{n: t + 0.01 * j for n, t in base.items()} for j in range(1, k)]
        w = 1.0 / k
        memcpy = Memcpy(model_bytes, copies=k)
        for nthreads in threads:
            torch.set_num_threads(nthreads)
            times: dict[str, list[float]] = {"memcpy": [], **{v: [] for v in VARIANTS}}
            for rep in range(reps + 1):  # rep 0 is a warm-up
                dt = memcpy.seconds()
                if rep:
                    times["memcpy"].append(dt)
                for name, fn in VARIANTS.items():
                    target = models[0]
                    others = [(w, m) for m in models[1:]]
                    t0 = now()
                    fn(target, w, others)
                    dt = now() - t0
                    if rep:
                        times[name].append(dt)
            read = k * model_bytes
            ref = Summary.of(read / 1e9 / t for t in times["memcpy"])
            for name in ["memcpy", *VARIANTS]:
                gbs = Summary.of(read / 1e9 / t for t in times[name])
                ms = Summary.of(t * 1e3 for t in times[name])
                ratio = gbs.median / ref.median
                row = {
                    "k": k,
                    "threads": nthreads,
                    "variant": name,
                    "model_bytes": model_bytes,
                    "ms": ms,
                    "GBps_read": gbs,
                    "ratio_to_memcpy": ratio,
                }
                out.append(row)
                res.add(**row)
    return out


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=100.0, help="model size, MB (10^6 bytes)")
    ap.add_argument("--ks", default="2,4,8", help="numbers of models averaged")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", default="1,2", help="torch thread counts to measure")
    add_out_argument(ap, "average")
    args = ap.parse_args(argv)
    ks = [int(x) for x in args.ks.split(",")]
    threads = [int(x) for x in args.threads.split(",")]
    res = Results("average", args.out)
    res.add(event="machine", **machine_info())
    rows = run(args.mb, ks, args.reps, threads, res)
    table = []
    for r in rows:
        ms: Summary = r["ms"]  # type: ignore[assignment]
        gbs: Summary = r["GBps_read"]  # type: ignore[assignment]
        table.append(
            [
                r["k"],
                r["threads"],
                r["variant"],
                ms.fmt(1),
                gbs.fmt(2),
                f"{100 * r['ratio_to_memcpy']:.0f} %",  # type: ignore[operator]
            ]
        )
    print_table(
        f"Averaging k models of {args.mb:g} MB (median (min-max) over {args.reps} reps; "
        "GB/s = k x model bytes / time; target: weighted_average_ >= 70 % of memcpy)",
        ["k", "threads", "variant", "ms", "GB/s read", "% of memcpy"],
        table,
    )
    res.write()
    return rows


if __name__ == "__main__":
    main()
