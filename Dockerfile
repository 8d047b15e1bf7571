# Build-and-export image: compress a model and write ONNX + safetensors to a mounted volume.
#   docker build -t svd-export .
#   docker run --gpus all -v "$PWD/out:/out" -v "$HOME/.cache/huggingface:/hf" \
#       svd-export --model opt-6.7b --ratio 0.4 --format onnx --out /out/opt-6.7b-0.4
# No secrets are baked in: a gated model's token is passed at run time (-e HF_TOKEN).
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/hf \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The distribution's Python is whatever the pinned base image ships; pinning its apt revision as well
# would break the build at every Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /src
COPY . /src
# The package's own version floors (pyproject.toml) are the pins. The [gpu] extra brings onnxruntime-gpu,
# never the CPU `onnxruntime` beside it: both install the same module.
# hadolint ignore=DL3013
RUN pip install "/src[gpu]" \
    && mkdir -p /out /hf \
    && chown 1000:1000 /out /hf

USER 1000:1000
VOLUME ["/out", "/hf"]
WORKDIR /out
ENTRYPOINT ["svd-export"]
CMD ["--help"]
