"""LearnerGroup on real Ray actors, real gloo process groups and real DeepSpeed ZeRO engines.

Groups are expensive (one process per rank), so each is built once per module and the
order-sensitive checks (fresh weights, the first optimizer step) run inside its fixture.
"""

from dataclasses import asdict, replace

import pytest
import ray
import torch
from transformers import AutoTokenizer

from learners.group import LearnerGroup
from learners.losses import token_logprobs
from rlhf_cluster.batch import TrainBatch
from rlhf_cluster.config import LearnerConfig
from rlhf_cluster.models import load_model
from rlhf_cluster.tiny_model import (AUDIO_BOS, AUDIO_EOS, AUDIO_MAX_FRAMES, AUDIO_TOKEN, IM_END,
                                     IM_START)

PLACEHOLDERS_PER_CLIP = 25  # 100 valid mel frames -> 50 -> 25 encoder outputs


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def ray_local(ray_session):
    yield


def make_batch(model_dir, num_rows: int = 6, seed: int = 0) -> TrainBatch:
    """Rows of a spoken prompt (1 or 2 clips each) plus a sampled reply, right-padded.

    Every clip has its own random features, so handing a row another row's clip changes its
    logprobs: the group-vs-in-process comparison catches wrong clip slicing.
    """
    tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    g = torch.Generator().manual_seed(seed)
    reply_words = encode("the answer is one two three four five yes no")
    rows, prompt_lens, clips = [], [], []
    for i in range(num_rows):
        n_clips = 1 + i % 2
        audio = f" {AUDIO_BOS} {' '.join([AUDIO_TOKEN] * PLACEHOLDERS_PER_CLIP)} {AUDIO_EOS}"
        prompt = encode(f"{IM_START} user{audio * n_clips} how many syllables ? {IM_END} "
                        f"{IM_START} assistant")
        reply = [reply_words[j] for j in torch.randint(len(reply_words), (2 + i % 4,), generator=g)]
        rows.append(prompt + reply)
        prompt_lens.append(len(prompt))
        clips.append(n_clips)
    T = max(map(len, rows))
    ids = torch.full((num_rows, T), tok.pad_token_id)
    attn = torch.zeros(num_rows, T, dtype=torch.long)
    loss_mask = torch.zeros(num_rows, T)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        attn[i, :len(row)] = 1
        loss_mask[i, prompt_lens[i]:len(row)] = 1
    n = sum(clips)
    feature_mask = torch.zeros(n, AUDIO_MAX_FRAMES, dtype=torch.long)
    feature_mask[:, :100] = 1
    return TrainBatch(
        input_ids=ids, attention_mask=attn, loss_mask=loss_mask,
        old_logprobs=torch.zeros(num_rows, T), advantages=loss_mask.clone(),
        model_inputs={"input_features": torch.randn(n, 128, AUDIO_MAX_FRAMES, generator=g),
                      "feature_attention_mask": feature_mask,
                      "clips_per_row": torch.tensor(clips)})


def split(batch: TrainBatch, rows: int) -> list[TrainBatch]:
    """Rows [0, rows) and [rows, B), each with its own clips."""
    cut = int(batch.model_inputs["clips_per_row"][:rows].sum())
    shards = []
    for r, c in ((slice(0, rows), slice(0, cut)), (slice(rows, None), slice(cut, None))):
        inputs = {k: v[c] if k in ("input_features", "feature_attention_mask") else v[r]
                  for k, v in batch.model_inputs.items()}
        shards.append(TrainBatch(batch.input_ids[r], batch.attention_mask[r], batch.loss_mask[r],
                                 batch.old_logprobs[r], batch.advantages[r], inputs))
    return shards


def cfg(**kw) -> dict:
    return asdict(LearnerConfig(**{"num_cpus_per_rank": 0.25, "micro_batch_size": 2, "lr": 1e-3, **kw}))


def assert_same_names_and_shapes(named, model_dir):
    expected = load_model(model_dir).state_dict()
    assert list(named) == list(expected)
    assert all(named[k].shape == expected[k].shape for k in expected)


@pytest.fixture(scope="module")
def zero3(ray_local, model_dir):
    """2-rank ZeRO-3 group; records fresh logprobs/weights and one step on an uneven split."""
    group = LearnerGroup(model_dir, cfg(num_ranks=2, zero_stage=3), name_prefix="z3")
    batch = make_batch(model_dir)
    shards = split(batch, 4)  # 4 + 2 rows: rank 1 runs one padding micro-batch
    run = {"batch": batch, "shards": shards, "logprobs": group.logprobs(shards),
           "w0": group.named_tensors()}
    run["metrics"] = group.train_step(shards)
    run["w1"] = group.named_tensors()
    yield group, run
    group.shutdown()


@pytest.fixture(scope="module")
def zero2_kl(ray_local, model_dir):
    """2-rank ZeRO-2 group with a frozen reference model (kl_coef > 0)."""
    group = LearnerGroup(model_dir, cfg(num_ranks=2, zero_stage=2, kl_coef=0.1, lr=1e-2),
                         name_prefix="z2")
    yield group
    group.shutdown()


def test_sharded_logprobs_match_in_process_model(zero3, model_dir):
    _, run = zero3
    batch = run["batch"]
    model = load_model(model_dir).eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.model_inputs.items() if k != "clips_per_row"}
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **inputs).logits
    # the learner reports logprobs on loss tokens only (prompt positions are 0)
    expected = token_logprobs(logits, batch.input_ids) * batch.loss_mask
    got = torch.cat(run["logprobs"]) * batch.loss_mask
    assert batch.loss_mask.sum() > 0
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_clips_counted_from_placeholders_without_clips_per_row(zero3):
    group, run = zero3
    shards = [replace(s, model_inputs={k: v for k, v in s.model_inputs.items()
                                       if k != "clips_per_row"}) for s in run["shards"]]
    counted, given = group.logprobs(shards), group.logprobs(run["shards"])
    for a, b in zip(counted, given):
        torch.testing.assert_close(a, b)


def test_zero3_named_tensors_and_step(zero3, model_dir):
    _, run = zero3
    assert_same_names_and_shapes(run["w0"], model_dir)
    fresh = load_model(model_dir).state_dict()
    assert all(torch.equal(run["w0"][k], fresh[k]) for k in fresh)
    changed = [k for k in fresh if not torch.equal(run["w0"][k], run["w1"][k])]
    assert len(changed) == len(fresh)
    assert set(run["metrics"]) >= {"pg_loss", "kl", "clip_frac", "ratio_mean", "ratio_max",
                                   "grad_norm", "lr"}


def test_two_ranks_match_one_rank_on_the_whole_batch(zero3, ray_local, model_dir):
    """2 ranks on a 4 + 2 split with micro-batches of 2 == 1 rank on all 6 rows at once."""
    _, run = zero3
    single = LearnerGroup(model_dir, cfg(num_ranks=1, zero_stage=0, micro_batch_size=6),
                          name_prefix="single")
    try:
        metrics = single.train_step([run["batch"]])
        w1 = single.named_tensors()
    finally:
        single.shutdown()
    # Adam's first step is nearly scale-free; the pre-clip grad norm is what catches a wrong
    # gradient scale (e.g. a missing world_size factor would halve it).
    assert metrics["grad_norm"] == pytest.approx(run["metrics"]["grad_norm"], rel=1e-5)
    for k in w1:
        torch.testing.assert_close(run["w1"][k], w1[k], atol=1e-5, rtol=0)


def test_save_round_trips_through_load_model(zero3, model_dir, tmp_path):
    group, run = zero3
    group.save(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json"} <= files
    loaded = load_model(tmp_path / "ckpt").state_dict()
    current = group.named_tensors()
    assert list(loaded) == list(current)
    assert all(torch.equal(loaded[k], current[k]) for k in current)


def test_positive_advantage_raises_sampled_token_logprobs(zero2_kl, model_dir):
    group = zero2_kl
    shards = split(make_batch(model_dir, seed=1), 3)
    before = group.logprobs(shards)
    for shard, lp in zip(shards, before):
        shard.old_logprobs = lp  # on-policy
    first = group.train_step(shards)
    second = group.train_step(shards)
    after = group.logprobs(shards)
    gain = sum(((a - b) * s.loss_mask).sum() for a, b, s in zip(after, before, shards))
    assert gain / sum(s.num_tokens for s in shards) > 0.1
    assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert second["kl"] > 0 and second["ratio_mean"] > 1  # moved away from the reference
    named, fresh = group.named_tensors(), load_model(model_dir).state_dict()
    assert_same_names_and_shapes(named, model_dir)
    assert not any(torch.equal(named[k], fresh[k]) for k in fresh)


def test_dead_rank_surfaces_as_error(ray_local, model_dir):
    group = LearnerGroup(model_dir, cfg(num_ranks=2, zero_stage=0), name_prefix="doomed")
    try:
        ray.kill(group.workers[1])
        with pytest.raises(RuntimeError, match="doomed-1 died"):
            group.train_step(split(make_batch(model_dir, num_rows=2), 1))
    finally:
        group.shutdown()


def test_unschedulable_group_fails_with_clear_error(ray_local, model_dir):
    with pytest.raises(RuntimeError, match="no room for 2 x"):
        LearnerGroup(model_dir, cfg(num_ranks=2, num_cpus_per_rank=64), name_prefix="huge",
                     ready_timeout_s=1)
