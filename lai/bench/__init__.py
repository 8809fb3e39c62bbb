"""Measurement instruments of the benchmarks (``scripts/bench_online.py``), kept out of the
training package: :mod:`lai.bench.memory` (peak live tensor storage) and
:mod:`lai.bench.syncs` (kernels and host synchronisations in a step)."""
