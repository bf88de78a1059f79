# Shoal's container images: two targets of this file.
#   docker build --target cpu  -t shoal:cpu  .    Debian 12, ONNX Runtime (CPU)
#   docker build --target cuda -t shoal:cuda .    NVIDIA's CUDA 13 runtime (cuDNN 9), onnxruntime-gpu, CuPy
# --build-arg EXTRAS=cloud,trace,pytorch adds Shoal's extras to either (pytorch: a large download).
#
# Run (README "Container, Kubernetes and KServe"):
#   docker run --rm --shm-size=1g --stop-timeout=40 -p 8000-8002:8000-8002 \
#     -v "$PWD/models:/models:ro" shoal:cpu [shoal serve options]
# --shm-size: the tensor arenas are in /dev/shm (docker's default, 64 MB, is too small);
# --ipc=host instead when clients on the host use the shared-memory extensions;
# --stop-timeout above --exit-timeout-secs (30 s), the time the server drains on SIGTERM;
# --gpus all for the CUDA image (CUDA 13: NVIDIA driver 580 or newer).

ARG DEBIAN_IMAGE=debian:bookworm-slim
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# Shoal's wheel (pure Python), built once for both images.
FROM ${DEBIAN_IMAGE} AS wheel
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY server server
COPY workers workers
COPY shm shm
COPY proto proto
RUN python3 -m venv /tmp/build \
 && /tmp/build/bin/pip install --no-cache-dir -q --upgrade pip \
 && /tmp/build/bin/pip wheel --no-cache-dir -q --no-deps -w /wheels .

# The CPU image's environment: /opt/shoal, Shoal with ONNX Runtime.
FROM ${DEBIAN_IMAGE} AS cpu-venv
ARG EXTRAS=""
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/shoal \
 && /opt/shoal/bin/pip install --no-cache-dir -q --upgrade pip \
 && /opt/shoal/bin/pip install --no-cache-dir -q "$(ls /wheels/shoal-*.whl)[onnx${EXTRAS:+,$EXTRAS}]"

# The CUDA image's environment: the GPU build of ONNX Runtime, and CuPy for CUDA shared memory.
# Their CUDA major version is the base image's: onnxruntime-gpu 1.31's CUDA provider links
# libcudart.so.13 and libcublas.so.13 (check a newer release's before raising it).
FROM ${CUDA_IMAGE} AS cuda-venv
ARG EXTRAS=""
ARG CUDA_PACKAGES="onnxruntime-gpu==1.31.* cupy-cuda13x"
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/shoal \
 && /opt/shoal/bin/pip install --no-cache-dir -q --upgrade pip \
 && /opt/shoal/bin/pip install --no-cache-dir -q "$(ls /wheels/shoal-*.whl)${EXTRAS:+[$EXTRAS]}" $CUDA_PACKAGES

FROM ${CUDA_IMAGE} AS cuda
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 shoal \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/shoal --shell /usr/sbin/nologin shoal \
 && mkdir /models
COPY --from=cuda-venv /opt/shoal /opt/shoal
COPY deploy/docker/entrypoint.sh /usr/local/bin/shoal-entrypoint
ENV PATH=/opt/shoal/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SHOAL_MODEL_REPOSITORY=/models \
    SHOAL_HEALTH_URL=http://127.0.0.1:8000/v2/health/ready \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000:1000
WORKDIR /home/shoal
VOLUME ["/models"]
EXPOSE 8000 8001 8002
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["/opt/shoal/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SHOAL_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["/usr/local/bin/shoal-entrypoint"]
CMD []

# The last stage is the default target: the CPU image.
FROM ${DEBIAN_IMAGE} AS cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 shoal \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/shoal --shell /usr/sbin/nologin shoal \
 && mkdir /models
COPY --from=cpu-venv /opt/shoal /opt/shoal
COPY deploy/docker/entrypoint.sh /usr/local/bin/shoal-entrypoint
ENV PATH=/opt/shoal/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SHOAL_MODEL_REPOSITORY=/models \
    SHOAL_HEALTH_URL=http://127.0.0.1:8000/v2/health/ready
USER 1000:1000
WORKDIR /home/shoal
VOLUME ["/models"]
EXPOSE 8000 8001 8002
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["/opt/shoal/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['SHOAL_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["/usr/local/bin/shoal-entrypoint"]
CMD []
