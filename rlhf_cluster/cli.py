"""`rlhf-cluster` command line: run a config, validate it, or build the offline tiny inputs."""

from __future__ import annotations

import argparse
import logging
import sys

from rlhf_cluster.config import ConfigError, load_config, to_yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run_p = sub.add_parser("run", help="run the stages of a config (embedded Ray unless --address)")
    run_p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    run_p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rl.steps=50")
    run_p.add_argument("--address", help="join this Ray cluster (else $RAY_ADDRESS, else embedded)")
    run_p.add_argument("--auth-token-file", help="Ray auth token file for joining a cluster")

    scale_p = sub.add_parser("scale", help="set the number of rollout workers of a running RL job")
    scale_p.add_argument("workers", type=int, help="target number of rollout workers (>= 1)")
    scale_p.add_argument("--address", default="auto", help="the job's Ray cluster (default: auto)")
    scale_p.add_argument("--auth-token-file", help="Ray auth token file for joining the cluster")
    scale_p.add_argument("--namespace", default="rlhf-cluster", help="the job's cluster.namespace")

    val_p = sub.add_parser("validate", help="validate a config and print it resolved")
    val_p.add_argument("config")
    val_p.add_argument("overrides", nargs="*")

    tiny_p = sub.add_parser("make-tiny-model", help="build the offline tiny audio LM")
    tiny_p.add_argument("out_dir")
    tiny_p.add_argument("--seed", type=int, default=0)

    data_p = sub.add_parser("make-synthetic-data", help="write the built-in spoken task")
    data_p.add_argument("out_dir")
    data_p.add_argument("--num-tasks", type=int, default=256)
    data_p.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command in ("run", "validate"):
            cfg = load_config(args.config, args.overrides)
            if args.command == "validate":
                print(to_yaml(cfg))
                return 0
            from rlhf_cluster.driver import run

            run(cfg, address=args.address, token_path=args.auth_token_file)
        elif args.command == "scale":
            print(scale(args))
        elif args.command == "make-tiny-model":
            from rlhf_cluster.tiny_model import build_tiny_model

            print(build_tiny_model(args.out_dir, seed=args.seed))
        elif args.command == "make-synthetic-data":
            from rlhf_cluster.data.synthetic import generate_synthetic

            for name, path in generate_synthetic(args.out_dir, args.num_tasks, seed=args.seed).items():
                print(f"{name}: {path}")
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:
        if args.command != "scale":
            raise
        print(f"scale: {exc}", file=sys.stderr)
        return 2
    return 0


def scale(args: argparse.Namespace) -> str:
    """Join the job's cluster (token auth), set its rollout-worker target, describe the result."""
    import ray

    from rlhf_cluster.cluster import prepare_auth
    from rlhf_cluster.elastic import scale_rollout_workers

    if not ray.is_initialized():
        prepare_auth(args.auth_token_file)
        ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
    status = scale_rollout_workers(args.workers, namespace=args.namespace)
    return (f"rollout workers: target {status['target']}, running {status.get('workers', '?')}, "
            f"starting {status.get('starting', 0)}, retiring {status.get('retiring', 0)} "
            f"(step {status.get('step', '?')}, weight version {status.get('version', '?')})")


if __name__ == "__main__":
    sys.exit(main())
