"""Same as `zoo bench gla` (zoo/benchmarks/gla.py): python scripts/bench_gla.py [--record docs/benchmarks.md] ..."""

from zoo.benchmarks.gla import main

if __name__ == "__main__":
    main()
