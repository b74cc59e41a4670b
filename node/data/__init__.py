"""Data for a node: datasets, partitions between nodes, and per-node minibatch loaders.

Light on purpose (no scikit-learn or scipy imports), so that a node process stays within
its memory budget.
"""

from rumor.node.data.datasets import (
    Dataset,
    digits,
    get_dataset,
    load_csv,
    load_npz,
    logistic_newton,
    synthetic_least_squares,
    synthetic_logistic,
)
from rumor.node.data.loaders import TensorBatches, node_loaders, node_seed
from rumor.node.data.partition import dirichlet, iid, label_histogram, partition, shards

__all__ = [
    "Dataset",
    "TensorBatches",
    "digits",
    "dirichlet",
    "get_dataset",
    "iid",
    "label_histogram",
    "load_csv",
    "load_npz",
    "logistic_newton",
    "node_loaders",
    "node_seed",
    "partition",
    "shards",
    "synthetic_least_squares",
    "synthetic_logistic",
]
