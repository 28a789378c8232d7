"""Pass-rate curation: keep only prompts the policy solves sometimes, not always or never.

Step-Audio-R1 kept prompts solved 3-6 times out of 8: a prompt every sample solves (or none
does) gives a group-relative advantage of zero everywhere, so it costs compute and teaches
nothing. Groups are kept or dropped whole so that per-prompt baselines stay intact.
"""

from __future__ import annotations

from collections import defaultdict

from rlhf_cluster.experience import Episode

_EPS = 1e-9  # 3/8 written as 0.375 must still count as "within [0.375, ...]"


def filter_by_pass_rate(episodes: list[Episode], component: str = "correct", *, low: float,
                        high: float, threshold: float = 0.5) -> tuple[list[Episode], dict]:
    """Keep every episode of each prompt whose pass rate lies in [low, high] (inclusive).

    A pass is `rewards[component] >= threshold`. Episodes without that component (their
    reward failed) do not count towards the rate; a group with no scored episode at all is
    dropped and counted as `groups_unscored`, never treated as "too hard". Kept episodes
    keep their input order.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    groups: dict[str, list[Episode]] = defaultdict(list)
    for ep in episodes:
        groups[ep.prompt_id].append(ep)
    counts = {"groups_total": len(groups), "groups_kept": 0, "groups_too_easy": 0,
              "groups_too_hard": 0, "groups_unscored": 0}
    kept_ids: set[str] = set()
    for prompt_id, group in groups.items():
        scored = [ep.rewards[component] for ep in group if component in ep.rewards]
        if not scored:
            counts["groups_unscored"] += 1
            continue
        rate = sum(value >= threshold for value in scored) / len(scored)
        if rate < low - _EPS:
            counts["groups_too_hard"] += 1
        elif rate > high + _EPS:
            counts["groups_too_easy"] += 1
        else:
            counts["groups_kept"] += 1
            kept_ids.add(prompt_id)
    return [ep for ep in episodes if ep.prompt_id in kept_ids], counts
