# syntax=docker/dockerfile:1
#
# VELO proxy images, from one Dockerfile:
#   docker build -t velo-proxy:0.1.0 .                       # runtime (default, last stage): onnxruntime only, no torch
#   docker build --target train -t velo-proxy:0.1.0-train .  # retrain job: the same app plus torch (CPU)
#   docker build --build-arg EXTRA_EMBEDDERS=multilingual-e5-small -t velo-proxy:0.1.0 .  # + the multilingual embedder
#
# Stages: base -> deps (runtime venv, no torch) -> torch (deps + torch CPU + export/train extras)
#         -> exporter (exports the embedder to ONNX) | train (retrain image)
#         -> runtime (deps venv + the exported model; no torch).

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    VELO_EMBEDDER_DIR=/opt/velo/models/all-MiniLM-L6-v2 \
    VELO_VERIFIER_DIR=/opt/velo/models/e5-pair-verifier \
    VELO_DATA_DIR=/var/lib/velo/data \
    VELO_HOST=0.0.0.0 \
    VELO_PORT=8080
# The unprivileged user every image runs as (uid/gid 10001; the Helm chart's securityContext uses the same ids).
RUN groupadd --system --gid 10001 velo \
    && useradd --system --uid 10001 --gid velo --home-dir /home/velo --create-home --shell /usr/sbin/nologin velo \
    && mkdir -p /var/lib/velo/data /var/lib/velo/policies \
    && chown -R velo:velo /var/lib/velo

# Runtime dependencies and the app (its default ONNX policy is package data) in a venv, without torch.
FROM base AS deps
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY velo_proxy ./velo_proxy
COPY policy ./policy
RUN pip install --no-cache-dir . \
    && ! pip show torch >/dev/null 2>&1

# torch (CPU) on top of the runtime venv: pinned to 2.13.0 from the CPU wheel index (a looser pin, or the
# default index, pulls GBs of CUDA wheels), plus the export/train extras.
FROM deps AS torch
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && pip install --no-cache-dir "/src[train,multilingual]" "torch==${TORCH_VERSION}"

# Builder: export the embedder and the pair verifiers to ONNX once (the only use of torch on the serving path):
# the default verifier (e5-pair-verifier, VELO_VERIFIER_DIR; the shipped learned policy was trained on its scores
# too) and the English one (/opt/velo/models/pair-verifier, an explicit choice for the verified policy:
# `docker run -e VELO_VERIFIER_DIR=/opt/velo/models/pair-verifier`).
# EXTRA_EMBEDDERS (space-separated: "all-MiniLM-L6-v2-int8", "multilingual-e5-small") are exported next to it, to
# /opt/velo/models/<name>, with the pair verifier that serves them beside (/opt/velo/models/<verifier>),
# for the chart's config.embedder (VELO_EMBEDDER, VELO_VERIFIER_DIR) to select.
FROM torch AS exporter
ARG EXTRA_EMBEDDERS=""
RUN velo-proxy models export --out "${VELO_EMBEDDER_DIR}" \
    && test -s "${VELO_EMBEDDER_DIR}/model.onnx" \
    && test -s "${VELO_EMBEDDER_DIR}/tokenizer.json" \
    && test -s "${VELO_VERIFIER_DIR}/model.onnx" \
    && test -s "${VELO_VERIFIER_DIR}/velo_verifier.json" \
    && test -s /opt/velo/models/pair-verifier/model.onnx \
    && for name in ${EXTRA_EMBEDDERS}; do \
         velo-proxy models export --embedder "${name}" --out "/opt/velo/models/${name}" \
         && test -s "/opt/velo/models/${name}/model.onnx" || exit 1; \
       done

# Retrain image (--target train): the app with torch, for the retrain CronJob; non-root. It embeds the simulator's
# texts (package data, policy/snapshot) with the same exported embedder as the proxy (VELO_EMBEDDER_DIR).
FROM torch AS train
COPY --from=exporter --chown=root:root /opt/velo/models /opt/velo/models
WORKDIR /home/velo
USER 10001:10001
ENTRYPOINT ["velo-proxy"]
CMD ["retrain"]

# Runtime image: onnxruntime only, the embedder and the default policy baked in, non-root.
FROM base AS runtime
LABEL org.opencontainers.image.title="velo-proxy" \
      org.opencontainers.image.description="Semantic-cache reverse proxy for OpenAI-compatible chat APIs (VELO)" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=deps /opt/venv /opt/venv
COPY --from=exporter --chown=root:root /opt/velo/models /opt/velo/models
WORKDIR /home/velo
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VELO_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["velo-proxy"]
CMD ["serve"]
