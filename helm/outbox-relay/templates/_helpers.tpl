{{/* vim: set filetype=mustache: */}}
{{/*
==============================================================================
 Names and labels
 All of these take a chart context: this chart's root context `$`, or, from a
 producer chart that depends on this one, the subchart context
 `(index $.Subcharts "outbox-relay")`.
==============================================================================
*/}}

{{- define "outbox-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "outbox-relay.fullname" -}}
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

{{- define "outbox-relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Pod component: the relay itself, or the example producer app. */}}
{{- define "outbox-relay.component" -}}
{{- if eq .Values.mode "sidecar-example" }}producer-example{{ else }}relay{{ end }}
{{- end }}

{{- define "outbox-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ include "outbox-relay.component" . }}
{{- end }}

{{/* Labels without the component (each template adds its own). */}}
{{- define "outbox-relay.commonLabels" -}}
helm.sh/chart: {{ include "outbox-relay.chart" . }}
app.kubernetes.io/name: {{ include "outbox-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- with .Chart.AppVersion }}
app.kubernetes.io/version: {{ . | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: outbox-relay
{{- end }}

{{- define "outbox-relay.labels" -}}
{{ include "outbox-relay.commonLabels" . }}
app.kubernetes.io/component: {{ include "outbox-relay.component" . }}
{{- end }}

{{- define "outbox-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "outbox-relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secret holding the credentials (chart-created or existingSecret). */}}
{{- define "outbox-relay.secretName" -}}
{{- default (include "outbox-relay.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* Whether the chart creates the credentials Secret. */}}
{{- define "outbox-relay.createSecret" -}}
{{- if not .Values.existingSecret }}true{{ end }}
{{- end }}

{{/* data: of the credentials Secret (secret.yaml and the migration hook Secret). */}}
{{- define "outbox-relay.secretData" -}}
{{ .Values.secretKeys.databaseUrl }}: {{ .Values.secret.databaseUrl | b64enc | quote }}
{{- with .Values.secret.kafkaProperties }}
{{ $.Values.secretKeys.kafkaProperties }}: {{ toJson . | b64enc | quote }}
{{- end }}
{{- with .Values.secret.webhookSecret }}
{{ $.Values.secretKeys.webhookSecret }}: {{ . | b64enc | quote }}
{{- end }}
{{- with .Values.secret.webhookHeaders }}
{{ $.Values.secretKeys.webhookHeaders }}: {{ toJson . | b64enc | quote }}
{{- end }}
{{- end }}

{{/* Name of the routes ConfigMap, empty when no routes file is configured. */}}
{{- define "outbox-relay.routesConfigMapName" -}}
{{- if .Values.routes.existingConfigMap }}
{{- .Values.routes.existingConfigMap }}
{{- else if .Values.routes.content }}
{{- printf "%s-routes" (include "outbox-relay.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "outbox-relay.image" -}}
{{- $repo := .Values.image.repository }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (toString (default .Chart.AppVersion .Values.image.tag)) }}
{{- end }}
{{- end }}

{{/* shutdownTimeout + 15s: time for the relay to drain before SIGKILL. */}}
{{- define "outbox-relay.terminationGracePeriodSeconds" -}}
{{- add (int .Values.shutdownTimeout) 15 }}
{{- end }}

{{/* Checksum of the chart-managed config, to roll pods when it changes. */}}
{{- define "outbox-relay.configChecksum" -}}
{{- $cfg := dict "existingSecret" .Values.existingSecret "routes" .Values.routes.content -}}
{{- if not .Values.existingSecret }}{{ $_ := set $cfg "secret" .Values.secret }}{{ end -}}
{{- toJson $cfg | sha256sum }}
{{- end }}

{{/*
==============================================================================
 Optional relay settings
==============================================================================
outbox-relay.optionalSettings: environment variable -> path of its value in
.Values. A setting is rendered only when its value is set: null (the default in
values.yaml) or a missing key leaves the variable out, so the relay's own
default applies. Types and bounds are checked by values.schema.json.
*/}}
{{- define "outbox-relay.optionalSettings" -}}
OUTBOX_SHARDS: outbox.shards
OUTBOX_LOG_FORMAT: logFormat
OUTBOX_KAFKA_TOPIC_PREFIX: kafka.topicPrefix
OUTBOX_KAFKA_DELIVERY_TIMEOUT: kafka.deliveryTimeout
OUTBOX_KAFKA_EXACTLY_ONCE: kafka.exactlyOnce
OUTBOX_KAFKA_TRANSACTIONAL_ID_PREFIX: kafka.transactionalIdPrefix
OUTBOX_KAFKA_PROGRESS_TOPIC: kafka.progressTopic
OUTBOX_WEBHOOK_TIMEOUT: webhook.timeout
OUTBOX_WEBHOOK_CONCURRENCY: webhook.concurrency
OUTBOX_WEBHOOK_ALLOW_PRIVATE: webhook.allowPrivate
OUTBOX_WEBHOOK_BREAKER_FAILURES: webhook.breakerFailures
OUTBOX_WEBHOOK_BREAKER_COOLDOWN: webhook.breakerCooldown
OUTBOX_BATCH_SIZE: relay.batchSize
OUTBOX_WAKEUP: relay.wakeup
OUTBOX_POLL_INTERVAL: relay.pollInterval
OUTBOX_HEARTBEAT_INTERVAL: relay.heartbeatInterval
OUTBOX_REBALANCE_INTERVAL: relay.rebalanceInterval
OUTBOX_RESCAN_INTERVAL: relay.rescanInterval
OUTBOX_LEASES: relay.leases
OUTBOX_LEASE_NAMESPACE: relay.leaseNamespace
OUTBOX_MAX_ATTEMPTS: relay.maxAttempts
OUTBOX_RETRY_BACKOFF_BASE: relay.retryBackoffBase
OUTBOX_RETRY_BACKOFF_MAX: relay.retryBackoffMax
OUTBOX_STRICT_ORDER: relay.strictOrder
OUTBOX_KEEP_SENT: relay.keepSent
OUTBOX_RETENTION: retention.period
OUTBOX_RETENTION_BATCH: retention.batch
OUTBOX_RETENTION_INTERVAL: retention.interval
OUTBOX_GUARD_INTERVAL: guard.interval
OUTBOX_GUARD_XACT_AGE: guard.xactAge
OUTBOX_GUARD_SLOT_XMIN_AGE: guard.slotXminAge
OUTBOX_GUARD_DEAD_TUPLES: guard.deadTuples
OUTBOX_PENDING_SLO: guard.pendingSlo
OUTBOX_GAUGE_INTERVAL: metrics.gaugeInterval
{{- end }}

{{/*
outbox-relay.settingsEnv: env items (a YAML list) for the optional settings
that are set, in variable-name order. Parameters (dict): values (the relay's
.Values), command ("run" or "migrate"; migrate gets only the settings it
reads: the shard count of the table it creates, and the log format).
*/}}
{{- define "outbox-relay.settingsEnv" -}}
{{- $v := .values -}}
{{- $migrate := list "OUTBOX_SHARDS" "OUTBOX_LOG_FORMAT" -}}
{{- range $name, $path := include "outbox-relay.optionalSettings" . | fromYaml }}
{{- if or (eq $.command "run") (has $name $migrate) }}
{{- $val := $v }}
{{- $found := true }}
{{- range splitList "." $path }}
{{- if and $found (kindIs "map" $val) (hasKey $val .) }}
{{- $val = index $val . }}
{{- else }}
{{- $found = false }}
{{- end }}
{{- end }}
{{- if and $found (not (kindIs "invalid" $val)) }}
- name: {{ $name }}
  value: {{ include "outbox-relay.envValue" $val | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A value as the relay parses it. Numbers from values files arrive as float64,
which would print as 1e+07: whole numbers are printed as integers.
*/}}
{{- define "outbox-relay.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}{{ int64 . }}{{ else }}{{ toString . }}{{ end }}
{{- end }}

{{/*
==============================================================================
 The relay container
==============================================================================
outbox-relay.container renders ONE container as a YAML list item.
Parameters (dict):
  relay             chart context of the relay chart (see above)           [required]
  command           "run" (default) or "migrate"
  name              container name                                          (outbox-relay)
  databaseSecret    dict name/key of the Secret key holding OUTBOX_DATABASE_URL
                    (default: the relay's Secret and secretKeys.databaseUrl)
  credentialsSecret Secret with the kafka properties / webhook secret / webhook
                    headers keys
                    (default: the relay's Secret)
  routesConfigMap   ConfigMap with the routes file ("-" = none;
                    default: the relay's routes ConfigMap, if any)
  portName          name of the http container port                         (http)
  readinessProbe    false = no readinessProbe                               (true)
  volumePrefix      prefix of the volume names it mounts                    ("")
*/}}
{{- define "outbox-relay.container" -}}
{{- $r := .relay -}}
{{- $v := $r.Values -}}
{{- $cmd := default "run" .command -}}
{{- $secret := include "outbox-relay.secretName" $r -}}
{{- $db := default (dict "name" $secret "key" $v.secretKeys.databaseUrl) .databaseSecret -}}
{{- $creds := default $secret .credentialsSecret -}}
{{- $routes := default (include "outbox-relay.routesConfigMapName" $r) .routesConfigMap -}}
{{- if eq $routes "-" }}{{ $routes = "" }}{{ end -}}
{{- $portName := default "http" .portName -}}
{{- $prefix := default "" .volumePrefix -}}
{{- $port := int $v.http.port -}}
- name: {{ default "outbox-relay" .name }}
  image: {{ include "outbox-relay.image" $r | quote }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  args: ["outbox-relay", {{ $cmd | quote }}]
  env:
    - name: OUTBOX_DATABASE_URL
      valueFrom:
        secretKeyRef:
          name: {{ required "outbox-relay: the database Secret name is required (existingSecret or secret.databaseUrl)" $db.name | quote }}
          key: {{ required "outbox-relay: the database Secret key is required" $db.key | quote }}
    - name: OUTBOX_SINK
      value: {{ $v.sink | quote }}
    {{- if eq $v.sink "kafka" }}
    - name: OUTBOX_KAFKA_BOOTSTRAP_SERVERS
      value: {{ $v.kafka.bootstrapServers | quote }}
    - name: OUTBOX_KAFKA_PROPERTIES
      valueFrom:
        secretKeyRef:
          name: {{ $creds | quote }}
          key: {{ $v.secretKeys.kafkaProperties | quote }}
          optional: true
    {{- else if eq $v.sink "webhook" }}
    - name: OUTBOX_WEBHOOK_URL
      value: {{ $v.webhook.url | quote }}
    - name: OUTBOX_WEBHOOK_SECRET
      valueFrom:
        secretKeyRef:
          name: {{ $creds | quote }}
          key: {{ $v.secretKeys.webhookSecret | quote }}
          optional: true
    - name: OUTBOX_WEBHOOK_HEADERS
      valueFrom:
        secretKeyRef:
          name: {{ $creds | quote }}
          key: {{ $v.secretKeys.webhookHeaders | quote }}
          optional: true
    {{- end }}
    {{- if and $routes (eq $cmd "run") }}
    - name: OUTBOX_ROUTES_FILE
      value: {{ printf "%s/%s" (trimSuffix "/" $v.routes.mountPath) $v.routes.key | quote }}
    {{- end }}
    {{- with $v.outbox.schema }}
    - name: OUTBOX_SCHEMA
      value: {{ . | quote }}
    {{- end }}
    {{- with $v.outbox.table }}
    - name: OUTBOX_TABLE
      value: {{ . | quote }}
    {{- end }}
    - name: OUTBOX_LOG_LEVEL
      value: {{ $v.logLevel | quote }}
    - name: OUTBOX_SHUTDOWN_TIMEOUT
      value: {{ $v.shutdownTimeout | quote }}
    - name: OUTBOX_HTTP_PORT
      value: {{ ternary $port 0 (eq $cmd "run") | quote }}
    {{- with include "outbox-relay.settingsEnv" (dict "values" $v "command" $cmd) | trim }}
    {{- . | nindent 4 }}
    {{- end }}
    {{- with $v.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if eq $cmd "run" }}
  ports:
    - name: {{ $portName }}
      containerPort: {{ $port }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /healthz
      port: {{ $portName }}
    {{- with $v.startupProbe }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ $portName }}
    {{- with $v.livenessProbe }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if or (not (hasKey . "readinessProbe")) .readinessProbe }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ $portName }}
    {{- with $v.readinessProbe }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  resources:
    {{- toYaml $v.resources | nindent 4 }}
  {{- else }}
  resources:
    {{- toYaml $v.migration.resources | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.securityContext | nindent 4 }}
  volumeMounts:
    - name: {{ $prefix }}tmp
      mountPath: /tmp
    {{- if and $routes (eq $cmd "run") }}
    - name: {{ $prefix }}routes
      mountPath: {{ $v.routes.mountPath | quote }}
      readOnly: true
    {{- end }}
{{- end }}

{{/*
outbox-relay.volumes: the volumes outbox-relay.container mounts, as YAML
list items. Same parameters as outbox-relay.container.
*/}}
{{- define "outbox-relay.volumes" -}}
{{- $r := .relay -}}
{{- $v := $r.Values -}}
{{- $cmd := default "run" .command -}}
{{- $routes := default (include "outbox-relay.routesConfigMapName" $r) .routesConfigMap -}}
{{- if eq $routes "-" }}{{ $routes = "" }}{{ end -}}
{{- $prefix := default "" .volumePrefix -}}
- name: {{ $prefix }}tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if and $routes (eq $cmd "run") }}
- name: {{ $prefix }}routes
  configMap:
    name: {{ $routes | quote }}
    items:
      - key: {{ $v.routes.key | quote }}
        path: {{ $v.routes.key | quote }}
{{- end }}
{{- end }}

{{/*
==============================================================================
 Sidecar form (public API for producer charts; documented in README.md)
==============================================================================
In the producer chart (which lists outbox-relay as a dependency, with
`outbox-relay.mode: library`):

  spec:
    terminationGracePeriodSeconds: {{ include "outbox-relay.terminationGracePeriodSeconds" (index $.Subcharts "outbox-relay") }}
    containers:
      - name: app
        ...
      {{- include "outbox-relay.sidecarContainer" (dict "relay" (index $.Subcharts "outbox-relay") "databaseSecret" (dict "name" "my-app-db" "key" "DATABASE_URL")) | nindent 6 }}
    volumes:
      {{- include "outbox-relay.sidecarVolumes" (dict "relay" (index $.Subcharts "outbox-relay")) | nindent 6 }}

Parameters (dict): relay (required), databaseSecret, credentialsSecret,
routesConfigMap, name -- as for outbox-relay.container, plus
  readinessProbe  true = give the sidecar the /readyz readiness probe (false:
                  a relay that cannot reach its sink should not take the
                  producer's pod out of its Service; liveness still applies)
The sidecar names its port "outbox-http" and its volumes "outbox-relay-*" so
that they do not clash with the producer's own.
*/}}
{{- define "outbox-relay.sidecarContainer" -}}
{{- $p := dict "relay" (required "outbox-relay.sidecarContainer: parameter relay is required" .relay) "command" "run" "name" .name "databaseSecret" .databaseSecret "credentialsSecret" .credentialsSecret "routesConfigMap" .routesConfigMap "portName" (default "outbox-http" .portName) "volumePrefix" (default "outbox-relay-" .volumePrefix) "readinessProbe" (default false .readinessProbe) -}}
{{- include "outbox-relay.container" $p }}
{{- end }}

{{- define "outbox-relay.sidecarVolumes" -}}
{{- $p := dict "relay" (required "outbox-relay.sidecarVolumes: parameter relay is required" .relay) "command" "run" "routesConfigMap" .routesConfigMap "volumePrefix" (default "outbox-relay-" .volumePrefix) -}}
{{- include "outbox-relay.volumes" $p }}
{{- end }}
