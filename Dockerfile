# syntax=docker/dockerfile:1
# xorserve images: one Dockerfile, one target per role (docker-compose.yml builds each):
#   trainer   train -> export -> parity into /models (PyTorch)
#   server    `xorserve serve` on ONNX Runtime with CUDA 13 + cuDNN 9 from pip; no PyTorch, no CUDA base image
#   loadtest  Locust master or worker running loadtest/locustfile.py; no ONNX Runtime, no PyTorch
# What is pinned: every package named in constraints.txt (the versions the test suite ran with) is
# installed at exactly that version. What is not:
#   - the server's NVIDIA CUDA and cuDNN wheels (nvidia-cuda-runtime, nvidia-cuda-nvrtc, nvidia-cufft,
#     nvidia-curand, nvidia-cudnn-cu13, and the nvidia-* wheels those require) from onnxruntime-gpu's
#     cuda and cudnn extras: constraints.txt was frozen on a machine without them, so pip takes the
#     newest that onnxruntime-gpu 1.31.1 allows (~=13.0, ~=12.0, ~=10.0, ~=9.0) when the image is built;
#   - the trainer's CUDA dependencies of torch 2.13.0 (nvidia-*, triton), absent for the same reason:
#     pip takes what that torch wheel's metadata requires;
#   - the base image (a tag, not a digest) and the pip that comes with it.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# A fixed non-root uid. /models belongs to it, so a fresh named volume mounted there does too.
RUN useradd --create-home --uid 10001 --user-group xorserve \
    && install -d -o xorserve -g xorserve /models
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY serving/ serving/
COPY trainer/ trainer/
COPY loadtest/ loadtest/

FROM base AS trainer
# PyPI's torch==2.13.0 for Linux is the CUDA build (gigabytes); the trainer runs it on the CPU here
# (--device cpu below), so the model it writes is the same whichever host builds the image.
RUN pip install -c constraints.txt ".[train]"
USER xorserve
CMD ["xorserve", "train", "--out", "/models/xor/1", "--device", "cpu"]

FROM base AS server
# The cuda and cudnn extras bring the CUDA 13 and cuDNN 9 user-space libraries as wheels;
# serving.runtime preloads them. The host's driver arrives through the NVIDIA container toolkit.
RUN pip install -c constraints.txt ".[serve]" "onnxruntime-gpu[cuda,cudnn]"
USER xorserve
EXPOSE 8001 8002
CMD ["xorserve", "serve", "--model-repository", "/models", "--host", "0.0.0.0", "--port", "8001", "--metrics-port", "8002"]

FROM base AS loadtest
# Only what the Locust user imports (the generated stubs need protobuf); the project itself without
# its dependencies, so ONNX Runtime stays out of the load generators.
RUN pip install -c constraints.txt locust grpcio protobuf numpy \
    && pip install --no-deps .
USER xorserve
EXPOSE 8089 5557
CMD ["locust", "-f", "loadtest/locustfile.py", "--host", "server:8001"]
