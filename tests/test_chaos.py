"""The chaos suite (tests/chaos_lab.py): real node processes in network namespaces under
faults, measured against a fault-free run of the same cluster.

- The measures themselves, on synthetic metrics whose right answers are known (no root).
- ``slow`` (``make test-slow``): one short fixed schedule per rule, a SIGKILL and restart
  overlapping a 4|4 partition: no lock-up, no crash, full round rate within the heartbeat
  timeout + 5 s of the last heal, final mean accuracy within 1 point of the fault-free run.
  Not in ``make test``: on two shared cores the full-rate criterion sits at the noise floor
  (fault-free runs drift by 25 % within a run), so it failed one run in several.
- ``slow``: the named scenario and drawn schedules on the full budget
  (``make chaos`` runs many more and prints one line each).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import chaos_lab, netns_util
from tests.chaos_lab import Action, RunRecord, Schedule

T0 = 1_000_000.0
PERIOD = 0.1


def _write_node(folder: Path, i: int, rounds: list[float], finished: bool, acc: float) -> None:
    lines = [{"t": T0 - 1.0, "event": "start", "node": f"node-{i}"}]
    lines += [
        {"t": t, "event": "round", "round": k, "accuracy": None} for k, t in enumerate(rounds)
    ]
    if finished:
        lines.append({"t": rounds[-1] + 0.2, "event": "finished", "accuracy": acc})
        lines.append({"t": rounds[-1] + 0.3, "event": "stop"})
    path = folder / f"node-{i}.metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


def _ticks(start: float, end: float, skip: tuple[float, float] | None = None) -> list[float]:
    """Round times every PERIOD s from ``start`` to ``end``, none inside ``skip``."""
    out, k = [], 0
    while (t := start + k * PERIOD) < end - 1e-9:
        if skip is None or not (skip[0] - 1e-9 <= t < skip[1] - 1e-9):
            out.append(round(t, 6))
        k += 1
    return out


def _synthetic(
    folder: Path,
    applied: list[tuple[float, Action]],
    stalled: dict[int, tuple[float, float]],
    ended: float = 31.0,
    unfinished: tuple[int, ...] = (),
    last: dict[int, float] | None = None,
) -> RunRecord:
    folder.mkdir(parents=True)
    last = last or {}
    for i in range(chaos_lab.N_HOSTS):
        gap = stalled.get(i)
        skip = None if gap is None else (T0 + gap[0], T0 + gap[1])
        ticks = _ticks(T0 - 0.5, T0 + last.get(i, 30.0), skip)
        _write_node(folder, i, ticks, i not in unfinished, acc=0.9)
    actions = tuple(a for _, a in applied)
    return RunRecord(
        rule="dpsgd",
        schedule=Schedule("synthetic", (chaos_lab.Fault("x", actions, "x"),) if actions else ()),
        folder=folder,
        t0=T0,
        applied=[(T0 + t, a) for t, a in applied],
        processes=[(i, 0, False) for i in range(chaos_lab.N_HOSTS)],
        ended=T0 + ended,
        overdue=[],
    )


@pytest.fixture
def reference(tmp_path: Path) -> chaos_lab.Reference:
    record = _synthetic(tmp_path / "ff", [], {})
    out = chaos_lab.analyse(record, None)
    return chaos_lab.reference_from(record, out)


def test_fault_free_synthetic_run_is_at_full_rate_throughout(reference) -> None:
    assert reference.node_rates == pytest.approx([1 / PERIOD] * 8, rel=0.02)
    assert reference.outcome.full_share == 1.0
    assert reference.outcome.stall_s <= 2 * chaos_lab.GRID_S
    assert reference.outcome.passed, reference.outcome.line()


def test_one_stalled_node_is_measured_to_the_end_of_its_stall(tmp_path, reference) -> None:
    # h3's link is down from 5 s to 8 s; node 3 then logs no round from 10 s to 14 s while
    # its neighbours are up: a 4 s stall, 6 s to full rate after the heal at 8 s
    applied = [(5.0, Action(5.0, "down", (3,))), (8.0, Action(8.0, "up", (3,)))]
    out = chaos_lab.analyse(_synthetic(tmp_path / "run", applied, {3: (10.0, 14.0)}), reference)
    assert out.stall_s == pytest.approx(4.0, abs=0.15), out.line()
    assert out.stall_at.startswith("@n3+")
    assert out.recovery_s == pytest.approx(6.0, abs=0.15), out.line()
    assert out.below_half_s == pytest.approx(4.0, abs=0.15), out.line()
    assert out.lockup is None and out.accuracy_delta == pytest.approx(0.0)
    assert out.failures == [], out.line()  # 6 s is within the 7 s limit


def test_a_stall_while_cut_off_is_no_stall(tmp_path, reference) -> None:
    # node 3 logs nothing while its own link is down: it has no live neighbour to wait for
    applied = [(5.0, Action(5.0, "down", (3,))), (9.0, Action(9.0, "up", (3,)))]
    out = chaos_lab.analyse(_synthetic(tmp_path / "run", applied, {3: (5.0, 9.0)}), reference)
    assert out.stall_s <= 2 * chaos_lab.GRID_S, out.line()
    assert out.below_half_s <= 2 * chaos_lab.GRID_S, out.line()


def test_a_slow_recovery_fails(tmp_path, reference) -> None:
    applied = [(5.0, Action(5.0, "down", (3,))), (6.0, Action(6.0, "up", (3,)))]
    out = chaos_lab.analyse(_synthetic(tmp_path / "run", applied, {1: (6.0, 16.0)}), reference)
    assert out.recovery_s == pytest.approx(10.0, abs=0.15), out.line()
    assert "recovery" in out.failures


def test_full_rate_must_hold_for_a_while_but_not_to_the_end(tmp_path, reference) -> None:
    # heal at 6 s; node 1 stalls 7-9 s (inside the hold: recovery at 9 s), node 2 stalls
    # 22-24.5 s (after 9 s + FULL_RATE_HOLD_S: no slow recovery, but still a stall)
    assert 9.0 + chaos_lab.FULL_RATE_HOLD_S < 22.0
    applied = [(5.0, Action(5.0, "down", (3,))), (6.0, Action(6.0, "up", (3,)))]
    stalls = {1: (7.0, 9.0), 2: (22.0, 24.5)}
    out = chaos_lab.analyse(_synthetic(tmp_path / "run", applied, stalls), reference)
    assert out.recovery_s == pytest.approx(3.0, abs=0.15), out.line()
    assert out.stall_s == pytest.approx(2.5, abs=0.15) and out.stall_at.startswith("@n2+")


def test_a_node_that_stops_for_good_is_a_lockup(tmp_path, reference) -> None:
    applied = [(5.0, Action(5.0, "down", (2,))), (6.0, Action(6.0, "up", (2,)))]
    record = _synthetic(tmp_path / "run", applied, {}, ended=60.0, unfinished=(2,), last={2: 12.0})
    out = chaos_lab.analyse(record, reference)
    assert out.lockup is not None and out.lockup.startswith("n2 active without a round")
    assert "lockup" in out.failures


def test_drawn_schedules_are_reproducible_and_well_formed() -> None:
    settings = chaos_lab.FULL
    for seed in range(300):
        sched = chaos_lab.draw_schedule(seed, settings)
        assert sched == chaos_lab.draw_schedule(seed, settings)
        acts = sched.actions()
        assert 2 <= len(sched.faults) <= 4
        kills = [i for a in acts if a.op == "kill" for i in a.target]
        assert len(kills) == len(set(kills)) <= 3
        for i in kills:  # every killed node comes back, later
            kill = next(a.at for a in acts if a.op == "kill" and i in a.target)
            assert any(a.op == "restart" and i in a.target and a.at > kill for a in acts)
        assert sum(f.kind == "partition" for f in sched.faults) <= 1
        assert all(settings.fault_start_s <= f.actions[0].at for f in sched.faults)
    kinds = {f.kind for s in range(300) for f in chaos_lab.draw_schedule(s, settings).faults}
    assert kinds == {"kill", "partition", "flap"}


def test_the_scenario_is_what_the_issue_describes() -> None:
    sched = chaos_lab.scenario(0)
    acts = sched.actions()
    (kill,) = [a for a in acts if a.op == "kill"]
    (restart,) = [a for a in acts if a.op == "restart"]
    downs = [a for a in acts if a.op == "down"]
    ups = [a for a in acts if a.op == "up"]
    hosts = {i for a in downs for i in a.target}
    assert len(hosts) == 2 and kill.target[0] not in hosts
    assert all(a.at == kill.at for a in downs)
    assert all(a.at == kill.at + 20.0 for a in ups)
    assert restart.at == kill.at + 23.0 and restart.target == kill.target


# --------------------------------------------------------------------- real clusters


@pytest.fixture
def netns() -> None:
    reason = netns_util.unavailable()
    if reason:
        pytest.skip(reason)


def _report(ref: chaos_lab.Reference, outcomes: list[chaos_lab.Outcome]) -> str:
    return "\n".join([chaos_lab.describe_reference(ref), *(o.line() for o in outcomes)])


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("rule", chaos_lab.RULES)
def test_fixed_schedule_recovers(rule: str, tmp_path: Path, netns: None) -> None:
    settings = chaos_lab.SHORT
    ref = chaos_lab.measure_reference(rule, settings, tmp_path / "fault-free", print)
    out = chaos_lab.chaos(
        rule, chaos_lab.fixed_schedule(), settings, tmp_path / "fixed", ref, print
    )
    report = _report(ref, [out])
    print(report)
    assert out.lockup is None, report
    assert not out.crashed, report
    assert out.recovery_s is not None, report
    assert out.recovery_s <= chaos_lab.RECOVERY_LIMIT_S, report
    delta = out.accuracy_delta
    assert delta is not None and abs(delta) <= chaos_lab.ACCURACY_POINTS, report
    assert not out.unevaluated, report  # every node evaluated its final model


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("rule", chaos_lab.RULES)
def test_scenario_and_drawn_schedules(rule: str, tmp_path: Path, netns: None) -> None:
    settings = chaos_lab.FULL
    ref = chaos_lab.measure_reference(rule, settings, tmp_path / "fault-free", print)
    schedules = [chaos_lab.scenario(s) for s in range(2)]
    schedules += [chaos_lab.draw_schedule(s, settings) for s in range(3)]
    outcomes = []
    for sched in schedules:
        folder = tmp_path / sched.name.replace(" ", "-")
        outcomes.append(chaos_lab.chaos(rule, sched, settings, folder, ref, print))
        print(outcomes[-1].line())
    report = _report(ref, outcomes)
    assert all(o.passed for o in outcomes), report
