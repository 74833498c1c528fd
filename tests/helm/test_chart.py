"""Renders, lints and validates the Helm chart offline, then checks what must hold.

Uses the Helm SDK (PyPI helm-python-sdk; no helm binary, no cluster) and kubernetes-validate
(--strict) for a current Kubernetes version. Prints one line per check and a final
"N passed, M failed" line; exits non-zero on any failure.
"""

import pathlib
import sys

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "custodian"
KUBE = "1.37.0"
VALUE_SETS = {
    "default": ROOT / "tests" / "helm" / "default-values.yaml",
    "production": ROOT / "tests" / "helm" / "production-values.yaml",
}

passed, failed = 0, 0


def check(name, condition, detail=""):
    global passed, failed
    if condition:
        passed += 1
        print(f"PASS {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def pods(doc):
    kind = doc.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet"):
        return [doc["spec"]["template"]["spec"]]
    if kind == "Job":
        return [doc["spec"]["template"]["spec"]]
    return []


for label, path in VALUE_SETS.items():
    values = yaml.safe_load(path.read_text())
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE}")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    check(f"{label}: helm lint --strict is clean", not problems and not report.get("errors"), f"{problems} {report.get('errors')}")

    chart = helm.Chart.load(CHART)
    chart.validate_schema(values)
    rendered = chart.render(values, name="custodian", namespace="custodian", is_install=True)
    docs = []
    for template, text in rendered.items():
        if template.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    check(f"{label}: rendered {len(docs)} manifests", len(docs) > 5)

    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, KUBE, strict=True)
            check(f"{label}: {name} validates against Kubernetes {KUBE} (strict)", True)
        except Exception as error:  # noqa: BLE001 - report whatever the validator raises
            check(f"{label}: {name} validates against Kubernetes {KUBE} (strict)", False, str(error)[:300])

    # Every container runs as non-root with a read-only root filesystem, dropping all capabilities.
    for doc in docs:
        for spec in pods(doc):
            security = spec.get("securityContext", {})
            for container in spec["containers"]:
                c = container.get("securityContext", {})
                check(
                    f"{label}: {doc['metadata']['name']}/{container['name']} is non-root, read-only, drops ALL",
                    security.get("runAsNonRoot") is True
                    and c.get("readOnlyRootFilesystem") is True
                    and c.get("allowPrivilegeEscalation") is False
                    and c.get("capabilities", {}).get("drop") == ["ALL"]
                    and security.get("seccompProfile", {}).get("type") == "RuntimeDefault",
                )

    # Runner NetworkPolicies admit only gateway pods, on the mTLS port.
    runner_policies = [d for d in docs if d["kind"] == "NetworkPolicy" and "runner" in d["metadata"]["name"]]
    check(f"{label}: one NetworkPolicy per runner pool", len(runner_policies) == len(values.get("runners", {}).get("pools", [{}])))
    for policy in runner_policies:
        ingress = policy["spec"]["ingress"]
        sources = [s for rule in ingress for s in rule.get("from", [])]
        check(
            f"{label}: {policy['metadata']['name']} admits only the gateway",
            len(ingress) == 1
            and len(sources) == 1
            and sources[0].get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == "gateway"
            and "namespaceSelector" not in sources[0]
            and "ipBlock" not in sources[0],
        )

    # Secrets are referenced, never inlined into ConfigMaps.
    secret_values = [v for v in [values.get("keys", {}).get("masterKey"), values.get("database", {}).get("url")] if v]
    config_text = "\n".join(yaml.safe_dump(d) for d in docs if d["kind"] == "ConfigMap")
    check(f"{label}: no secret value in any ConfigMap", not any(v in config_text for v in secret_values))
    gateway = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "custodian-custodian")
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    check(
        f"{label}: master key and database URL come from Secrets",
        "secretKeyRef" in env["CUSTODIAN_MASTER_KEY"].get("valueFrom", {})
        and "secretKeyRef" in env["CUSTODIAN_DATABASE__URL"].get("valueFrom", {}),
    )

    # Migrations run as a pre-install/pre-upgrade hook.
    hooks = [d for d in docs if d["kind"] == "Job" and "pre-install" in d["metadata"].get("annotations", {}).get("helm.sh/hook", "")]
    check(f"{label}: migration Job is a pre-install,pre-upgrade hook", len(hooks) == 1 and "pre-upgrade" in hooks[0]["metadata"]["annotations"]["helm.sh/hook"])
    check(f"{label}: the hook runs `custodian migrate`", hooks and hooks[0]["spec"]["template"]["spec"]["containers"][0]["args"][0] == "migrate")

# Bad values are refused by the schema.
try:
    helm.Chart.load(CHART).validate_schema({**yaml.safe_load(VALUE_SETS["default"].read_text()), "publicUrl": "not a url"})
    check("schema refuses a bad publicUrl", False)
except helm.HelmValuesError:
    check("schema refuses a bad publicUrl", True)

print(f"helm: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
