"""Same as `zoo bench linear_scan` (zoo/benchmarks/linear_scan.py): python scripts/bench_linear_scan.py [--record docs/benchmarks.md] ..."""

from zoo.benchmarks.linear_scan import main

if __name__ == "__main__":
    main()
