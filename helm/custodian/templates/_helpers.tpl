{{- define "custodian.name" -}}{{ .Release.Name }}-custodian{{- end -}}
{{- define "custodian.labels" -}}
app.kubernetes.io/name: custodian
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
{{- define "custodian.gatewaySelector" -}}
app.kubernetes.io/name: custodian
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}
{{- define "custodian.keysSecret" -}}{{ default (printf "%s-keys" (include "custodian.name" .)) .Values.keys.existingSecret }}{{- end -}}
{{- define "custodian.dbSecret" -}}{{ default (printf "%s-db" (include "custodian.name" .)) .Values.database.existingSecret }}{{- end -}}
{{- define "custodian.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{- define "custodian.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}
{{- define "custodian.gatewayEnv" -}}
- name: CUSTODIAN_CONFIG
  value: /etc/custodian/custodian.toml
- name: CUSTODIAN_MASTER_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "custodian.keysSecret" . }}
      key: master-key
- name: CUSTODIAN_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "custodian.dbSecret" . }}
      key: url
{{- if .Values.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
- name: OTEL_SERVICE_NAME
  value: custodian
{{- end }}
{{- end -}}
{{- /*
Runner pods build a sandbox per run with bubblewrap (user, pid, mount, IPC, UTS namespaces, a fresh
/proc, mounts, pivot_root). The pod therefore runs in a user namespace of its own (`hostUsers:
false`), with an unmasked /proc (`procMount: Unmasked`, only allowed in a user namespace) and a
seccomp profile that adds to the runtime's default exactly what bubblewrap needs
(files/runner-seccomp.json). docs/KUBERNETES.md explains each setting.
*/ -}}
{{- define "custodian.runnerIsolated" -}}{{ if .Values.runners.dangerouslyRunWithoutIsolation }}{{ else }}true{{ end }}{{- end -}}
{{- define "custodian.runnerSeccompName" -}}{{ printf "%s-%s-runner" (.Release.Namespace | default "default") (include "custodian.name" .) }}{{- end -}}
{{- define "custodian.runnerSeccompPath" -}}
{{- $seccomp := .Values.runners.seccomp -}}
{{- if $seccomp.securityProfilesOperator -}}
operator/{{ include "custodian.runnerSeccompName" . }}.json
{{- else -}}
{{ required "runners.seccomp.localhostProfile is required when runners.seccomp.securityProfilesOperator is false: install files/runner-seccomp.json on every node and give its path under the kubelet's seccomp directory (docs/KUBERNETES.md)" $seccomp.localhostProfile }}
{{- end -}}
{{- end -}}
{{- define "custodian.runnerPodSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
{{- if include "custodian.runnerIsolated" . }}
seccompProfile:
  type: Localhost
  localhostProfile: {{ include "custodian.runnerSeccompPath" . }}
{{- with .Values.runners.appArmorProfile }}
appArmorProfile:
  type: {{ .type }}
  {{- if eq .type "Localhost" }}
  localhostProfile: {{ required "runners.appArmorProfile.localhostProfile is required when its type is Localhost" .localhostProfile }}
  {{- end }}
{{- end }}
{{- else }}
seccompProfile:
  type: RuntimeDefault
{{- end }}
{{- end -}}
{{- define "custodian.runnerContainerSecurity" -}}
{{- include "custodian.containerSecurity" . }}
{{- if include "custodian.runnerIsolated" . }}
procMount: Unmasked
{{- end }}
{{- end -}}
{{- /* Bytes in a Kubernetes quantity (plain, k/M/G/T or Ki/Mi/Gi/Ti); fails on anything else. */ -}}
{{- define "custodian.bytes" -}}
{{- if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- int64 . -}}
{{- else -}}
{{- $q := toString . -}}
{{- $units := dict "" 1 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 -}}
{{- $number := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $unit := trimPrefix $number $q -}}
{{- if or (not $number) (not (hasKey $units $unit)) -}}
{{- fail (printf "runners.resources.limits.memory: %q is not a quantity this chart understands (use e.g. 2Gi or 2048Mi)" $q) -}}
{{- end -}}
{{- mulf (float64 $number) (get $units $unit) | int64 -}}
{{- end -}}
{{- end -}}
{{- /* The runner's configuration (TOML) for one pool: dict with Values and pool. */ -}}
{{- define "custodian.runnerConfig" -}}
{{- $sandbox := .Values.runners.sandbox -}}
listen = "0.0.0.0:7443"
trust_domain = {{ .Values.tls.trustDomain | quote }}
tenant = {{ .pool.tenant | quote }}
name = {{ .pool.name | quote }}
cert_file = "/etc/custodian-runner/tls/tls.crt"
key_file = "/etc/custodian-runner/tls/tls.key"
ca_file = "/etc/custodian-runner/tls/ca.crt"

# Each run: namespaces of its own, a private root, work dir and /tmp on tmpfs.
[sandbox]
bwrap = {{ $sandbox.bwrap | quote }}
read_only_paths = {{ $sandbox.readOnlyPaths | default list | toJson }}
tmpfs_bytes = {{ $sandbox.tmpfsBytes | int64 }}
processes = {{ $sandbox.processes | int64 }}
memory_bytes = {{ $sandbox.memoryBytes | int64 }}
spare = {{ $sandbox.spare }}
{{- end -}}
