{{/* Pod template of the proxy, shared by the DaemonSet and the Deployment. */}}
{{- define "velo-proxy.podTemplate" -}}
metadata:
  annotations:
    checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
    {{- if include "velo-proxy.createSecret" . }}
    checksum/secret: {{ include (print $.Template.BasePath "/secret.yaml") . | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "velo-proxy.labels" . | nindent 4 }}
    app.kubernetes.io/component: proxy
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "velo-proxy.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: proxy
      image: {{ include "velo-proxy.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["velo-proxy"]
      args: ["serve", "--host", "0.0.0.0", "--port", {{ .Values.containerPort | quote }}]
      ports:
        - name: http
          containerPort: {{ .Values.containerPort }}
          protocol: TCP
      envFrom:
        - configMapRef:
            name: {{ include "velo-proxy.fullname" . }}
      env:
        - name: VELO_AGENT_ID
          valueFrom:
            fieldRef:
              {{- if eq .Values.mode "daemonset" }}
              fieldPath: spec.nodeName
              {{- else }}
              fieldPath: metadata.name
              {{- end }}
        - name: HOME
          value: /tmp
        {{- include "velo-proxy.secretEnv" . | nindent 8 }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      startupProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: {{ .Values.probes.startup.periodSeconds }}
        failureThreshold: {{ .Values.probes.startup.failureThreshold }}
        timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
        periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
        failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
        timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
        periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
        failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
        timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: {{ .Values.dataDir.mountPath }}
        - name: tmp
          mountPath: /tmp
        {{- if .Values.retrain.enabled }}
        - name: policy
          mountPath: {{ .Values.policy.mountPath }}
          readOnly: true
        {{- end }}
    {{- if eq .Values.qdrant.mode "sidecar" }}
    {{- $q := .Values.qdrant.sidecar }}
    - name: qdrant
      image: {{ printf "%s:%s" $q.image.repository $q.image.tag | quote }}
      imagePullPolicy: {{ $q.image.pullPolicy }}
      ports:
        - name: qdrant-http
          containerPort: {{ $q.httpPort }}
          protocol: TCP
        - name: qdrant-grpc
          containerPort: {{ $q.grpcPort }}
          protocol: TCP
      env:
        - name: QDRANT__SERVICE__HTTP_PORT
          value: {{ $q.httpPort | quote }}
        - name: QDRANT__SERVICE__GRPC_PORT
          value: {{ $q.grpcPort | quote }}
        - name: QDRANT__STORAGE__STORAGE_PATH
          value: /qdrant/storage
        - name: QDRANT__STORAGE__SNAPSHOTS_PATH
          value: /qdrant/snapshots
        - name: QDRANT__TELEMETRY_DISABLED
          value: "true"
        - name: QDRANT_INIT_FILE_PATH
          value: /qdrant/init/.qdrant-initialized
        - name: QDRANT__SERVICE__API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ include "velo-proxy.secretName" . }}
              key: {{ .Values.auth.secretKeys.qdrantApiKey }}
              optional: true
        {{- with $q.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      startupProbe:
        httpGet:
          path: /livez
          port: qdrant-http
        periodSeconds: 5
        failureThreshold: 60
      livenessProbe:
        httpGet:
          path: /livez
          port: qdrant-http
        periodSeconds: 10
        failureThreshold: 3
      readinessProbe:
        httpGet:
          path: /readyz
          port: qdrant-http
        periodSeconds: 5
        failureThreshold: 3
      resources:
        {{- toYaml $q.resources | nindent 8 }}
      securityContext:
        {{- toYaml $q.securityContext | nindent 8 }}
      volumeMounts:
        - name: qdrant-storage
          mountPath: /qdrant/storage
        - name: qdrant-snapshots
          mountPath: /qdrant/snapshots
        - name: qdrant-init
          mountPath: /qdrant/init
        - name: tmp
          mountPath: /tmp
    {{- end }}
  volumes:
    - name: data
      emptyDir:
        {{- with .Values.dataDir.sizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    - name: tmp
      emptyDir:
        {{- with .Values.tmpSizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- if .Values.retrain.enabled }}
    - name: policy
      persistentVolumeClaim:
        claimName: {{ include "velo-proxy.policyClaimName" . }}
        readOnly: true
    {{- end }}
    {{- if eq .Values.qdrant.mode "sidecar" }}
    {{- $p := .Values.qdrant.sidecar.persistence }}
    - name: qdrant-storage
      {{- if eq $p.type "hostPath" }}
      hostPath:
        path: {{ $p.hostPath }}
        type: DirectoryOrCreate
      {{- else if eq $p.type "ephemeral" }}
      ephemeral:
        volumeClaimTemplate:
          metadata:
            labels:
              {{- include "velo-proxy.selectorLabels" . | nindent 14 }}
              app.kubernetes.io/component: qdrant
          spec:
            accessModes: ["ReadWriteOnce"]
            {{- with $p.storageClass }}
            storageClassName: {{ . }}
            {{- end }}
            resources:
              requests:
                storage: {{ $p.size }}
      {{- else }}
      emptyDir:
        {{- with $p.size }}
        sizeLimit: {{ . }}
        {{- end }}
      {{- end }}
    - name: qdrant-snapshots
      emptyDir: {}
    - name: qdrant-init
      emptyDir:
        sizeLimit: 1Mi
    {{- end }}
{{- end }}
