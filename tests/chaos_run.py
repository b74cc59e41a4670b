"""Run chaos schedules against a real eight-node cluster and report one line per schedule.

    python -m tests.chaos_run --seeds 20 --rules dpsgd,async-gossip [--scenario 5]

For each rule it first runs the fault-free reference (the same cluster, no faults), then one
run per seed (faults drawn from ``random.Random(seed)``: :func:`tests.chaos_lab.draw_schedule`)
and ``--scenario N`` runs of the named scenario (:func:`tests.chaos_lab.scenario`). Each line
gives the seed, the rule, lock-up yes/no, the longest stall, the time to full round rate after
the last heal against its limit, the longest time a survivor spent below half its fault-free
rate, the final mean accuracy against the fault-free run, PASS/FAIL (with the failed
criteria) and the faults; a summary follows. The definitions are in :mod:`tests.chaos_lab`.

Exits 1 when any schedule fails, 2 when a fault-free reference does not complete, 130 on
Ctrl-C (or SIGTERM); prints why and exits 0 when network namespaces are unavailable (not
root). ``--dry-run`` only prints the schedules; ``--control`` first runs the fault-free
cluster once more per rule, measured like a schedule (how far two fault-free runs differ).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from tests import chaos_lab, netns_util


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so every lab is torn down on the way out."""
    raise KeyboardInterrupt


def _load() -> str:
    """The 1-minute load average: other work on the machine slows the nodes, and the
    fault-free reference and the faulted runs are compared at whatever load each met."""
    return f"load {os.getloadavg()[0]:.1f}"


def _say(text: str) -> None:
    print(text, flush=True)


def _is_control(o: chaos_lab.Outcome) -> bool:
    return o.name == "control"


def failed(outcomes: Sequence[chaos_lab.Outcome]) -> bool:
    """Whether a schedule failed (control runs measure noise: they pass or fail nothing)."""
    return any(not o.passed for o in outcomes if not _is_control(o))


def summary(outcomes: Sequence[chaos_lab.Outcome]) -> list[str]:
    """A few lines per rule: passes, each criterion's failures, the worst values; control
    runs apart, as the noise floor."""
    lines = []
    for o in outcomes:
        if _is_control(o):
            d = o.accuracy_delta
            lines.append(
                f"{o.rule} control (a second fault-free run: the noise floor): accuracy "
                + ("n/a" if d is None else f"{d:+.1f} points")
                + f", {o.recovery_note.strip('()')}, below half {o.below_half_s:.1f}s, "
                f"longest stall {o.stall_s:.1f}s"
            )
    outcomes = [o for o in outcomes if not _is_control(o)]
    for rule in dict.fromkeys(o.rule for o in outcomes):
        mine = [o for o in outcomes if o.rule == rule]
        passed = sum(o.passed for o in mine)
        failed: dict[str, int] = {}
        for o in mine:
            for f in o.failures:
                failed[f] = failed.get(f, 0) + 1
        recovered = [o.recovery_s for o in mine if o.recovery_s is not None]
        deltas = [d for o in mine if (d := o.accuracy_delta) is not None]
        worst_stall = max(mine, key=lambda o: o.stall_s)
        worst_half = max(mine, key=lambda o: o.below_half_s)
        lines.append(
            f"{rule}: {passed}/{len(mine)} PASS; failures "
            + (", ".join(f"{k} {v}" for k, v in failed.items()) or "none")
        )
        lines.append(
            f"  lock-ups {sum(o.lockup is not None for o in mine)}; "
            f"time to full rate: max {max(recovered):.1f}s" if recovered else
            f"  lock-ups {sum(o.lockup is not None for o in mine)}; time to full rate: none"
        )  # fmt: skip
        lines[-1] += (
            f" (never reached: {sum(o.recovery_s is None for o in mine)}), "
            f"limit {chaos_lab.RECOVERY_LIMIT_S:.1f}s; longest stall {worst_stall.stall_s:.1f}s "
            f"({worst_stall.name}); below half {worst_half.below_half_s:.1f}s "
            f"({worst_half.name})"
        )
        if deltas:
            lines.append(
                f"  accuracy vs fault-free: {min(deltas):+.1f} to {max(deltas):+.1f} points "
                f"(mean {sum(deltas) / len(deltas):+.1f}), tolerance "
                f"{chaos_lab.ACCURACY_POINTS:.0f}"
            )
    return lines


def _order(folder: Path) -> tuple[bool, int, str]:
    """Seeds in numeric order, then the scenario runs, then anything else."""
    kind, _, number = folder.name.rpartition("-")
    return (kind != "seed", int(number) if number.isdigit() else 1 << 30, folder.name)


def analyse_kept(root: Path) -> int:
    """Measure again the runs a ``--keep`` folder holds (``<root>/<rule>/<run>``, or one
    rule's ``<root>/<run>``): per rule, its fault-free run first."""
    outcomes = []
    rule_dirs = [root] if (root / "fault-free").is_dir() else sorted(root.iterdir())
    for rule_dir in [d for d in rule_dirs if (d / "fault-free" / "harness.json").exists()]:
        ff = chaos_lab.load_record(rule_dir / "fault-free")
        ref = chaos_lab.reference_from(ff, chaos_lab.analyse(ff, None))
        _say(chaos_lab.describe_reference(ref))
        runs = [p for p in rule_dir.iterdir() if p.name != "fault-free"]
        for folder in sorted((p for p in runs if (p / "harness.json").exists()), key=_order):
            out = chaos_lab.analyse(chaos_lab.load_record(folder), ref)
            outcomes.append(out)
            _say(out.line())
    _say(f"--- summary ({sum(not _is_control(o) for o in outcomes)} schedules)")
    for line in summary(outcomes):
        _say(line)
    return 1 if failed(outcomes) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos_run", description=__doc__)
    parser.add_argument("--seeds", type=int, default=5, help="schedules per rule (0: none)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--rules", default=",".join(chaos_lab.RULES))
    parser.add_argument("--scenario", type=int, default=0, help="named-scenario runs per rule")
    parser.add_argument(
        "--control",
        action="store_true",
        help="first run the fault-free cluster once more per rule, measured like a schedule: "
        "the noise floor of the criteria",
    )
    parser.add_argument("--short", action="store_true", help="the test suite's 25-35 s budget")
    parser.add_argument("--keep", type=Path, help="keep every run's files in this folder")
    parser.add_argument("--dry-run", action="store_true", help="print the schedules only")
    parser.add_argument(
        "--analyse", type=Path, help="measure the runs kept (--keep) in this folder again"
    )
    args = parser.parse_args(argv)
    if args.analyse is not None:
        return analyse_kept(args.analyse)

    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in rules if r not in chaos_lab.RULE_PARAMS]
    if unknown:
        parser.error(f"unknown rules {unknown}; known: {', '.join(chaos_lab.RULES)}")
    settings = chaos_lab.SHORT if args.short else chaos_lab.FULL
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    schedules = [chaos_lab.draw_schedule(s, settings) for s in seeds]
    schedules += [chaos_lab.scenario(s) for s in range(args.scenario)]
    if args.control:
        schedules.insert(0, chaos_lab.Schedule("control"))
    if args.dry_run:
        for sched in schedules:
            _say(f"{sched.name:<11} {sched.describe()}")
        return 0
    reason = netns_util.unavailable()
    if reason:
        _say(f"chaos: skipped: {reason}")
        return 0

    signal.signal(signal.SIGTERM, _interrupt)
    root = args.keep or Path(tempfile.mkdtemp(prefix="rumor-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    for line in chaos_lab.definitions():
        _say(line)
    outcomes: list[chaos_lab.Outcome] = []
    began = time.monotonic()
    code = 0
    try:
        for rule in rules:
            t = time.monotonic()
            try:
                ref = chaos_lab.measure_reference(rule, settings, root / rule / "fault-free", _say)
            except RuntimeError as exc:
                _say(f"{rule}: {exc}")
                code = 2
                continue
            wall = f" [{time.monotonic() - t:.0f}s wall, {_load()}]"
            _say(chaos_lab.describe_reference(ref) + wall)
            for sched in schedules:
                t = time.monotonic()
                folder = root / rule / sched.name.replace(" ", "-")
                out = chaos_lab.chaos(rule, sched, settings, folder, ref)
                outcomes.append(out)
                _say(out.line() + f" [{time.monotonic() - t:.0f}s wall, {_load()}]")
    except KeyboardInterrupt:
        _say("interrupted; the summary covers the runs that completed")
        code = 130
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            _say(f"run files kept in {root}")
    count = sum(not _is_control(o) for o in outcomes)
    _say(f"--- summary ({count} schedules, {time.monotonic() - began:.0f}s in all)")
    for line in summary(outcomes):
        _say(line)
    if code == 0 and failed(outcomes):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
