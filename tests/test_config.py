"""Config validation: errors name the key, the value and what is allowed."""

import pytest

from rlhf_cluster.config import ConfigError, load_config

QS = "configs/quickstart.yaml"


def test_quickstart_config_loads_with_overrides():
    cfg = load_config(QS, ["rl.steps=7", "learner.zero_stage=3"])
    assert cfg.rl.steps == 7 and cfg.learner.zero_stage == 3
    assert cfg.reward.weights == {"correct": 0.8, "reasoning_present": 0.2, "preference": 0.5}


@pytest.mark.parametrize("override, fragments", [
    ("rl.stepz=5", ["rl.stepz", "steps"]),
    ("learner.zero_stage=5", ["learner.zero_stage=5", "[0, 1, 2, 3]"]),
    ("learner.lr=abc", ["learner.lr", "abc"]),
    ("rollout.engine=tgi", ["rollout.engine='tgi'", "'hf'", "'vllm'"]),
    ("rollout.samples_per_prompt=1", ["rollout.samples_per_prompt", ">= 2"]),
    ("rollout.top_p=1.5", ["rollout.top_p=1.5", "(0, 1]"]),
    ("reward.weights.vibes=1.0", ["reward.weights.vibes", "correct", "preference"]),
    ("reward.services.preference.enabled=false", ["reward.weights.preference", "no reward service"]),
    ("run.stages=[sft,rm,rl]", ["run.stages", "['rm', 'sft', 'rl']"]),
    ("rm.micro_batch_size=33", ["rm.micro_batch_size=33", "even"]),
    ("reward.normalize.preference=minmax", ["reward.normalize.preference='minmax'", "running_zscore"]),
    ("reward.verifiers=[correct,vibes]", ["vibes", "exact_match"]),
    ("run.stages=[rl,dance]", ["dance", "rl"]),
    ("rl.steps=0", ["rl.steps=0", "> 0"]),
    ("sync.transport=carrier_pigeon", ["sync.transport='carrier_pigeon'", "'shm'", "'object_store'"]),
    ("sync.bucket_mb=0", ["sync.bucket_mb=0", "> 0"]),
])
def test_bad_values_name_key_value_and_allowed(override, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(QS, [override])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_override_without_equals_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(QS, ["rl.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_required_keys_reported(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rl: {steps: 3}\n")
    with pytest.raises(ConfigError, match="model.path"):
        load_config(f)


def test_curation_and_rm_keys_are_checked_together():
    assert load_config(QS, ["rl.curation.enabled=true"]).rl.curation.high == 0.75
    with pytest.raises(ConfigError, match="rl.curation.component='vibes'.*no reward service"):
        load_config(QS, ["rl.curation.enabled=true", "rl.curation.component=vibes"])
    with pytest.raises(ConfigError, match=r"low <= high"):
        load_config(QS, ["rl.curation.enabled=true", "rl.curation.low=0.9", "rl.curation.high=0.5"])
    with pytest.raises(ConfigError, match="data.pairs_path"):
        load_config(QS, ["data.pairs_path=null", "run.stages=[rm,rl]"])
    with pytest.raises(ConfigError, match="reward model.*preference.path"):
        load_config(QS, ["run.stages=[sft,rl]"])
    cfg = load_config(QS, ["run.stages=[sft,rl]", "reward.services.preference.path=/models/rm"])
    assert cfg.reward.services.preference.path == "/models/rm"


def test_buffered_batches_fit_in_a_rollout_worker():
    from rlhf_cluster.weight_sync import ROLLOUT_CONCURRENCY

    load_config("configs/quickstart.yaml", [f"rl.max_buffered_batches={ROLLOUT_CONCURRENCY - 1}"])
    with pytest.raises(ConfigError, match=f"rl.max_buffered_batches={ROLLOUT_CONCURRENCY} must be at most"):
        load_config("configs/quickstart.yaml", [f"rl.max_buffered_batches={ROLLOUT_CONCURRENCY}"])
