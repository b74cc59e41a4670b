"""The public Python API: build and run nodes from a :class:`~rumor.config.NodeConfig`, or
around any ``torch.nn.Module`` and data loaders of your own.

Real node over gRPC::

    import asyncio, rumor
    cfg = rumor.NodeConfig(node_id="a", listen="127.0.0.1:50051", peers={"b": "127.0.0.1:50052"})
    asyncio.run(rumor.run_node(cfg))

Your own model and data (the node does not care where they come from)::

    trainer = rumor.Trainer(my_module, my_train_loader, my_test_loader, lr=0.1)
    node = rumor.make_node(cfg, rumor.GrpcTransport(cfg.listen), trainer=trainer)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from rumor.algorithms import registry
from rumor.config import NodeConfig
from rumor.node import checkpoint, lifeline
from rumor.node.clock import Clock
from rumor.node.runtime import Node
from rumor.node.telemetry import from_config as telemetry_from_config
from rumor.protocol.channels import Reconnect
from rumor.protocol.security import Security
from rumor.protocol.transport import Transport

log = logging.getLogger("rumor")


def setup_logging(level: str = "INFO", node_id: str | None = None) -> None:
    """Structured one-line logs; in a node daemon every line names the node
    (``2025-01-01 12:00:00,000 WARNING node=node-3 rumor.security ...``)."""
    level = os.environ.get("RUMOR_LOG_LEVEL", level).upper()
    who = f"node={node_id} ".replace("%", "%%") if node_id else ""
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s " + who + "%(name)s %(message)s",
    )


def make_trainer(cfg: NodeConfig, dataset: Any = None, parts: Any = None) -> Any:
    """The trainer a config describes: dataset shard, model and optimizer.

    ``dataset`` and ``parts`` may be passed in to share one loaded dataset between many
    simulated nodes; otherwise they are built from the config (same seed, same split on
    every node).
    """
    from rumor.node.data import get_dataset, node_loaders, partition
    from rumor.node.models import build_model
    from rumor.node.trainer import Trainer

    if dataset is None:
        dataset = get_dataset(cfg.dataset, seed=cfg.seed)
    if parts is None:
        parts = partition(cfg.partition, dataset.y_train, cfg.n_nodes, seed=cfg.seed)
    if cfg.role != "honest":  # an attacker identity trains on poisoned rows
        from rumor.algorithms.attacks import poison

        dataset, parts = poison(cfg.role, dataset, parts, cfg.index, cfg.role_params, cfg.seed)
    train, test = node_loaders(dataset, parts, cfg.index, cfg.batch_size, seed=cfg.seed)
    model = build_model(
        cfg.model, dataset.x_train.shape[1], dataset.num_classes, seed=cfg.model_seed
    )
    loss = cfg.loss or ("cross_entropy" if dataset.num_classes else "mse")
    return Trainer(
        model,
        train,
        test,
        loss=loss,
        optimizer=cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )


def make_node(
    cfg: NodeConfig,
    transport: Transport,
    trainer: Any = None,
    clock: Clock | None = None,
    simulated: bool = False,
    step_cost_s: float = 0.0,
) -> Node:
    """A :class:`Node` for ``cfg`` on ``transport`` (trainer built from ``cfg`` if not given)."""
    rule = registry.create(cfg.algorithm, cfg.params)
    if cfg.role != "honest":
        from rumor.algorithms.attacks import SybilIdentity

        rule = SybilIdentity(rule)
    return Node(
        node_id=cfg.node_id,
        rule=rule,
        trainer=trainer if trainer is not None else make_trainer(cfg),
        transport=transport,
        neighbours=dict(cfg.peers),
        clock=clock,
        max_rounds=cfg.rounds,
        metrics_path=cfg.metrics,
        eval_every=cfg.eval_every,
        seed=cfg.seed,
        simulated=simulated,
        step_cost_s=step_cost_s,
        heartbeat_period_s=cfg.heartbeat_period,
        heartbeat_misses=cfg.heartbeat_misses,
        request_timeout_s=cfg.request_timeout,
        startup_wait_s=cfg.startup_wait,
        min_peers=cfg.min_peers,
        linger_s=cfg.linger,
        linger_for_neighbours_s=cfg.linger_for_neighbours,
        # Exporters (Prometheus, trace) measure wall time: real nodes only.
        telemetry=None if simulated else telemetry_from_config(cfg),
        checkpointer=None if simulated else checkpoint.from_config(cfg),
    )


async def run_node(cfg: NodeConfig, trainer: Any = None) -> dict[str, Any]:
    """Run one real node over gRPC until its rounds are done or SIGTERM/SIGINT arrives."""
    from rumor.node.allocator import keep_freed_memory
    from rumor.protocol.grpc_transport import GrpcTransport

    keep_freed_memory()  # model-sized buffers come back every round: keep them mapped
    security = Security.from_config(cfg)  # SecurityError: plain text off loopback, no keys
    security.announce([cfg.listen, cfg.advertise or "", *cfg.peers.values()])
    transport = GrpcTransport(
        cfg.listen,
        advertise=cfg.advertise,
        node_id=cfg.node_id,
        security=security,
        reconnect=Reconnect(cfg.reconnect_initial, cfg.reconnect_max, cfg.connect_timeout),
    )
    node = make_node(cfg, transport, trainer=trainer)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not available off the main thread or on Windows; Ctrl-C still ends the loop there.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, node.request_stop)
    lifeline.watch(loop, node.request_stop)  # stop when the launcher is gone (if it gave one)
    return await node.run()


def run(coro: Any) -> Any:
    """Run a coroutine on uvloop when it is installed (it is on Linux), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)
