"""Same as `zoo bench delta_rule` (zoo/benchmarks/delta_rule.py): python scripts/bench_delta_rule.py [--record docs/benchmarks.md] ..."""

from zoo.benchmarks.delta_rule import main

if __name__ == "__main__":
    main()
