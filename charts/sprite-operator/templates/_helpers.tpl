{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "sprite-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix of every object name: "<release>-<chart>", or the release name alone
when it already contains the chart name. Kept short enough that
"<fullname>-controller" still fits 63 characters.
*/}}
{{- define "sprite-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sprite-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels of every object. */}}
{{- define "sprite-operator.labels" -}}
helm.sh/chart: {{ include "sprite-operator.chart" . }}
app.kubernetes.io/name: {{ include "sprite-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sprite-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "controller"). */}}
{{- define "sprite-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sprite-operator.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Standard labels plus the component: (dict "ctx" $ "component" "relay"). */}}
{{- define "sprite-operator.componentLabels" -}}
{{ include "sprite-operator.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* ServiceAccount name of a component: (dict "ctx" $ "component" "controller"). */}}
{{- define "sprite-operator.serviceAccountName" -}}
{{- $sa := (index .ctx.Values .component).serviceAccount }}
{{- if $sa.create }}
{{- default (printf "%s-%s" (include "sprite-operator.fullname" .ctx) .component) $sa.name }}
{{- else }}
{{- required (printf "%s.serviceAccount.name is required when %s.serviceAccount.create is false" .component .component) $sa.name }}
{{- end }}
{{- end }}

{{- define "sprite-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "sprite-operator.simImage" -}}
{{- printf "%s:%s" .Values.sim.image.repository (default .Chart.AppVersion .Values.sim.image.tag) }}
{{- end }}

{{- define "sprite-operator.simName" -}}
{{- printf "%s-sim" (include "sprite-operator.fullname" .) }}
{{- end }}

{{/* The Sprites.dev API URL: explicit, else the simulator's Service, else the real API. */}}
{{- define "sprite-operator.spritesApiUrl" -}}
{{- if .Values.sprites.apiUrl }}
{{- .Values.sprites.apiUrl }}
{{- else if .Values.sim.enabled }}
{{- printf "http://%s.%s.svc:%v" (include "sprite-operator.simName" .) .Release.Namespace .Values.sim.port }}
{{- else }}
{{- "https://api.sprites.dev" }}
{{- end }}
{{- end }}

{{/*
The Secret holding the Sprites.dev token, and its key: an existing Secret, the
chart's own from sprites.token, or the simulator's. Fails the render with a
clear message when there is none.
*/}}
{{- define "sprite-operator.tokenSecretName" -}}
{{- if .Values.sprites.existingSecret }}
{{- .Values.sprites.existingSecret }}
{{- else if .Values.sprites.token }}
{{- printf "%s-sprites-token" (include "sprite-operator.fullname" .) }}
{{- else if .Values.sim.enabled }}
{{- include "sprite-operator.simName" . }}
{{- else }}
{{- fail "\n\nsprite-operator needs a Sprites.dev API token: set sprites.existingSecret to a Secret holding it (key sprites.existingSecretKey, default \"token\"), or sprites.token to let the chart create that Secret, or sim.enabled=true to run against the bundled simulator.\n" }}
{{- end }}
{{- end }}

{{- define "sprite-operator.tokenSecretKey" -}}
{{- if .Values.sprites.existingSecret }}
{{- .Values.sprites.existingSecretKey }}
{{- else }}
{{- "token" }}
{{- end }}
{{- end }}

{{/* pip arguments: explicit, else the simulator image's wheelhouse when the sim runs. */}}
{{- define "sprite-operator.pipArgs" -}}
{{- if .Values.pipArgs }}
{{- toJson .Values.pipArgs }}
{{- else if .Values.sim.enabled }}
{{- toJson (list "--no-index" "--find-links" .Values.sim.wheelhouse) }}
{{- else }}
{{- "[]" }}
{{- end }}
{{- end }}

{{/* Where RBAC for watched objects goes: ClusterRole or a Role in watchNamespace. */}}
{{- define "sprite-operator.rbacKind" -}}
{{- if .Values.watchNamespace }}Role{{ else }}ClusterRole{{ end }}
{{- end }}

{{/* Is JWT verification configured in the relay (an HS256 secret or a JWKS)? "true" or "". */}}
{{- define "sprite-operator.jwtConfigured" -}}
{{- if or .Values.relay.jwt.hs256SecretName .Values.relay.jwt.jwksConfigMap }}true{{ end }}
{{- end }}

{{/*
"true" when the relay verifies JWTs without checking `iss` or `aud`, which
relay.jwt.allowMissingIssuerAndAudience must have allowed.
*/}}
{{- define "sprite-operator.jwtUnscoped" -}}
{{- $jwt := .Values.relay.jwt }}
{{- if and (include "sprite-operator.jwtConfigured" .) (or (not $jwt.issuer) (not $jwt.audience)) }}true{{ end }}
{{- end }}

{{/*
Fails the render when JWT verification is configured without an issuer and an
audience: a signature alone only proves the identity provider minted the
token, for any of its applications, so a token meant for another application
would open a Sprite session.
*/}}
{{- define "sprite-operator.checkJwt" -}}
{{- $jwt := .Values.relay.jwt }}
{{- if and (include "sprite-operator.jwtUnscoped" .) (not $jwt.allowMissingIssuerAndAudience) }}
{{- $missing := list }}
{{- if not $jwt.issuer }}{{ $missing = append $missing "relay.jwt.issuer" }}{{ end }}
{{- if not $jwt.audience }}{{ $missing = append $missing "relay.jwt.audience" }}{{ end }}
{{- fail (printf "\n\nrelay.jwt.hs256SecretName or relay.jwt.jwksConfigMap is set, so the relay verifies JWTs, but these are empty: %s. Without both an issuer and an audience the relay would accept a token the identity provider minted for any of its applications. Set relay.jwt.issuer and relay.jwt.audience (the `iss` and `aud` of tokens minted for the relay), or, only if that identity provider mints tokens for the relay alone, set relay.jwt.allowMissingIssuerAndAudience=true.\n" (join ", " $missing)) }}
{{- end }}
{{- end }}
