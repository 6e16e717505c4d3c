"""Same as `zoo bench hybrid` (zoo/benchmarks/hybrid.py): python scripts/bench_hybrid.py [--record docs/benchmarks.md] ..."""

from zoo.benchmarks.hybrid import main

if __name__ == "__main__":
    main()
