"""RewardRouter against real Ray actors: weighting, timeouts, dead actors, verifier errors."""

import sys
import time

import pytest
import ray

from reward_services.router import RewardRouter, RewardServiceError, ScoredItem
from reward_services.verifier_service import VerifierService

GOOD = "<think> i count 3 syllables , voice sounds sad </think> sorry that sounds hard . the answer is 3"
TASK = {"answer": "3"}
WEIGHTS = {"correct": 0.8, "reasoning_present": 0.2}


@pytest.fixture(scope="module", autouse=True)
def ray_local(ray_session):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    yield


class SlowService:
    """Answers correctly, but only after `delay_s`: a reward model stuck on a slow GPU."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def score(self, items):
        time.sleep(self.delay_s)
        return [{"judge": 1.0} for _ in items]


def actor(cls, *args):
    """A started actor: worker start-up (seconds on a small box) must not count as a timeout."""
    handle = ray.remote(cls).options(num_cpus=0).remote(*args)
    ray.get(handle.__ray_ready__.remote())
    return handle


def verifiers():
    return actor(VerifierService, ["correct", "reasoning_present"])


def items(*responses, task=TASK):
    return [{"episode_id": f"e{i}", "response": r, "task": task} for i, r in enumerate(responses)]


def test_weighted_reward_matches_hand_computed_values():
    router = RewardRouter({"verifiers": verifiers()}, WEIGHTS, timeout_s=30, retries=0, on_failure="fail")
    scored = router.score(items(GOOD, "<think> x </think> the answer is 4", "3", "4"))
    assert [s.reward for s in scored] == pytest.approx([1.0, 0.2, 0.8, 0.0])
    assert scored[1] == ScoredItem("e1", pytest.approx(0.2), {"correct": 0.0, "reasoning_present": 1.0}, None,
                                   [{"correct": 0.0, "reasoning_present": 1.0, "reward": pytest.approx(0.2)}])
    assert router.counters == {"timeouts": 0, "errors": 0, "dropped": 0}
    assert router.score([]) == []


def test_components_from_several_services_are_all_kept():
    router = RewardRouter({"verifiers": verifiers(), "judge": actor(SlowService, 0.0)},
                          {**WEIGHTS, "judge": 0.5}, timeout_s=30, retries=0)
    (scored,) = router.score(items(GOOD))
    assert scored.components == {"correct": 1.0, "reasoning_present": 1.0, "judge": 1.0}
    assert scored.reward == pytest.approx(1.5)


def test_weight_without_component_is_a_config_error():
    router = RewardRouter({"verifiers": verifiers()}, {"corect": 1.0}, timeout_s=30, retries=0)
    with pytest.raises(ValueError, match=r"'corect'.*available: \['correct', 'reasoning_present'\]"):
        router.score(items(GOOD))


def test_slow_service_is_dropped_promptly_and_counted():
    timeout_s, retries = 0.5, 1
    router = RewardRouter({"verifiers": verifiers(), "judge": actor(SlowService, 20.0)},
                          {**WEIGHTS, "judge": 1.0}, timeout_s=timeout_s, retries=retries)
    start = time.monotonic()
    scored = router.score(items(GOOD, "3"))
    assert time.monotonic() - start < timeout_s * (retries + 1) + 3.0
    assert [s.reward for s in scored] == [None, None]
    assert "'judge'" in scored[0].error and "timed out" in scored[0].error
    assert scored[0].components == {"correct": 1.0, "reasoning_present": 1.0}  # kept for the audit
    assert router.counters == {"timeouts": retries + 1, "errors": 0, "dropped": 2}


def test_slow_service_fails_the_run_in_fail_mode():
    timeout_s, retries = 0.5, 1
    router = RewardRouter({"judge": actor(SlowService, 20.0)}, {"judge": 1.0},
                          timeout_s=timeout_s, retries=retries, on_failure="fail")
    start = time.monotonic()
    with pytest.raises(RewardServiceError, match="'judge'.*timed out"):
        router.score(items(GOOD))
    assert time.monotonic() - start < timeout_s * (retries + 1) + 3.0


def test_dead_service_is_retried_then_dropped():
    judge = actor(SlowService, 0.0)
    ray.kill(judge)
    deadline = time.monotonic() + 30  # kill is asynchronous: wait until it has taken effect
    while time.monotonic() < deadline:
        try:
            ray.get(judge.__ray_ready__.remote(), timeout=30)
            time.sleep(0.1)
        except ray.exceptions.RayActorError:
            break
    else:
        pytest.fail("killed actor still answers after 30 s")
    router = RewardRouter({"judge": judge}, {"judge": 1.0}, timeout_s=10, retries=2)
    (scored,) = router.score(items(GOOD))
    assert scored.reward is None and "ActorDiedError" in scored.error
    assert router.counters == {"timeouts": 0, "errors": 3, "dropped": 1}


def test_raising_verifier_is_an_error_not_a_zero():
    router = RewardRouter({"verifiers": verifiers()}, WEIGHTS, timeout_s=30, retries=0)
    batch = items(GOOD) + items(GOOD, task={"answer": None})
    batch[1]["episode_id"] = "no-answer"
    ok, bad = router.score(batch)
    assert ok.reward == pytest.approx(1.0) and ok.error is None
    assert bad.reward is None and bad.components == {}
    assert "'correct'" in bad.error and "no answer" in bad.error
    assert router.counters == {"timeouts": 0, "errors": 1, "dropped": 1}

    strict = RewardRouter({"verifiers": verifiers()}, WEIGHTS, timeout_s=30, retries=0, on_failure="fail")
    with pytest.raises(RewardServiceError, match="'no-answer'.*'verifiers'.*no answer"):
        strict.score(batch)


def test_invalid_router_settings():
    with pytest.raises(ValueError, match="on_failure"):
        RewardRouter({"v": None}, WEIGHTS, timeout_s=1, retries=0, on_failure="ignore")
    with pytest.raises(ValueError, match="at least one"):
        RewardRouter({}, WEIGHTS, timeout_s=1, retries=0)


class Scripted:
    """Returns fixed rows per episode id (a stand-in service; the router logic is under test)."""

    def __init__(self, rows: dict):
        self.rows = rows

    def score(self, items):
        return [self.rows[item["episode_id"]] for item in items]


class SlowFirstCall:
    """The first call hangs (a stuck GPU), later calls answer at once; threaded, so a hung call
    does not block the next batch."""

    def __init__(self):
        self.calls = 0

    def score(self, items):
        self.calls += 1
        if self.calls == 1:
            time.sleep(30)
        return [{"judge": 0.5} for _ in items]


def test_turn_discount_and_per_turn_rewards_hand_computed():
    """Two assistant turns, d = 0.5: episode value = (v0 + 0.5 v1) / 1.5; each turn weighted."""
    rm = actor(Scripted, {"e0": {"preference": 3.0, "__turns__": [{"preference": 1.0}, {"preference": 3.0}]},
                          "e1": {"preference": 2.0, "__turns__": [{"preference": 2.0}]}})
    ver = actor(Scripted, {"e0": {"correct": 0.5, "reasoning_present": 1.0,
                                  "__turns__": [{"correct": 1.0}, {"correct": 0.0}]},
                           "e1": {"correct": 1.0, "reasoning_present": 0.0}})
    weights = {"correct": 0.8, "reasoning_present": 0.2, "preference": 0.5}
    router = RewardRouter({"rm": rm, "verifier": ver}, weights, timeout_s=30, retries=0, turn_discount=0.5)
    multi, single = router.score(items(GOOD, GOOD))
    correct_ep = (1.0 + 0.5 * 0.0) / 1.5
    preference_ep = (1.0 + 0.5 * 3.0) / 1.5
    assert multi.components == {"correct": pytest.approx(correct_ep), "reasoning_present": 1.0,
                                "preference": pytest.approx(preference_ep)}
    assert multi.reward == pytest.approx(0.8 * correct_ep + 0.2 * 1.0 + 0.5 * preference_ep)
    assert multi.turns == [
        {"correct": 1.0, "preference": 1.0, "reward": pytest.approx(0.8 * 1.0 + 0.2 * 1.0 + 0.5 * 1.0)},
        {"correct": 0.0, "preference": 3.0, "reward": pytest.approx(0.8 * 0.0 + 0.2 * 1.0 + 0.5 * 3.0)}]
    # the episode reward is the discounted mean of the turn rewards
    assert multi.reward == pytest.approx((multi.turns[0]["reward"] + 0.5 * multi.turns[1]["reward"]) / 1.5)
    assert single.reward == pytest.approx(0.8 * 1.0 + 0.5 * 2.0) and len(single.turns) == 1


def test_turn_counts_that_disagree_are_an_item_error():
    rm = actor(Scripted, {"e0": {"preference": 1.0, "__turns__": [{"preference": 1.0}, {"preference": 1.0}]}})
    ver = actor(Scripted, {"e0": {"correct": 1.0, "__turns__": [{"correct": 1.0}]}})
    router = RewardRouter({"rm": rm, "verifier": ver}, {"correct": 1.0, "preference": 1.0}, timeout_s=30, retries=0)
    (scored,) = router.score(items(GOOD))
    assert scored.reward is None and "__turns__" in scored.error
    assert router.counters["dropped"] == 1


def test_non_finite_scores_are_errors_not_rewards():
    rm = actor(Scripted, {"e0": {"preference": float("nan")}, "e1": {"preference": 2.0}})
    router = RewardRouter({"rm": rm}, {"preference": 1.0}, timeout_s=30, retries=0)
    bad, good = router.score(items(GOOD, GOOD))
    assert bad.reward is None and "non-finite" in bad.error and good.reward == 2.0


def test_batch_and_running_zscore_before_weighting():
    rows = {"e0": {"preference": 1.0, "correct": 1.0}, "e1": {"preference": 3.0, "correct": 1.0},
            "e2": {"preference": 5.0, "correct": 0.0}}
    svc = actor(Scripted, rows)
    weights = {"preference": 0.5, "correct": 1.0}
    batch = RewardRouter({"s": svc}, weights, timeout_s=30, retries=0, normalize={"preference": "batch_zscore"})
    scored = batch.score(items(GOOD, GOOD, GOOD))
    std = (8 / 3) ** 0.5  # population std of 1, 3, 5
    z = [(v - 3.0) / (std + 1e-6) for v in (1.0, 3.0, 5.0)]
    assert [s.reward for s in scored] == pytest.approx([0.5 * z[0] + 1.0, 0.5 * z[1] + 1.0, 0.5 * z[2]])
    assert scored[0].components["preference"] == 1.0  # raw value kept...
    assert scored[0].components["preference.normalized"] == pytest.approx(z[0])  # ...next to the used one

    running = RewardRouter({"s": svc}, weights, timeout_s=30, retries=0, normalize={"preference": "running_zscore"})
    running.score(items(GOOD, GOOD))  # sees 1, 3
    (third,) = running.score(items(GOOD, GOOD, GOOD))[2:]  # then 1, 3, 5: all five values so far
    seen = [1.0, 3.0, 1.0, 3.0, 5.0]
    mean = sum(seen) / 5
    std = (sum((v - mean) ** 2 for v in seen) / 5) ** 0.5
    assert third.reward == pytest.approx(0.5 * (5.0 - mean) / (std + 1e-6))


def test_slow_service_times_out_alone_and_the_run_goes_on():
    """Per-service timeout: the judge's 0.5 s bound drops batch 1 (counted) while the verifier
    keeps its own; the next batch is scored normally."""
    judge = ray.remote(SlowFirstCall).options(num_cpus=0, max_concurrency=4).remote()
    ray.get(judge.__ray_ready__.remote())
    router = RewardRouter({"verifiers": verifiers(), "judge": judge}, {**WEIGHTS, "judge": 1.0},
                          timeout_s=30, retries=0, service_timeouts={"judge": 0.5})
    start = time.monotonic()
    first = router.score(items(GOOD))
    assert time.monotonic() - start < 10
    assert first[0].reward is None and "'judge'" in first[0].error and "0.5s" in first[0].error
    assert router.service_counters == {"verifiers": {"timeouts": 0, "errors": 0},
                                       "judge": {"timeouts": 1, "errors": 0}}
    (second,) = router.score(items(GOOD))
    assert second.reward == pytest.approx(1.0 + 0.5) and second.error is None
    assert router.counters == {"timeouts": 1, "errors": 0, "dropped": 1}


def test_invalid_turn_and_normalise_settings():
    with pytest.raises(ValueError, match="turn_discount"):
        RewardRouter({"v": None}, WEIGHTS, timeout_s=1, retries=0, turn_discount=0.0)
    with pytest.raises(ValueError, match="minmax"):
        RewardRouter({"v": None}, WEIGHTS, timeout_s=1, retries=0, normalize={"correct": "minmax"})
