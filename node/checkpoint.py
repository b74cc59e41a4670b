"""Checkpoints of one node: its model, optimizer and mixing-rule state, and where it was.

A checkpoint is two files in the node's ``checkpoint_dir``, named after the number of rounds
finished (``ckpt-00000040``):

- ``.safetensors``: every tensor (model ``model/<name>``, optimizer ``optim/<k>``, rule
  ``rule/<k>``); safetensors holds raw tensors only, so loading one never runs code;
- ``.json``: the manifest: format version, node id, rounds finished, clock readings (node
  clock and Unix time), trainer counters, the config digest, the rumor version, the model
  digest, the tensors file's SHA-256, and the non-tensor parts of the optimizer and rule
  state, where tensors appear as ``{"__tensor__": key}``.

Both are written to a temporary name, flushed to disk and renamed (``os.replace``), the
tensors first: a manifest only ever names complete tensors, and a node killed while saving
leaves the previous checkpoint intact. The last ``keep`` checkpoints are kept.

The config digest is a hash of the fields that change what training computes
(:data:`TRAINING_FIELDS`, plus the neighbour ids); addresses, timeouts, logging, security and
the round budget are left out, so a node can move to another machine or get more rounds and
still resume. A checkpoint whose digest differs is refused (:class:`CheckpointMismatch`).

This module reads and writes files; it must not know about the network or the rules.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("rumor.checkpoint")

#: Format of the manifest; a reader refuses other versions.
CHECKPOINT_VERSION = 1
#: Config fields that change what a node computes; their hash is the config digest.
TRAINING_FIELDS = (
    "node_id",
    "index",
    "n_nodes",
    "algorithm",
    "params",
    "dataset",
    "partition",
    "model",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "weight_decay",
    "loss",
    "seed",
    "init",
)
_NAME = re.compile(r"^ckpt-(\d{8,})\.json$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (unreadable, damaged, another format version)."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint was made with a different training configuration."""

    def __init__(self, path: Path, saved: str, expected: str) -> None:
        super().__init__(
            f"checkpoint {path} was made with config digest {saved}, but this node's "
            f"configuration has digest {expected}; the training settings changed "
            f"({', '.join(TRAINING_FIELDS)} or the neighbours). Restore the old settings, "
            "or move the checkpoint folder away to start afresh"
        )
        self.path, self.saved, self.expected = path, saved, expected


def config_digest(cfg: Any) -> str:
    """A short hex hash of ``cfg``'s training fields and neighbour ids."""
    data = {name: getattr(cfg, name) for name in TRAINING_FIELDS}
    data["neighbours"] = sorted(getattr(cfg, "peers", {}) or {})
    text = json.dumps(data, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    """What :meth:`CheckpointStore.load` returns."""

    path: Path
    round: int
    model: dict[str, torch.Tensor]
    optimizer: Any
    rule: Any
    manifest: dict[str, Any]


class CheckpointStore:
    """The checkpoints of one node in one folder."""

    def __init__(self, directory: str | Path, node_id: str, digest: str, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("checkpoint_keep must be >= 1")
        self.directory = Path(directory)
        self.node_id = node_id
        self.digest = digest
        self.keep = keep
        self.last_saved_round: int | None = None

    # ------------------------------------------------------------------ writing
    def save(
        self,
        round: int,
        model: dict[str, torch.Tensor],
        optimizer: Any = None,
        rule: Any = None,
        **info: Any,
    ) -> Path:
        """Write a checkpoint of ``round`` finished rounds; return the manifest's path.

        ``info`` goes into the manifest as is (clock readings, counters, model digest).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {
            f"model/{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.items()
        }
        optim_json = _encode(optimizer, "optim", tensors)
        rule_json = _encode(rule, "rule", tensors)
        stem = self.directory / f"ckpt-{round:08d}"
        tensor_path = stem.with_suffix(".safetensors")
        tmp = tensor_path.with_name(f".{tensor_path.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp), metadata={"node": self.node_id, "round": str(round)})
        _fsync(tmp)
        sha = _sha256(tmp)
        os.replace(tmp, tensor_path)
        manifest = {
            "version": CHECKPOINT_VERSION,
            "node": self.node_id,
            "round": round,
            "config_digest": self.digest,
            "rumor_version": _rumor_version(),
            "saved_at": time.time(),
            "tensors": tensor_path.name,
            "tensors_sha256": sha,
            "optimizer": optim_json,
            "rule": rule_json,
            **info,
        }
        manifest_path = stem.with_suffix(".json")
        tmp = manifest_path.with_name(f".{manifest_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(manifest, indent=1, default=repr), encoding="utf-8")
        _fsync(tmp)
        os.replace(tmp, manifest_path)
        _fsync_dir(self.directory)
        self.last_saved_round = round
        self._prune()
        return manifest_path

    def _prune(self) -> None:
        for path in self.manifests()[: -self.keep]:
            for victim in (path, path.with_suffix(".safetensors")):
                with contextlib.suppress(FileNotFoundError):
                    victim.unlink()

    # ------------------------------------------------------------------ reading
    def manifests(self) -> list[Path]:
        """Manifest paths, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))  # type: ignore[union-attr]

    def latest(self) -> Path | None:
        paths = self.manifests()
        return paths[-1] if paths else None

    def load(self, path: Path | None = None) -> Checkpoint | None:
        """The latest (or the given) checkpoint; None when there is none.

        Raises :class:`CheckpointMismatch` when its config digest differs from this node's,
        :class:`CheckpointError` when it cannot be read.
        """
        path = path or self.latest()
        if path is None:
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read checkpoint manifest {path}: {exc}") from exc
        if manifest.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format version {manifest.get('version')!r}; "
                f"this rumor reads version {CHECKPOINT_VERSION}"
            )
        if manifest.get("config_digest") != self.digest:
            raise CheckpointMismatch(path, str(manifest.get("config_digest")), self.digest)
        if manifest.get("node") != self.node_id:
            raise CheckpointError(f"checkpoint {path} belongs to node {manifest.get('node')!r}")
        from safetensors.torch import load_file

        tensor_path = path.with_name(str(manifest["tensors"]))
        try:
            if _sha256(tensor_path) != manifest.get("tensors_sha256"):
                raise CheckpointError(f"{tensor_path} does not match its manifest (damaged)")
            tensors = load_file(str(tensor_path))
        except OSError as exc:
            raise CheckpointError(f"cannot read {tensor_path}: {exc}") from exc
        model = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
        return Checkpoint(
            path=path,
            round=int(manifest["round"]),
            model=model,
            optimizer=_decode(manifest.get("optimizer"), tensors),
            rule=_decode(manifest.get("rule"), tensors),
            manifest=manifest,
        )


# ---------------------------------------------------------------------- nested state


def _encode(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for ``obj``, moving every tensor into ``tensors`` under a fresh key.

    Dicts with string keys stay JSON objects; other dicts (int keys, as in optimizer and
    ledger states) become ``{"__items__": [[key, value], ...]}``; tuples become lists.
    """
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}/{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, prefix, tensors) for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, prefix, tensors), _encode(v, prefix, tensors)] for k, v in obj.items()
            ]
        }
    if isinstance(obj, (list, tuple)):
        return [_encode(v, prefix, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} (in {prefix} state)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            try:
                return tensors[obj["__tensor__"]]
            except KeyError:
                raise CheckpointError(
                    f"checkpoint names a missing tensor {obj['__tensor__']!r}"
                ) from None
        if set(obj) == {"__items__"}:
            return {
                _hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]
            }
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# ---------------------------------------------------------------------- files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        _fsync(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _rumor_version() -> str:
    try:
        from importlib.metadata import version

        return version("rumor")
    except Exception:  # not installed as a distribution (a source checkout)
        return "unknown"


# ---------------------------------------------------------------------- a node's checkpoints


class NodeCheckpointer:
    """Saves a running :class:`rumor.node.runtime.Node` every ``every`` rounds and when its
    rule's loop ends (finished, or stopped by SIGTERM), and resumes it at start.

    A save is a synchronous snapshot on the event loop, so no coroutine can change the model
    or the rule's state half-way; when the model lock is held (training in the worker thread)
    the save waits for the lock in a task instead. Writing a small model takes milliseconds;
    for large ones raise ``checkpoint_every``.
    """

    def __init__(self, store: CheckpointStore, every: int) -> None:
        self.store = store
        self.every = int(every)
        self._pending: set[Any] = set()

    def resume(self, node: Any) -> Checkpoint | None:
        """Restore ``node`` from the latest checkpoint, if any (before it serves or trains)."""
        rule = node.rule
        if not getattr(rule, "checkpointable", False):
            raise ValueError(
                f"checkpoint_dir is set but the rule {rule.name!r} cannot resume from a "
                "checkpoint yet; unset checkpoint_dir for it"
            )
        ckpt = self.store.load()
        if ckpt is None:
            log.info("%s: no checkpoint in %s; starting afresh", node.node_id, self.store.directory)
            return None
        node.trainer.model.load_state_dict(ckpt.model)
        if ckpt.optimizer:
            node.trainer.optimizer.load_state_dict(ckpt.optimizer)
        rule.load_state_dict(ckpt.rule or {})
        manifest = ckpt.manifest
        trainer_info = manifest.get("trainer", {})
        for name in ("steps", "epochs"):
            if name in trainer_info and hasattr(node.trainer, name):
                setattr(node.trainer, name, int(trainer_info[name]))
        if manifest.get("rng"):
            node.ctx.rng.setstate(_as_tuple(manifest["rng"]))
        node.ctx.round = ckpt.round
        self.store.last_saved_round = ckpt.round
        digest = node.model_digest()
        node.metrics.write(
            "resume",
            round=ckpt.round,
            digest=digest,
            checkpoint=str(ckpt.path),
            config_digest=self.store.digest,
        )
        log.info(
            "%s: resumed from %s: %d rounds done, model digest %s",
            node.node_id,
            ckpt.path,
            ckpt.round,
            digest,
        )
        return ckpt

    def after_round(self, node: Any, rounds_done: int) -> None:
        """Called as a round ends: save when ``rounds_done`` is a multiple of ``every``."""
        if self.every > 0 and rounds_done % self.every == 0:
            self.save(node, "interval")

    def save(self, node: Any, reason: str) -> None:
        """Save now, or as soon as the worker thread releases the model."""
        rounds_done = node.ctx.round
        if self.store.last_saved_round == rounds_done and reason != "interval":
            return
        lock = node.ctx.lock
        if getattr(lock, "locked", lambda: False)():
            import asyncio

            async def later() -> None:
                async with lock:
                    self._save_now(node, reason)

            task = asyncio.ensure_future(later())
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            return
        self._save_now(node, reason)

    async def flush(self) -> None:
        """Wait for saves that were waiting for the model lock."""
        import asyncio

        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def _save_now(self, node: Any, reason: str) -> None:
        try:
            rule_state = node.rule.state_dict()
        except RuntimeError as exc:  # the rule never started: nothing of its own to keep
            log.info("%s: checkpoint without rule state (%s)", node.node_id, exc)
            rule_state = {}
        optimizer = getattr(node.trainer, "optimizer", None)
        path = self.store.save(
            node.ctx.round,
            node.trainer.model.state_dict(),
            optimizer.state_dict() if optimizer is not None else None,
            rule_state,
            reason=reason,
            algorithm=node.rule.name,
            digest=node.model_digest(),
            clock={"elapsed": node.clock.now(), "unix": time.time()},
            trainer={
                "steps": getattr(node.trainer, "steps", 0),
                "epochs": getattr(node.trainer, "epochs", 0),
            },
            rng=node.ctx.rng.getstate(),
        )
        log.debug("%s: checkpoint %s (%s)", node.node_id, path, reason)


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def from_config(cfg: Any) -> NodeCheckpointer | None:
    """The checkpointer a :class:`rumor.config.NodeConfig` asks for (None without a folder)."""
    if not getattr(cfg, "checkpoint_dir", None):
        return None
    store = CheckpointStore(
        cfg.checkpoint_dir, cfg.node_id, config_digest(cfg), cfg.checkpoint_keep
    )
    if not cfg.resume:
        store.last_saved_round = None
        return _NoResume(store, cfg.checkpoint_every)
    return NodeCheckpointer(store, cfg.checkpoint_every)


class _NoResume(NodeCheckpointer):
    """Saves checkpoints but starts afresh (``resume = false``)."""

    def resume(self, node: Any) -> Checkpoint | None:
        log.info("%s: resume = false: starting afresh", node.node_id)
        return None
