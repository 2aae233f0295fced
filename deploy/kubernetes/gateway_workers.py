"""The workers of a rendered kustomize overlay, as the nginx renderer takes them.

Reads the manifests (`kubectl kustomize OVERLAY`) on stdin and prints a JSON list, one entry per worker pod:
{"host": "<pod>.<service>.<namespace>.svc.cluster.local", "port": 8000, "precision": "fp4", "id": "flux_worker_0"}
— the stable DNS name of each StatefulSet pod, its port (FLUX_PORT), its precision (main_<precision>.py)
and its worker id, the pod name with every character FLUX_WORKER_ID does not take turned into "_"
(the transform the pod's entry command makes).

    kubectl kustomize overlays/mixed | python3 gateway_workers.py [--namespace NS]
"""
from __future__ import annotations

import argparse
import json
import re
import sys

import yaml


def worker_id(pod_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", pod_name)


def workers(docs: list[dict], namespace: str | None = None) -> list[dict]:
    out = []
    for doc in docs:
        if not doc or doc.get("kind") != "StatefulSet":
            continue
        meta, spec = doc["metadata"], doc["spec"]
        ns = namespace or meta.get("namespace") or "default"
        container = spec["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        match = re.fullmatch(r"main_(bf16|fp4|fp8)\.py", env.get("WORKER_SCRIPT") or "")
        if match is None:
            raise SystemExit(f"{meta['name']}: WORKER_SCRIPT must be main_<precision>.py")
        for i in range(int(spec.get("replicas", 1))):
            pod = f"{meta['name']}-{i}"
            out.append({"host": f"{pod}.{spec['serviceName']}.{ns}.svc.cluster.local",
                        "port": int(env.get("FLUX_PORT") or 8000), "precision": match.group(1),
                        "id": worker_id(pod)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", help="the namespace the workers run in (default: the manifests')")
    args = parser.parse_args()
    found = workers(list(yaml.safe_load_all(sys.stdin)), args.namespace)
    if not found:
        raise SystemExit("no StatefulSet of workers in the manifests")
    json.dump(found, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
