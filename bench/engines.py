"""Generation tokens/s of the vLLM engine vs the HF engine, same tiny model, same prompts.

    .venv-vllm/bin/python bench/engines.py [--prompts 8] [--n 8] [--max-new-tokens 24] [--repeats 3]

Run in the vLLM environment (`.ci/vllm_env.sh`). Both engines get the quickstart's spoken
prompts (audio features included) rendered by the same adapter, sample at temperature 1 with
the same stop and suppressed ids, in one process each after a warm-up call; tokens/s counts
the tokens actually generated. Prints a table and the ratio; never asserts.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.engine import GenerationRequest, SamplingParams  # noqa: E402
from actors.rollout_worker import make_engine  # noqa: E402


def requests_for(model_dir: Path, data_dir: Path, prompts: int, n: int, max_new_tokens: int):
    from transformers import AutoTokenizer

    from rlhf_cluster.adapters import make_adapter
    from rlhf_cluster.data.tasks import load_tasks

    adapter = make_adapter("auto", str(model_dir), AutoTokenizer.from_pretrained(model_dir))
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=1.0,
                            stop_token_ids=adapter.stop_token_ids,
                            suppress_token_ids=adapter.suppress_token_ids)
    reqs = []
    for task in load_tasks(data_dir / "tasks.parquet").tasks[:prompts]:
        ids, clips = adapter.render_prompt("you are a caring voice assistant .", task.turns)
        reqs.append(GenerationRequest(task.prompt_id, ids, adapter.audio_inputs(clips), params))
    return reqs, adapter.pad_id


def measure(engine, reqs, repeats: int) -> tuple[float, float]:
    engine.generate(reqs)  # warm-up (first-call compilation / allocation)
    tokens, seconds = 0, 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = engine.generate(reqs)
        seconds += time.perf_counter() - t0
        tokens += sum(len(r.token_ids) for r in results)
    return tokens / seconds, seconds / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-fraction", type=float, default=0.05, help="vLLM gpu_memory_utilization")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhf_cluster.data.synthetic import generate_synthetic
    from rlhf_cluster.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", seed=0)
        generate_synthetic(Path(tmp) / "data", num_tasks=max(32, args.prompts), seed=0)
        reqs, pad = requests_for(model_dir, Path(tmp) / "data", args.prompts, args.n, args.max_new_tokens)
        rows = []
        for kind, options in (("hf", {}), ("vllm", {"gpu_memory_utilization": args.memory_fraction})):
            engine = make_engine(kind, str(model_dir), "float32", pad, 0, **options)
            rate, per_batch = measure(engine, reqs, args.repeats)
            rows.append((kind, rate, per_batch))
            del engine
            gc.collect()
    print(f"\n{args.prompts} prompts x {args.n} samples, <= {args.max_new_tokens} new tokens, "
          f"{args.repeats} timed batches after a warm-up (threads: {os.environ.get('OMP_NUM_THREADS', 'default')})")
    print(f"{'engine':<8}{'tokens/s':>12}{'s/batch':>10}")
    for kind, rate, per_batch in rows:
        print(f"{kind:<8}{rate:>12.1f}{per_batch:>10.3f}")
    print(f"vllm / hf tokens/s: {rows[1][1] / rows[0][1]:.2f}x")


if __name__ == "__main__":
    main()
