"""The driver's rollout pipeline: at most `in_flight` unreleased batches are ever submitted,
a released batch's gate runs before the next submission, batches come back in order and
scored, and a failure on a pipeline thread is raised in the main loop."""

import threading

import pytest

from rlhf_cluster.rollout_pipeline import RolloutPipeline


def test_bounded_in_flight_gates_and_order():
    log, lock = [], threading.Lock()

    def submit(b):
        with lock:
            log.append(("submit", b))
        return [b]

    def collect(refs, b):
        return [f"ep{b}"]

    def score(eps):
        return [e + "-scored" for e in eps]

    pipe = RolloutPipeline(submit, collect, score, num_batches=5, in_flight=2)
    try:
        got = []
        for step in range(1, 6):
            batch_id, eps, scored, _ = pipe.next()
            got.append((batch_id, eps, scored))
            with lock:
                submitted = [b for kind, b in log if kind == "submit"]
            assert max(submitted) <= step + 1  # never more than in_flight=2 unreleased batches
            pipe.release(lambda s=step: log.append(("gate", s)))
        assert got == [(b, [f"ep{b}"], [f"ep{b}-scored"]) for b in range(1, 6)]
        # batch b+2 is submitted only after the gate released by step b has run
        for b in range(1, 4):
            assert log.index(("gate", b)) < log.index(("submit", b + 2))
    finally:
        pipe.close()


def test_thread_failure_is_raised_in_the_main_loop():
    def collect(refs, b):
        if b == 2:
            raise RuntimeError("a rollout worker died during step 2")
        return [b]

    pipe = RolloutPipeline(lambda b: [b], collect, lambda eps: eps, num_batches=3, in_flight=3)
    try:
        assert pipe.next()[0] == 1
        with pytest.raises(RuntimeError, match="died during step 2"):
            pipe.next()
    finally:
        pipe.close()
