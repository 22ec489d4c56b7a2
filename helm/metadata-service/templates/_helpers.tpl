{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "metadata-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name alone when it already
contains the chart name; 63 characters at most (DNS label).
*/}}
{{- define "metadata-service.fullname" -}}
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

{{/*
Full name with a suffix, still 63 characters at most.
Usage: include "metadata-service.suffixedName" (list . "migrate")
*/}}
{{- define "metadata-service.suffixedName" -}}
{{- $ctx := index . 0 }}
{{- $suffix := index . 1 }}
{{- $base := include "metadata-service.fullname" $ctx | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $base $suffix }}
{{- end }}

{{- define "metadata-service.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels.
*/}}
{{- define "metadata-service.labels" -}}
helm.sh/chart: {{ include "metadata-service.chart" . }}
{{ include "metadata-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: metadata-service
{{- end }}

{{/*
Selector labels (immutable once deployed: never add to these).
*/}}
{{- define "metadata-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "metadata-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector of the server pods (the migration Job's pods carry component=migration).
*/}}
{{- define "metadata-service.serverSelectorLabels" -}}
{{ include "metadata-service.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{/*
Selector of the relay pods (postgres mode, relay.enabled or webhooks.enabled).
*/}}
{{- define "metadata-service.relaySelectorLabels" -}}
{{ include "metadata-service.selectorLabels" . }}
app.kubernetes.io/component: relay
{{- end }}

{{/*
"true" when the relay runs as a Deployment of its own: postgres mode with
relay.enabled (NATS, and webhooks) or webhooks.enabled (webhooks only, no
NATS). In sqlite mode the server relays and delivers itself (natsEnv on the
server container) and no relay Deployment is rendered.
*/}}
{{- define "metadata-service.relayDeployed" -}}
{{- if and (or .Values.relay.enabled .Values.webhooks.enabled) (eq .Values.database.mode "postgres") }}true{{ end }}
{{- end }}

{{/*
webhooks.allowNetworks (a list, or a comma-separated string) as the one
comma-separated value METADATA_WEBHOOK_ALLOW_NETWORKS takes; "" when empty.
*/}}
{{- define "metadata-service.webhookAllowNetworks" -}}
{{- $networks := .Values.webhooks.allowNetworks }}
{{- if kindIs "string" $networks }}
{{- $networks = splitList "," $networks }}
{{- end }}
{{- $items := list }}
{{- range $networks }}
{{- with toString . | trim }}
{{- $items = append $items . }}
{{- end }}
{{- end }}
{{- join "," $items }}
{{- end }}

{{/*
The webhook variables, on the server (it checks endpoint URLs against
allowNetworks on CreateWebhook/UpdateWebhook, and delivers in sqlite mode)
and on the relay (it delivers in postgres mode). Unset values are left out,
so the binary's defaults apply.
*/}}
{{- define "metadata-service.webhookEnv" -}}
{{- $w := .Values.webhooks }}
{{- with include "metadata-service.webhookAllowNetworks" . }}
- name: METADATA_WEBHOOK_ALLOW_NETWORKS
  value: {{ . | quote }}
{{- end }}
{{- with $w.timeout }}
- name: METADATA_WEBHOOK_TIMEOUT
  value: {{ . | quote }}
{{- end }}
{{- with $w.failureWindow }}
- name: METADATA_WEBHOOK_FAILURE_WINDOW
  value: {{ . | quote }}
{{- end }}
{{- with $w.retrySchedule }}
- name: METADATA_WEBHOOK_RETRY_SCHEDULE
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Variables of the webhook settings (webhookEnv).
*/}}
{{- define "metadata-service.webhookEnvNames" -}}
{{- toJson (list "METADATA_WEBHOOK_ALLOW_NETWORKS" "METADATA_WEBHOOK_TIMEOUT" "METADATA_WEBHOOK_FAILURE_WINDOW" "METADATA_WEBHOOK_RETRY_SCHEDULE") }}
{{- end }}

{{/*
"true" when the server container relays (sqlite mode, relay.enabled).
*/}}
{{- define "metadata-service.serverRelays" -}}
{{- if and .Values.relay.enabled (eq .Values.database.mode "sqlite") }}true{{ end }}
{{- end }}

{{/*
Name of the Secret holding the NATS URL and credentials.
*/}}
{{- define "metadata-service.natsSecretName" -}}
{{- default (include "metadata-service.suffixedName" (list . "nats")) .Values.relay.nats.existingSecret }}
{{- end }}

{{/*
"true" when the chart creates the NATS Secret.
*/}}
{{- define "metadata-service.createNatsSecret" -}}
{{- if and .Values.relay.enabled (not .Values.relay.nats.existingSecret) }}true{{ end }}
{{- end }}

{{/*
NATS credentials in use: none, userPassword or creds (from the values for
the chart's Secret, from relay.nats.existingSecretAuth for an existing one).
*/}}
{{- define "metadata-service.natsAuth" -}}
{{- $n := .Values.relay.nats }}
{{- if $n.existingSecret }}{{ $n.existingSecretAuth }}
{{- else if $n.creds }}creds
{{- else if or $n.user $n.password }}userPassword
{{- else }}none
{{- end }}
{{- end }}

{{/*
The NATS variables of a container that relays (the relay's, or the server's
in sqlite mode). URL, user and password come from the NATS Secret; the
.creds file and the TLS CA are mounted files (natsVolumeMounts).
*/}}
{{- define "metadata-service.natsEnv" -}}
{{- $n := .Values.relay.nats }}
{{- $secret := include "metadata-service.natsSecretName" . }}
{{- $auth := include "metadata-service.natsAuth" . }}
- name: METADATA_NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $n.secretKeys.url }}
{{- if eq $auth "userPassword" }}
- name: METADATA_NATS_USER
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $n.secretKeys.user }}
- name: METADATA_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $n.secretKeys.password }}
{{- else if eq $auth "creds" }}
- name: METADATA_NATS_CREDS
  value: /etc/metadata-service/nats-creds/{{ $n.secretKeys.creds }}
{{- end }}
{{- with $n.tlsCaSecret }}
- name: METADATA_NATS_TLS_CA
  value: /etc/metadata-service/nats-ca/{{ $n.tlsCaKey }}
{{- end }}
- name: METADATA_NATS_STREAM
  value: {{ $n.stream | quote }}
- name: METADATA_NATS_SUBJECT_PREFIX
  value: {{ $n.subjectPrefix | quote }}
- name: METADATA_RELAY_FORMAT
  value: {{ .Values.relay.format | quote }}
{{- with $n.maxAge }}
- name: METADATA_NATS_MAX_AGE
  value: {{ . | quote }}
{{- end }}
{{- with $n.duplicateWindow }}
- name: METADATA_NATS_DUPLICATE_WINDOW
  value: {{ . | quote }}
{{- end }}
{{- if not (kindIs "invalid" $n.replicas) }}
- name: METADATA_NATS_REPLICAS
  value: {{ include "metadata-service.envValue" $n.replicas | quote }}
{{- end }}
{{- with $n.timeout }}
- name: METADATA_NATS_TIMEOUT
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Volume mounts (and volumes, below) of the NATS .creds file and TLS CA.
*/}}
{{- define "metadata-service.natsVolumeMounts" -}}
{{- if eq (include "metadata-service.natsAuth" .) "creds" }}
- name: nats-creds
  mountPath: /etc/metadata-service/nats-creds
  readOnly: true
{{- end }}
{{- if .Values.relay.nats.tlsCaSecret }}
- name: nats-ca
  mountPath: /etc/metadata-service/nats-ca
  readOnly: true
{{- end }}
{{- end }}

{{- define "metadata-service.natsVolumes" -}}
{{- $n := .Values.relay.nats }}
{{- if eq (include "metadata-service.natsAuth" .) "creds" }}
- name: nats-creds
  secret:
    secretName: {{ include "metadata-service.natsSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ $n.secretKeys.creds }}
        path: {{ $n.secretKeys.creds }}
{{- end }}
{{- with $n.tlsCaSecret }}
- name: nats-ca
  secret:
    secretName: {{ . }}
    items:
      - key: {{ $n.tlsCaKey }}
        path: {{ $n.tlsCaKey }}
{{- end }}
{{- end }}

{{/*
Variables of the NATS settings (natsEnv), set on whichever container relays.
*/}}
{{- define "metadata-service.natsEnvNames" -}}
{{- toJson (list "METADATA_NATS_URL" "METADATA_NATS_USER" "METADATA_NATS_PASSWORD" "METADATA_NATS_CREDS" "METADATA_NATS_TLS_CA" "METADATA_NATS_STREAM" "METADATA_NATS_SUBJECT_PREFIX" "METADATA_RELAY_FORMAT" "METADATA_NATS_MAX_AGE" "METADATA_NATS_DUPLICATE_WINDOW" "METADATA_NATS_REPLICAS" "METADATA_NATS_TIMEOUT") }}
{{- end }}

{{/*
config keys the relay process reads too (the rest are the server's only).
*/}}
{{- define "metadata-service.relayConfigKeys" -}}
{{- toJson (list "dbMaxConnections" "dbConnectTimeout" "watchPollInterval" "eventRetention" "logFormat" "logFilter") }}
{{- end }}

{{/*
Every variable the chart may set on the relay container, with the command
line flags of `relay` that would override them.
*/}}
{{- define "metadata-service.relayManagedFlags" -}}
DATABASE_URL: [--database-url]
METADATA_RELAY_LISTEN: [--listen]
METADATA_METRICS_LISTEN: [--metrics-listen]
METADATA_DB_MAX_CONNECTIONS: [--db-max-connections]
METADATA_DB_CONNECT_TIMEOUT: [--db-connect-timeout]
METADATA_WATCH_POLL_INTERVAL: [--watch-poll-interval]
METADATA_EVENT_RETENTION: [--event-retention]
METADATA_LOG_FORMAT: [--log-format]
RUST_LOG: [--log-filter]
METADATA_NATS_URL: [--nats-url, --relay-nats-url]
METADATA_NATS_USER: [--nats-user]
METADATA_NATS_PASSWORD: [--nats-password]
METADATA_NATS_CREDS: [--nats-creds]
METADATA_NATS_TLS_CA: [--nats-tls-ca]
METADATA_NATS_STREAM: [--nats-stream]
METADATA_NATS_SUBJECT_PREFIX: [--nats-subject-prefix]
METADATA_RELAY_FORMAT: [--format, --relay-format]
METADATA_NATS_MAX_AGE: [--nats-max-age]
METADATA_NATS_DUPLICATE_WINDOW: [--nats-duplicate-window]
METADATA_NATS_REPLICAS: [--nats-replicas]
METADATA_NATS_TIMEOUT: [--nats-timeout]
METADATA_WEBHOOK_ALLOW_NETWORKS: [--webhook-allow-networks]
METADATA_WEBHOOK_TIMEOUT: [--webhook-timeout]
METADATA_WEBHOOK_FAILURE_WINDOW: [--webhook-failure-window]
METADATA_WEBHOOK_RETRY_SCHEDULE: [--webhook-retry-schedule]
{{- end }}

{{- define "metadata-service.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "metadata-service.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
ServiceAccount of the migration Job. A pre-install hook runs before the
chart's own ServiceAccount exists, so a chart-created account cannot be used.
*/}}
{{- define "metadata-service.migrationServiceAccountName" -}}
{{- if .Values.migration.serviceAccountName }}
{{- .Values.migration.serviceAccountName }}
{{- else if .Values.serviceAccount.create }}
{{- "default" }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "metadata-service.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the credentials.
*/}}
{{- define "metadata-service.secretName" -}}
{{- default (include "metadata-service.fullname" .) .Values.existingSecret }}
{{- end }}

{{/*
Name of the short-lived hook Secret read by the migration Job.
*/}}
{{- define "metadata-service.migrationSecretName" -}}
{{- include "metadata-service.suffixedName" (list . "migrate") }}
{{- end }}

{{/*
"true" when the chart creates its own Secret (it has something to put in it).
*/}}
{{- define "metadata-service.createSecret" -}}
{{- if and (not .Values.existingSecret) (or (and (eq .Values.database.mode "postgres") .Values.database.url) .Values.auth.apiKeys .Values.auth.frontendJwtKey) }}true{{ end }}
{{- end }}

{{/*
"true" when the migration Job runs: postgres mode only (see values.yaml).
*/}}
{{- define "metadata-service.migrationEnabled" -}}
{{- if and .Values.migration.enabled (eq .Values.database.mode "postgres") }}true{{ end }}
{{- end }}

{{- define "metadata-service.sqliteUrl" -}}
sqlite:///data/metadata.db?mode=rwc
{{- end }}

{{- define "metadata-service.pvcName" -}}
{{- default (include "metadata-service.suffixedName" (list . "data")) .Values.persistence.existingClaim }}
{{- end }}

{{/*
The API keys as the server reads them: "name:sha256hex", one per line.
*/}}
{{- define "metadata-service.apiKeysText" -}}
{{- range .Values.auth.apiKeys }}
{{ .name }}:{{ .sha256 }}
{{- end }}
{{- end }}

{{/*
host:port for a listener; IPv6 addresses get brackets.
Usage: include "metadata-service.listenAddress" (list .Values.bindAddress port)
*/}}
{{- define "metadata-service.listenAddress" -}}
{{- $host := index . 0 | toString }}
{{- $port := index . 1 | int }}
{{- if and (contains ":" $host) (not (hasPrefix "[" $host)) }}
{{- printf "[%s]:%d" $host $port }}
{{- else }}
{{- printf "%s:%d" $host $port }}
{{- end }}
{{- end }}

{{/*
A humantime duration ("10s", "1m 30s", "7days", "500ms") in milliseconds.
Usage: include "metadata-service.durationMillis" (list "config.shutdownGrace" .Values.config.shutdownGrace)
*/}}
{{- define "metadata-service.durationMillis" -}}
{{- $what := index . 0 }}
{{- $text := index . 1 | toString | trim }}
{{- if not (regexMatch "^([0-9]+ *[a-zA-Zµ]+ *)+$" $text) }}
{{- fail (printf "%s: %q is not a duration; use e.g. \"10s\", \"1m\", \"1m 30s\"" $what $text) }}
{{- end }}
{{- $units := dict "nsec" 0 "ns" 0 "usec" 0 "us" 0 "µs" 0 "msec" 1 "ms" 1 "seconds" 1000 "second" 1000 "sec" 1000 "secs" 1000 "s" 1000 "minutes" 60000 "minute" 60000 "min" 60000 "mins" 60000 "m" 60000 "hours" 3600000 "hour" 3600000 "hr" 3600000 "hrs" 3600000 "h" 3600000 "days" 86400000 "day" 86400000 "d" 86400000 "weeks" 604800000 "week" 604800000 "w" 604800000 "months" 2630016000 "month" 2630016000 "M" 2630016000 "years" 31557600000 "year" 31557600000 "y" 31557600000 }}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+ *[a-zA-Zµ]+" $text -1 }}
{{- $n := regexFind "^[0-9]+" . | int64 }}
{{- $unit := regexReplaceAll "^[0-9]+ *" . "" }}
{{- if not (hasKey $units $unit) }}
{{- fail (printf "%s: unknown unit %q in %q (use ms, s, m, h, days...)" $what $unit $text) }}
{{- end }}
{{- $total = add $total (mul $n (index $units $unit)) }}
{{- end }}
{{- $total }}
{{- end }}

{{/*
Environment variable names the chart sets itself, per config key.
*/}}
{{- define "metadata-service.configEnvNames" -}}
dbMaxConnections: METADATA_DB_MAX_CONNECTIONS
dbConnectTimeout: METADATA_DB_CONNECT_TIMEOUT
dbTimeout: METADATA_DB_TIMEOUT
dbHealthInterval: METADATA_DB_HEALTH_INTERVAL
sqliteBusyTimeout: METADATA_SQLITE_BUSY_TIMEOUT
maxFieldBytes: METADATA_MAX_FIELD_BYTES
maxDepth: METADATA_MAX_DEPTH
maxRequestBytes: METADATA_MAX_REQUEST_BYTES
maxConcurrentRequests: METADATA_MAX_CONCURRENT_REQUESTS
maxWatchStreams: METADATA_MAX_WATCH_STREAMS
maxStreamsPerConnection: METADATA_MAX_STREAMS_PER_CONNECTION
watchProgressInterval: METADATA_WATCH_PROGRESS_INTERVAL
watchPollInterval: METADATA_WATCH_POLL_INTERVAL
watchBuffer: METADATA_WATCH_BUFFER
eventRetention: METADATA_EVENT_RETENTION
eventPruneInterval: METADATA_EVENT_PRUNE_INTERVAL
requestIdTtl: METADATA_REQUEST_ID_TTL
shutdownGrace: METADATA_SHUTDOWN_GRACE
disableReflection: METADATA_DISABLE_REFLECTION
corsAllowedOrigins: METADATA_CORS_ALLOWED_ORIGINS
logFormat: METADATA_LOG_FORMAT
logFilter: RUST_LOG
{{- end }}

{{/*
Every variable name the chart may set (extraEnv must not repeat them).
*/}}
{{- define "metadata-service.managedEnvNames" -}}
{{- $names := list "DATABASE_URL" "METADATA_LISTEN" "METADATA_METRICS_LISTEN" "METADATA_API_KEYS" "METADATA_API_KEYS_FILE" "METADATA_FRONTEND_JWT_KEY" "METADATA_FRONTEND_JWT_ISSUER" "METADATA_FRONTEND_JWT_AUDIENCE" "METADATA_FRONTEND_JWT_LEEWAY" "METADATA_ALLOW_UNAUTHENTICATED" "METADATA_TLS_CERT" "METADATA_TLS_KEY" "METADATA_TLS_CLIENT_CA" "OTEL_EXPORTER_OTLP_ENDPOINT" "OTEL_RESOURCE_ATTRIBUTES" "OTEL_TRACES_SAMPLER" "OTEL_TRACES_SAMPLER_ARG" }}
{{- range $k, $v := include "metadata-service.configEnvNames" . | fromYaml }}
{{- $names = append $names $v }}
{{- end }}
{{- $names = concat $names (include "metadata-service.natsEnvNames" . | fromJsonArray) }}
{{- $names = concat $names (include "metadata-service.webhookEnvNames" . | fromJsonArray) }}
{{- toJson $names }}
{{- end }}

{{/*
Command line flag of an environment variable the chart sets: the server
reads METADATA_<FLAG_IN_UPPER_SNAKE>, DATABASE_URL, RUST_LOG (--log-filter) and
OTEL_EXPORTER_OTLP_ENDPOINT (--otlp-endpoint); the other OTEL_* have no flag.
*/}}
{{- define "metadata-service.flagOfEnv" -}}
{{- if eq . "RUST_LOG" }}--log-filter
{{- else if eq . "OTEL_EXPORTER_OTLP_ENDPOINT" }}--otlp-endpoint
{{- else }}--{{ trimPrefix "METADATA_" . | lower | replace "_" "-" }}
{{- end }}
{{- end }}

{{/*
Fails when a list of extra arguments repeats a flag the chart sets through
the environment: a flag wins over its variable, so it would silently undo
the chart's value (and the checks made on it).
Usage: include "metadata-service.checkExtraArgs" (list . "extraArgs" .Values.extraArgs)
*/}}
{{- define "metadata-service.checkExtraArgs" -}}
{{- $ctx := index . 0 }}
{{- $what := index . 1 }}
{{- $args := index . 2 }}
{{- range $env := include "metadata-service.managedEnvNames" $ctx | fromJsonArray }}
{{- $flag := include "metadata-service.flagOfEnv" $env }}
{{- range $args }}
{{- $arg := toString . }}
{{- if or (eq $arg $flag) (hasPrefix (printf "%s=" $flag) $arg) }}
{{- fail (printf "%s sets %s, which the chart sets itself (%s): use the matching value (config.*, auth.*, tls.*, webhooks.*, metrics.enabled, database.*, bindAddress, containerPorts) instead" $what $flag $env) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A config value as an env value string, or "" when it is unset (null, "",
false): the server default then applies. Integers arrive as float64 from
YAML and must not be printed as 1.048576e+06.
*/}}
{{- define "metadata-service.envValue" -}}
{{- $v := . }}
{{- if kindIs "invalid" $v }}
{{- else if kindIs "bool" $v }}
{{- if $v }}true{{ end }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) }}
{{- printf "%d" (int64 $v) }}
{{- else }}
{{- toString $v }}
{{- end }}
{{- end }}

{{/*
Environment from `config` (server and migration Job).
*/}}
{{- define "metadata-service.configEnv" -}}
{{- $names := include "metadata-service.configEnvNames" . | fromYaml }}
{{- range $key := keys .Values.config | sortAlpha }}
{{- if not (hasKey $names $key) }}
{{- fail (printf "config.%s is not a known setting (known: %s); pass other flags with extraEnv or extraArgs" $key (keys $names | sortAlpha | join ", ")) }}
{{- end }}
{{- $value := include "metadata-service.envValue" (index $.Values.config $key) }}
{{- if ne $value "" }}
- name: {{ index $names $key }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
DATABASE_URL for the server and the migration Job.
Usage: include "metadata-service.databaseUrlEnv" (list . secretName)
*/}}
{{- define "metadata-service.databaseUrlEnv" -}}
{{- $ctx := index . 0 }}
{{- $secret := index . 1 }}
{{- if eq $ctx.Values.database.mode "sqlite" }}
- name: DATABASE_URL
  value: {{ include "metadata-service.sqliteUrl" $ctx | quote }}
{{- else }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $ctx.Values.secretKeys.databaseUrl }}
{{- end }}
{{- end }}

{{/*
Checks that templates cannot express in values.schema.json. Renders nothing;
fails with a message saying what to change.
*/}}
{{- define "metadata-service.validate" -}}
{{- $v := .Values }}
{{- $mode := $v.database.mode }}
{{- if eq $mode "sqlite" }}
{{- if ne (int $v.replicaCount) 1 }}
{{- fail (printf "database.mode=sqlite keeps one SQLite file on a ReadWriteOnce volume, so exactly one replica may run: set replicaCount=1 (got %d), or use database.mode=postgres for several replicas" (int $v.replicaCount)) }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- fail "database.mode=sqlite runs exactly one replica: autoscaling.enabled must be false (use database.mode=postgres to scale out)" }}
{{- end }}
{{- if $v.database.url }}
{{- fail "database.url is for database.mode=postgres; in sqlite mode the chart uses sqlite:///data/metadata.db?mode=rwc on its volume (unset database.url)" }}
{{- end }}
{{- else }}
{{- if and (not $v.database.url) (not $v.existingSecret) }}
{{- fail (printf "database.mode=postgres needs a database URL: set database.url=postgres://user:password@host:5432/db (stored in a Secret by the chart), or existingSecret=<name of a Secret with the URL under key %q>; or use database.mode=sqlite for a single-node install" $v.secretKeys.databaseUrl) }}
{{- end }}
{{- if and $v.database.url (not (regexMatch "^postgres(ql)?://" $v.database.url)) }}
{{- fail "database.url must start with postgres:// or postgresql:// in postgres mode (for SQLite set database.mode=sqlite and leave database.url empty)" }}
{{- end }}
{{- end }}
{{- if and $v.existingSecret (or $v.database.url $v.auth.apiKeys $v.auth.frontendJwtKey) }}
{{- fail (printf "existingSecret=%s is set, so database.url, auth.apiKeys and auth.frontendJwtKey must be empty: put them in that Secret under the keys %q, %q and %q (secretKeys.*)" $v.existingSecret $v.secretKeys.databaseUrl $v.secretKeys.apiKeys $v.secretKeys.frontendJwtKey) }}
{{- end }}
{{- if not (or $v.auth.apiKeys $v.auth.frontendJwtKey $v.auth.apiKeysFile $v.existingSecret $v.auth.allowUnauthenticated) }}
{{- fail "no client authentication configured, and the server refuses to start on a non-loopback address without it. Set one of: auth.apiKeys (list of {name, sha256}: KEY=$(openssl rand -hex 32); printf %s \"$KEY\" | sha256sum), auth.frontendJwtKey (HS256 secret or PEM public key), existingSecret (a Secret holding api-keys and/or frontend-jwt-key), auth.apiKeysFile (mounted file), or auth.allowUnauthenticated=true (trusted networks only)" }}
{{- end }}
{{- with $v.auth.frontendJwtKey }}
{{- if and (not (hasPrefix "-----BEGIN" (trim .))) (not (hasPrefix "@" .)) (lt (len .) 32) }}
{{- fail (printf "auth.frontendJwtKey: an HMAC secret must be at least 32 bytes (got %d; e.g. openssl rand -hex 32), or give a PEM public key or @/path/to/file" (len .)) }}
{{- end }}
{{- end }}
{{- with $v.auth.frontendJwtLeeway }}
{{- $_ := include "metadata-service.durationMillis" (list "auth.frontendJwtLeeway" .) }}
{{- end }}
{{- $names := list }}
{{- range $v.auth.apiKeys }}
{{- if has .name $names }}
{{- fail (printf "auth.apiKeys: the name %q is used twice" .name) }}
{{- end }}
{{- $names = append $names .name }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.secretName) }}
{{- fail "tls.enabled=true needs tls.secretName: a Secret (type kubernetes.io/tls) holding the server certificate and key" }}
{{- end }}
{{- if and $v.tls.enabled (not $v.metrics.enabled) }}
{{- fail "tls.enabled=true needs metrics.enabled=true: the kubelet's gRPC probes cannot speak TLS, so with TLS the probes are HTTP GETs of /healthz and /readyz on the metrics port. Keep metrics.enabled=true (restrict who reaches the port with networkPolicy.metricsFrom), or turn TLS off" }}
{{- end }}
{{- if and $v.serviceMonitor.enabled (not $v.metrics.enabled) }}
{{- fail "serviceMonitor.enabled=true needs metrics.enabled=true: the ServiceMonitor scrapes /metrics on the metrics port" }}
{{- end }}
{{- if hasKey $v.probes.liveness "type" }}
{{- fail "probes.liveness.type was removed (chart 0.2.0): the liveness probe now checks the gRPC health name \"liveness\" (an HTTP GET of /healthz with TLS), which stays SERVING while the database is down, so a database outage no longer restarts pods; delete probes.liveness.type" }}
{{- end }}
{{- if and (not $v.tls.enabled) $v.tls.clientCaSecretName }}
{{- fail "tls.clientCaSecretName (mutual TLS) needs tls.enabled=true and tls.secretName" }}
{{- end }}
{{- $graceMs := include "metadata-service.durationMillis" (list "config.shutdownGrace" (default "10s" $v.config.shutdownGrace)) | int64 }}
{{- $stopMs := add $graceMs (mul (int64 $v.lifecycle.preStopSleepSeconds) 1000) }}
{{- if le (mul (int64 $v.terminationGracePeriodSeconds) 1000) $stopMs }}
{{- fail (printf "terminationGracePeriodSeconds=%d must be greater than config.shutdownGrace (%s) plus lifecycle.preStopSleepSeconds (%d): Kubernetes kills the pod at terminationGracePeriodSeconds, before open calls could finish. Raise terminationGracePeriodSeconds (leave a few seconds of margin) or lower config.shutdownGrace" (int64 $v.terminationGracePeriodSeconds) (toString (default "10s" $v.config.shutdownGrace)) (int64 $v.lifecycle.preStopSleepSeconds)) }}
{{- end }}
{{- range $key := list "dbConnectTimeout" "dbTimeout" "dbHealthInterval" "sqliteBusyTimeout" "watchProgressInterval" "watchPollInterval" "eventRetention" "eventPruneInterval" "requestIdTtl" }}
{{- $d := index $v.config . }}
{{- if $d }}
{{- $_ := include "metadata-service.durationMillis" (list (printf "config.%s" $key) $d) }}
{{- end }}
{{- end }}
{{- if $v.autoscaling.enabled }}
{{- if gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- end }}
{{- if not (or $v.autoscaling.targetCPUUtilizationPercentage $v.autoscaling.targetMemoryUtilizationPercentage) }}
{{- fail "autoscaling.enabled needs autoscaling.targetCPUUtilizationPercentage or autoscaling.targetMemoryUtilizationPercentage" }}
{{- end }}
{{- end }}
{{- if $v.podDisruptionBudget.enabled }}
{{- $maxU := $v.podDisruptionBudget.maxUnavailable }}
{{- $minA := $v.podDisruptionBudget.minAvailable }}
{{- if and (kindIs "invalid" $maxU) (kindIs "invalid" $minA) }}
{{- fail "podDisruptionBudget.enabled needs maxUnavailable or minAvailable" }}
{{- end }}
{{- end }}
{{- include "metadata-service.validateRelay" . }}
{{- include "metadata-service.validateWebhooks" . }}
{{- include "metadata-service.checkExtraArgs" (list . "extraArgs" $v.extraArgs) }}
{{- include "metadata-service.checkExtraArgs" (list . "migration.extraArgs" $v.migration.extraArgs) }}
{{- $managed := include "metadata-service.managedEnvNames" . | fromJsonArray }}
{{- range $v.extraEnv }}
{{- if has .name $managed }}
{{- fail (printf "extraEnv sets %s, which the chart sets itself: use the matching value (config.*, auth.*, tls.*, webhooks.*, database.*, bindAddress, containerPorts) instead" .name) }}
{{- end }}
{{- end }}
{{- end }}


{{/*
Environment from `config` for the relay: the keys it reads (relayConfigKeys).
*/}}
{{- define "metadata-service.relayConfigEnv" -}}
{{- $names := include "metadata-service.configEnvNames" . | fromYaml }}
{{- range $key := include "metadata-service.relayConfigKeys" . | fromJsonArray }}
{{- $value := include "metadata-service.envValue" (index $.Values.config $key) }}
{{- if ne $value "" }}
- name: {{ index $names $key }}
  value: {{ $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks of the relay values (called from validate).
*/}}
{{- define "metadata-service.validateRelay" -}}
{{- $v := .Values }}
{{- $r := $v.relay }}
{{- $n := $r.nats }}
{{- if $n.existingSecret }}
{{- if or $n.url $n.user $n.password $n.creds }}
{{- fail (printf "relay.nats.existingSecret=%s is set, so relay.nats.url, relay.nats.user, relay.nats.password and relay.nats.creds must be empty: put them in that Secret under the keys %q, %q, %q and %q (relay.nats.secretKeys.*) and say which credentials it holds with relay.nats.existingSecretAuth (none, userPassword or creds)" $n.existingSecret $n.secretKeys.url $n.secretKeys.user $n.secretKeys.password $n.secretKeys.creds) }}
{{- end }}
{{- else }}
{{- if ne $n.existingSecretAuth "none" }}
{{- fail (printf "relay.nats.existingSecretAuth=%s is for relay.nats.existingSecret, which is empty: set relay.nats.user and relay.nats.password, or relay.nats.creds, instead" $n.existingSecretAuth) }}
{{- end }}
{{- if $r.enabled }}
{{- if not $n.url }}
{{- fail (printf "relay.enabled=true needs a NATS URL: set relay.nats.url=nats://host:4222 (stored in a Secret by the chart), or relay.nats.existingSecret=<name of a Secret with the URL under key %q>" $n.secretKeys.url) }}
{{- end }}
{{- if and $n.creds (or $n.user $n.password) }}
{{- fail "relay.nats.creds and relay.nats.user/password exclude each other (the relay refuses both): keep one" }}
{{- end }}
{{- if and (or $n.user $n.password) (not (and $n.user $n.password)) }}
{{- fail "relay.nats.user and relay.nats.password go together: set both, or neither" }}
{{- end }}
{{- end }}
{{- end }}
{{- if $r.enabled }}
{{- range $key := list "maxAge" "duplicateWindow" "timeout" }}
{{- with index $n $key }}
{{- $_ := include "metadata-service.durationMillis" (list (printf "relay.nats.%s" $key) .) }}
{{- end }}
{{- end }}
{{- $maxAge := $n.maxAge | default $v.config.eventRetention | default "7days" }}
{{- $maxAgeMs := include "metadata-service.durationMillis" (list "relay.nats.maxAge" $maxAge) | int64 }}
{{- $dupMs := include "metadata-service.durationMillis" (list "relay.nats.duplicateWindow" ($n.duplicateWindow | default "2m")) | int64 }}
{{- if gt $dupMs $maxAgeMs }}
{{- fail (printf "relay.nats.duplicateWindow (%s) must not exceed the stream's max age (%s: relay.nats.maxAge, else config.eventRetention): the relay refuses to start" ($n.duplicateWindow | default "2m") $maxAge) }}
{{- end }}
{{- end }}
{{- /* A webhooks-only relay (webhooks.enabled, no NATS) has the same
ports and the same flags to protect. */}}
{{- if or $r.enabled (include "metadata-service.relayDeployed" .) }}
{{- if and $v.metrics.enabled (include "metadata-service.relayDeployed" .) (eq (int $r.containerPorts.health) (int $r.containerPorts.metrics)) }}
{{- fail (printf "relay.containerPorts.health and relay.containerPorts.metrics must differ (both %d)" (int $r.containerPorts.health)) }}
{{- end }}
{{- $relayFlags := include "metadata-service.relayManagedFlags" . | fromYaml }}
{{- range $env, $flags := $relayFlags }}
{{- range $flag := $flags }}
{{- range $r.extraArgs }}
{{- $arg := toString . }}
{{- if or (eq $arg $flag) (hasPrefix (printf "%s=" $flag) $arg) }}
{{- fail (printf "relay.extraArgs sets %s, which the chart sets itself (%s): use the matching value (relay.*, webhooks.*, config.*, metrics.enabled, bindAddress) instead" $flag $env) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- $shared := list }}
{{- range $v.extraEnv }}
{{- $shared = append $shared .name }}
{{- end }}
{{- range $r.extraEnv }}
{{- if hasKey $relayFlags .name }}
{{- fail (printf "relay.extraEnv sets %s, which the chart sets itself: use the matching value (relay.*, webhooks.*, config.*, metrics.enabled, bindAddress) instead" .name) }}
{{- end }}
{{- if has .name $shared }}
{{- fail (printf "relay.extraEnv sets %s, which extraEnv sets as well (the relay gets both): set it in one of them" .name) }}
{{- end }}
{{- end }}
{{- if include "metadata-service.relayDeployed" . }}
{{- range $v.extraEnv }}
{{- if hasKey $relayFlags .name }}
{{- fail (printf "extraEnv sets %s, which the chart sets itself on the relay (extraEnv goes to the relay too): use the matching value instead" .name) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Checks of the webhook values (called from validate): the schema checks
their shape, these the units the binary would refuse at start.
*/}}
{{- define "metadata-service.validateWebhooks" -}}
{{- $w := .Values.webhooks }}
{{- with $w.timeout }}
{{- if eq (include "metadata-service.durationMillis" (list "webhooks.timeout" .) | int64) 0 }}
{{- fail (printf "webhooks.timeout must be at least 1ms (got %q): every delivery would time out" .) }}
{{- end }}
{{- end }}
{{- with $w.failureWindow }}
{{- $_ := include "metadata-service.durationMillis" (list "webhooks.failureWindow" .) }}
{{- end }}
{{- with $w.retrySchedule }}
{{- range splitList "," . }}
{{- $_ := include "metadata-service.durationMillis" (list "webhooks.retrySchedule" .) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
otel.resourceAttributes as OTEL_RESOURCE_ATTRIBUTES: key=value pairs joined
by commas, in key order so that the rendering is stable.
*/}}
{{- define "metadata-service.resourceAttributes" -}}
{{- $pairs := list }}
{{- range $key := keys . | sortAlpha }}
{{- $pairs = append $pairs (printf "%s=%s" $key (toString (index $ $key))) }}
{{- end }}
{{- join "," $pairs }}
{{- end }}
