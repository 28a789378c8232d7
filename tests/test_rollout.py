"""Rollout side: exact token ids and logprobs reach the training batch, audio stays paired."""

import pytest
import torch

from actors.rollout_worker import RolloutWorker
from rlhf_cluster.data.tasks import load_tasks
from rlhf_cluster.experience import collate
from rlhf_cluster.models import load_model
from learners.losses import token_logprobs

SAMPLING = {"n": 3, "max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0}


@pytest.fixture(scope="module")
def worker(tiny_model_dir):
    return RolloutWorker(0, tiny_model_dir, system_prompt="you are a caring voice assistant .")


@pytest.fixture(scope="module")
def tasks(synthetic_dir):
    return load_tasks(synthetic_dir / "tasks.parquet").tasks[:4]


def test_batch_tokens_masks_and_logprobs_equal_what_the_engine_sampled(worker, tasks):
    episodes = worker.rollout(tasks, SAMPLING, step=1)
    assert len(episodes) == len(tasks) * SAMPLING["n"]
    batch = collate(episodes, worker.pad_token_id())
    for b, ep in enumerate(episodes):
        prompt_ids, _ = worker.adapter.render_prompt(worker.system_prompt, tasks[b // 3].turns)
        sampled = ep.token_ids[len(prompt_ids):]
        assert ep.token_ids[:len(prompt_ids)] == prompt_ids
        row_mask = batch.loss_mask[b].bool()
        assert batch.input_ids[b][row_mask].tolist() == sampled  # exactly the sampled ids
        assert row_mask.nonzero().flatten().tolist() == list(range(len(prompt_ids), len(ep.token_ids)))
        assert batch.old_logprobs[b][row_mask].tolist() == pytest.approx(ep.logprobs[len(prompt_ids):])
        assert 1 <= len(sampled) <= SAMPLING["max_new_tokens"]
        assert not set(sampled) & set(worker.adapter.suppress_token_ids)  # no audio placeholders
        if ep.finish_reason == "stop":
            assert sampled[-1] in worker.adapter.stop_token_ids
        assert ep.episode_id == f"s000001-{ep.prompt_id}-{ep.sample_index}"


def test_audio_is_paired_with_its_episode_when_prompts_have_n_samples(worker, tasks, tiny_model_dir):
    """Several prompts x n samples in one batch: each row's forward pass sees its own clip.

    Per-row logprobs recomputed from the collated batch must equal those from running each
    episode alone with its own prompt's audio, and equal the engine's behaviour logprobs."""
    episodes = worker.rollout(tasks, SAMPLING, step=2)
    batch = collate(episodes, worker.pad_token_id())
    assert batch.model_inputs["clips_per_row"].tolist() == [1] * len(episodes)
    model = load_model(tiny_model_dir).eval()
    suppress = torch.tensor(worker.adapter.suppress_token_ids)

    def masked(logits):  # the distribution the engine samples from
        return logits.index_fill(-1, suppress, float("-inf"))

    inputs = {k: v for k, v in batch.model_inputs.items() if k != "clips_per_row"}
    with torch.no_grad():
        together = token_logprobs(masked(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                               **inputs).logits), batch.input_ids)
        for b, ep in enumerate(episodes):
            own_audio = worker.adapter.audio_inputs([tasks[b // 3].turns[0].audio])
            ids = torch.tensor([ep.token_ids])
            alone = token_logprobs(masked(model(input_ids=ids, **own_audio).logits), ids)[0]
            mask = batch.loss_mask[b, :len(ep.token_ids)].bool()
            assert torch.allclose(together[b, :len(ep.token_ids)][mask], alone[mask], atol=1e-5)
            assert torch.allclose(alone[mask], batch.old_logprobs[b, :len(ep.token_ids)][mask], atol=1e-4)
    # and a shuffled pairing would be detected: the clips differ between prompts
    assert not torch.equal(inputs["input_features"][0], inputs["input_features"][3])


def test_update_weights_copies_every_tensor_and_rejects_unknown_names(worker):
    new = {k: torch.randn_like(v) for k, v in worker.named_tensors().items()}
    assert worker.update_weights(5, new) == 5 and worker.weight_version() == 5
    for name, tensor in worker.named_tensors().items():
        assert torch.equal(tensor, new[name])
    with pytest.raises(KeyError, match="unknown names"):
        worker.update_weights(6, {**new, "not.a.weight": torch.zeros(1)})
