"""Claim: SybilWall keeps a Sybil attack's success low where plain averaging fails, and more
Sybils do not help the attacker (Werthenbach & Pouwelse, "Towards Sybil Resilience in
Decentralized Learning", arXiv:2306.15044).

The attack matrix, scaled down to this machine (spec, B.6): digits split Dirichlet(0.1)
between 32 honest nodes on a random geometric graph (max degree 7); one attacker with
k in {2, 8} Sybil identities attached through 8 attack edges to honest nodes spread far apart
(:func:`rumor.algorithms.attacks.sybil_topology`), all sending the same model trained on
poisoned data (label flip 0 <-> 1; full runs add the 3x3 trigger backdoor -> 1). For each
defence, averaging (``dpsgd``), coordinate-wise median, trimmed mean (beta 0.2), Krum (f 1),
FoolsGold and SybilWall (as configured by default, with the reference's uncentred
histories, and with update sums): the honest nodes' mean clean test accuracy and attack
success rate (fraction of targeted test rows classified as the attacker wants), without
attack and under each attack. Logistic regression, SGD lr 0.2, batch 16, 5 local steps per
round, 60 rounds, shared initial weights.

Everything runs in simulation (in-process transport, virtual clock) with the real node
runtime and the rules' real message paths, signatures included.
``rumor bench claims sybilwall`` prints the table.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from rumor.claims import Arm, Claim

TITLE = "SybilWall vs averaging and robust baselines under Sybil poisoning (digits)"

NAME = "sybilwall"


ARMS: tuple[Arm, ...] = (
    Arm("averaging", "dpsgd"),
    Arm("median", "median"),
    Arm("trimmed mean", "trimmed-mean", {"beta": 0.2}),
    Arm("Krum", "krum", {"f": 1}),
    Arm("FoolsGold", "foolsgold"),
    Arm("SybilWall", "sybilwall"),
    Arm("SybilWall, reference histories", "sybilwall", {"centre": "none"}),
    Arm("SybilWall, update sums", "sybilwall", {"history_mode": "sum_of_local_updates"}),
)


@dataclass
class Setup:
    honest: int = 32
    attack_edges: int = 8
    sybils: tuple[int, ...] = (2, 8)
    attacks: tuple[str, ...] = ("label-flip", "backdoor")
    rounds: int = 60
    local_steps: int = 5
    model: str = "logreg"
    lr: float = 0.2
    batch_size: int = 16
    partition: str = "dirichlet:0.1"


def run_scenario(
    arm: Arm, attacks: tuple[str, ...], sybils: int, seed: int, setup: Setup
) -> dict[str, tuple[float, float]]:
    """``{attack: (mean clean accuracy, mean attack success)}`` of the honest nodes after
    the last round, for one run attacked by ``attacks[0]`` (or, with ``sybils = 0``, one
    clean run measured against every attack in ``attacks``: the rate at which clean models
    already make the attacker's mistakes).

    The honest nodes' data is the same with and without attack: the data set is split into
    ``honest + 1`` shards, the last one the attacker's.
    """
    from rumor.algorithms.attacks import attack_configs, honest_report, sybil_topology
    from rumor.config import NodeConfig
    from rumor.node.simulation import simulate

    graph = sybil_topology(setup.honest, sybils, setup.attack_edges if sybils else 0, seed=seed)
    base = NodeConfig(
        algorithm=arm.algorithm,
        params={**arm.params, "local_steps": setup.local_steps},
        rounds=setup.rounds,
        dataset="digits",
        partition=setup.partition,
        model=setup.model,
        lr=setup.lr,
        batch_size=setup.batch_size,
        seed=seed,
        eval_every=0,
    )
    configs = [c.replace(n_nodes=setup.honest + 1) for c in attack_configs(graph, base, attacks[0])]
    nodes: dict[str, Any] = {}

    async def capture(network: Any, by_id: dict[str, Any]) -> None:
        nodes.update(by_id)

    simulate(configs, scenario=capture)
    measured = attacks if sybils == 0 else attacks[:1]
    out = {}
    for attack in measured:
        report = honest_report(nodes, configs, attack)
        out[attack] = (report["honest_accuracy"], report["attack_success"])
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(quick: bool = False, seeds: int | None = None) -> Claim:
    """The attack matrix over ``seeds`` seeds (2; 1 quick).

    ``quick``: label flip only, 40 rounds. ``holds``: in every attacked scenario where
    averaging's attack success exceeds 0.2, SybilWall's is at most half of it.
    """
    n_seeds = seeds if seeds is not None else (1 if quick else 2)
    if n_seeds < 1:
        raise ValueError("seeds must be >= 1")
    setup = Setup(rounds=40, attacks=("label-flip",)) if quick else Setup()
    started = time.perf_counter()
    # (attack, k) -> arm -> runs; k = 0 is one clean run per arm and seed, measured twice
    results: dict[tuple[str, int], dict[str, list[tuple[float, float]]]] = {}
    runs = [(setup.attacks, 0)] + [((a,), k) for a in setup.attacks for k in setup.sybils]
    for attacks, k in runs:
        for arm in ARMS:
            for seed in range(n_seeds):
                for attack, value in run_scenario(arm, attacks, k, seed, setup).items():
                    results.setdefault((attack, k), {}).setdefault(arm.label, []).append(value)
    scenarios = [(a, 0) for a in setup.attacks] + [
        (a, k) for a in setup.attacks for k in setup.sybils
    ]
    rows: list[list[Any]] = []
    asr: dict[tuple[str, str, int], float] = {}
    for attack, k in scenarios:
        for arm in ARMS:
            values = results[attack, k][arm.label]
            acc = _mean_std([v[0] for v in values])
            rate = _mean_std([v[1] for v in values])
            asr[arm.label, attack, k] = rate[0]
            rows.append(
                [
                    attack,
                    k,
                    arm.label,
                    round(acc[0], 4),
                    round(acc[1], 4),
                    round(rate[0], 4),
                    round(rate[1], 4),
                ]
            )
    elapsed = time.perf_counter() - started
    checked = [(a, k) for a, k in scenarios if k > 0 and asr["averaging", a, k] > 0.2]
    holds = bool(checked) and all(
        asr["SybilWall", a, k] <= 0.5 * asr["averaging", a, k] for a, k in checked
    )
    notes = [
        f"digits, {setup.honest} honest nodes, {setup.partition} label skew, random geometric "
        f"graph (max degree 7); Sybils on {setup.attack_edges} attack edges spread far apart; "
        f"{setup.model}, SGD lr {setup.lr}, batch {setup.batch_size}, "
        f"{setup.local_steps} local steps per round, {setup.rounds} rounds.",
        "sybils 0: no attack (the success rate clean models already have on the targeted "
        "rows). label-flip: 0 <-> 1 swapped, success = targeted 0/1 test rows classified as "
        "the other; backdoor: 3x3 trigger -> class 1, success = triggered non-1 rows -> 1.",
        "acc and attack: means over the honest nodes after the last round; mean and std over "
        "seeds.",
        f"{n_seeds} seed(s), wall time {elapsed:.0f} s.",
    ]
    return Claim(
        name=NAME,
        title=TITLE,
        claim=(
            "SybilWall keeps the attack success low where averaging fails, with few or many "
            "Sybils (arXiv:2306.15044)."
        ),
        columns=["attack", "sybils", "rule", "acc", "acc std", "attack", "attack std"],
        rows=rows,
        holds=holds,
        notes=notes,
        setup={
            "honest": setup.honest,
            "attack_edges": setup.attack_edges,
            "sybils": list(setup.sybils),
            "attacks": list(setup.attacks),
            "rounds": setup.rounds,
            "local_steps": setup.local_steps,
            "model": setup.model,
            "lr": setup.lr,
            "batch_size": setup.batch_size,
            "partition": setup.partition,
            "seeds": n_seeds,
            "quick": quick,
            "wall_time_s": round(elapsed, 1),
        },
    )
