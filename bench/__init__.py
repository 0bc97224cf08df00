"""GPU and CPU benchmarks; results in bench/results and BENCHMARKS.md."""
