"""Offline checks of the Kubernetes manifests in deploy/k8s (no cluster needed).

Renders every kustomize overlay with `kubectl kustomize`, then: yamllint on deploy/, strict schema
validation of built-in kinds (kubernetes-validate), custom resources against ../shared/k8s-schemas,
checkov, every container command line against pdserve's real argument parser, the image set in one
place, and structural assertions on every overlay (GPUs per pod == --tp-size, the router lists exactly the
instances) and on each 2x8 layout. Missing tools skip with a message naming the tool; they never pass.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
SCHEMAS = Path(os.environ.get("PDSERVE_K8S_SCHEMAS", ROOT.parent / "shared" / "k8s-schemas"))
K8S_VERSION = "1.31.0"
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "networking.k8s.io", "rbac.authorization.k8s.io", "autoscaling"}
GPU_ROLES = ("prefill", "decode")
# overlay -> (instances per role, GPUs per instance = --tp-size); each role fills one 8-GPU node.
LAYOUTS = {"2x8-single-gpu": (8, 1), "2x8-tp4": (2, 4), "2x8-tp8": (1, 8)}
IMAGE = "ghcr.io/example/pdserve"  # the name every manifest uses; its tag/digest is set in base only


def _tool(name: str) -> str | None:
    """The test venv's tool, else scripts/setup.sh's tools venv (checkov needs its own), else PATH."""
    for bin_dir in (Path(sys.executable).parent, Path(__file__).resolve().parents[1] / ".venv-tools" / "bin"):
        if (bin_dir / name).exists():
            return str(bin_dir / name)
    return shutil.which(name)


def _render(path: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found on PATH: cannot render the kustomize overlays (install kubectl >= 1.27)")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


_cache: dict[Path, list[dict]] = {}


def rendered(path: Path) -> list[dict]:
    if path not in _cache:
        _cache[path] = _render(path)
    return _cache[path]


def _by(docs: list[dict], kind: str, name: str) -> dict:
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def _container(obj: dict) -> dict:
    (c,) = obj["spec"]["template"]["spec"]["containers"]
    return c


def _workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def test_overlays_exist() -> None:
    names = {p.name for p in OVERLAYS}
    assert set(LAYOUTS) <= names, names


def test_yamllint() -> None:
    try:
        from yamllint import linter
        from yamllint.config import YamlLintConfig
    except ImportError:
        pytest.skip("yamllint is not installed (pip install -e '.[dev]')")
    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint"))
    files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") or p.name == ".yamllint")
    assert files
    problems = []
    for f in files:
        for p in linter.run(f.read_text(), conf, str(f)):
            if p.level == "error":
                problems.append(f"{f.relative_to(ROOT)}:{p.line}:{p.column}: {p.message} ({p.rule})")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", [K8S / "base", *OVERLAYS], ids=lambda p: p.name)
def test_kustomize_renders(path: Path) -> None:
    docs = rendered(path)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "StatefulSet", "Service", "Deployment", "PodDisruptionBudget"} <= kinds
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == "pdserve", d["metadata"]


@pytest.mark.parametrize("path", [K8S / "base", *OVERLAYS], ids=lambda p: p.name)
def test_schema_validation(path: Path) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[dev]')")
    for d in rendered(path):
        group = d["apiVersion"].rpartition("/")[0] if "/" in d["apiVersion"] else ""
        if group in BUILTIN_GROUPS:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        else:
            _validate_cr(d)


def _validate_cr(doc: dict) -> None:
    """Custom resources go against the JSON Schemas in shared/k8s-schemas (the CI checkout has it at
    ../shared); a CR kind without a schema there fails."""
    import jsonschema

    if not SCHEMAS.is_dir():
        pytest.skip(f"custom resource {doc['kind']} needs schemas from {SCHEMAS}, which is missing")
    version = doc["apiVersion"].rpartition("/")[2]
    schema_file = SCHEMAS / f"{doc['kind'].lower()}_{version}.json"
    assert schema_file.exists(), f"no schema for {doc['apiVersion']} {doc['kind']} in {SCHEMAS}"
    jsonschema.validate(doc, json.loads(schema_file.read_text()))


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_checkov(path: Path, tmp_path: Path) -> None:
    """Every check passes or is skipped by a `checkov.io/skipN: ID=reason` annotation in the manifests."""
    checkov = _tool("checkov")
    if checkov is None:
        pytest.skip("checkov is not installed (pip install checkov==3.3.30, ideally in its own venv)")
    docs = rendered(path)
    f = tmp_path / "rendered.yaml"
    f.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    out = subprocess.run(
        [checkov, "-f", str(f), "--framework", "kubernetes", "--skip-download", "--compact", "--quiet", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert out.returncode in (0, 1), out.stderr
    report = json.loads(out.stdout) if out.stdout.strip() else {}
    failed = report.get("results", {}).get("failed_checks", []) if isinstance(report, dict) else []
    assert out.returncode == 0 and not failed, (
        "\n".join(f"{c['check_id']} {c['resource']}" for c in failed) or out.stdout[-2000:]
    )
    # Every skip carries a reason.
    for d in docs:
        for k, v in (d["metadata"].get("annotations") or {}).items():
            if k.startswith("checkov.io/skip"):
                assert re.fullmatch(r"CKV2?_K8S_\d+=.{10,}", v), f"{d['kind']}/{d['metadata']['name']}: {k}: {v}"


def _argv(container: dict) -> list[str]:
    env_names = {e["name"] for e in container.get("env", [])}
    argv = list(container.get("command", [])) + list(container.get("args", []))

    def expand(s: str) -> str:
        def sub(m: re.Match[str]) -> str:
            assert m.group(1) in env_names, f"$({m.group(1)}) is not defined in the container env"
            return "10.0.0.1"

        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, s)

    return [expand(a) for a in argv]


def _flag(argv: list[str], flag: str, default: str | None = None) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else default


def _gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def _gib(quantity: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi|Ti)", str(quantity))
    assert m, f"unexpected quantity {quantity!r}"
    return float(m.group(1)) * {"Mi": 1 / 1024, "Gi": 1, "Ti": 1024}[m.group(2)]


def _parse(argv: list[str]) -> tuple[argparse.Namespace, bool]:
    """pdserve's own parser on a container's argv. (args, True) when it parses only without `--tp-size N`:
    the CLI does not have tensor parallelism yet; every other flag must still parse."""
    from pdserve import cli

    try:
        return cli.build_parser().parse_args(argv[1:]), False
    except SystemExit:
        if "--tp-size" not in argv:
            raise
    i = argv.index("--tp-size")
    return cli.build_parser().parse_args(argv[1:i] + argv[i + 2 :]), True


@pytest.mark.parametrize("path", [K8S / "base", *OVERLAYS], ids=lambda p: p.name)
def test_command_lines_parse(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from router.config import router_config

    no_tp_flag = []
    for w in _workloads(rendered(path)):
        for c in w["spec"]["template"]["spec"]["containers"]:
            argv = _argv(c)
            assert argv[0] == "pdserve", argv
            # PDSERVE_* twins are parser defaults: literal values in the manifest must parse too.
            for e in c.get("env", []):
                if e["name"].startswith("PDSERVE_"):
                    monkeypatch.setenv(e["name"], e.get("value", "10.0.0.1"))
            try:
                args, without_tp = _parse(argv)
            except SystemExit as exc:
                pytest.fail(f"{w['kind']}/{w['metadata']['name']}: {argv} does not parse ({exc})")
            if args.command == "router":
                router_config(args)  # URLs, ports, no duplicates
                continue
            assert args.host == "0.0.0.0"
            port_names = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert port_names["http"] == args.port
            if args.command == "prefill":
                assert port_names["bootstrap"] == args.bootstrap_port
            if without_tp:
                no_tp_flag.append(w["metadata"]["name"])
            else:
                assert getattr(args, "tp_size", 1) == _gpus(c), f"{w['metadata']['name']}: --tp-size != GPU count"
    if no_tp_flag:
        pytest.skip(f"pdserve's CLI has no --tp-size yet: {no_tp_flag} parse only without it (all else checked)")


# ---- every overlay: GPUs per pod == --tp-size, the router lists exactly the instances ----


@pytest.mark.parametrize("path", [K8S / "base", *OVERLAYS], ids=lambda p: p.name)
def test_gpus_match_tp_size(path: Path) -> None:
    for role in GPU_ROLES:
        c = _container(_by(rendered(path), "StatefulSet", role))
        argv = _argv(c)
        tp = int(_flag(argv, "--tp-size", "1"))
        res = c["resources"]
        assert res["requests"] == res["limits"], role
        assert _gpus(c) == tp >= 1, f"{path.name} {role}: {_gpus(c)} GPUs but --tp-size {tp}"
        if tp > 1:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["NCCL_SOCKET_IFNAME"] and env["GLOO_SOCKET_IFNAME"], env
            assert env["NCCL_IB_HCA"].split(",") == _flag(argv, "--ib-device").split(","), "NCCL and Mooncake NICs"
            pod = _by(rendered(path), "StatefulSet", role)["spec"]["template"]["spec"]
            shm = {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]
            assert shm["medium"] == "Memory" and _gib(shm["sizeLimit"]) >= 8 * tp, shm
            assert _gib(res["limits"]["memory"]) > 2 * _gib(shm["sizeLimit"]), res


@pytest.mark.parametrize("path", [K8S / "base", *OVERLAYS], ids=lambda p: p.name)
def test_router_lists_exactly_the_instances(path: Path) -> None:
    """Every prefill/decode pod by its stable StatefulSet DNS name, in order, and nothing else."""
    from pdserve import cli
    from router.config import router_config

    docs = rendered(path)
    n = {role: _by(docs, "StatefulSet", role)["spec"].get("replicas", 1) for role in GPU_ROLES}
    router = _by(docs, "Deployment", "router")
    cfg = router_config(cli.build_parser().parse_args(_argv(_container(router))[1:]))
    ns = "pdserve"
    assert [(p.url, p.bootstrap_port) for p in cfg.prefill] == [
        (f"http://prefill-{i}.prefill.{ns}.svc.cluster.local:30001", 8998) for i in range(n["prefill"])
    ]
    assert cfg.decode == [f"http://decode-{i}.decode.{ns}.svc.cluster.local:30002" for i in range(n["decode"])]
    c = _container(router)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readiness"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    pdb = _by(docs, "PodDisruptionBudget", "router")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= router["spec"]["template"]["metadata"]["labels"].items()
    assert router["spec"]["replicas"] > pdb["spec"]["minAvailable"]
    # Discovery is by DNS: no RBAC objects and no API token in any pod.
    assert not [d for d in docs if d["kind"] in ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")]
    for w in _workloads(docs):
        assert w["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


# ---- the 2x8 layouts ----


@pytest.mark.parametrize(("name", "instances", "gpus"), [(k, *v) for k, v in LAYOUTS.items()])
def test_gpu_pods_structure(name: str, instances: int, gpus: int) -> None:
    docs = rendered(K8S / "overlays" / name)
    single = rendered(K8S / "overlays" / "2x8-single-gpu")
    assert instances * gpus == 8  # each role fills its 8-GPU node exactly
    for role in GPU_ROLES:
        sts = _by(docs, "StatefulSet", role)
        svc = _by(docs, "Service", role)
        spec = sts["spec"]
        pod = spec["template"]["spec"]
        c = _container(sts)
        other = "decode" if role == "prefill" else "prefill"
        assert spec["replicas"] == instances
        assert spec["serviceName"] == role and svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
        # Anti-affinity against the other role, per node, and a node pool for this role.
        terms = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert any(
            t["topologyKey"] == "kubernetes.io/hostname"
            and any(
                e["key"] == "app.kubernetes.io/component" and e["values"] == [other]
                for e in t["labelSelector"]["matchExpressions"]
            )
            for t in terms
        ), terms
        assert pod["nodeSelector"] == {"pdserve.io/pool": role}
        # GPUs (= --tp-size) + RDMA, requests == limits; per GPU the same CPU and memory as a single-GPU pod.
        res = c["resources"]
        assert _gpus(c) == gpus and res["requests"] == res["limits"]
        argv = _argv(c)
        assert _flag(argv, "--tp-size") == (str(gpus) if gpus > 1 else None), argv
        one = _container(_by(single, "StatefulSet", role))["resources"]["limits"]
        assert int(res["limits"]["cpu"]) == gpus * int(one["cpu"])
        assert _gib(res["limits"]["memory"]) == gpus * _gib(one["memory"])
        assert any(k.startswith("rdma/") for k in res["limits"]), res
        assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
        # Root on purpose (the image's default user is not root; IPC_LOCK is only effective for root).
        assert pod["securityContext"]["runAsUser"] == 0
        # /dev/shm is a memory-backed emptyDir, larger for TP pods (NCCL).
        vols = {v["name"]: v for v in pod["volumes"]}
        shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm and vols[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
        one_pod = _by(single, "StatefulSet", role)["spec"]["template"]["spec"]
        if gpus > 1:
            one_shm = {v["name"]: v for v in one_pod["volumes"]}["dshm"]["emptyDir"]["sizeLimit"]
            assert _gib(vols[shm[0]["name"]]["emptyDir"]["sizeLimit"]) > _gib(one_shm)
        # Pod IP through the Downward API, advertised to peers.
        env = {e["name"]: e for e in c["env"]}
        for var in ("POD_IP", "PDSERVE_ADVERTISE_HOST", "MC_TCP_BIND_ADDRESS"):
            assert env[var]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", var
        assert any(n.startswith("MC_") for n in env) and any(n.startswith("UCX_") for n in env)
        assert ("NCCL_SOCKET_IFNAME" in env) == (gpus > 1)
        # Probes on /health, generous startup.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 900
        # Named ports, and RDMA transfer flags on every NIC of the node (a comma list).
        names = {p["name"] for p in c["ports"]}
        assert names == ({"http", "bootstrap"} if role == "prefill" else {"http"})
        assert "--transfer-backend mooncake --mooncake-protocol rdma --ib-device mlx5_" in " ".join(argv)
        assert len(_flag(argv, "--ib-device").split(",")) == 8
        assert "--model /models/" in " ".join(argv)


# ---- the image, set in one place ----


def _base_image() -> str:
    (entry,) = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["images"]
    assert entry["name"] == IMAGE, entry
    name = entry.get("newName", IMAGE)
    return f"{name}@{entry['digest']}" if "digest" in entry else f"{name}:{entry['newTag']}"


def test_image_set_in_one_place() -> None:
    """Manifests name the image untagged; only base/kustomization.yaml's `images:` sets a tag or digest."""
    for f in sorted(K8S.rglob("*.yaml")):
        text = f.read_text()
        if f.name == "kustomization.yaml":
            k = yaml.safe_load(text)
            assert ("images" in k) == (f.parent == K8S / "base"), f"{f}: set the image in base/kustomization.yaml"
            continue
        for image in re.findall(r"^\s*-?\s*image:\s*(\S+)", text, re.M):
            assert image == IMAGE, f"{f}: image {image} (set its tag or digest in base/kustomization.yaml only)"
        assert not re.search(r"path:\s*\S*/image\s*$", text, re.M), f"{f} patches an image"
    _base_image()


@pytest.mark.parametrize("path", [K8S / "base", *OVERLAYS], ids=lambda p: p.name)
def test_every_container_runs_the_base_image(path: Path) -> None:
    images = {c["image"] for w in _workloads(rendered(path)) for c in w["spec"]["template"]["spec"]["containers"]}
    assert images == {_base_image()}


def test_setting_the_image_in_base_reaches_every_overlay(tmp_path: Path) -> None:
    """What `kustomize edit set image ghcr.io/example/pdserve=<registry>/pdserve@sha256:...` writes in base/."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kfile = copy / "base" / "kustomization.yaml"
    k = yaml.safe_load(kfile.read_text())
    digest = "sha256:" + "0" * 64
    k["images"] = [{"name": IMAGE, "newName": "registry.example.com/team/pdserve", "digest": digest}]
    kfile.write_text(yaml.safe_dump(k, sort_keys=False))
    for overlay in OVERLAYS:
        docs = _render(copy / "overlays" / overlay.name)
        images = {c["image"] for w in _workloads(docs) for c in w["spec"]["template"]["spec"]["containers"]}
        assert images == {f"registry.example.com/team/pdserve@{digest}"}, overlay.name
