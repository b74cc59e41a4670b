"""Options shared by several commands, so that flags are spelled the same everywhere."""

from __future__ import annotations

from enum import Enum
from typing import Any

import typer

from rumor.config import NodeConfig, parse_params


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


FormatOpt = typer.Option(OutputFormat.table, "--format", help="Output as a table or JSON.")


def training_overrides(
    *,
    algorithm: str | None,
    param: list[str] | None,
    rounds: int | None,
    dataset: str | None,
    partition: str | None,
    model: str | None,
    lr: float | None,
    momentum: float | None = None,
    batch_size: int | None,
    seed: int | None,
    init: str | None,
    eval_every: int | None,
) -> dict[str, Any]:
    """The config fields a user set on the command line (None means: not given)."""
    given = {
        "algorithm": algorithm,
        "rounds": rounds,
        "dataset": dataset,
        "partition": partition,
        "model": model,
        "lr": lr,
        "momentum": momentum,
        "batch_size": batch_size,
        "seed": seed,
        "init": init,
        "eval_every": eval_every,
    }
    out = {k: v for k, v in given.items() if v is not None}
    if param:
        out["params"] = parse_params(param)
    return out


def apply(cfg: NodeConfig, overrides: dict[str, Any]) -> NodeConfig:
    if "params" in overrides:
        overrides = {**overrides, "params": {**cfg.params, **overrides["params"]}}
    return cfg.replace(**overrides)
