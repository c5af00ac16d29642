{{/* The chart's name (nameOverride replaces it, as in every chart). */}}
{{- define "truenas-incus-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A release-qualified name for the operator's objects (fullnameOverride replaces it). */}}
{{- define "truenas-incus-operator.fullname" -}}
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

{{/* Where the scratch volume (VM images on their way to TrueNAS) is mounted: TIO_SCRATCH_DIR. */}}
{{- define "truenas-incus-operator.scratchPath" -}}
/var/cache/truenas-incus-operator
{{- end }}

{{/* Labels on every object (Helm's recommended set). */}}
{{- define "truenas-incus-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "truenas-incus-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: truenas-incus-operator
{{- end }}

{{/* Selector labels: stable across upgrades. */}}
{{- define "truenas-incus-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "truenas-incus-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount's name. */}}
{{- define "truenas-incus-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "truenas-incus-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- /* Only what the operator does: watch its resources, patch them (finalizer, annotations) and
       their status, read the Secrets a TrueNASConnection names, post Events. Never writes spec.
       RBAC cannot grant `get` on Secrets by label: the operator itself uses only Secrets labelled
       incus.truenas.io/credentials=true. */}}
{{- define "truenas-incus-operator.rules" -}}
- apiGroups: ["incus.truenas.io"]
  resources: ["incusinstances", "truenasconnections", "incusinstancesnapshots", "incusinstancerestores"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["incus.truenas.io"]
  resources:
    - "incusinstances/status"
    - "truenasconnections/status"
    - "incusinstancesnapshots/status"
    - "incusinstancerestores/status"
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# spec.expose: the Service and EndpointSlices named after an IncusInstance, read, made, updated and
# deleted by name (never listed or watched; one of that name the operator does not own is left alone).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "update", "delete"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "create", "update", "delete"]
{{- end }}

{{/* The policy file: the policy values without the chart's own switches. */}}
{{- define "truenas-incus-operator.policyFile" -}}
{{- omit .Values.policy "admission" | toYaml }}
{{- end }}

{{/* Globs (* and ?) as a CEL list of anchored regular expressions. */}}
{{- define "truenas-incus-operator.globRegexes" -}}
{{- $out := list -}}
{{- range . -}}
{{- $out = append $out (printf "^%s$" (regexQuoteMeta . | replace "\\*" ".*" | replace "\\?" ".")) -}}
{{- end -}}
{{- toJson $out -}}
{{- end }}

{{/* Whether a rule's snapshots block forbids a verb (snapshot, restore, clone): set to false. */}}
{{- define "truenas-incus-operator.forbids" -}}
{{- $snapshots := .rule.snapshots | default dict }}
{{- if and (hasKey $snapshots .verb) (kindIs "bool" (get $snapshots .verb)) (not (get $snapshots .verb)) }}true{{ end }}
{{- end }}

{{/* "true" when some rule or defaultRule forbids IncusInstanceSnapshots or IncusInstanceRestores,
     the ones admission can refuse (templates/admission-policy-snapshots.yaml). */}}
{{- define "truenas-incus-operator.snapshotAdmission" -}}
{{- $found := "" }}
{{- range $rule := append (.Values.policy.rules | default list) (.Values.policy.defaultRule | default dict) }}
{{- range $verb := list "snapshot" "restore" }}
{{- if include "truenas-incus-operator.forbids" (dict "rule" $rule "verb" $verb) }}{{ $found = "true" }}{{ end }}
{{- end }}
{{- end }}
{{- $found }}
{{- end }}
