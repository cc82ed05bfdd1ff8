#!/bin/bash
# STAMP v3 (outcome pruner) vs L1 and uniform on the five targets' dev splits (never their test splits).
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=docs/results/v3-dev; mkdir -p $OUT
PY=.venv/bin/python
P=.stamp/pruners/stamp-outcome-natural
$PY -m tests.benchmarks.bench_headroom --pruner $P --tasks "npz:../shared/datasets/cifar10.npz" "npz:../shared/datasets/fashion_mnist.npz?classes=6,7,8,9" "npz:../shared/datasets/dtd10.npz" \
  --masks stamp l1 uniform --budgets 0.3 0.1 0.5 --seeds 0 --out $OUT/targets-A.jsonl > $OUT/A.log 2>&1 &
$PY -m tests.benchmarks.bench_headroom --pruner $P --tasks digits "npz:../shared/datasets/omniglot.npz" \
  --masks stamp l1 uniform --budgets 0.3 0.1 0.5 --seeds 0 --out $OUT/targets-B.jsonl > $OUT/B.log 2>&1 &
wait
