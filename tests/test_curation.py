"""Pass-rate curation on hand-built groups (pure logic, no Ray)."""

import pytest

from rlhf_cluster.curation import filter_by_pass_rate
from rlhf_cluster.experience import Episode


def ep(prompt_id: str, i: int, rewards: dict) -> Episode:
    return Episode(episode_id=f"{prompt_id}-{i}", prompt_id=prompt_id, sample_index=i, policy_version=0,
                   token_ids=[1, 2], loss_mask=[0, 1], logprobs=[0.0, -0.5], response_text="x",
                   finish_reason="stop", rewards=rewards)


def group(prompt_id: str, passes: int, n: int = 8, component: str = "correct") -> list[Episode]:
    return [ep(prompt_id, i, {component: 1.0 if i < passes else 0.0}) for i in range(n)]


def test_step_audio_r1_rule_keeps_3_to_6_of_8():
    episodes = group("p2", 2) + group("p3", 3) + group("p6", 6) + group("p7", 7) + group("p0", 0) + group("p8", 8)
    kept, counts = filter_by_pass_rate(episodes, low=3 / 8, high=6 / 8)
    assert {e.prompt_id for e in kept} == {"p3", "p6"}
    assert len(kept) == 16  # whole groups
    assert counts == {"groups_total": 6, "groups_kept": 2, "groups_too_easy": 2,
                      "groups_too_hard": 2, "groups_unscored": 0}


def test_bounds_are_inclusive_and_decimal_bounds_work():
    episodes = group("p3", 3) + group("p6", 6)
    kept, counts = filter_by_pass_rate(episodes, low=0.375, high=0.75)
    assert counts["groups_kept"] == 2 and len(kept) == 16


def test_order_is_preserved_across_interleaved_groups():
    episodes = [e for pair in zip(group("a", 4), group("b", 8)) for e in pair]
    kept, _ = filter_by_pass_rate(episodes, low=0.25, high=0.75)
    assert [e.episode_id for e in kept] == [f"a-{i}" for i in range(8)]


def test_threshold_and_component():
    episodes = [ep("q", 0, {"judge": 0.7}), ep("q", 1, {"judge": 0.4}),
                ep("r", 0, {"judge": 0.9}), ep("r", 1, {"judge": 0.6})]
    kept, counts = filter_by_pass_rate(episodes, component="judge", low=0.5, high=0.5, threshold=0.6)
    assert {e.prompt_id for e in kept} == {"q"}  # 0.6 itself passes, so r is 2/2: too easy
    assert counts["groups_too_easy"] == 1


def test_failed_rewards_do_not_count_as_failures():
    episodes = group("p", 2, n=4) + [ep("p", 9, {}), ep("dead", 0, {}), ep("dead", 1, {})]
    kept, counts = filter_by_pass_rate(episodes, low=0.5, high=0.5)
    assert len(kept) == 5  # 2 of 4 scored pass; the unscored one stays with its group
    assert counts == {"groups_total": 2, "groups_kept": 1, "groups_too_easy": 0,
                      "groups_too_hard": 0, "groups_unscored": 1}


def test_empty_and_invalid_bounds():
    assert filter_by_pass_rate([], low=0.0, high=1.0) == ([], {
        "groups_total": 0, "groups_kept": 0, "groups_too_easy": 0, "groups_too_hard": 0, "groups_unscored": 0})
    with pytest.raises(ValueError, match="low <= high"):
        filter_by_pass_rate([], low=0.8, high=0.2)
    with pytest.raises(ValueError):
        filter_by_pass_rate([], low=-0.1, high=0.5)


def test_rl_loop_curation_marks_whole_groups_and_reports_counts():
    """driver.curate: what the RL loop calls on each scored batch (rl.curation)."""
    from types import SimpleNamespace

    from rlhf_cluster.driver import curate

    episodes = group("p1", 1) + group("p4", 4) + group("p8", 8)
    cur = SimpleNamespace(enabled=True, component="correct", low=3 / 8, high=6 / 8, threshold=0.5)
    counts = curate(cur, episodes)
    assert counts == {"curation.groups_total": 3, "curation.groups_kept": 1, "curation.groups_too_easy": 1,
                      "curation.groups_too_hard": 1, "curation.groups_unscored": 0}
    assert [e.dropped for e in episodes] == ["curated"] * 8 + [None] * 8 + ["curated"] * 8
    assert curate(SimpleNamespace(enabled=False), episodes) == {}
