"""`python -m benchmarks [args]` is `ppo-fast bench [args]`."""
import sys

from ppo_fast.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
