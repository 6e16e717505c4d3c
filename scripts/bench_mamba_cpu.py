"""Same as `zoo bench mamba_cpu` (zoo/benchmarks/mamba_cpu.py): python scripts/bench_mamba_cpu.py [--record docs/benchmarks.md] ..."""

from zoo.benchmarks.mamba_cpu import main

if __name__ == "__main__":
    main()
