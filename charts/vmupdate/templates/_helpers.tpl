{{/* Names and labels. */}}
{{- define "vmupdate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vmupdate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "vmupdate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "vmupdate.labels" -}}
helm.sh/chart: {{ include "vmupdate.chart" . }}
app.kubernetes.io/name: {{ include "vmupdate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component (operator, agent): pass (list $ "operator"). */}}
{{- define "vmupdate.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "vmupdate.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "vmupdate.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "vmupdate.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "vmupdate.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "vmupdate.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create -}}
{{- default (printf "%s-agent" (include "vmupdate.fullname" .)) .Values.agent.serviceAccount.name -}}
{{- else -}}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The agent's gRPC port, from agent.config.listen_address (HOST:PORT). */}}
{{- define "vmupdate.agent.port" -}}
{{- $port := regexReplaceAll "^.*:" .Values.agent.config.listen_address "" -}}
{{- if not (regexMatch "^.+:[0-9]+$" .Values.agent.config.listen_address) -}}
{{- fail (printf "agent.config.listen_address: must be HOST:PORT, got %q" .Values.agent.config.listen_address) -}}
{{- end -}}
{{- $port -}}
{{- end -}}

{{/*
The directories to mount for agent.config.socket_globs: each glob's leading components
without a wildcard (/run/vms/NAME-WITH-A-STAR/qmp.sock: /run/vms; a glob without wildcards:
its directory). One per line, deduplicated, nested ones dropped. The agent connects to the
sockets in its own mount namespace, so they must be there at the same path.
*/}}
{{- define "vmupdate.agent.socketRoots" -}}
{{- $roots := list -}}
{{- range .Values.agent.config.socket_globs -}}
{{- $parts := list -}}
{{- $wild := false -}}
{{- range (rest (splitList "/" .)) -}}
{{- if or $wild (regexMatch "[*?\\[]" .) -}}
{{- $wild = true -}}
{{- else -}}
{{- $parts = append $parts . -}}
{{- end -}}
{{- end -}}
{{- if and (not $wild) $parts -}}
{{- $parts = initial $parts -}}
{{- end -}}
{{- $root := printf "/%s" (join "/" (compact $parts)) -}}
{{- if eq $root "/" -}}
{{- fail (printf "agent.config.socket_globs: %q would mount the host's / into the agent; start the glob with a directory" .) -}}
{{- end -}}
{{- $roots = append $roots $root -}}
{{- end -}}
{{- $roots = uniq $roots | sortAlpha -}}
{{- $kept := list -}}
{{- range $roots -}}
{{- $r := . -}}
{{- $nested := false -}}
{{- range $roots -}}
{{- if and (ne . $r) (hasPrefix (printf "%s/" .) $r) -}}
{{- $nested = true -}}
{{- end -}}
{{- end -}}
{{- if not $nested -}}
{{- $kept = append $kept $r -}}
{{- end -}}
{{- end -}}
{{- join "\n" $kept -}}
{{- end -}}

{{/* The agent's configuration as the ConfigMap holds it (node_name is added per node). */}}
{{- define "vmupdate.agent.config" -}}
{{- $cfg := deepCopy .Values.agent.config -}}
{{- $clientCA := ternary "/etc/vmupdate/client-ca/ca.crt" "/etc/vmupdate/tls/ca.crt" (eq .Values.certificates.agentServing "csr") -}}
{{- $_ := set $cfg "tls" (dict "cert_file" "/etc/vmupdate/tls/tls.crt" "key_file" "/etc/vmupdate/tls/tls.key" "client_ca_file" $clientCA) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The name the operator and the registrar check on an agent's serving certificate:
"{node}" (the VMHost's node) when each agent has its own (certificates.agentServing=csr). */}}
{{- define "vmupdate.agentServerName" -}}
{{- if eq .Values.certificates.agentServing "csr" -}}
{node}
{{- else -}}
{{- .Values.agentServerName -}}
{{- end -}}
{{- end -}}

{{/* Refuse certificate settings that do not go together. */}}
{{- define "vmupdate.certificates.check" -}}
{{- $c := .Values.certificates -}}
{{- if and (ne $c.create "none") (ne $c.agentServing "csr") -}}
{{- fail (printf "certificates.agentServing=%s mounts the pre-made agent.tlsSecret on every agent, and certificates.create=%s makes no agent serving certificate: set certificates.create=none and make operator.tlsSecret, registrar.tlsSecret and agent.tlsSecret beforehand (docs/install.md), or keep certificates.agentServing=csr (each agent asks for its own node's)" $c.agentServing $c.create) -}}
{{- end -}}
{{- if and (eq $c.agentServing "csr") (not .Values.registrar.enabled) -}}
{{- fail "certificates.agentServing=csr: the agents take their client CA from registrar.tlsSecret's ca.crt; keep registrar.enabled=true, or set certificates.agentServing=secret with certificates.create=none and pre-made Secrets" -}}
{{- end -}}
{{- end -}}
