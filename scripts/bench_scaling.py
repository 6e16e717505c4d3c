"""Same as `zoo bench scaling` (zoo/benchmarks/scaling.py): python scripts/bench_scaling.py [--record docs/benchmarks.md] ..."""

from zoo.benchmarks.scaling import main

if __name__ == "__main__":
    main()
