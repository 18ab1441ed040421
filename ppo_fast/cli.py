"""The `ppo-fast` command: `info`, `bench`, `train`, `plot`, `demo`."""
from __future__ import annotations

import argparse
import os
import sys

import torch


def cmd_info(_args) -> int:
    import ppo_fast
    from ppo_fast.backend import available_backends, requested_backend, triton_interpreted

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"ppo_fast {ppo_fast.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {triton_version}"
          f"{' [interpreter]' if triton_interpreted() else ''}")
    print(f"requested backend: {requested_backend()}")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "CPU"
        print(f"  {dev} ({name}): backends {available_backends(dev)}")
    return 0


def cmd_bench(args) -> int:
    from ppo_fast import bench

    if args.e2e:
        return cmd_bench_e2e(args)

    record = bench.run(args.device, ops=args.op, quick=args.quick)
    print()
    print(bench.markdown_table(record))
    if not args.no_save:
        path = bench.save(record, args.out) if args.out else bench.save(record)
        print(f"\nwrote {path} (and .md)")
    return 0


def cmd_bench_e2e(args) -> int:
    from ppo_fast import bench_e2e
    from ppo_fast.config import ConfigError

    try:
        record = bench_e2e.run(config_from_args(args, flags=("device",)), steps=args.steps, warmup=args.warmup)
    except ConfigError as e:
        print(f"ppo-fast bench --e2e: bad config: {e}", file=sys.stderr)
        return 2
    print(bench_e2e.markdown_table(record))
    if not args.no_save:
        print(f"\nwrote {bench_e2e.save(record, args.out) if args.out else bench_e2e.save(record)} (and .md)")
    return 0


def config_from_args(args, flags):
    """A PPOConfig: defaults (the embedded task, or with --resume the run's saved config.yaml)
    < --config file < the `flags` given < key=value."""
    from ppo_fast.config import PPOConfig, parse_overrides

    previous = os.path.join(args.out or PPOConfig.out, "config.yaml")
    if args.config:
        config = PPOConfig.from_file(args.config)
    elif getattr(args, "resume", False) and os.path.isfile(previous):
        config = PPOConfig.from_file(previous)  # resuming: the run's own config, overrides on top
    else:
        config = PPOConfig()
    given = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    return config.replace({**given, **parse_overrides(args.overrides)})


def cmd_train(args) -> int:
    from ppo_fast.config import ConfigError
    from ppo_fast.trainer import PPOTrainer

    try:
        config = config_from_args(args, flags=("out", "steps", "seed")).validate()
        history = PPOTrainer(config).train(resume=args.resume)
    except ConfigError as e:
        print(f"ppo-fast train: bad config: {e}", file=sys.stderr)
        return 2
    if history:
        first, last = history[0], history[-1]
        print(f"reward_mean {first['reward_mean']:.3f} -> {last['reward_mean']:.3f} over {len(history)} steps; "
              f"metrics in {config.out}/metrics.jsonl")
    return 0


def cmd_plot(args) -> int:
    from ppo_fast.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    """The embedded default run (`ppo-fast train` with no arguments)."""
    args.config, args.steps, args.seed, args.overrides, args.resume = None, None, None, [], False
    return cmd_train(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppo-fast", description="Fused kernels for PPO.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends available, devices, versions").set_defaults(func=cmd_info)

    bench_parser = sub.add_parser("bench", help="time every op against the plain-PyTorch reference")
    bench_parser.add_argument("--op", action="append", help="only this op (repeatable)")
    bench_parser.add_argument("--quick", action="store_true", help="small subset, under a minute")
    bench_parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    bench_parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    bench_parser.add_argument("--no-save", action="store_true", help="print the table only")
    bench_parser.add_argument("--e2e", action="store_true",
                              help="end to end: PPO steps with ppo_fast ops vs reference ops (model from --config)")
    bench_parser.add_argument("--config", default=None, help="--e2e: a PPOConfig YAML (default: the embedded task)")
    bench_parser.add_argument("--steps", type=int, default=5, help="--e2e: timed PPO steps per run")
    bench_parser.add_argument("--warmup", type=int, default=1, help="--e2e: untimed steps first")
    bench_parser.add_argument("overrides", nargs="*", metavar="key=value", help="--e2e: PPOConfig fields")
    bench_parser.set_defaults(func=cmd_bench)

    train_parser = sub.add_parser("train", help="a PPO run; no arguments: the embedded count task",
                                  description="Run PPO. Settings: PPOConfig defaults < --config < flags < key=value.")
    train_parser.add_argument("--config", default=None, help="a YAML file of PPOConfig keys")
    train_parser.add_argument("--out", default=None, help="output folder (metrics.jsonl, config.yaml)")
    train_parser.add_argument("--steps", type=int, default=None)
    train_parser.add_argument("--seed", type=int, default=None)
    train_parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    train_parser.add_argument("overrides", nargs="*", metavar="key=value", help="any PPOConfig field")
    train_parser.set_defaults(func=cmd_train)

    plot_parser = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    plot_parser.add_argument("run_dir", help="a ppo-fast train --out folder")
    plot_parser.add_argument("--out", default=None, help="where the PNGs go (default RUN_DIR/plots)")
    plot_parser.set_defaults(func=cmd_plot)

    demo_parser = sub.add_parser("demo", help="the embedded default run (= ppo-fast train)")
    demo_parser.add_argument("--out", default=None)
    demo_parser.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after the flags
    if extra and (getattr(args, "overrides", None) is None or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = args.overrides + extra
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
