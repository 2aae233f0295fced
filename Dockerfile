# FLUX API worker image: one container per GPU (see docker-compose.multi-gpu.yml).
#   docker build -t flux-api .
#   docker run --gpus '"device=0"' --network host -e FP4_API_PORT=8000 flux-api
# The CUDA runtime comes with PyPI's torch wheels; the host needs the NVIDIA driver and the
# NVIDIA Container Toolkit. For a CPU-only image: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim

ARG TORCH_INDEX=""
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/huggingface \
    FLUX_OUTPUT_DIR=/data/outputs \
    FLUX_HOST=127.0.0.1

RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 flux \
    && mkdir -p /data/huggingface /data/outputs \
    && chown -R flux:flux /data

WORKDIR /app
COPY requirements.txt .
RUN if [ -n "$TORCH_INDEX" ]; then pip install torch --index-url "$TORCH_INDEX"; fi \
    && pip install -r requirements.txt

COPY --chown=flux:flux . .
USER flux

# FP4_API_PORT / BF16_API_PORT / FP8_API_PORT or FLUX_PORT choose the port (default 8000).
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${FLUX_PORT:-8000}/health" || exit 1
# SIGTERM drains: /health 503, new work refused, accepted work finished within FLUX_DRAIN_TIMEOUT.
STOPSIGNAL SIGTERM
CMD ["python", "main_fp4.py"]
