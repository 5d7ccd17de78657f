{{/*
Helpers shared by the templates. Only text/template, sprig and Helm's include/tpl/
required/toYaml are used: the subset tools/helm-render covers (docs/deploy.md).
*/}}

{{- define "coffea-hq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The resource name prefix: <release>-<chart>, or the release alone if it holds the chart name. */}}
{{- define "coffea-hq.fullname" -}}
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

{{- define "coffea-hq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object; pass (dict "root" $ "component" "server"). */}}
{{- define "coffea-hq.labels" -}}
helm.sh/chart: {{ include "coffea-hq.chart" .root }}
{{ include "coffea-hq.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: coffea-hq
{{- end }}

{{- define "coffea-hq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "coffea-hq.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "coffea-hq.serverName" -}}
{{- printf "%s-server" (include "coffea-hq.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "coffea-hq.workerName" -}}
{{- printf "%s-worker" (include "coffea-hq.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "coffea-hq.valkeyName" -}}
{{- printf "%s-valkey" (include "coffea-hq.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The URL analysis sessions and workers give as HQ_URL: the server Service's cluster DNS name. */}}
{{- define "coffea-hq.serverURL" -}}
{{- $scheme := ternary "https" "http" .Values.tls.enabled }}
{{- printf "%s://%s.%s.svc.%s:%d" $scheme (include "coffea-hq.serverName" .) .Release.Namespace .Values.clusterDomain (int .Values.server.service.port) }}
{{- end }}

{{/* The image for a role: (dict "root" $ "image" .Values.server.image "suffix" ""). */}}
{{- define "coffea-hq.image" -}}
{{- $repository := default .root.Values.image.repository .image.repository }}
{{- $tag := default (printf "%s%s" (default .root.Chart.AppVersion .root.Values.image.tag) (default "" .image.tagSuffix)) .image.tag }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "coffea-hq.pullPolicy" -}}
{{- default .root.Values.image.pullPolicy .image.pullPolicy }}
{{- end }}

{{/* The Secret holding the store password, or "" when the store needs none. */}}
{{- define "coffea-hq.redisSecretName" -}}
{{- if .Values.valkey.enabled }}
{{- if .Values.valkey.auth.enabled }}
{{- if .Values.valkey.auth.existingSecret }}
{{- .Values.valkey.auth.existingSecret }}
{{- else }}
{{- $_ := required "valkey.auth.enabled needs valkey.auth.password or valkey.auth.existingSecret" .Values.valkey.auth.password }}
{{- printf "%s-redis" (include "coffea-hq.fullname" .) }}
{{- end }}
{{- end }}
{{- else if .Values.externalRedis.existingSecret }}
{{- .Values.externalRedis.existingSecret }}
{{- else if .Values.externalRedis.password }}
{{- printf "%s-redis" (include "coffea-hq.fullname" .) }}
{{- end }}
{{- end }}

{{/* Whether this chart creates the password Secret itself ("true" or ""). */}}
{{- define "coffea-hq.createRedisSecret" -}}
{{- $auth := ternary .Values.valkey.auth .Values.externalRedis .Values.valkey.enabled }}
{{- $wanted := or (not .Values.valkey.enabled) .Values.valkey.auth.enabled }}
{{- if and $wanted $auth.password (not $auth.existingSecret) }}true{{ end }}
{{- end }}

{{- define "coffea-hq.redisSecretKey" -}}
{{- $auth := ternary .Values.valkey.auth .Values.externalRedis .Values.valkey.enabled }}
{{- if $auth.existingSecret }}{{ $auth.existingSecretPasswordKey }}{{ else }}password{{ end }}
{{- end }}

{{/*
The server's store settings as env vars: HQ_REDIS_PASSWORD (from the Secret) first,
so that Kubernetes expands $(HQ_REDIS_PASSWORD) inside HQ_REDIS_URL.
*/}}
{{- define "coffea-hq.redisEnv" -}}
{{- $secret := include "coffea-hq.redisSecretName" . }}
{{- $userinfo := "" }}
{{- $host := "" }}
{{- $port := 0 }}
{{- $db := 0 }}
{{- $scheme := "redis" }}
{{- if .Values.valkey.enabled }}
{{- $host = printf "%s.%s.svc.%s" (include "coffea-hq.valkeyName" .) .Release.Namespace .Values.clusterDomain }}
{{- $port = int .Values.valkey.port }}
{{- else }}
{{- $host = required "externalRedis.host is required when valkey.enabled is false" .Values.externalRedis.host }}
{{- $port = int .Values.externalRedis.port }}
{{- $db = int .Values.externalRedis.database }}
{{- $scheme = ternary "rediss" "redis" .Values.externalRedis.tls }}
{{- $userinfo = .Values.externalRedis.username }}
{{- end }}
{{- if $secret }}
{{- $userinfo = printf "%s:$(HQ_REDIS_PASSWORD)" $userinfo }}
- name: HQ_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ include "coffea-hq.redisSecretKey" . }}
{{- end }}
- name: HQ_REDIS_URL
  value: {{ printf "%s://%s%s:%d/%d" $scheme (ternary (printf "%s@" $userinfo) "" (ne $userinfo "")) $host $port $db | quote }}
{{- end }}

{{/*
TLS, by role (dict "root" $ "role" "server"|"worker"). The server mounts the whole
kubernetes.io/tls Secret (its certificate and key); a worker only the CA (tls.caKey),
never the server's key, and trusts it through HQ_TLS_CA.
*/}}
{{- define "coffea-hq.tlsVolumes" -}}
{{- $tls := .root.Values.tls }}
{{- if $tls.enabled }}
{{- $secret := required "tls.enabled needs tls.secretName" $tls.secretName }}
{{- if eq .role "server" }}
- name: tls
  secret:
    secretName: {{ $secret }}
    defaultMode: 0440
{{- else if $tls.caKey }}
- name: tls
  secret:
    secretName: {{ $secret }}
    defaultMode: 0440
    items:
      - key: {{ $tls.caKey }}
        path: ca.crt
{{- end }}
{{- end }}
{{- end }}

{{- define "coffea-hq.tlsMounts" -}}
{{- $tls := .root.Values.tls }}
{{- if and $tls.enabled (or (eq .role "server") $tls.caKey) }}
- name: tls
  mountPath: {{ $tls.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "coffea-hq.tlsEnv" -}}
{{- $tls := .root.Values.tls }}
{{- if and $tls.enabled (eq .role "worker") $tls.caKey }}
- name: HQ_TLS_CA
  value: {{ printf "%s/ca.crt" $tls.mountPath | quote }}
{{- end }}
{{- end }}

{{/* The server's HTTPS options: its certificate and key from the mounted Secret. */}}
{{- define "coffea-hq.tlsArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-cert
- {{ printf "%s/tls.crt" .Values.tls.mountPath | quote }}
- --tls-key
- {{ printf "%s/tls.key" .Values.tls.mountPath | quote }}
{{- end }}
{{- end }}

{{/* Volumes and mounts of the token extension point. */}}
{{- define "coffea-hq.securityVolumes" -}}
{{- if .Values.auth.enabled }}
- name: auth
  secret:
    secretName: {{ required "auth.enabled needs auth.secretName" .Values.auth.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "coffea-hq.securityMounts" -}}
{{- if .Values.auth.enabled }}
- name: auth
  mountPath: {{ .Values.auth.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "coffea-hq.securityEnv" -}}
{{- if .Values.auth.enabled }}
- name: HQ_AUTH_DIR
  value: {{ .Values.auth.mountPath | quote }}
{{- end }}
{{- end }}
