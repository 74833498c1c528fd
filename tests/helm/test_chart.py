"""Renders, lints and validates the Helm chart offline, then checks what must hold.

Uses the Helm SDK (PyPI helm-python-sdk; no helm binary, no cluster) and kubernetes-validate
(--strict) for a current Kubernetes version. Runner pods must keep every run isolated under the
chart's defaults; the seccomp profile they use is also tried for real with bubblewrap on this
machine's kernel (seccomp_live.py). Prints one line per check and a final "N passed, M failed"
line; exits non-zero on any failure.
"""

import copy
import json
import os
import pathlib
import re
import sys
import tempfile
import tomllib

import helm_python as helm
import kubernetes_validate
import yaml

import pod_security
import seccomp_live

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "custodian"
PROFILE = json.loads((CHART / "files" / "runner-seccomp.json").read_text())
KUBE = "1.37.0"
VALUE_SETS = {
    "default": ROOT / "tests" / "helm" / "default-values.yaml",
    "production": ROOT / "tests" / "helm" / "production-values.yaml",
}
DANGER_FLAG = "--dangerously-run-without-isolation"
SPO_API = "security-profiles-operator.x-k8s.io/v1"

passed, failed = 0, 0


def check(name, condition, detail=""):
    global passed, failed
    if condition:
        passed += 1
        print(f"PASS {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def merged(base, override):
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def render(values):
    """(manifests, NOTES text) for `values`; raises what Helm raises."""
    chart = helm.Chart.load(CHART)
    chart.validate_schema(values)
    rendered = chart.render(values, name="custodian", namespace="custodian", is_install=True)
    docs, notes = [], ""
    for template, text in rendered.items():
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs, notes


def refused(values):
    """The error message when the chart refuses `values` (schema or template), else None."""
    try:
        render(values)
    except helm.HelmError as error:
        return str(error)
    return None


def pods(doc):
    if doc.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return [doc["spec"]["template"]["spec"]]
    return []


def is_runner(doc):
    return doc["kind"] == "Deployment" and doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "runner"


def runner_config(doc, docs):
    """The runner.toml the runner Deployment `doc` mounts, parsed."""
    spec = doc["spec"]["template"]["spec"]
    volume = next(v for v in spec["volumes"] if v["name"] == "config")
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"])
    return tomllib.loads(config_map["data"]["runner.toml"])


def isolation_problems(doc, docs, values):
    """Why the runner Deployment `doc` would not isolate runs (empty when it does)."""
    problems = []
    spec = doc["spec"]["template"]["spec"]
    pod = spec.get("securityContext", {})
    if spec.get("hostUsers") is not False:
        problems.append("hostUsers is not false")
    seccomp = pod.get("seccompProfile", {})
    if seccomp.get("type") != "Localhost":
        problems.append(f"pod seccomp profile is {seccomp}")
    elif values["runners"]["seccomp"]["securityProfilesOperator"]:
        profiles = [d for d in docs if d["kind"] == "SeccompProfile"]
        names = [f"operator/{d['metadata']['name']}.json" for d in profiles]
        if seccomp.get("localhostProfile") not in names:
            problems.append(f"seccomp profile {seccomp.get('localhostProfile')} is none of the rendered {names}")
        if any(d["spec"] != PROFILE for d in profiles):
            problems.append("a rendered SeccompProfile differs from files/runner-seccomp.json")
    elif seccomp.get("localhostProfile") != values["runners"]["seccomp"].get("localhostProfile"):
        problems.append(f"seccomp profile {seccomp.get('localhostProfile')} is not the configured one")
    if pod.get("runAsNonRoot") is not True or pod.get("runAsUser") in (None, 0):
        problems.append("runner may run as root")
    for container in spec["containers"]:
        context = container.get("securityContext", {})
        if context.get("procMount") != "Unmasked":
            problems.append(f"{container['name']}: procMount is {context.get('procMount')}")
        if "seccompProfile" in context:
            problems.append(f"{container['name']}: overrides the pod's seccomp profile")
        if context.get("allowPrivilegeEscalation") is not False or context.get("capabilities", {}).get("add"):
            problems.append(f"{container['name']}: may gain privileges")
        if any(DANGER_FLAG in arg for arg in container.get("args", []) + container.get("command", [])):
            problems.append(f"{container['name']}: starts with {DANGER_FLAG}")
    try:
        config = runner_config(doc, docs)
    except tomllib.TOMLDecodeError as error:
        return problems + [f"runner.toml is not valid TOML: {error}"]
    if "work_root" in config:
        problems.append("runner.toml still has work_root")
    sandbox = values["runners"]["sandbox"]
    expected = {
        "bwrap": sandbox["bwrap"],
        "read_only_paths": sandbox["readOnlyPaths"],
        "tmpfs_bytes": sandbox["tmpfsBytes"],
        "processes": sandbox["processes"],
        "memory_bytes": sandbox["memoryBytes"],
        "spare": sandbox["spare"],
    }
    if config.get("sandbox") != expected:
        problems.append(f"runner.toml [sandbox] is {config.get('sandbox')}, not {expected}")
    return problems


def spo_problems(doc):
    """Where a SeccompProfile breaks the operator's CRD (v1, cluster-scoped)."""
    actions = {"SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP",
               "SCMP_ACT_ERRNO", "SCMP_ACT_TRACE", "SCMP_ACT_ALLOW", "SCMP_ACT_LOG", "SCMP_ACT_NOTIFY"}
    ops = {"SCMP_CMP_NE", "SCMP_CMP_LT", "SCMP_CMP_LE", "SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_MASKED_EQ"}
    problems = []
    if doc["apiVersion"] != SPO_API or "namespace" in doc["metadata"]:
        problems.append("not a cluster-scoped v1 SeccompProfile")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"]) or len(doc["metadata"]["name"]) > 253:
        problems.append("name is not a DNS subdomain")
    spec = doc["spec"]
    if set(spec) - {"defaultAction", "architectures", "syscalls", "baseProfileName", "flags", "state"}:
        problems.append(f"unknown spec fields {set(spec)}")
    if spec.get("defaultAction") not in actions:
        problems.append("defaultAction")
    for rule in spec.get("syscalls", []):
        if set(rule) - {"names", "action", "errnoRet", "args"} or rule.get("action") not in actions:
            problems.append(f"rule {rule}")
        if not rule.get("names") or len(set(rule["names"])) != len(rule["names"]):
            problems.append(f"names of {rule}")
        for arg in rule.get("args", []):
            if not (0 <= arg["index"] <= 5 and arg["op"] in ops and arg.get("value", 0) >= 0 and arg.get("valueTwo", 0) >= 0):
                problems.append(f"arg {arg}")
    return problems


def allowed(profile, name):
    return any(name in r["names"] and r["action"] == "SCMP_ACT_ALLOW" for r in profile["syscalls"])


# --- Default and production values: lint, validate, and what must hold. ---------------------

for label, path in VALUE_SETS.items():
    given = yaml.safe_load(path.read_text())
    values = merged(yaml.safe_load((CHART / "values.yaml").read_text()), given)
    report = helm.lint(CHART, given, strict=True, kube_version=f"v{KUBE}")
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    check(f"{label}: helm lint --strict is clean", not problems and not report.get("errors"), f"{problems} {report.get('errors')}")

    docs, notes = render(given)
    check(f"{label}: rendered {len(docs)} manifests", len(docs) > 5)

    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"] == SPO_API:
            # A custom resource: checked against the operator's CRD below.
            continue
        try:
            kubernetes_validate.validate(doc, KUBE, strict=True)
            check(f"{label}: {name} validates against Kubernetes {KUBE} (strict)", True)
        except Exception as error:  # noqa: BLE001 - report whatever the validator raises
            check(f"{label}: {name} validates against Kubernetes {KUBE} (strict)", False, str(error)[:300])

    # Every container runs as non-root with a read-only root filesystem, dropping all capabilities;
    # runner pods use the chart's seccomp profile, every other pod the runtime's default.
    for doc in docs:
        for spec in pods(doc):
            security = spec.get("securityContext", {})
            seccomp = "Localhost" if is_runner(doc) else "RuntimeDefault"
            for container in spec["containers"]:
                c = container.get("securityContext", {})
                check(
                    f"{label}: {doc['metadata']['name']}/{container['name']} is non-root, read-only, drops ALL, seccomp {seccomp}",
                    security.get("runAsNonRoot") is True
                    and c.get("readOnlyRootFilesystem") is True
                    and c.get("allowPrivilegeEscalation") is False
                    and c.get("capabilities", {}).get("drop") == ["ALL"]
                    and security.get("seccompProfile", {}).get("type") == seccomp,
                )

    # Runner pods isolate every run: user-namespaced pod, unmasked /proc, the shipped seccomp
    # profile, no dangerous flag, and a runner config with the sandbox table and no work root.
    runners = [d for d in docs if is_runner(d)]
    check(f"{label}: one runner Deployment per pool", len(runners) == len(values["runners"]["pools"]))
    for doc in runners:
        problems = isolation_problems(doc, docs, values)
        check(f"{label}: {doc['metadata']['name']} runs with isolation on", not problems, problems)
    profiles = [d for d in docs if d["kind"] == "SeccompProfile"]
    check(f"{label}: one SeccompProfile for the Security Profiles Operator", len(profiles) == 1)
    for doc in profiles:
        problems = spo_problems(doc)
        check(f"{label}: SeccompProfile/{doc['metadata']['name']} fits the operator's v1 CRD", not problems, problems)

    # Pod Security levels: the gateway and the migration hook meet `restricted`; runner pods need
    # what NOTES tells the operator (privileged with AppArmor Unconfined, baseline otherwise).
    for doc in docs:
        for spec in pods(doc):
            if not is_runner(doc):
                check(
                    f"{label}: {doc['metadata']['name']} meets the restricted Pod Security level",
                    pod_security.level(spec) == "restricted",
                    pod_security.restricted_violations(spec),
                )
    stated = re.search(r"Pod Security level the namespace needs: (\w+)", notes)
    check(
        f"{label}: NOTES states the Pod Security level runner pods need",
        stated and all(pod_security.level(d["spec"]["template"]["spec"]) == stated.group(1) for d in runners),
        stated and [pod_security.level(d["spec"]["template"]["spec"]) for d in runners],
    )
    check(f"{label}: NOTES carries no isolation warning", "DANGER" not in notes and "NONE" not in notes)

    # Runner NetworkPolicies admit only gateway pods, on the mTLS port.
    runner_policies = [d for d in docs if d["kind"] == "NetworkPolicy" and "runner" in d["metadata"]["name"]]
    check(f"{label}: one NetworkPolicy per runner pool", len(runner_policies) == len(values["runners"]["pools"]))
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
    secret_values = [v for v in [given.get("keys", {}).get("masterKey"), given.get("database", {}).get("url")] if v]
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

# --- The isolation check itself can fail: each weakening of a rendered runner is caught. -----

default_given = yaml.safe_load(VALUE_SETS["default"].read_text())
default_values = merged(yaml.safe_load((CHART / "values.yaml").read_text()), default_given)
docs, _ = render(default_given)
runner = next(d for d in docs if is_runner(d))


def weakened(change):
    mutated_docs = copy.deepcopy(docs)
    target = next(d for d in mutated_docs if d["metadata"]["name"] == runner["metadata"]["name"] and is_runner(d))
    change(target, mutated_docs)
    return isolation_problems(target, mutated_docs, default_values)


def set_config(mutated_docs, text):
    for d in mutated_docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == runner["metadata"]["name"]:
            d["data"]["runner.toml"] = text


runner_config_text = original_toml = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == runner["metadata"]["name"])["data"]["runner.toml"]
weakenings = {
    "hostUsers true": lambda d, _: d["spec"]["template"]["spec"].update(hostUsers=True),
    "procMount Default": lambda d, _: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(procMount="Default"),
    "seccomp RuntimeDefault": lambda d, _: d["spec"]["template"]["spec"]["securityContext"].update(seccompProfile={"type": "RuntimeDefault"}),
    "another Localhost profile": lambda d, _: d["spec"]["template"]["spec"]["securityContext"]["seccompProfile"].update(localhostProfile="operator/other.json"),
    "container seccomp override": lambda d, _: d["spec"]["template"]["spec"]["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
    "dangerous flag": lambda d, _: d["spec"]["template"]["spec"]["containers"][0]["args"].append(DANGER_FLAG),
    "work_root back": lambda _, m: set_config(m, original_toml.replace("[sandbox]", 'work_root = "/work"\n\n[sandbox]')),
    "no sandbox table": lambda _, m: set_config(m, original_toml.split("[sandbox]")[0]),
    "runs as root": lambda d, _: d["spec"]["template"]["spec"]["securityContext"].update(runAsUser=0),
}
for what, change in weakenings.items():
    check(f"the isolation check catches a runner with {what}", weakened(change))

# --- runners.dangerouslyRunWithoutIsolation: never silent. ------------------------------------

danger_docs, danger_notes = render(merged(default_given, {"runners": {"dangerouslyRunWithoutIsolation": True}}))
danger_runner = next(d for d in danger_docs if is_runner(d))
danger_spec = danger_runner["spec"]["template"]["spec"]
check("dangerous mode: the runner starts with the flag", DANGER_FLAG in danger_spec["containers"][0]["args"])
check(
    "dangerous mode: the pod is marked and NOTES shouts it",
    "NONE" in danger_runner["spec"]["template"]["metadata"]["annotations"]["custodian.dev/isolation"]
    and "DANGER: RUNNERS RUN COMMANDS WITHOUT ISOLATION" in danger_notes,
)
check("dangerous mode: no isolation is claimed", isolation_problems(danger_runner, danger_docs, default_values) != [])
check("dangerous mode: the runner pod falls back to the restricted level", pod_security.level(danger_spec) == "restricted", pod_security.restricted_violations(danger_spec))
check("default: the runner starts without the flag", DANGER_FLAG not in runner["spec"]["template"]["spec"]["containers"][0]["args"])

# --- Other isolation settings. ----------------------------------------------------------------

aa_docs, aa_notes = render(merged(default_given, {"runners": {"appArmorProfile": {"type": "RuntimeDefault"}}}))
aa_spec = next(d for d in aa_docs if is_runner(d))["spec"]["template"]["spec"]
check(
    "AppArmor RuntimeDefault: runner pods meet baseline, and NOTES says so",
    pod_security.level(aa_spec) == "baseline" and "needs: baseline" in aa_notes,
    pod_security.baseline_violations(aa_spec),
)
check("AppArmor Unconfined (default): runner pods need privileged", pod_security.level(runner["spec"]["template"]["spec"]) == "privileged")

node_values = {"runners": {"seccomp": {"securityProfilesOperator": False, "localhostProfile": "custodian/runner-seccomp.json"}}}
node_docs, _ = render(merged(default_given, node_values))
node_runner = next(d for d in node_docs if is_runner(d))
check(
    "without the operator: pods use the node-installed profile, no SeccompProfile is rendered",
    not isolation_problems(node_runner, node_docs, merged(default_values, node_values))
    and not [d for d in node_docs if d["kind"] == "SeccompProfile"],
    isolation_problems(node_runner, node_docs, merged(default_values, node_values)),
)
message = refused(merged(default_given, {"runners": {"seccomp": {"securityProfilesOperator": False}}}))
check("without the operator and without a profile path: refused", message and "runners.seccomp.localhostProfile is required" in message, message)

rc_docs, _ = render(merged(default_given, {"runners": {"runtimeClassName": "gvisor"}}))
check("runtimeClassName reaches runner pods only", [d["spec"]["template"]["spec"].get("runtimeClassName") for d in rc_docs if pods(d)].count("gvisor") == 1)

ro_docs, _ = render(merged(default_given, {"runners": {"sandbox": {"readOnlyPaths": ["/opt/toolchain"]}}}))
ro_runner = next(d for d in ro_docs if is_runner(d))
check("readOnlyPaths reach the runner's [sandbox] table", runner_config(ro_runner, ro_docs)["sandbox"]["read_only_paths"] == ["/opt/toolchain"])
for path in ["/", "/etc", "/etc/custodian-runner/tls", "/proc", "/tmp/x"]:
    message = refused(merged(default_given, {"runners": {"sandbox": {"readOnlyPaths": [path]}}}))
    check(f"readOnlyPaths refuses {path}", message and "readOnlyPaths" in message, message)

# MCP sessions live in the database: the ingress routes without session affinity unless asked to.
ingress_on = {"ingress": {"enabled": True}}
affinity = "nginx.ingress.kubernetes.io/upstream-hash-by"
for sticky, expected in [(None, False), (True, True)]:
    given = merged(default_given, ingress_on if sticky is None else merged(ingress_on, {"ingress": {"stickyOnSessionId": sticky}}))
    ingresses = [d for d in render(given)[0] if d["kind"] == "Ingress"]
    annotated = bool(ingresses) and affinity in (ingresses[0]["metadata"].get("annotations") or {})
    check(f"ingress session affinity {'on when asked' if sticky else 'off by default'}", len(ingresses) == 1 and annotated == expected)

# Runs keep their files in memory: the runner's memory limit must exist and hold one run's tmpfs.
small = {"runners": {"resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}}}
message = refused(merged(default_given, small))
check("a memory limit that cannot hold one run's tmpfs is refused", message and "cannot hold one run's tmpfs" in message, message)
check("a smaller tmpfs fits that limit", refused(merged(default_given, {**small, "runners": {**small["runners"], "sandbox": {"tmpfsBytes": 67108864}}})) is None)
message = refused(merged(default_given, {"runners": {"resources": {"limits": {"memory": None}}}}))
check("a runner without a memory limit is refused", message is not None and "memory" in message, message)

# Bad values are refused by the schema.
for what, override in {
    "a bad publicUrl": {"publicUrl": "not a url"},
    "a tmpfs under 1 MiB": {"runners": {"sandbox": {"tmpfsBytes": 4096}}},
    "a relative read-only path": {"runners": {"sandbox": {"readOnlyPaths": ["opt/tools"]}}},
    "fewer than 8 processes": {"runners": {"sandbox": {"processes": 2}}},
    "an unknown sandbox key": {"runners": {"sandbox": {"workRoot": "/work"}}},
    "a non-boolean danger flag": {"runners": {"dangerouslyRunWithoutIsolation": "yes"}},
    "an unknown AppArmor type": {"runners": {"appArmorProfile": {"type": "Permissive"}}},
    "a seccomp path that climbs out": {"runners": {"seccomp": {"localhostProfile": "../etc/profile.json"}}},
}.items():
    try:
        helm.Chart.load(CHART).validate_schema(merged(default_given, override))
        check(f"schema refuses {what}", False)
    except helm.HelmValuesError:
        check(f"schema refuses {what}", True)

# --- The seccomp profile: RuntimeDefault for a container without capabilities, no ptrace,
# plus exactly what bubblewrap needs; proven on this kernel with the real bwrap. -------------

check("profile denies by default (EPERM)", PROFILE["defaultAction"] == "SCMP_ACT_ERRNO" and "defaultErrnoRet" not in PROFILE)
denied = ["ptrace", "process_vm_readv", "process_vm_writev", "bpf", "keyctl", "add_key", "request_key", "setns",
          "chroot", "open_tree", "move_mount", "fsopen", "fsmount", "mount_setattr", "perf_event_open",
          "kexec_load", "init_module", "finit_module", "userfaultfd", "io_uring_setup", "open_by_handle_at"]
check("profile allows none of the calls a runner never needs", not [n for n in denied if allowed(PROFILE, n)], [n for n in denied if allowed(PROFILE, n)])
clone3 = [r for r in PROFILE["syscalls"] if "clone3" in r["names"]]
check("profile answers clone3 with ENOSYS (so libc falls back to clone)", clone3 == [{"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}])
bwrap_rule = [r for r in PROFILE["syscalls"] if set(r["names"]) & set(seccomp_live.ADDITIONS)]
check("profile adds exactly bubblewrap's calls, in one rule", [sorted(r["names"]) for r in bwrap_rule] == [sorted(seccomp_live.ADDITIONS)], bwrap_rule)
check("profile keeps Landlock for the sandbox helper", all(allowed(PROFILE, n) for n in ["landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "seccomp", "prctl"]))

missing = seccomp_live.prerequisites()
if missing and os.environ.get("CI") != "true":
    print(f"SKIP live seccomp checks: {missing} (CI=true makes this a failure)")
else:
    check("bubblewrap and libseccomp are here for the live checks", missing is None, missing)
    if missing is None:
        ok, output = seccomp_live.run(PROFILE)
        check("under the profile, bubblewrap builds the runner's sandbox as the runner uid", ok, output)
        for syscall in seccomp_live.ADDITIONS:
            ok, output = seccomp_live.run(seccomp_live.runtime_default_for(PROFILE, syscall))
            check(f"with {syscall} as RuntimeDefault has it, bubblewrap cannot build the sandbox", not ok, output)
        # The runner itself (its probe goes through the same sandbox as a command) loses nothing to
        # the profile: `check` reports the same layers with and without it.
        runner_bin = pathlib.Path(os.environ.get("CUSTODIAN_RUNNER_BIN", ROOT / "target" / "debug" / "custodian-runner"))
        if seccomp_live.runner_supports_bubblewrap(runner_bin):
            plain = seccomp_live.runner_check(runner_bin, None)
            under = seccomp_live.runner_check(runner_bin, PROFILE)
            check("custodian-runner check sees the same sandbox under the profile as without it", plain == under, f"without: {plain}, under: {under}")
            check("custodian-runner check finds runs isolated under the profile", under == (0, []), under)
            # The chart's runner.toml is one the runner accepts, and isolates runs with as rendered
            # (certificate paths pointed at placeholder files: only their existence is checked here).
            with tempfile.TemporaryDirectory() as tls:
                os.chmod(tls, 0o755)
                for name in ("tls.crt", "tls.key", "ca.crt"):
                    (pathlib.Path(tls) / name).write_text("")
                    os.chmod(pathlib.Path(tls) / name, 0o644)
                config = pathlib.Path(tls) / "runner.toml"
                config.write_text(runner_config_text.replace("/etc/custodian-runner/tls", tls))
                os.chmod(config, 0o644)
                result = seccomp_live.runner_check(runner_bin, PROFILE, config)
                check("custodian-runner check accepts the chart's runner.toml and isolates runs with it", result == (0, []), result)
        else:
            print(f"SKIP custodian-runner check under the profile: {runner_bin} is missing or predates the bubblewrap sandbox")

# --- The image and the chart's prerequisites. -------------------------------------------------

stages = re.split(r"(?m)^FROM ", (ROOT / "Dockerfile").read_text())
runner_stage = next((s for s in stages if re.match(r"\S+ AS runner\b", s)), "")
installs = re.findall(r"apt-get install((?:[^\n]*\\\n)*[^\n]*)", runner_stage)
check("the runner image installs bubblewrap", any(re.search(r"(?<![\w-])bubblewrap(?![\w-])", i) for i in installs), installs)
check("the runner image runs as uid 10001", re.search(r"(?m)^USER 10001", runner_stage) is not None)
chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
check("the chart requires Kubernetes 1.33+ (user namespaces and procMount on by default)", chart_meta.get("kubeVersion") == ">=1.33.0-0")

print(f"helm: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
