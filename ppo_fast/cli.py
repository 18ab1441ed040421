"""The `ppo-fast` command: `info`, `bench [ops|e2e]`, `train`, `plot`, `demo`."""
from __future__ import annotations

import argparse
import os
import sys

import torch


def cmd_info(_args) -> int:
    import ppo_fast
    from ppo_fast.ops.backend import available_backends, requested_backend, triton_interpreted
    from ppo_fast.ops.native import cpu_capability, cpu_kernel_module

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"ppo_fast {ppo_fast.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), triton {triton_version}"
          f"{' [interpreter]' if triton_interpreted() else ''}")
    print(f"requested backend: {requested_backend()}")
    print(f"CPU kernels: ppo_fast.{cpu_kernel_module()} (instruction set {cpu_capability().lower()}, "
          f"{torch.get_num_threads()} threads)")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else "CPU"
        print(f"  {dev} ({name}): backends {available_backends(dev)}")
    return 0


def cmd_bench(args) -> int:
    """`bench ops` (default): every op vs the reference; `bench e2e`: PPO steps, fused vs reference ops;
    `bench tp`: the vocabulary-parallel head per group size."""
    from ppo_fast.bench import RESULTS_DIR, records

    if args.kind == "tp":
        from ppo_fast.bench import tensor_parallel

        record = tensor_parallel.run(args.device, worlds=args.world, tp_sizes=args.tp,
                                     preset="quick" if args.quick else "full")
    elif args.kind == "e2e":
        from ppo_fast.bench import e2e
        from ppo_fast.ppo.config import ConfigError

        try:
            record = e2e.run(config_from_args(args, flags=("device",)), steps=args.steps, warmup=args.warmup)
        except ConfigError as e:
            print(f"ppo-fast bench e2e: bad config: {e}", file=sys.stderr)
            return 2
    else:
        from ppo_fast.bench import ops

        if args.overrides:
            print(f"ppo-fast bench ops: takes no key=value settings (got {args.overrides})", file=sys.stderr)
            return 2
        record = ops.run(args.device, ops=args.op, preset="quick" if args.quick else args.preset,
                         save_to=None if args.no_save else args.out or RESULTS_DIR)
    print()
    print(records.markdown_table(record))
    if not args.no_save:
        print(f"\nwrote {records.save(record, args.out or RESULTS_DIR)} (and .md)")
    return 0


def config_from_args(args, flags, resume=False, config_class=None):
    """A PPOConfig (or `config_class`): defaults (the embedded task) < --config file < the `flags`
    given < key=value. Resuming, the run's own config.yaml takes the place of the defaults and --config.
    A key=value naming no field is refused first, whatever else is wrong."""
    from ppo_fast.ppo.config import ConfigError, PPOConfig, parse_overrides

    PPOConfig = config_class or PPOConfig  # noqa: N806 - the class the settings build

    overrides = parse_overrides(args.overrides)
    PPOConfig.check_keys(overrides)
    if resume:
        saved = os.path.join(args.out or PPOConfig.out, "config.yaml")
        if args.config:
            raise ConfigError("--resume continues with the run's own config.yaml; pass changes as key=value, "
                              "not --config")
        if not os.path.isfile(saved):
            raise ConfigError(f"--resume: {saved!r} does not exist, so there is no run to resume there "
                              f"(a run writes it before loading its models)")
        config = PPOConfig.from_file(saved)
    else:
        config = PPOConfig.from_file(args.config) if args.config else PPOConfig()
    given = {k: getattr(args, k) for k in flags if getattr(args, k, None) is not None}
    return config.replace({**given, **overrides})


def close_process_group(together: bool = True) -> None:
    """Leave torchrun's process group, after the other ranks reach the same point when `together`
    (a rank that exits with the group open can abort in gloo's teardown: "terminate called without
    an active exception"). After an error, alone: the others may never get there."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


def run_job(args, name: str, config_class, trainer_class, report) -> int:
    """`ppo-fast train` and `ppo-fast rm`: the config, the run folder (locked, and for a fresh run
    config.yaml written, before the models load; rank 0 alone writes it under torchrun), the
    trainer; `report(history, config)` prints the outcome. Exit codes: 2 bad config, 1 diverged."""
    from ppo_fast.ppo import TrainingDiverged
    from ppo_fast.ppo.config import ConfigError
    from ppo_fast.ppo.run_folder import RunFolder

    main_process = int(os.environ.get("RANK", "0")) == 0
    try:
        config = config_from_args(args, flags=("out", "steps", "seed"), resume=args.resume,
                                  config_class=config_class).validate()
        with RunFolder(config.out, main=main_process).open(config, args.resume) as run:
            history = trainer_class(config).train(resume=args.resume, run=run)
    except ConfigError as e:
        print(f"ppo-fast {name}: bad config: {e}", file=sys.stderr)
        close_process_group(together=False)
        return 2
    except TrainingDiverged as e:
        print(f"ppo-fast {name}: stopped: {e}", file=sys.stderr)
        close_process_group(together=False)
        return 1
    close_process_group()
    if history and main_process:
        report(history, config)
    return 0


def cmd_train(args) -> int:
    from ppo_fast.ppo import PPOConfig, PPOTrainer

    def report(history, config):
        first, last = history[0], history[-1]
        print(f"reward_mean {first['reward_mean']:.3f} -> {last['reward_mean']:.3f} over {len(history)} steps; "
              f"metrics in {config.out}/metrics.jsonl")

    return run_job(args, "train", PPOConfig, PPOTrainer, report)


def cmd_rm(args) -> int:
    """Train a reward model on preference pairs (ppo_fast.ppo.reward_training)."""
    from ppo_fast.ppo.reward_training import RewardModelTrainer, RMConfig

    def report(history, config):
        evals = [m["eval_accuracy"] for m in history if "eval_accuracy" in m]
        if evals:
            print(f"held-out pairwise accuracy {evals[0]:.3f} -> {evals[-1]:.3f}; the model is in {config.out}/model "
                  f"(ppo-fast train reward_model={config.out}/model)")

    return run_job(args, "rm", RMConfig, RewardModelTrainer, report)


def cmd_plot(args) -> int:
    from ppo_fast.ppo.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    """The embedded default run in a fresh folder each time (runs/demo-<date>-<time> unless --out)."""
    import datetime

    args.config, args.steps, args.seed, args.overrides, args.resume = None, None, None, [], False
    args.out = args.out or os.path.join("runs", f"demo-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    return cmd_train(args)


def _add_run_arguments(parser, config_name: str, out_help: str) -> None:
    """The arguments `train` and `rm` share: a config file, the output folder, steps, seed, resume, key=value."""
    parser.add_argument("--config", default=None, help=f"a YAML file of {config_name} keys")
    parser.add_argument("--out", default=None, help=out_help)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"any {config_name} field")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppo-fast", description="Fused kernels for PPO.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends available, devices, versions").set_defaults(func=cmd_info)

    bench_parser = sub.add_parser("bench", help="benchmarks: `ops` (default), every op vs the reference; `e2e`, "
                                                "PPO steps with ppo_fast ops vs reference ops; `tp`, the "
                                                "vocabulary-parallel head per group size")
    bench_parser.add_argument("kind", nargs="?", choices=("ops", "e2e", "tp"), default="ops")
    bench_parser.add_argument("--op", action="append", help="ops: only this op family, e.g. gae (repeatable)")
    bench_parser.add_argument("--quick", action="store_true",
                              help="ops: small subset, under a minute (--preset quick); tp: a tiny shape")
    bench_parser.add_argument("--preset", default="full", choices=("full", "quick", "headline"),
                              help="ops: which shapes; headline: the GPU run's figures (tiny sizes on a CPU)")
    bench_parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    bench_parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    bench_parser.add_argument("--no-save", action="store_true", help="print the table only")
    bench_parser.add_argument("--config", default=None, help="e2e: a PPOConfig YAML (default: the embedded task)")
    bench_parser.add_argument("--steps", type=int, default=5, help="e2e: timed PPO steps per run")
    bench_parser.add_argument("--warmup", type=int, default=1, help="e2e: untimed steps first")
    bench_parser.add_argument("--world", type=int, nargs="+", default=None,
                              help="tp: group sizes to run as processes (gloo on CPU; a GPU a rank on CUDA; "
                                   "default 2 on a CPU, every GPU where there are several)")
    bench_parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8],
                              help="tp: one rank's share of a TP-n head, timed alone (the local rows)")
    bench_parser.add_argument("overrides", nargs="*", metavar="key=value", help="e2e: PPOConfig fields")
    bench_parser.set_defaults(func=cmd_bench)

    train_parser = sub.add_parser("train", help="a PPO run; no arguments: the embedded count task",
                                  description="Run PPO. Settings: PPOConfig defaults < --config < flags < key=value.")
    _add_run_arguments(train_parser, "PPOConfig", "output folder (metrics.jsonl, config.yaml)")
    train_parser.set_defaults(func=cmd_train)

    rm_parser = sub.add_parser("rm", help="train a reward model on preference pairs; no arguments: the count task",
                               description="Reward-model training. Settings: RMConfig defaults < --config < flags "
                                           "< key=value.")
    _add_run_arguments(rm_parser, "RMConfig", "output folder (metrics.jsonl, checkpoints, model/)")
    rm_parser.set_defaults(func=cmd_rm)

    plot_parser = sub.add_parser("plot", help="PNG curves of a run's metrics.jsonl")
    plot_parser.add_argument("run_dir", help="a ppo-fast train --out folder")
    plot_parser.add_argument("--out", default=None, help="where the PNGs go (default RUN_DIR/plots)")
    plot_parser.set_defaults(func=cmd_plot)

    demo_parser = sub.add_parser("demo", help="the embedded default run in a fresh runs/demo-<time> folder")
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
