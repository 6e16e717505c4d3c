"""Same as `zoo bench all` (zoo/benchmarks/all.py): python scripts/bench_all.py [--quick] [--plot FILE] [--record docs/benchmarks.md] ..."""

from zoo.benchmarks.all import main

if __name__ == "__main__":
    main()
