"""The vLLM lane (run in the vLLM environment, `.ci/vllm_env.sh`): the main suite's fixtures
(tiny model, synthetic data, one local Ray instance) plus one small vLLM memory reservation."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.conftest import ray_session, synthetic_dir, tiny_model_dir  # noqa: E402,F401

# On CPU vLLM reserves this fraction of host RAM for its KV cache: keep CI boxes usable.
GPU_MEMORY_UTILIZATION = float(os.environ.get("RLHF_VLLM_MEMORY_FRACTION", "0.05"))
