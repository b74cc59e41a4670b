"""Kubernetes clusters: a StatefulSet, its headless Service and a ConfigMap of node configs.

Pod ``<name>-i`` of the StatefulSet is node ``node-i``: it reads ``/etc/rumor/node-i.toml``
from the ConfigMap (the pod finds its ordinal in the ``apps.kubernetes.io/pod-index`` label,
set by Kubernetes 1.28 and later), and its peers reach it at its stable network id
``<name>-i.<name>:<port>`` through the headless Service, which publishes pods before they
are ready so that nodes starting together find each other. With ``[tls]`` (or ``token_file``)
the certificates (and token) come from the Secret ``<name>-secrets``, made by ``kubectl create
secret generic`` (:func:`secret_command`); they are projected into ``/etc/rumor/tls`` (and
``/etc/rumor/token``) next to the configs. Every pod sees every node's key, since the pods
of one StatefulSet share one template: give the namespace to this cluster alone.
Each pod keeps its metrics and checkpoints in a PersistentVolumeClaim at ``/var/lib/rumor``.

No private key is ever written into a manifest.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from rumor import config as config_io
from rumor.config import NodeConfig
from rumor.deploy import container, yamltext
from rumor.deploy.spec import ClusterSpec

#: The image's non-root user (deploy/docker/Dockerfile).
RUN_AS_USER = 10001
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
FILES = ("configmap.yaml", "service.yaml", "statefulset.yaml")


def secret_name(spec: ClusterSpec) -> str:
    return f"{spec.name}-secrets"


def configs(spec: ClusterSpec) -> list[NodeConfig]:
    """Node configs as the pods see them: peers by stable network id."""
    return spec.configs(
        container.layout(
            spec,
            host_of=lambda i: f"{spec.name}-{i}.{spec.name}",
            tls_of=lambda nid: container.tls_paths(f"{nid}.crt", f"{nid}.key"),
        )
    )


def manifests(
    spec: ClusterSpec,
    image: str = container.DEFAULT_IMAGE,
    namespace: str | None = None,
    storage: str = "1Gi",
    cpu: str = "500m",
    memory: str = "1Gi",
) -> dict[str, dict[str, Any]]:
    """File name -> manifest, for ``configmap.yaml``, ``service.yaml``, ``statefulset.yaml``."""
    labels = {"app.kubernetes.io/name": "rumor", "app.kubernetes.io/instance": spec.name}

    def meta(name: str) -> dict[str, Any]:
        out: dict[str, Any] = {"name": name, "labels": dict(labels)}
        if namespace:
            out["namespace"] = namespace
        return out

    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(f"{spec.name}-config"),
        "data": {f"{c.node_id}.toml": config_io.dumps(c) for c in configs(spec)},
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(spec.name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": dict(labels),
            "ports": [{"name": "grpc", "port": spec.port, "targetPort": "grpc"}],
        },
    }
    sources: list[dict[str, Any]] = [{"configMap": {"name": f"{spec.name}-config"}}]
    items = [{"key": key, "path": path} for key, path in _secret_paths(spec).items()]
    for item in items:
        if item["key"].endswith(".key") or item["key"] == "token":
            item["mode"] = 0o440  # root and the pod's fsGroup (the rumor user) only
    if items:
        sources.append({"secret": {"name": secret_name(spec), "items": items}})
    node = {
        "name": "rumor",
        "image": image,
        "args": ["node", "--config", f"{container.CONFIG_DIR}/node-$(POD_INDEX).toml"],
        "env": [
            {
                "name": "POD_INDEX",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{POD_INDEX_LABEL}']"}},
            },
            *({"name": k, "value": v} for k, v in container.NODE_ENV.items()),
        ],
        "ports": [{"name": "grpc", "containerPort": spec.port}],
        "readinessProbe": {"tcpSocket": {"port": "grpc"}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": cpu, "memory": memory}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": container.CONFIG_DIR, "readOnly": True},
            {"name": "state", "mountPath": container.STATE_DIR},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    stateful_set = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta(spec.name),
        "spec": {
            "serviceName": spec.name,
            "replicas": spec.n_nodes,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS_USER,
                        "runAsGroup": RUN_AS_USER,
                        "fsGroup": RUN_AS_USER,
                    },
                    "containers": [node],
                    "volumes": [
                        {"name": "config", "projected": {"sources": sources}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "state"},
                    "spec": {
                        "accessModes": ["ReadWriteOnce"],
                        "resources": {"requests": {"storage": storage}},
                    },
                }
            ],
        },
    }
    return {
        "configmap.yaml": config_map,
        "service.yaml": service,
        "statefulset.yaml": stateful_set,
    }


def _secret_files(spec: ClusterSpec) -> dict[str, Path]:
    """Secret key -> the file on this machine that fills it."""
    files: dict[str, Path] = {}
    if spec.tls is not None:
        files["ca.crt"] = spec.tls.ca
        for node_id in spec.node_ids:
            files[f"{node_id}.crt"] = spec.tls.cert_of(node_id)
            files[f"{node_id}.key"] = spec.tls.key_of(node_id)
    if spec.token_file is not None:
        files["token"] = spec.token_file
    return files


def _secret_paths(spec: ClusterSpec) -> dict[str, str]:
    """Secret key -> path under /etc/rumor, where the node configs expect it."""
    prefix = container.CONFIG_DIR + "/"
    paths = {key: f"{container.TLS_DIR}/{key}" for key in _secret_files(spec)}
    if "token" in paths:
        paths["token"] = container.TOKEN_FILE
    return {key: path.removeprefix(prefix) for key, path in paths.items()}


def secret_command(spec: ClusterSpec, namespace: str | None = None) -> str | None:
    """The ``kubectl`` command that makes the Secret, or None when nothing is secret."""
    files = [f"{key}={path}" for key, path in _secret_files(spec).items()]
    if not files:
        return None
    cmd = ["kubectl", "create", "secret", "generic", secret_name(spec)]
    if namespace:
        cmd += ["--namespace", namespace]
    cmd += [f"--from-file={f}" for f in files]
    return shlex.join(cmd)


def write(
    spec: ClusterSpec,
    out: Path,
    image: str = container.DEFAULT_IMAGE,
    namespace: str | None = None,
    storage: str = "1Gi",
) -> list[Path]:
    """Write the three manifests into ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in manifests(spec, image=image, namespace=namespace, storage=storage).items():
        path = out / name
        path.write_text(yamltext.dumps(doc))
        written.append(path)
    return written
