"""The vLLM engine's config keys, validated before any actor starts (no vLLM needed here)."""

import pytest

from rlhf_cluster.config import ConfigError, load_config
from rlhf_cluster.driver import engine_options

QS = "configs/quickstart.yaml"


@pytest.mark.parametrize("overrides, fragments", [
    (["rollout.gpu_memory_utilization=0"], ["rollout.gpu_memory_utilization=0", "(0, 1]"]),
    (["rollout.gpu_memory_utilization=1.5"], ["rollout.gpu_memory_utilization=1.5", "(0, 1]"]),
    (["rollout.tensor_parallel_size=0"], ["rollout.tensor_parallel_size=0", ">= 1"]),
    (["rollout.engine=vllm", "rollout.tensor_parallel_size=2", "rollout.num_gpus_per_worker=1"],
     ["tensor_parallel_size=2", "num_gpus_per_worker >= 2", "got 1"]),
])
def test_bad_vllm_settings_name_key_and_allowed(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(QS, overrides)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_engine_options_reach_only_the_vllm_engine():
    cfg = load_config(QS, ["rollout.engine=vllm", "rollout.tensor_parallel_size=2",
                           "rollout.num_gpus_per_worker=2", "rollout.gpu_memory_utilization=0.3"])
    assert engine_options(cfg) == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.3}
    assert engine_options(load_config(QS, ["rollout.tensor_parallel_size=2"])) == {}
