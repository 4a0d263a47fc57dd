#!/usr/bin/env bash
# Checks the Kubernetes manifests offline: renders the base and every overlay with
# `kubectl kustomize`, validates each rendering (and models-loader.yaml) against the
# Kubernetes API schemas with `kubernetes-validate --strict`, then checks what the schemas
# cannot: the expected objects are there, the pods are locked down, the GPU is asked for in
# the gpu overlay only, and every number in the sources carries a comment. Last, the Grafana
# dashboard (deploy/grafana) is valid JSON and queries only metrics sibyl's sources declare.
#
# Needs kubectl and python3 (with venv). kubernetes-validate is installed from PyPI into a
# virtual environment under ~/.cache/sibyl/pytools the first time, and reused after.
#
#   deploy/k8s/check.sh
#
# Environment: KUBERNETES_VERSIONS (space separated, default: the newest version the installed
# kubernetes-validate knows, and 1.30.0, the oldest this deployment supports: preStop sleep is
# on by default from 1.30).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

validator_version=1.37.0
venv="${XDG_CACHE_HOME:-$HOME/.cache}/sibyl/pytools/k8s-venv"
python="$venv/bin/python"

command -v kubectl >/dev/null || { echo "check.sh: kubectl is not on PATH" >&2; exit 1; }

installed="$("$python" -c 'from kubernetes_validate.version import __version__; print(__version__)' 2>/dev/null || true)"
if [[ "$installed" != "$validator_version" ]]; then
    echo "== installing kubernetes-validate $validator_version into $venv"
    python3 -m venv --clear "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "kubernetes-validate==$validator_version"
fi

newest="$("$python" -c 'import kubernetes_validate.utils as u; print(u.latest_version())')"
read -r -a versions <<<"${KUBERNETES_VERSIONS:-$newest 1.30.0}"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

targets=(base overlays/cpu overlays/gpu)
echo "== kubectl kustomize ($(kubectl version --client 2>/dev/null | tr '\n' ' '))"
for target in "${targets[@]}"; do
    rendered="$out/${target//\//-}.yaml"
    kubectl kustomize "$target" >"$rendered"
    echo "rendered $target: $(grep -c '^kind:' "$rendered") objects"
done
cp models-loader.yaml "$out/models-loader.yaml"

echo "== kubernetes-validate $validator_version --strict, Kubernetes ${versions[*]}"
version_args=()
for version in "${versions[@]}"; do
    version_args+=(-k "$version")
done
for file in "$out"/*.yaml; do
    # It exits 0 on a kind it has no schema for (a WARN line), so any line other than INFO
    # fails the check.
    status=0
    report="$("$venv/bin/kubernetes-validate" --strict "${version_args[@]}" "$file")" || status=$?
    if [[ $status -ne 0 ]] || grep -qv '^INFO ' <<<"$report"; then
        grep -v '^INFO ' <<<"$report" >&2 || true
        echo "check.sh: $(basename "$file") does not validate" >&2
        exit 1
    fi
    echo "valid $(basename "$file"): $(grep -c '^INFO ' <<<"$report") object x version checks"
done

echo "== contents"
"$python" - "$out" <<'PYTHON'
import sys
from pathlib import Path

import yaml

out = Path(sys.argv[1])
errors = []


def fail(where, message):
    errors.append(f"{where}: {message}")


EXPECTED = {
    ("Namespace", "sibyl"),
    ("PersistentVolumeClaim", "sibyl-models"),
    ("NetworkPolicy", "sibyl-default-deny"),
    ("NetworkPolicy", "sibyl-allow-dns"),
    ("ConfigMap", "sibyl-common"),
}
for role, kinds in {
    "sibyl-gateway": ["ServiceAccount", "ConfigMap", "Deployment", "Service",
                      "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"],
    "sibyl-verifier": ["ServiceAccount", "ConfigMap", "Deployment", "Service",
                       "PodDisruptionBudget", "NetworkPolicy"],
    "sibyl-drafter-ngram": ["ServiceAccount", "ConfigMap", "Deployment", "Service",
                            "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"],
    "sibyl-drafter-retrieval": ["ServiceAccount", "ConfigMap", "Deployment", "Service",
                                "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                "NetworkPolicy"],
    "sibyl-drafter-suffix": ["ServiceAccount", "ConfigMap", "StatefulSet", "Service",
                             "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"],
}.items():
    EXPECTED |= {(kind, role) for kind in kinds}

MODEL = {
    "base": "/models/qwen2.5-coder-0.5b.gguf",
    "overlays-cpu": "/models/qwen2.5-coder-0.5b.gguf",
    "overlays-gpu": "/models/qwen2.5-coder-1.5b.gguf",
}
DRAFTERS = ("sibyl-drafter-ngram", "sibyl-drafter-retrieval", "sibyl-drafter-suffix")
GRPC_PORT = {"sibyl-gateway": 50051, "sibyl-verifier": 50052} | {d: 50061 for d in DRAFTERS}
METRICS_PORT = {"sibyl-gateway": "9090", "sibyl-verifier": "9090"} | {d: "9090" for d in DRAFTERS}


def base_name(obj):
    """A generated ConfigMap's name without kustomize's hash suffix."""
    name = obj["metadata"]["name"]
    if obj["kind"] == "ConfigMap":
        name = name.rsplit("-", 1)[0]
    return name


def check_pod(where, name, pod, containers_extra):
    spec = pod["spec"]
    annotations = pod["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" or \
            annotations.get("prometheus.io/port") != METRICS_PORT[name] or \
            annotations.get("prometheus.io/path") != "/metrics":
        fail(where, "prometheus.io scrape annotations missing or wrong")
    if spec.get("automountServiceAccountToken") is not False:
        fail(where, "automountServiceAccountToken is not false")
    if spec.get("serviceAccountName") != name:
        fail(where, f"serviceAccountName is not {name}")
    security = spec.get("securityContext", {})
    if security.get("runAsNonRoot") is not True or security.get("runAsUser") != 65532:
        fail(where, "pod does not run as non-root uid 65532")
    if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        fail(where, "pod seccomp profile is not RuntimeDefault")
    if not spec.get("terminationGracePeriodSeconds"):
        fail(where, "no terminationGracePeriodSeconds")
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    models = volumes.get("models", {}).get("persistentVolumeClaim", {})
    if models.get("claimName") != "sibyl-models" or models.get("readOnly") is not True:
        fail(where, "the models volume is not the sibyl-models claim, read-only")
    for container in spec["containers"]:
        at = f"{where} container {container['name']}"
        # The gpu overlay's verifier runs the image's CUDA variant; everything else the plain one.
        image = "sibyl:0.1.0-cuda" if (where.startswith("overlays-gpu") and name == "sibyl-verifier") \
            else "sibyl:0.1.0"
        if container.get("image") != image or \
                container.get("imagePullPolicy") != "IfNotPresent":
            fail(at, f"image is not {image} with imagePullPolicy IfNotPresent")
        security = container.get("securityContext", {})
        if security.get("readOnlyRootFilesystem") is not True:
            fail(at, "root filesystem is not read-only")
        if security.get("allowPrivilegeEscalation") is not False:
            fail(at, "privilege escalation is not disabled")
        if security.get("capabilities", {}).get("drop") != ["ALL"]:
            fail(at, "capabilities are not all dropped")
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(bound, {}):
                    fail(at, f"no {resource} in resources.{bound}")
        mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
        if mounts.get("models", {}).get("mountPath") != "/models" or \
                mounts["models"].get("readOnly") is not True:
            fail(at, "models not mounted read-only at /models")
        env_from = [e.get("configMapRef", {}).get("name", "") for e in container.get("envFrom", [])]
        if len(env_from) != 2 or not env_from[0].startswith("sibyl-common-") or \
                not env_from[1].startswith(f"{name}-"):
            fail(at, f"envFrom is not [sibyl-common, {name}]: {env_from}")
        # Health over TLS: `sibyl health` against the role's own port, checking the
        # certificate for the role's Service name.
        health = ["sibyl", "health", "--addr", f"127.0.0.1:{GRPC_PORT[name]}",
                  "--tls-ca", "/etc/sibyl/tls/ca.crt", "--tls-server-name", name]
        for probe in containers_extra["grpc_probes"]:
            if container.get(probe, {}).get("exec", {}).get("command") != health:
                fail(at, f"{probe} is not `{' '.join(health)}`")
        if mounts.get("tls", {}).get("mountPath") != "/etc/sibyl/tls" or \
                volumes.get("tls", {}).get("secret", {}).get("secretName") != "sibyl-tls":
            fail(at, "the Secret sibyl-tls is not mounted at /etc/sibyl/tls")
        if not container.get("lifecycle", {}).get("preStop", {}).get("sleep"):
            fail(at, "no preStop sleep (drain)")


for path in sorted(out.glob("*.yaml")):
    target = path.stem
    if target == "models-loader":
        continue
    objects = [o for o in yaml.safe_load_all(path.read_text()) if o]
    found = {(o["kind"], base_name(o)): o for o in objects}
    missing = EXPECTED - set(found)
    for kind, name in sorted(missing):
        fail(target, f"missing {kind} {name}")
    for obj in objects:
        where = f"{target} {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] not in ("Namespace", "PersistentVolume") and \
                obj["metadata"].get("namespace") != "sibyl":
            fail(where, "not in namespace sibyl")
        labels = obj["metadata"].get("labels", {})
        if labels.get("app.kubernetes.io/part-of") != "sibyl":
            fail(where, "no app.kubernetes.io/part-of=sibyl label")
        if obj["kind"] == "ServiceAccount" and obj.get("automountServiceAccountToken") is not False:
            fail(where, "automountServiceAccountToken is not false")
    for name in GRPC_PORT:
        deployment = found.get(("Deployment", name)) or found.get(("StatefulSet", name))
        if deployment:
            # Readiness follows gRPC health; liveness is a TCP connect on every role, so a
            # missing model file (NOT_SERVING, retried) never becomes a crash loop.
            template = deployment["spec"]["template"]
            check_pod(f"{target} Deployment/{name}", name, template,
                      {"grpc_probes": ["readinessProbe"]})
            for container in template["spec"]["containers"]:
                if "tcpSocket" not in container.get("livenessProbe", {}):
                    fail(f"{target} Deployment/{name}", "liveness is not a TCP connect")
                if "startupProbe" in container:
                    fail(f"{target} Deployment/{name}", "a startup probe restarts pods "
                         "whose model file is late")
    suffix = found.get(("StatefulSet", "sibyl-drafter-suffix"))
    if suffix:
        # Its snapshot on a volume of its own, its peers the pods of its headless Service.
        at = f"{target} StatefulSet/sibyl-drafter-suffix"
        spec = suffix["spec"]
        claims = [c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])]
        mounts = {m["name"]: m["mountPath"]
                  for m in spec["template"]["spec"]["containers"][0].get("volumeMounts", [])}
        config = found.get(("ConfigMap", "sibyl-drafter-suffix"), {}).get("data", {})
        if claims != ["suffix-index"] or mounts.get("suffix-index") != "/var/lib/sibyl":
            fail(at, "no volume claim suffix-index mounted at /var/lib/sibyl")
        if not config.get("SIBYL_SUFFIX_SNAPSHOT", "").startswith("/var/lib/sibyl/"):
            fail(at, "SIBYL_SUFFIX_SNAPSHOT is not on the index volume")
        if config.get("SIBYL_SUFFIX_PEERS") != "https://sibyl-drafter-suffix:50061" or \
                spec.get("serviceName") != "sibyl-drafter-suffix":
            fail(at, "the peers are not the pods of its headless Service, over TLS")
    for name in ("sibyl-verifier", *DRAFTERS):
        service = found.get(("Service", name))
        if service and service["spec"].get("clusterIP") != "None":
            fail(f"{target} Service/{name}", "not headless (clusterIP: None)")
    verifier = found.get(("Deployment", "sibyl-verifier"))
    if verifier:
        args = verifier["spec"]["template"]["spec"]["containers"][0].get("args", [])
        for drafter in DRAFTERS:
            kind = drafter.removeprefix("sibyl-drafter-")
            if args[:1] != ["verifier"] or f"{kind}=https://{drafter}:50061" not in args:
                fail(target, f"the verifier's args do not name the {kind} drafter: {args}")
    gateway = found.get(("Deployment", "sibyl-gateway"))
    if gateway and "https://sibyl-verifier:50052" not in \
            gateway["spec"]["template"]["spec"]["containers"][0].get("args", []):
        fail(target, "the gateway does not call the verifier over TLS")
    common = found.get(("ConfigMap", "sibyl-common"))
    for variable in ("SIBYL_TLS_CERT", "SIBYL_TLS_KEY", "SIBYL_TLS_CA"):
        if common and not common["data"].get(variable, "").startswith("/etc/sibyl/tls/"):
            fail(target, f"{variable} is not a file of the Secret sibyl-tls")
    if common and common["data"].get("SIBYL_MODEL") != MODEL[target]:
        fail(target, f"SIBYL_MODEL is {common['data'].get('SIBYL_MODEL')}, not {MODEL[target]}")
    gpu_text = "nvidia.com/gpu: 1" in path.read_text()
    if target == "overlays-gpu":
        spec = verifier["spec"]["template"]["spec"] if verifier else {}
        limits = spec.get("containers", [{}])[0].get("resources", {}).get("limits", {})
        if limits.get("nvidia.com/gpu") != 1:
            fail(target, "the verifier does not ask for nvidia.com/gpu: 1")
        verifier_config = found.get(("ConfigMap", "sibyl-verifier"))
        if not verifier_config or verifier_config["data"].get("SIBYL_DEVICE") != "cuda":
            fail(target, "the verifier does not compute on the GPU (SIBYL_DEVICE=cuda)")
        if not spec.get("nodeSelector") or not spec.get("tolerations"):
            fail(target, "the verifier has no nodeSelector or tolerations")
    elif gpu_text:
        fail(target, "asks for nvidia.com/gpu outside the gpu overlay")
    kinds = sorted({o["kind"] for o in objects})
    print(f"{target}: {len(objects)} objects, kinds {', '.join(kinds)}"
          + ("; verifier asks for nvidia.com/gpu: 1, SIBYL_DEVICE=cuda" if target == "overlays-gpu" else
             "; no nvidia.com/gpu"))

if errors:
    for error in errors:
        print(f"ERROR {error}", file=sys.stderr)
    sys.exit(1)
PYTHON

echo "== every number in the sources has a comment (on its line or the line above)"
"$python" - <<'PYTHON'
import re
import sys
from pathlib import Path

# A YAML value that is a number, a quantity (250m, 512Mi) or holds a port (HOST:8080), in a
# "key: value", "- value" or kustomize literal "KEY=value" line.
number = re.compile(r"""^["']?(\d+(\.\d+)?(m|Ki|Mi|Gi|Ti)?|.*:\d{2,5}(/.*)?)["']?$""")
bad = []
files = sorted(Path(".").rglob("*.yaml"))
for path in files:
    previous = ""
    for number_line, line in enumerate(path.read_text().splitlines(), 1):
        code, _, comment = line.partition(" #")
        stripped = code.strip()
        value = None
        if stripped and not stripped.startswith("#"):
            match = re.match(r"^(- )?([\w./-]+: |- |[A-Z_]+=)?(.+)$", stripped)
            if match and match.group(3):
                value = match.group(3).split("=", 1)[-1] if match.group(1) and "=" in match.group(3) else match.group(3)
                value = value.rsplit(": ", 1)[-1]
        if value and number.match(value) and not comment and not previous.strip().startswith("#"):
            bad.append(f"{path}:{number_line}: {line.strip()}")
        previous = line
if bad:
    print("numbers without a comment:", *bad, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"{len(files)} YAML files")
PYTHON

echo "== Grafana dashboard"
dashboard=../grafana/sibyl-dashboard.json
"$python" -m json.tool "$dashboard" >/dev/null
"$python" - "$dashboard" ../.. <<'PYTHON'
import json
import re
import sys
from pathlib import Path

dashboard = json.loads(Path(sys.argv[1]).read_text())
root = Path(sys.argv[2])
# Metric names as sibyl's sources declare them (string literals "sibyl_...").
declared = set()
for folder in ("crates", "services", "proto"):
    for source in (root / folder).glob("**/src/**/*.rs"):
        declared |= set(re.findall(r'"(sibyl_[a-z0-9_]+)"', source.read_text()))
queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
unknown = set()
for query in queries:
    for name in re.findall(r"\b(sibyl_[a-z0-9_]+)", query):
        if re.sub(r"_(bucket|sum|count)$", "", name) not in declared:
            unknown.add(name)
if not declared:
    sys.exit("check.sh: found no sibyl_* metric declared in the Rust sources")
if unknown:
    sys.exit(f"check.sh: the dashboard queries metrics no source declares: {sorted(unknown)}")
print(f"valid JSON, schemaVersion {dashboard['schemaVersion']}, {len(queries)} queries "
      f"over metrics the sources declare ({len(declared)} declared)")
PYTHON

echo "OK: base and overlays (cpu, gpu) render, validate against Kubernetes ${versions[*]} and hold what they should; the dashboard's queries name declared metrics"
