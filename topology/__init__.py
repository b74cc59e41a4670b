"""Communication topologies for gossip learning: graphs, mixing matrices, spectral constants.

Everything works on plain :mod:`networkx` graphs whose nodes are ``0..n-1`` (node ``i`` is
the process ``node-i``):

* :mod:`~rumor.topology.builders`: graph families (ring, torus, exponential, random ...);
* :mod:`~rumor.topology.spec`: :func:`build` from strings such as ``"torus:4x4"``;
* :mod:`~rumor.topology.io`: :func:`save` and :func:`load` (edge list, GraphML, JSON);
* :mod:`~rumor.topology.mixing`: doubly stochastic gossip matrices, and the per-node
  :func:`metropolis_weights` a running node uses;
* :mod:`~rumor.topology.spectral`: spectral gap, ``chi_1``, ``chi_2``, effective resistance
  and DADAO's communication rates;
* :mod:`~rumor.topology.analysis`: :func:`analyze`, all of the above in one dict.

Examples
--------
>>> from rumor.topology import build, metropolis_hastings, spectral_gap
>>> round(spectral_gap(metropolis_hastings(build("complete:5"))), 10)
1.0

Names are loaded on first use (PEP 562): ``from rumor.topology import metropolis_weights``
imports :mod:`~rumor.topology.mixing` alone, without :mod:`networkx`, which every
``rumor node`` process would otherwise pay for (about 12 MiB and 300 modules).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Eager: imports nothing heavy, and binding it here keeps ``canonical`` the function even
# after a submodule imports ``rumor.topology.canonical`` (which would bind the module).
from rumor.topology.canonical import canonical, edge_key

if TYPE_CHECKING:
    from rumor.topology.analysis import analyze
    from rumor.topology.builders import (
        barabasi_albert,
        complete,
        erdos_renyi,
        exponential,
        grid_2d,
        hypercube,
        path,
        random_geometric,
        random_regular,
        ring,
        star,
        torus_2d,
        watts_strogatz,
    )
    from rumor.topology.io import load, save
    from rumor.topology.mixing import (
        MIXING_KINDS,
        max_degree,
        metropolis_hastings,
        metropolis_weights,
        mixing_matrix,
        uniform,
    )
    from rumor.topology.spec import FAMILIES, build
    from rumor.topology.spectral import (
        algebraic_connectivity,
        chi_1,
        chi_2,
        dadao_constants,
        dadao_rates,
        effective_resistance,
        sampling_laplacian,
        spectral_gap,
    )

__all__ = [
    "FAMILIES",
    "MIXING_KINDS",
    "algebraic_connectivity",
    "analyze",
    "barabasi_albert",
    "build",
    "canonical",
    "chi_1",
    "chi_2",
    "complete",
    "dadao_constants",
    "dadao_rates",
    "edge_key",
    "effective_resistance",
    "erdos_renyi",
    "exponential",
    "grid_2d",
    "hypercube",
    "load",
    "max_degree",
    "metropolis_hastings",
    "metropolis_weights",
    "mixing_matrix",
    "path",
    "random_geometric",
    "random_regular",
    "ring",
    "sampling_laplacian",
    "save",
    "spectral_gap",
    "star",
    "torus_2d",
    "uniform",
    "watts_strogatz",
]

_SUBMODULES = ("analysis", "builders", "canonical", "io", "mixing", "spec", "spectral")

_HOME = {
    "analyze": "analysis",
    **dict.fromkeys(
        (
            "barabasi_albert",
            "complete",
            "erdos_renyi",
            "exponential",
            "grid_2d",
            "hypercube",
            "path",
            "random_geometric",
            "random_regular",
            "ring",
            "star",
            "torus_2d",
            "watts_strogatz",
        ),
        "builders",
    ),
    "load": "io",
    "save": "io",
    **dict.fromkeys(
        (
            "MIXING_KINDS",
            "max_degree",
            "metropolis_hastings",
            "metropolis_weights",
            "mixing_matrix",
            "uniform",
        ),
        "mixing",
    ),
    "FAMILIES": "spec",
    "build": "spec",
    **dict.fromkeys(
        (
            "algebraic_connectivity",
            "chi_1",
            "chi_2",
            "dadao_constants",
            "dadao_rates",
            "effective_resistance",
            "sampling_laplacian",
            "spectral_gap",
        ),
        "spectral",
    ),
}
"""The submodule each public name lives in."""


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is not None:
        value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
