"""Preference-RM and rubric-judge services (in-process, real models), their tokenizer and
malformed-output handling, and the config-driven launch of remote services on real Ray actors."""

import os
import shutil
import sys

import pytest
import ray
import torch

from actors.engine import GenerationResult
from learners.reward_model import RewardModel, load_reward_model
from reward_services.judge import RubricJudgeService
from reward_services.preference import PreferenceService, turn_ends
from reward_services.router import RewardRouter
from rlhf_cluster.cluster import kill_actors
from rlhf_cluster.config import ConfigError, load_config
from rlhf_cluster.models import load_model
from test_reward_model import spoken_row

RUBRIC = ["acknowledges the emotion", "answers the question"]


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory):
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("rm") / "reward_model"
    RewardModel(load_model(tiny_model_dir)).save_pretrained(out)
    for f in os.listdir(tiny_model_dir):  # tokenizer files, as LearnerWorker.save copies them
        if not (out / f).exists():
            shutil.copy(os.path.join(tiny_model_dir, f), out / f)
    return str(out)


def item(model_dir, seed, episode_id="e", **extra):
    ids, audio = spoken_row(model_dir, seed)
    ids = ids[0].tolist()
    return {"episode_id": episode_id, "response": "the answer is 2", "task": {"answer": "2"},
            "token_ids": ids, "loss_mask": [0] * (len(ids) - 5) + [1] * 5, "audio": audio, **extra}


def direct_scores(rm_dir, it, positions):
    model = load_reward_model(rm_dir).eval()
    ids = torch.tensor([it["token_ids"]])
    with torch.no_grad():
        values = model(ids, torch.ones_like(ids), **it["audio"])[0]
    return [float(values[p]) for p in positions]


def test_turn_ends_from_spans_or_the_loss_mask():
    assert turn_ends({"turn_spans": [(3, 6), (9, 12)]}) == [5, 11]
    assert turn_ends({"loss_mask": [0, 0, 1, 1, 0]}) == [3]
    with pytest.raises(ValueError, match="nothing to score"):
        turn_ends({"loss_mask": [0, 0]})


def test_preference_scores_episode_and_turns_at_their_end_tokens(rm_dir, tiny_model_dir):
    service = PreferenceService(rm_dir, batch_size=2, policy_path=tiny_model_dir)
    single = item(tiny_model_dir, 0, "single")
    n = len(single["token_ids"])
    multi = item(tiny_model_dir, 1, "multi", turn_spans=[(n - 12, n - 8), (n - 5, n)])
    short = item(tiny_model_dir, 2, "short")
    short["token_ids"] = short["token_ids"][:-3]  # a shorter row: padding must not change scores
    short["loss_mask"] = short["loss_mask"][:-3]
    broken = {"episode_id": "broken", "response": "x", "task": {}, "token_ids": [], "audio": None}
    out = service.score([single, multi, broken, short])
    s = direct_scores(rm_dir, single, [n - 1])[0]
    assert out[0] == {"preference": pytest.approx(s, abs=1e-5), "__turns__": [{"preference": pytest.approx(s, abs=1e-5)}]}
    t1, t2 = direct_scores(rm_dir, multi, [n - 9, n - 1])
    assert out[1]["__turns__"] == [{"preference": pytest.approx(t1, abs=1e-5)}, {"preference": pytest.approx(t2, abs=1e-5)}]
    assert out[1]["preference"] == pytest.approx(t2, abs=1e-5)
    assert "__error__" in out[2] and "no token_ids" in out[2]["__error__"]
    assert out[3]["preference"] == pytest.approx(direct_scores(rm_dir, short, [n - 4])[0], abs=1e-5)
    assert PreferenceService(rm_dir, batch_size=1).score([single])[0]["preference"] == pytest.approx(s, abs=1e-5)


def test_preference_refuses_a_reward_model_with_another_tokenizer(rm_dir, tmp_path):
    from rlhf_cluster.tiny_model import build_tokenizer

    other = tmp_path / "other"
    shutil.copytree(rm_dir, other)
    tok = build_tokenizer()
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="does not share the policy's tokenizer"):
        PreferenceService(rm_dir, policy_path=str(other))


class ScriptedEngine:
    """Stands in for a judge LM whose replies are known (pure parsing logic under test):
    the k-th generated reply is token id k, which the test's decode maps to its text."""

    def __init__(self):
        self.calls = []

    def generate(self, requests):
        self.calls.append(len(requests))
        start = sum(self.calls[:-1])
        return [GenerationResult(r.request_id, 0, [start + i], [0.0], "stop", 0) for i, r in enumerate(requests)]


def test_judge_reads_task_or_config_rubric_and_counts_malformed_output(tiny_model_dir):
    replies = ["1. yes\n2. no", "1. yes\n2. yes\n3. no", "The reply is kind.\n1. yes\n2. yes\n3. yes",
               "1. no\n2. no"]
    engine = ScriptedEngine()
    judge = RubricJudgeService(tiny_model_dir, rubric=RUBRIC, batch_size=2, engine_obj=engine)
    judge.adapter.decode = lambda ids: replies[ids[0]]
    items = [{"episode_id": "a", "response": "sorry . the answer is 2", "task": {}},
             {"episode_id": "b", "response": "2", "task": {}},
             {"episode_id": "c", "response": "2", "task": {"rubric": ["kind", "short", "correct"]}},
             {"episode_id": "d", "response": "2", "task": {"rubric": []}}]  # empty: the config's
    out = judge.score(items)
    assert engine.calls == [2, 2]  # batched by batch_size
    assert out[0] == {"rubric.0": 1.0, "rubric.1": 0.0, "rubric": 0.5}
    assert "malformed judge output" in out[1]["__error__"]  # three verdicts for two items
    assert out[2] == {"rubric.0": 1.0, "rubric.1": 1.0, "rubric.2": 1.0, "rubric": 1.0}
    assert out[3] == {"rubric.0": 0.0, "rubric.1": 0.0, "rubric": 0.0}  # a real zero, parsed
    assert judge.counters == {"judged": 4, "malformed": 1, "no_rubric": 0}
    no_rubric = RubricJudgeService(tiny_model_dir, engine_obj=ScriptedEngine())
    assert "no rubric items" in no_rubric.score(items[:1])[0]["__error__"]
    assert no_rubric.counters["no_rubric"] == 1


@pytest.fixture(scope="module")
def ray_local(ray_session):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield


def test_real_judge_model_gibberish_is_counted_and_dropped_never_zero(ray_local, tiny_model_dir):
    """The untrained tiny LM cannot write 'N. yes|no' lines: every verdict is malformed."""
    judge = ray.remote(RubricJudgeService).options(num_cpus=0).remote(
        tiny_model_dir, rubric=RUBRIC, max_new_tokens=8)
    ray.get(judge.__ray_ready__.remote())
    router = RewardRouter({"judge": judge}, {"rubric": 1.0}, timeout_s=60, retries=0)
    scored = router.score([{"episode_id": f"e{i}", "response": "the answer is 2", "task": {}} for i in range(3)])
    assert [s.reward for s in scored] == [None, None, None]
    assert all("malformed judge output" in s.error for s in scored)
    assert ray.get(judge.stats.remote())["malformed"] == 3
    assert router.counters["dropped"] == 3 and router.service_counters["judge"]["errors"] == 3


def remote_cfg(tiny_model_dir, synthetic_dir, url, *extra):
    return load_config(None, [  # schema defaults: weights {correct: 0.8, reasoning_present: 0.2}
        f"model.path={tiny_model_dir}", f"data.train_path={synthetic_dir / 'tasks.parquet'}",
        "reward.weights.mentions=0.5", "reward.services.remote.enabled=true", f"reward.services.remote.url={url}",
        "reward.services.remote.components=[mentions, length]",
        "reward.services.remote.token_env=QS_TEST_REWARD_TOKEN", *extra])


def test_remote_service_from_config_needs_its_token(ray_local, tiny_model_dir, synthetic_dir, monkeypatch):
    from reward_services.http_server import serve_reward_fn
    from reward_services.launch import start_reward_services

    server, url = serve_reward_fn(lambda response, task: {"mentions": float(task["answer"] in response),
                                                          "length": float(len(response))}, "tok-123")
    try:
        cfg = remote_cfg(tiny_model_dir, synthetic_dir, url)
        monkeypatch.delenv("QS_TEST_REWARD_TOKEN", raising=False)
        with pytest.raises(RuntimeError, match=r"(?s)reward service 'remote'.*no token.*QS_TEST_REWARD_TOKEN"):
            start_reward_services(cfg, pad_token_id=0)
        monkeypatch.setenv("QS_TEST_REWARD_TOKEN", "wrong")
        services, router = start_reward_services(cfg, pad_token_id=0)
        (refused,) = router.score([{"episode_id": "e", "response": "the answer is 2", "task": {"answer": "2"}}])
        assert refused.reward is None and "refused the token" in refused.error
        kill_actors(services.values())  # waits: the same names are started again next
        monkeypatch.setenv("QS_TEST_REWARD_TOKEN", "tok-123")
        services, router = start_reward_services(cfg, pad_token_id=0)
        (ok,) = router.score([{"episode_id": "e", "response": "the answer is 2", "task": {"answer": "2"}}])
        assert ok.components["mentions"] == 1.0 and ok.components["length"] == 15.0
        assert ok.reward == pytest.approx(0.8 * 1.0 + 0.2 * 0.0 + 0.5 * 1.0)
        kill_actors(services.values())  # waits: the same names are started again next
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("extra, fragments", [
    (["reward.weights.vibes=1.0"], ["reward.weights.vibes", "mentions"]),
    (["reward.services.remote.url=null"], ["reward.services.remote.url"]),
    (["reward.services.remote.components=[]"], ["reward.services.remote.components"]),
    (["reward.normalize={mentions: minmax}"], ["reward.normalize.mentions='minmax'", "batch_zscore"]),
    (["reward.normalize={vibes: batch_zscore}"], ["reward.normalize.vibes", "no reward service"]),
    (["reward.turn_discount=0"], ["reward.turn_discount=0", "(0, 1]"]),
    (["reward.services.remote.timeout_s=0"], ["reward.services.remote.timeout_s"]),
])
def test_reward_config_errors(tiny_model_dir, synthetic_dir, extra, fragments):
    with pytest.raises(ConfigError) as err:
        remote_cfg(tiny_model_dir, synthetic_dir, "http://127.0.0.1:1/", *extra)
    for fragment in fragments:
        assert fragment in str(err.value)
