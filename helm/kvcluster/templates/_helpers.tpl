{{/* Chart name, truncated to a DNS label. */}}
{{- define "kvcluster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name prefix of every resource. Kept to 40 characters: KubeRay derives longer names
(<name>-raycluster-xxxxx-head-svc, ...) from the RayService name.
*/}}
{{- define "kvcluster.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kvcluster.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component (pass a dict: ctx, component). */}}
{{- define "kvcluster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvcluster.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* All labels of one component (pass a dict: ctx, component). */}}
{{- define "kvcluster.labels" -}}
helm.sh/chart: {{ include "kvcluster.chart" .ctx }}
{{ include "kvcluster.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: kvcluster
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kvcluster.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "kvcluster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kvcluster.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kvcluster.configMapName" -}}
{{- printf "%s-config" (include "kvcluster.fullname" .) -}}
{{- end -}}

{{- define "kvcluster.secretName" -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- .Values.apiKeys.existingSecret -}}
{{- else -}}
{{- printf "%s-api-keys" (include "kvcluster.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Where the kvcluster config file is mounted in every Ray container. */}}
{{- define "kvcluster.configPath" -}}/etc/kvcluster/config.yaml{{- end -}}

{{/* Qdrant URL for the kvcluster config: the in-chart StatefulSet's Service, or external. */}}
{{- define "kvcluster.qdrantUrl" -}}
{{- if .Values.qdrant.enabled -}}
{{- printf "http://%s-qdrant.%s.svc.%s:6333" (include "kvcluster.fullname" .) .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- .Values.qdrant.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* Redis URL for the kvcluster config: in-chart, external, or empty (no Redis tier). */}}
{{- define "kvcluster.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis.%s.svc.%s:6379/%d" (include "kvcluster.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.redis.database) -}}
{{- else -}}
{{- .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/*
The kvcluster config tree (kvcluster/config.py) as YAML: the user's `config` values plus the
keys the chart owns (service URLs, serve host/port, cluster address, worker count).
*/}}
{{- define "kvcluster.configYaml" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $w := .Values.rayService.worker -}}
{{- $index := default dict (get $cfg "index") -}}
{{- $qdrantUrl := include "kvcluster.qdrantUrl" . -}}
{{- $_ := set $index "qdrant_url" (ternary $qdrantUrl nil (ne $qdrantUrl "")) -}}
{{- $_ := set $cfg "index" $index -}}
{{- $tiers := default dict (get $cfg "tiers") -}}
{{- $redisUrl := include "kvcluster.redisUrl" . -}}
{{- $_ := set $tiers "redis_url" (ternary $redisUrl nil (ne $redisUrl "")) -}}
{{- $_ := set $cfg "tiers" $tiers -}}
{{- $serve := default dict (get $cfg "serve") -}}
{{- $_ := set $serve "host" "0.0.0.0" -}}
{{- $_ := set $serve "port" (int .Values.rayService.serve.port) -}}
{{- $_ := set $cfg "serve" $serve -}}
{{- $cluster := default dict (get $cfg "cluster") -}}
{{- $_ := set $cluster "address" "auto" -}}
{{- if not (get $cluster "num_workers") -}}
{{- $tp := int (default 1 (get (default dict (get $cfg "model")) "tensor_parallel_size")) -}}
{{- $_ := set $cluster "num_workers" (max 1 (div (mul (int $w.replicas) (max 1 (int $w.gpus))) $tp)) -}}
{{- end -}}
{{- $_ := set $cfg "cluster" $cluster -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Checks that JSON schema cannot express; fail with a message naming the values. */}}
{{- define "kvcluster.validate" -}}
{{- $w := .Values.rayService.worker -}}
{{- if gt (int $w.minReplicas) (int $w.maxReplicas) -}}
{{- fail (printf "rayService.worker.minReplicas (%d) must not exceed rayService.worker.maxReplicas (%d)" (int $w.minReplicas) (int $w.maxReplicas)) -}}
{{- end -}}
{{- if or (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas)) -}}
{{- fail (printf "rayService.worker.replicas (%d) must lie between minReplicas (%d) and maxReplicas (%d)" (int $w.replicas) (int $w.minReplicas) (int $w.maxReplicas)) -}}
{{- end -}}
{{- if and (not .Values.qdrant.enabled) (not .Values.qdrant.externalUrl) -}}
{{- fail "qdrant.enabled is false: set qdrant.externalUrl to the Qdrant server kvcluster should use" -}}
{{- end -}}
{{- end -}}
