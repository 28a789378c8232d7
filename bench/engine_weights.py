"""Weight update bytes/s of the rollout engines (`update_weights` of a full learner-named set),
divided by single-process memcpy bytes/s of the same tensors, measured side by side.

    .venv-vllm/bin/python bench/engine_weights.py [--hidden 1024] [--layers 10] [--repeats 4]

Run in the vLLM environment (`.ci/vllm_env.sh`). The model is the tiny Qwen2-Audio builder at
a larger size (hidden 1024, 10 layers: about 105M parameters, 0.42 GB in fp32). Each repeat
perturbs the weights, times `update_weights`, then times a memcpy of the same bytes. HF copies
into its parameters in process; vLLM writes one safetensors file to /dev/shm and its workers
reload from it (`actors/vllm_engine.py`). Prints a table; never asserts.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.rollout_worker import make_engine  # noqa: E402


def measure(engine, named: dict, repeats: int) -> tuple[float, float, float]:
    """Median seconds per update, its GB/s, and update bytes/s over memcpy bytes/s."""
    import torch

    nbytes = sum(t.numel() * t.element_size() for t in named.values())
    flat = torch.cat([t.flatten() for t in named.values()])
    dst = torch.empty_like(flat)
    times, ratios = [], []
    for version in range(repeats):
        for t in named.values():
            t.add_(1e-3)
        t0 = time.perf_counter()
        engine.update_weights(version, named)
        update_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dst.copy_(flat)
        memcpy_s = time.perf_counter() - t0
        times.append(update_s)
        ratios.append(memcpy_s / update_s)
    update_s = statistics.median(times)
    return update_s, nbytes / update_s / 1e9, statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--memory-fraction", type=float, default=0.12, help="vLLM gpu_memory_utilization")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhf_cluster.models import load_model
    from rlhf_cluster.tiny_model import build_tiny_model

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model", hidden_size=args.hidden, num_layers=args.layers)
        named = {k: v.detach().clone() for k, v in load_model(str(model_dir)).named_parameters()}
        params = sum(t.numel() for t in named.values())
        for kind, options in (("hf", {}), ("vllm", {"gpu_memory_utilization": args.memory_fraction})):
            engine = make_engine(kind, str(model_dir), "float32", 0, 0, **options)
            rows.append((kind, *measure(engine, named, args.repeats)))
            if hasattr(engine, "shutdown"):
                engine.shutdown()
            del engine
            gc.collect()
    print(f"\n{params / 1e6:.0f}M parameters (fp32), median of {args.repeats} updates")
    print(f"{'engine':<8}{'s/update':>10}{'GB/s':>8}{'vs memcpy':>11}")
    for kind, seconds, rate, ratio in rows:
        print(f"{kind:<8}{seconds:>10.3f}{rate:>8.2f}{ratio:>11.3f}")


if __name__ == "__main__":
    main()
