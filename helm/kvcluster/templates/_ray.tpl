{{/*
One Ray container (head or worker). Pass a dict:
  ctx: the root context; role: "head" or "worker"; group: .Values.rayService.head/worker;
  resources: the container's resources (GPUs already added).
*/}}
{{- define "kvcluster.rayContainer" -}}
{{- $ctx := .ctx -}}
{{- $rs := $ctx.Values.rayService -}}
- name: ray-{{ .role }}
  image: {{ include "kvcluster.image" $ctx | quote }}
  imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
  ports:
    {{- if eq .role "head" }}
    - name: gcs-server
      containerPort: 6379
      protocol: TCP
    - name: dashboard
      containerPort: 8265
      protocol: TCP
    - name: client
      containerPort: 10001
      protocol: TCP
    {{- end }}
    - name: serve
      containerPort: {{ $rs.serve.port }}
      protocol: TCP
    - name: metrics
      containerPort: {{ $ctx.Values.monitoring.metricsPort }}
      protocol: TCP
  env:
    - name: KVCLUSTER_CONFIG
      value: {{ include "kvcluster.configPath" $ctx | quote }}
    - name: KVCLUSTER_SERVE__API_KEYS
      valueFrom:
        secretKeyRef:
          name: {{ include "kvcluster.secretName" $ctx }}
          key: {{ $ctx.Values.apiKeys.secretKey | quote }}
    {{- with $rs.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.livenessProbe }}
  livenessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.readinessProbe }}
  readinessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  lifecycle:
    preStop:
      exec:
        command: ["/bin/sh", "-c", "ray stop"]
  volumeMounts:
    - name: kvcluster-config
      mountPath: /etc/kvcluster
      readOnly: true
    - name: dshm
      mountPath: /dev/shm
    {{- with $rs.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* Pod template of a Ray group. Pass the same dict as kvcluster.rayContainer. */}}
{{- define "kvcluster.rayPodTemplate" -}}
{{- $ctx := .ctx -}}
{{- $rs := $ctx.Values.rayService -}}
metadata:
  labels:
    {{- include "kvcluster.selectorLabels" (dict "ctx" $ctx "component" (printf "ray-%s" .role)) | nindent 4 }}
    app.kubernetes.io/part-of: kvcluster
    {{- with $ctx.Values.commonLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # A config change gives the RayService a new spec, so KubeRay rolls out a new cluster.
    checksum/config: {{ include "kvcluster.configYaml" $ctx | sha256sum }}
    {{- with $rs.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "kvcluster.serviceAccountName" $ctx }}
  {{- with $ctx.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    {{- include "kvcluster.rayContainer" . | nindent 4 }}
  volumes:
    - name: kvcluster-config
      configMap:
        name: {{ include "kvcluster.configMapName" $ctx }}
    - name: dshm
      emptyDir:
        medium: Memory
        {{- with $rs.shmSizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- with $rs.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Ray Serve's multi-application config (serveConfigV2) running the kvcluster app. */}}
{{- define "kvcluster.serveConfig" -}}
{{- $s := .Values.rayService.serve -}}
{{- $args := merge (dict "config" (include "kvcluster.configPath" .)) (deepCopy $s.args) -}}
{{- $app := dict "name" $s.appName "route_prefix" $s.routePrefix "import_path" $s.importPath "args" $args -}}
{{- with $s.deployments }}{{ $_ := set $app "deployments" . }}{{ end -}}
{{- with $s.runtimeEnv }}{{ $_ := set $app "runtime_env" . }}{{ end -}}
{{- $cfg := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" (int $s.port)) "applications" (list $app) -}}
{{- toYaml $cfg -}}
{{- end -}}
