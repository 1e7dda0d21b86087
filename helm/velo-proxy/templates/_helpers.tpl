{{/* vim: set filetype=mustache: */}}

{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "velo-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: <release>-<chart>, or the release name if it already contains the chart name. */}}
{{- define "velo-proxy.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart label value: <name>-<version>. */}}
{{- define "velo-proxy.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels of every resource. */}}
{{- define "velo-proxy.labels" -}}
helm.sh/chart: {{ include "velo-proxy.chart" . }}
{{ include "velo-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: velo-proxy
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of the proxy (component=proxy keeps Redis/retrain pods out of the Service). */}}
{{- define "velo-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "velo-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "velo-proxy.proxySelectorLabels" -}}
{{ include "velo-proxy.selectorLabels" . }}
app.kubernetes.io/component: proxy
{{- end }}

{{- define "velo-proxy.redisSelectorLabels" -}}
{{ include "velo-proxy.selectorLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{/* ServiceAccount name. */}}
{{- define "velo-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "velo-proxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the Secret with the keys: the user's existingSecret or the chart's own. */}}
{{- define "velo-proxy.secretName" -}}
{{- default (include "velo-proxy.fullname" .) .Values.auth.existingSecret }}
{{- end }}

{{/* True (non-empty) when the chart creates its own Secret. */}}
{{- define "velo-proxy.createSecret" -}}
{{- if not .Values.auth.existingSecret }}true{{ end }}
{{- end }}

{{/* Proxy image reference. */}}
{{- define "velo-proxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Retrain image reference: the Dockerfile's "train" target. */}}
{{- define "velo-proxy.retrainImage" -}}
{{- $repo := default .Values.image.repository .Values.retrain.image.repository }}
{{- $tag := default (printf "%s-train" .Chart.AppVersion) .Values.retrain.image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{- define "velo-proxy.redisName" -}}
{{- printf "%s-redis" (include "velo-proxy.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Qdrant URL the proxy uses (empty in embedded mode). */}}
{{- define "velo-proxy.qdrantUrl" -}}
{{- if eq .Values.qdrant.mode "sidecar" }}
{{- printf "http://127.0.0.1:%d" (int .Values.qdrant.sidecar.httpPort) }}
{{- else if eq .Values.qdrant.mode "external" }}
{{- required "qdrant.external.url is required when qdrant.mode=external" .Values.qdrant.external.url }}
{{- end }}
{{- end }}

{{/* Redis URL that goes into the ConfigMap (empty when it comes from a Secret or Redis is off). */}}
{{- define "velo-proxy.redisUrl" -}}
{{- if eq .Values.redis.mode "internal" }}
{{- printf "redis://%s.%s.svc:%d/0" (include "velo-proxy.redisName" .) .Release.Namespace (int .Values.redis.internal.port) }}
{{- else if and (eq .Values.redis.mode "external") (not .Values.redis.external.existingSecret) }}
{{- required "redis.external.url or redis.external.existingSecret is required when redis.mode=external" .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* Name of the policy claim shared by the proxies and the retrain job. */}}
{{- define "velo-proxy.policyClaimName" -}}
{{- default (printf "%s-policy" (include "velo-proxy.fullname" .)) .Values.policy.persistence.existingClaim }}
{{- end }}

{{/* Refuse combinations that cannot work. */}}
{{- define "velo-proxy.validate" -}}
{{- if and .Values.retrain.enabled (eq .Values.redis.mode "none") }}
{{- fail "retrain.enabled needs Redis (the judged pairs and the experience streams): set redis.mode to internal or external, or retrain.enabled=false" }}
{{- end }}
{{- if and .Values.retrain.enabled (not .Values.learningLoop.enabled) }}
{{- fail "retrain.enabled needs learningLoop.enabled=true: with the loop off nothing is judged, so the retrain job has no judged pairs to learn from" }}
{{- end }}
{{- if and .Values.retrain.enabled (eq .Values.policy.name "threshold") }}
{{- fail "retrain.enabled needs policy.name=verified or learned: the threshold policy is recalibrated by nothing the retrain job learns (the verifier stage refits the verified policy's verifier, the lrs stage the learned policy)" }}
{{- end }}
{{- if and (eq .Values.config.embedder "all-MiniLM-L6-v2-int8") (eq .Values.policy.name "learned") }}
{{- fail (printf "config.embedder=%s needs policy.name=verified or threshold: the package ships a learned policy for all-MiniLM-L6-v2 and one for multilingual-e5-small, each refusing other vectors, so learned would serve no semantic hit" .Values.config.embedder) }}
{{- end }}
{{- if and (eq .Values.config.embedder "all-MiniLM-L6-v2-int8") .Values.retrain.enabled }}
{{- fail (printf "retrain.enabled needs config.embedder=all-MiniLM-L6-v2 or multilingual-e5-small: the job's lrs stage fine-tunes the package's learned policy for the embedder, and none ships for %s" .Values.config.embedder) }}
{{- end }}
{{- if and (eq .Values.learningLoop.judge "llm") (not .Values.learningLoop.judgeModel) }}
{{- fail "learningLoop.judge=llm needs learningLoop.judgeModel: the client model name the LLM judge asks (the proxy refuses to start without VELO_JUDGE_MODEL)" }}
{{- end }}
{{- if and (eq .Values.qdrant.sidecar.persistence.type "hostPath") (ne .Values.mode "daemonset") (eq .Values.qdrant.mode "sidecar") }}
{{- fail "qdrant.sidecar.persistence.type=hostPath is only for mode=daemonset (one pod per node); use emptyDir or ephemeral" }}
{{- end }}
{{- end }}

{{/* Env vars read from the Secret (all optional: a missing key leaves the setting unset). */}}
{{- define "velo-proxy.secretEnv" -}}
- name: VELO_UPSTREAM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "velo-proxy.secretName" . }}
      key: {{ .Values.auth.secretKeys.upstreamApiKey }}
      optional: true
- name: VELO_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "velo-proxy.secretName" . }}
      key: {{ .Values.auth.secretKeys.apiKeys }}
      optional: true
- name: VELO_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "velo-proxy.secretName" . }}
      key: {{ .Values.auth.secretKeys.adminKey }}
      optional: true
{{- if ne .Values.qdrant.mode "embedded" }}
- name: VELO_QDRANT_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "velo-proxy.secretName" . }}
      key: {{ .Values.auth.secretKeys.qdrantApiKey }}
      optional: true
{{- end }}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret }}
- name: VELO_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- end }}
{{- end }}
