"""rumor: decentralized gossip learning over real networks.

The public API in one import: configs, node construction and running, simulation, mixing
rules and transports. Subpackages: :mod:`rumor.node`, :mod:`rumor.protocol`,
:mod:`rumor.topology`, :mod:`rumor.algorithms`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "NodeConfig": ("rumor.config", "NodeConfig"),
    "load_config": ("rumor.config", "load"),
    "make_node": ("rumor.api", "make_node"),
    "make_trainer": ("rumor.api", "make_trainer"),
    "run_node": ("rumor.api", "run_node"),
    "simulate": ("rumor.node.simulation", "simulate"),
    "Node": ("rumor.node.runtime", "Node"),
    "Trainer": ("rumor.node.trainer", "Trainer"),
    "MixingRule": ("rumor.algorithms.base", "MixingRule"),
    "Bundle": ("rumor.protocol.bundle", "Bundle"),
    "Message": ("rumor.protocol.bundle", "Message"),
    "GrpcTransport": ("rumor.protocol.grpc_transport", "GrpcTransport"),
    "InProcNetwork": ("rumor.protocol.inproc", "InProcNetwork"),
    "InProcTransport": ("rumor.protocol.inproc", "InProcTransport"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import lazily, so ``import rumor`` stays cheap (no torch until it is needed)."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'rumor' has no attribute {name!r}")
