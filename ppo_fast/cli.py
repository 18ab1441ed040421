"""The `ppo-fast` command: `info`, `bench`, `demo`."""
from __future__ import annotations

import argparse
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

    record = bench.run(args.device, ops=args.op, quick=args.quick)
    print()
    print(bench.markdown_table(record))
    if not args.no_save:
        path = bench.save(record, args.out) if args.out else bench.save(record)
        print(f"\nwrote {path} (and .md)")
    return 0


def cmd_demo(args) -> int:
    # Until the PPO loop lands, the demo is the op benchmark at a CPU-sized shape.
    args.op, args.quick, args.no_save, args.out = None, True, True, None
    return cmd_bench(args)


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
    bench_parser.set_defaults(func=cmd_bench)

    demo_parser = sub.add_parser("demo", help="the embedded default job")
    demo_parser.add_argument("--device", default=None)
    demo_parser.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
