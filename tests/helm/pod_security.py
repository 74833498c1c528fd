"""The Pod Security Standards level a pod spec meets, as Pod Security Admission judges it on
Kubernetes 1.35 and later (https://kubernetes.io/docs/concepts/security/pod-security-standards/).

Only the controls a chart like this one can trip are evaluated; each returns the reasons a pod
fails it, so a test can say why a pod is not at the level it expects.
"""

DEFAULT_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t"}


def _containers(spec):
    return [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]


def _user_namespaced(spec):
    return spec.get("hostUsers") is False


def baseline_violations(spec):
    problems = []
    pod = spec.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            problems.append(f"{field}: true")
    if any("hostPath" in v for v in spec.get("volumes", [])):
        problems.append("hostPath volume")
    profiles = [("pod", pod)] + [(c["name"], c.get("securityContext", {})) for c in _containers(spec)]
    for who, context in profiles:
        if context.get("appArmorProfile", {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            problems.append(f"{who}: AppArmor {context['appArmorProfile']['type']}")
        if context.get("seccompProfile", {}).get("type") == "Unconfined":
            problems.append(f"{who}: seccomp Unconfined")
        selinux = context.get("seLinuxOptions", {})
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            problems.append(f"{who}: seLinuxOptions {selinux}")
    for container in _containers(spec):
        context = container.get("securityContext", {})
        if context.get("privileged"):
            problems.append(f"{container['name']}: privileged")
        added = set(context.get("capabilities", {}).get("add", []))
        if not added <= DEFAULT_CAPABILITIES:
            problems.append(f"{container['name']}: adds {sorted(added - DEFAULT_CAPABILITIES)}")
        if any(p.get("hostPort") for p in container.get("ports", [])):
            problems.append(f"{container['name']}: hostPort")
        # Since 1.35 baseline allows an unmasked /proc in a user namespace.
        if context.get("procMount", "Default") != "Default" and not _user_namespaced(spec):
            problems.append(f"{container['name']}: procMount {context['procMount']} outside a user namespace")
    return problems


def restricted_violations(spec):
    problems = baseline_violations(spec)
    pod = spec.get("securityContext", {})
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']}: {sorted(kinds)}")
    for container in _containers(spec):
        context = container.get("securityContext", {})
        name = container["name"]
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation not false")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: does not drop ALL capabilities")
        if not set(capabilities.get("add", [])) <= {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities")
        seccomp = context.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccomp {seccomp}")
        if context.get("procMount", "Default") != "Default":
            problems.append(f"{name}: procMount {context['procMount']}")
        # A user namespace makes the pod's root unprivileged on the node: PSA then skips these two.
        if not _user_namespaced(spec):
            if context.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
                problems.append(f"{name}: runAsNonRoot not true")
            if context.get("runAsUser", pod.get("runAsUser")) == 0:
                problems.append(f"{name}: runAsUser 0")
    return problems


def level(spec):
    """`restricted`, `baseline` or `privileged`: the strictest level `spec` meets."""
    if not restricted_violations(spec):
        return "restricted"
    if not baseline_violations(spec):
        return "baseline"
    return "privileged"
