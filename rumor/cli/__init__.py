"""The ``rumor`` command line: one module per command, each exposing ``register(app)``.

Command modules import heavy libraries (matplotlib, sklearn, torch) inside their functions,
so that ``rumor node`` processes stay small and ``rumor --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="rumor",
    help="Decentralized gossip learning over real networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_COMMAND_MODULES = (
    "node_cmd",
    "cluster_cmd",
    "simulate_cmd",
    "status_cmd",
    "watch_cmd",
    "topology_cmd",
    "plot_cmd",
    "bench_cmd",
    "keys_cmd",
    "deploy_cmd",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(f"{__name__}.{_name}").register(app)


def main() -> None:
    """Console-script entry point."""
    app()
