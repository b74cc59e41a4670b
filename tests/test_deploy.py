"""Cluster specs and the deploy generators: validation, node configs, compose, Kubernetes, hosts.

The compose file must pass ``docker-compose config`` (Debian's docker-compose) and the
manifests ``kubernetes-validate --strict``; each check is also shown to reject a broken copy,
so that a validator that accepts anything cannot pass these tests.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from rumor import config as config_io
from rumor import keys
from rumor.cli import app
from rumor.deploy import compose, hosts, yamltext
from rumor.deploy.spec import SpecError, from_dict, load

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "cluster.toml"

BASE = {"name": "t", "topology": "ring:4", "insecure": True}
HOST_A = {"a": "10.0.0.1"}


def _on(host: str, n: int) -> dict[str, str]:
    return {f"node-{i}": host for i in range(n)}


def rumor(*args: str, code: int = 0) -> str:
    """Run ``rumor ARGS`` in this process; check its exit code; its output (with stderr)."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (result.output, result.exception)
    return result.output


def _spec_file(tmp_path: Path, body: str, certs: bool = True) -> Path:
    if certs:
        keys.make_cluster([f"node-{i}" for i in range(4)], tmp_path / "certs")
        (tmp_path / "token").write_text("s3cret-token\n")
    path = tmp_path / "cluster.toml"
    path.write_text(body)
    return path


TLS_SPEC = """
name = "secure"
topology = "ring:4"
algorithm = "dpsgd"
rounds = 20
token_file = "token"
[params]
local_steps = 2
[tls]
dir = "certs"
"""


# ----------------------------------------------------------------------------- the spec


def test_example_spec_places_nodes_and_derives_their_configs() -> None:
    spec = load(EXAMPLE)
    assert spec.n_nodes == 4 and sorted(spec.graph.edges) == [(0, 1), (0, 3), (1, 2), (2, 3)]
    launches = hosts.plan(spec)
    by_id = {launch.node_id: launch for launch in launches}
    one = by_id["node-1"].config
    assert by_id["node-1"].host == "alpha"
    assert one.listen == "0.0.0.0:50052" and one.advertise == "10.0.0.10:50052"
    assert one.peers == {"node-0": "10.0.0.10:50051", "node-2": "10.0.0.11:50051"}
    assert (one.index, one.n_nodes, one.algorithm, one.rounds) == (1, 4, "dpsgd", 200)
    assert one.params == {"local_steps": 2, "round_timeout": 5.0}
    assert one.metrics == "/var/lib/rumor/node-1.metrics.jsonl"
    assert one.checkpoint_dir == "/var/lib/rumor/node-1.checkpoints"
    assert one.insecure is True and one.tls_cert is None
    assert by_id["node-3"].command == ["rumor", "node", "--config", "/etc/rumor/node-3.toml"]


def test_an_explicit_edge_list_and_graph_constants_filled_by_the_rule() -> None:
    spec = from_dict(
        {
            "name": "t",
            "insecure": True,
            "edges": [[0, 1], ["node-1", "node-2"], [2, 0], [2, 3]],
            "algorithm": "acid",
        }
    )
    assert spec.n_nodes == 4
    configs = compose.configs(spec)
    # ACiD needs chi_1 and chi_2 of the whole graph: prepare filled them, the same on all
    chis = {(c.params["chi_1"], c.params["chi_2"]) for c in configs}
    assert len(chis) == 1 and all(v > 0 for v in chis.pop())
    # acid can resume, so its nodes get a checkpoint folder (in each container's state volume)
    assert all(c.checkpoint_dir for c in configs)
    assert sorted(configs[2].peers) == ["node-0", "node-1", "node-3"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"peers": {"node-1": "x:1"}}, "'peers' differs per node"),
        ({"rounds": "ten"}, "rounds = 'ten' is not a"),
        ({"lr": True}, "lr = True is not a float"),
        ({"name": "Bad_Name"}, "name = 'Bad_Name'"),
        ({"edges": [[0, 1]]}, "exactly one of topology"),
        ({"topology": None}, "exactly one of topology"),
        ({"topology": "ring"}, "without [nodes], give the size"),
        ({"topology": "blob:4"}, "unknown topology 'blob'"),
        ({"topology": None, "edges": [[0, 1], [2, 3]]}, "not connected"),
        ({"topology": None, "edges": [[0, 0]]}, "joins a node to itself"),
        ({"topology": None, "edges": [[0, "x"]]}, "not a node index"),
        ({"insecure": False}, "add a [tls] table"),
        ({"tls": {"dir": "certs"}}, "contradict"),
        ({"tls": {"ca": "ca.crt"}}, "needs dir"),
        ({"insecure": False, "tls": {"dir": "c", "cert": "node.crt"}}, "must contain {node}"),
        ({"port": 70000}, "not a port"),
        ({"hosts": {"a": "10.0.0.1"}}, "[hosts] and [nodes] go together"),
        ({"hosts": {"a": "not an address"}, "nodes": {}}, "not an IP address or DNS name"),
        ({"hosts": HOST_A, "nodes": _on("a", 3)}, "has 4 nodes, but [nodes] lists 3"),
        ({"hosts": HOST_A, "nodes": {**_on("a", 3), "x": "a"}}, "[nodes] names x"),
        ({"hosts": HOST_A, "nodes": _on("b", 4)}, "host 'b' is not in [hosts]"),
        ({"hosts": HOST_A, "nodes": _on("a", 4)}, "both use a port 50051"),
        ({"hosts": HOST_A, "nodes": {**_on("a", 4), "node-0": 7}}, "expected a host name"),
        ({"n_nodes": 5}, "has 4 nodes, but n_nodes = 5"),
        ({"topology": "ring", "n_nodes": 3, "hosts": HOST_A, "nodes": _on("a", 4)}, "n_nodes = 3"),
        ({"checkpoints": "yes"}, "checkpoints = 'yes'"),
        ({"token": "a", "token_file": "t"}, "token or token_file"),
        ({"algorithm": "median", "checkpoints": True}, "'median' cannot resume"),
        ({"algorithm": "nope"}, "unknown algorithm 'nope'"),
    ],
)  # fmt: skip
def test_a_bad_spec_is_refused_with_the_reason(changes: dict, message: str) -> None:
    data = {k: v for k, v in {**BASE, **changes}.items() if v is not None}
    with pytest.raises(SpecError) as err:
        from_dict(data, source=Path("cluster.toml"))
    assert message in str(err.value) and str(err.value).startswith("cluster.toml: ")


def test_bad_spec_file_exits_2_and_names_the_problem(tmp_path: Path) -> None:
    path = _spec_file(tmp_path, 'name = "x"\ntopology = "ring:4"\n', certs=False)
    out = rumor("deploy", "hosts", str(path), code=2)
    assert "mutual TLS" in out and "insecure = true" in out
    path.write_text('name = "x"\ntopology = "ring:4"\ninsecure = true\n')
    assert "[hosts] and [nodes]" in rumor("deploy", "hosts", str(path), code=2)
    path.write_text("name = [")
    assert "not valid TOML" in rumor("deploy", "check", str(path), code=2)
    assert "No such file" in rumor("deploy", "check", str(tmp_path / "nope.toml"), code=2)


# ----------------------------------------------------------------------------- compose


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.skip("docker-compose is not installed (Debian package docker-compose)")
    return found


def test_compose_file_passes_docker_compose_config(tmp_path: Path) -> None:
    binary = _docker_compose()
    spec = _spec_file(tmp_path, TLS_SPEC)
    out = tmp_path / "compose"
    rumor("deploy", "compose", str(spec), "--out", str(out))
    checked = subprocess.run(
        [binary, "config"], cwd=out, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stderr
    resolved = yaml.safe_load(checked.stdout)
    assert sorted(resolved["services"]) == [f"node-{i}" for i in range(4)]
    node = resolved["services"]["node-2"]
    assert node["command"] == ["node", "--config", "/etc/rumor/node-2.toml"]
    assert node["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert Path(node["build"]["context"], "deploy/docker/Dockerfile").is_file()
    mounts = {v["target"]: v for v in node["volumes"]}
    assert mounts["/etc/rumor/node-2.toml"]["read_only"] is True
    assert mounts["/var/lib/rumor"]["type"] == "volume"
    cfg = config_io.load(out / "node-2.toml")
    assert cfg.peers == {"node-1": "node-1:50051", "node-3": "node-3:50051"}
    assert cfg.advertise == "node-2:50051" and cfg.listen == "0.0.0.0:50051"
    # the node's own certificate and key, the CA and the token, all read-only mounts whose
    # sources exist; the config names them where they are mounted
    tls = {t: Path(v["source"]) for t, v in mounts.items() if v["type"] == "bind"}
    assert tls["/etc/rumor/tls/node.crt"] == (tmp_path / "certs/node-2/node.crt").resolve()
    assert tls["/etc/rumor/tls/node.key"] == (tmp_path / "certs/node-2/node.key").resolve()
    assert tls["/etc/rumor/token"] == (tmp_path / "token").resolve()
    assert all(p.is_file() for p in tls.values())
    assert all(v["read_only"] for v in mounts.values() if v["type"] == "bind")
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca, cfg.token_file) == (
        "/etc/rumor/tls/node.crt", "/etc/rumor/tls/node.key", "/etc/rumor/tls/ca.crt",
        "/etc/rumor/token",
    )  # fmt: skip
    assert not cfg.insecure
    # the check is real: a broken service is refused
    broken = (out / "docker-compose.yml").read_text().replace("stop_signal", "stop_sigal", 1)
    (out / "docker-compose.yml").write_text(broken)
    refused = subprocess.run([binary, "config"], cwd=out, capture_output=True, timeout=60)
    assert refused.returncode != 0


def test_dockerfile_is_slim_cpu_non_root_with_the_rumor_entrypoint() -> None:
    text = (REPO / "deploy" / "docker" / "Dockerfile").read_text()
    assert "FROM ${PYTHON_IMAGE}" in text and "python:3.11-slim" in text
    assert "ARG TORCH_SPEC=" in text and "download.pytorch.org/whl/cpu" in text
    assert "USER 10001:10001" in text and 'ENTRYPOINT ["rumor"]' in text
    # every folder the package is installed from is copied into the build
    pyproject = (REPO / "pyproject.toml").read_text()
    for folder in ("rumor", "node", "protocol", "algorithms", "topology"):
        assert f'"{folder}"' in pyproject and f"COPY {folder} ./{folder}" in text


# ----------------------------------------------------------------------------- Kubernetes


def test_k8s_manifests_pass_kubernetes_validate(tmp_path: Path) -> None:
    spec_path = _spec_file(tmp_path, TLS_SPEC)
    out = tmp_path / "k8s"
    printed = rumor("deploy", "k8s", str(spec_path), "--out", str(out), "--namespace", "ml")
    files = sorted(out.glob("*.yaml"))
    assert [f.name for f in files] == ["configmap.yaml", "service.yaml", "statefulset.yaml"]
    docs = {f.name: yaml.safe_load(f.read_text()) for f in files}
    for version in ("1.28.0", "1.37.0"):  # the pod-index label needs 1.28 or later
        for doc in docs.values():
            kubernetes_validate.validate(doc, version, strict=True)
    cm, svc, sts = docs["configmap.yaml"], docs["service.yaml"], docs["statefulset.yaml"]
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "secure"
    assert sts["spec"]["replicas"] == 4 and cm["metadata"]["namespace"] == "ml"
    # pod ordinal i -> node-i: its config key, and its peers at their stable network ids
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["node", "--config", "/etc/rumor/node-$(POD_INDEX).toml"]
    for i in range(4):
        cfg = config_io.from_dict(config_io.tomllib.loads(cm["data"][f"node-{i}.toml"]))
        assert cfg.node_id == f"node-{i}" and cfg.advertise == f"secure-{i}.secure:50051"
        assert cfg.peers == {
            f"node-{j}": f"secure-{j}.secure:50051" for j in ((i - 1) % 4, (i + 1) % 4)
        }
        assert cfg.tls_cert == f"/etc/rumor/tls/node-{i}.crt"
    # the Secret is referenced, never written; the printed command makes it from the files
    sources = sts["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
    secret = next(s["secret"] for s in sources if "secret" in s)
    assert secret["name"] == "secure-secrets"
    paths = {item["key"]: item["path"] for item in secret["items"]}
    assert paths["node-3.key"] == "tls/node-3.key" and paths["token"] == "token"
    assert "PRIVATE KEY" not in "".join(f.read_text() for f in files)
    assert "kubectl create secret generic secure-secrets --namespace ml" in printed
    assert f"node-3.key={tmp_path / 'certs/node-3/node.key'}" in printed
    # the check is real: a broken manifest is refused
    bad = yaml.safe_load(files[2].read_text().replace("replicas: 4", 'replicas: "four"'))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.37.0", strict=True)
    typo = yaml.safe_load(files[1].read_text().replace("clusterIP", "clusterIp"))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, "1.37.0", strict=True)


def test_the_example_manifests_in_deploy_k8s_are_still_valid() -> None:
    # deploy/k8s is `rumor deploy k8s examples/cluster.toml --out deploy/k8s`, kept to read
    folder = REPO / "deploy" / "k8s"
    docs = {f.name: yaml.safe_load(f.read_text()) for f in folder.glob("*.yaml")}
    assert sorted(docs) == ["configmap.yaml", "service.yaml", "statefulset.yaml"]
    for doc in docs.values():
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
    spec = load(EXAMPLE)
    for node_id, text in docs["configmap.yaml"]["data"].items():
        cfg = config_io.from_dict(config_io.tomllib.loads(text))
        assert f"{cfg.node_id}.toml" == node_id and cfg.n_nodes == spec.n_nodes


# ----------------------------------------------------------------------------- hosts


def test_hosts_prints_each_machines_commands_and_writes_units_and_keys(tmp_path: Path) -> None:
    body = TLS_SPEC + '[hosts]\na = "10.1.0.1"\nb = "fd00::2"\n[nodes]\n'
    body += 'node-0 = "a"\nnode-1 = { host = "a", port = 50052 }\nnode-2 = "b"\nnode-3 = "b"\n'
    body = body.replace('topology = "ring:4"', 'topology = "ring"\nport = 7000')
    spec = _spec_file(
        tmp_path, body.replace('node-3 = "b"', 'node-3 = { host = "b", port = 7001 }')
    )
    out = tmp_path / "out"
    printed = rumor("deploy", "hosts", str(spec), "--out", str(out), "--rumor-bin", "/opt/r/rumor")
    assert printed == (
        "# on a (10.1.0.1)\n"
        "/opt/r/rumor node --config /etc/rumor/node-0.toml\n"
        "/opt/r/rumor node --config /etc/rumor/node-1.toml\n"
        "\n"
        "# on b (fd00::2)\n"
        "/opt/r/rumor node --config /etc/rumor/node-2.toml\n"
        "/opt/r/rumor node --config /etc/rumor/node-3.toml\n"
    )
    assert sorted(p.name for p in (out / "a").iterdir()) == [
        "node-0.toml", "node-1.toml", "rumor-node-0.service", "rumor-node-1.service", "tls",
        "token",
    ]  # fmt: skip
    cfg = config_io.load(out / "b" / "node-3.toml")
    assert cfg.advertise == "[fd00::2]:7001" and cfg.listen == "0.0.0.0:7001"
    assert cfg.peers == {"node-0": "10.1.0.1:7000", "node-2": "[fd00::2]:7000"}
    assert cfg.tls_key == "/etc/rumor/tls/node-3.key" and cfg.token_file == "/etc/rumor/token"
    key = out / "b" / "tls" / "node-3.key"
    assert key.read_bytes() == (tmp_path / "certs/node-3/node.key").read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "b" / "token").stat().st_mode) == 0o600
    assert not (out / "b" / "tls" / "node-0.key").exists()  # only this machine's keys
    unit = (out / "b" / "rumor-node-3.service").read_text()
    assert "ExecStart=/opt/r/rumor node --config /etc/rumor/node-3.toml\n" in unit
    assert "StateDirectory=rumor" in unit and "User=rumor" in unit


def test_hosts_refuses_when_certificates_are_missing(tmp_path: Path) -> None:
    body = TLS_SPEC.replace('token_file = "token"\n', "")
    body += '[hosts]\na = "10.1.0.1"\n[nodes]\n' + "".join(
        f'node-{i} = {{ host = "a", port = {7000 + i} }}\n' for i in range(4)
    )
    spec = _spec_file(tmp_path, body, certs=False)
    out = rumor("deploy", "hosts", str(spec), "--out", str(tmp_path / "out"), code=2)
    assert "certificates not found" in out and "rumor keys" in out
    # compose and k8s only reference them, and warn
    assert "certificates not there yet" in rumor("deploy", "k8s", str(spec), "-o", str(tmp_path))


# ----------------------------------------------------------------------------- YAML


def test_yaml_writer_round_trips_through_a_yaml_parser() -> None:
    doc = {
        "on": "yes",
        "n": None,
        "ports": ["50051", 50051, 1.5, True],
        "empty": {},
        "none": [],
        "nested": [{"a": {"b": [1, {"c": "d: e"}]}}, [1, 2], "x"],
        "toml": 'node_id = "node-0"\n\n[peers]\n"node-1" = "h:1"\n',
        "weird": "  lead\ttab\n\nend\n\n",
        "#key": "'quoted' \"both\" \\ back",
    }
    assert yaml.safe_load(yamltext.dumps(doc)) == doc
    assert list(yaml.safe_load_all(yamltext.dumps_all([doc, {"a": 1}]))) == [doc, {"a": 1}]
