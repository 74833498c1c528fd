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
