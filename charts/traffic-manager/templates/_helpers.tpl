{{/* The labels connect looks for (connector/manager_install.py SELECTOR). */}}
{{- define "tm.selector" -}}
app.kubernetes.io/name: traffic-manager
{{- end }}

{{- define "tm.labels" -}}
{{ include "tm.selector" . }}
app.kubernetes.io/part-of: tpnb
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The image tag, required (clients and agents must agree on it). */}}
{{- define "tm.tag" -}}
{{- required "image.tag is required: the tag `tpnb config view` shows as manager.image (e.g. --set image.tag=0.1.0-1a2b3c4d5e6f)" .Values.image.tag -}}
{{- end }}

{{- define "tm.image" -}}
{{ .Values.image.repository }}:{{ include "tm.tag" . }}
{{- end }}

{{/* A label-safe version (manager_install._label_value). */}}
{{- define "tm.version" -}}
{{- include "tm.tag" . | regexReplaceAll "[^A-Za-z0-9_.-]" "_" | trunc 63 | trimAll "-_." -}}
{{- end }}

{{/* Name of the cluster-scoped RBAC objects: as manager_install.rbac_name. */}}
{{- define "tm.rbacName" -}}
{{- if eq .Release.Namespace "tpnb" -}}tpnb-traffic-manager{{- else -}}tpnb-traffic-manager-{{ .Release.Namespace }}{{- end -}}
{{- end }}
