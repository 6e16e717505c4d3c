"""Same as `zoo bench distributed` (zoo/benchmarks/distributed.py): python scripts/bench_distributed.py [--record FILE] ..."""

from zoo.benchmarks.distributed import main

if __name__ == "__main__":
    main()
