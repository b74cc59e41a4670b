"""Run rumor nodes around your own ``nn.Module`` and data, from Python.

Four nodes on a ring, each with its own shard of a two-spirals problem and a small custom
network, gossiping with D-PSGD. The same `Node` objects run either over real gRPC on
127.0.0.1 (default) or in a simulation on a virtual clock (``--simulate``): only the
transport and the event loop change.

    python examples/python_api.py              # four gRPC servers in this process
    python examples/python_api.py --simulate   # the same, in simulated time
"""

from __future__ import annotations

import argparse
import asyncio
import math

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rumor import GrpcTransport, InProcNetwork, InProcTransport, Node, Trainer
from rumor.algorithms.gossip import DPSGD
from rumor.cluster import free_ports
from rumor.node.clock import run_virtual
from rumor.node.observe import consensus_distance

N = 4


def two_spirals(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 2 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=g)
    sign = 1 - 2 * label.float()
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], dim=1) / 10
    return x + 0.02 * torch.randn(n, 2, generator=g), label


class SpiralNet(nn.Module):
    """Any module works; rumor mixes its state_dict's floating-point tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_trainers() -> list[Trainer]:
    x, y = two_spirals(4000, seed=0)
    x_test, y_test = two_spirals(1000, seed=1)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=500)
    trainers = []
    for i in range(N):
        shard = TensorDataset(x[i::N], y[i::N])
        train = DataLoader(shard, batch_size=32, shuffle=True)
        # Every node starts from the same weights, as D-PSGD assumes. Averaging networks
        # that were initialised independently shrinks their weights towards zero and this
        # tanh network stalls there (try it: seed with 100 + i).
        torch.manual_seed(100)
        trainers.append(Trainer(SpiralNet(), train, test, optimizer="adam", lr=0.01))
    return trainers


def make_nodes(trainers: list[Trainer], transports: list, addresses: list[str]) -> list[Node]:
    nodes = []
    for i, (trainer, transport) in enumerate(zip(trainers, transports, strict=True)):
        ring = {f"n{j}": addresses[j] for j in ((i - 1) % N, (i + 1) % N)}
        nodes.append(
            Node(
                node_id=f"n{i}",
                rule=DPSGD(local_steps=10),
                trainer=trainer,
                transport=transport,
                neighbours=ring,
                max_rounds=200,
                eval_every=100,
                simulated=not isinstance(transport, GrpcTransport),
            )
        )
    return nodes


async def run_grpc() -> list[Node]:
    addresses = [f"127.0.0.1:{p}" for p in free_ports(N)]
    transports = [GrpcTransport(a, node_id=f"n{i}") for i, a in enumerate(addresses)]
    nodes = make_nodes(make_trainers(), transports, addresses)
    await asyncio.gather(*(n.run() for n in nodes))
    return nodes


async def run_simulated() -> list[Node]:
    net = InProcNetwork()
    addresses = [f"n{i}" for i in range(N)]
    transports = [InProcTransport(net, a) for a in addresses]
    nodes = make_nodes(make_trainers(), transports, addresses)
    await asyncio.gather(*(n.run() for n in nodes))
    return nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    nodes = run_virtual(run_simulated()) if args.simulate else asyncio.run(run_grpc())
    accs = [n.ctx.last_eval["accuracy"] for n in nodes]
    cd = consensus_distance([n.trainer.model.state_dict() for n in nodes])
    print(f"accuracy per node: {[round(a, 3) for a in accs]}")
    print(f"consensus distance: {cd:.3g}")


if __name__ == "__main__":
    main()
