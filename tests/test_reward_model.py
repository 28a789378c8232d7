"""The Bradley-Terry loss against hand-computed values, and the reward model's save/load and
audio-awareness (in-process; the rm stage itself runs in the quickstart test)."""

import math

import pytest
import torch

from learners.losses import bradley_terry_loss
from learners.reward_model import HEAD_FILE, RewardModel, end_positions, load_reward_model
from rlhf_cluster.audio import features_for_clips
from rlhf_cluster.models import load_model
from rlhf_cluster.rm_stage import split_heldout


def test_bradley_terry_loss_hand_computed():
    chosen = torch.tensor([2.0, 0.0, 0.5], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0, 0.5])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    # margins 1, -1, 0: -log sigmoid(m) = log(1 + e^-m)
    per_pair = [math.log(1 + math.exp(-1)), math.log(1 + math.exp(1)), math.log(2)]
    assert per_pair == pytest.approx([0.3132617, 1.3132617, 0.6931472])
    assert loss.item() == pytest.approx(sum(per_pair) / 3)
    assert metrics == {"bt_loss": pytest.approx(sum(per_pair) / 3), "pair_accuracy": pytest.approx(1 / 3),
                       "margin": pytest.approx(0.0)}
    loss.backward()
    # d/dc log(1 + e^-(c - r)) = -sigmoid(r - c) = -(1 - sigmoid(m))
    expected = [-(1 - 1 / (1 + math.exp(-m))) / 3 for m in (1.0, -1.0, 0.0)]
    assert chosen.grad.tolist() == pytest.approx(expected)


def test_bradley_terry_loss_global_normaliser_and_shape_check():
    """Two ranks with 2 pairs each, each divided by the global 4 pairs, add up to the mean."""
    c, r = torch.tensor([1.0, 2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    whole, _ = bradley_terry_loss(c, r)
    halves = [bradley_terry_loss(c[i:i + 2], r[i:i + 2], num_pairs_global=4)[0] for i in (0, 2)]
    assert float(sum(halves)) == pytest.approx(float(whole))
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


def test_end_positions():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]])
    assert end_positions(mask).tolist() == [2, 3, 0]
    with pytest.raises(ValueError, match="at least one"):
        end_positions(torch.zeros(1, 3))


def spoken_row(model_dir, seed):
    """A prompt with one clip of random speech-like noise, and its audio inputs."""
    from transformers import AutoTokenizer

    from rlhf_cluster.adapters import make_adapter
    from rlhf_cluster.data.tasks import Turn

    adapter = make_adapter("auto", model_dir, AutoTokenizer.from_pretrained(model_dir))
    wave = torch.randn(8000, generator=torch.Generator().manual_seed(seed)) * 0.1
    ids, clips = adapter.render_prompt("system", [Turn("user", "how many syllables ?", audio=wave)])
    ids = ids + adapter.text_ids("the answer is 2") + [adapter.im_end]
    feats, mask = features_for_clips(clips, max_frames=adapter.max_frames)
    return torch.tensor([ids]), {"input_features": feats, "feature_attention_mask": mask}


def test_reward_model_saves_loads_with_safetensors_and_hears_the_audio(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    model = RewardModel(load_model(tiny_model_dir)).eval()
    assert not model.backbone.get_output_embeddings().weight.requires_grad  # unused LM head: frozen
    ids, audio = spoken_row(tiny_model_dir, 0)
    _, other_audio = spoken_row(tiny_model_dir, 1)
    with torch.no_grad():
        score = model(ids, torch.ones_like(ids), **audio)[0, -1]
        other = model(ids, torch.ones_like(ids), **other_audio)[0, -1]
    assert float(score) != pytest.approx(float(other), abs=1e-6)  # same text, other voice: other score

    model.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / HEAD_FILE).is_file() and (tmp_path / "rm" / "model.safetensors").is_file()
    assert not list((tmp_path / "rm").glob("*.bin"))
    loaded = load_reward_model(tmp_path / "rm").eval()
    with torch.no_grad():
        assert float(loaded(ids, torch.ones_like(ids), **audio)[0, -1]) == pytest.approx(float(score), abs=1e-6)
    backbone = load_model(tmp_path / "rm")  # the backbone alone is an ordinary HF model dir
    assert type(backbone) is type(model.backbone)
    with pytest.raises(FileNotFoundError, match="not a reward model directory"):
        load_reward_model(tiny_model_dir)


def test_heldout_split_is_by_prompt_and_stable():
    from rlhf_cluster.data.tasks import Pair

    pairs = [Pair(f"pair-{i}", f"p{i // 2}", [], "a", "b") for i in range(400)]
    train, held = split_heldout(pairs, 0.1, seed=0)
    assert {p.prompt_id for p in train}.isdisjoint({p.prompt_id for p in held})
    assert 10 < len(held) < 70 and len(train) + len(held) == 400
    assert split_heldout(pairs, 0.1, seed=0) == (train, held)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_heldout(pairs[:1], 0.1, seed=0)
