#!/usr/bin/env bash
# The natural-image headroom study (issue 24, docs/natural_world.md): two processes, one core each.
# A: digits + Omniglot (dev splits), then 5 domain variants of one 20-class reference subset;
# B: CIFAR-10, DTD-10, Fashion-MNIST 6-9 (dev splits), then the 20 five-class reference subsets.
# Needs the stack (`stamp stack up`), the registered backbone (`stamp backbones register`; $BB picks which) and the ingested
# suite_tinyimagenet. Rows: $OUT/{targets,sources}-{A,B}.jsonl; then
#   .venv/bin/python -m tests.benchmarks.bench_headroom --analyze $OUT/targets-*.jsonl
#   .venv/bin/python -m tests.benchmarks.bench_headroom --analyze $OUT/sources-*.jsonl
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BB=${BB:-models:/stamp-backbone-resnet20-tinyimagenet32@champion}   # e.g. BB=models:/stamp-backbone-resnet20-tinyimagenet32-e80@champion
OUT=${OUT:-.stamp/headroom}; mkdir -p "$OUT"
PY=.venv/bin/python
# 5 allocations (L1 ranking) and 2 rankings inside L1's allocation: a 2-core budget (SynFlow, activation and
# random rankings were dropped after a first pass: Omniglot costs ~2.5 min a cell there)
MASKS="l1 uniform mix0.5 tilt-1 tilt+1 snip_in_l1 separability_in_l1"
SRC_MASKS="$MASKS"
CAT=s3://stamp/datasets/catalog.json
five=""
for i in $(seq 0 5 95); do five="$five tin-c$(seq -s- $i $((i+4)))"; done
(
  start=$(date +%s)
  $PY -m tests.benchmarks.bench_headroom --backbone $BB --tasks digits "npz:../shared/datasets/omniglot.npz" \
    --masks $MASKS --budgets 0.5 0.3 0.1 --seeds 0 1 --out $OUT/targets-A.jsonl
  echo "targets-A wall_s=$(( $(date +%s) - start ))"
  $PY -m tests.benchmarks.bench_headroom --backbone $BB --catalog $CAT \
    --tasks tin-c0-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15-16-17-18-19-gray tin-c0-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15-16-17-18-19-blur \
            tin-c0-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15-16-17-18-19-lowc tin-c0-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15-16-17-18-19-cshift_0.4 \
            tin-c0-1-2-3-4-5-6-7-8-9-10-11-12-13-14-15-16-17-18-19 \
    --masks $SRC_MASKS --budgets 0.5 0.3 0.1 --seeds 0 1 --train-per-class 25 --dev-per-class 25 --out $OUT/sources-A.jsonl
  echo "sources-A wall_s=$(( $(date +%s) - start ))"
) > $OUT/A.log 2>&1 &
(
  start=$(date +%s)
  $PY -m tests.benchmarks.bench_headroom --backbone $BB --tasks "npz:../shared/datasets/cifar10.npz" "npz:../shared/datasets/dtd10.npz" \
    "npz:../shared/datasets/fashion_mnist.npz?classes=6,7,8,9" --masks $MASKS --budgets 0.5 0.3 0.1 --seeds 0 1 --out $OUT/targets-B.jsonl
  echo "targets-B wall_s=$(( $(date +%s) - start ))"
  $PY -m tests.benchmarks.bench_headroom --backbone $BB --catalog $CAT --tasks $five \
    --masks $SRC_MASKS --budgets 0.5 0.3 0.1 --seeds 0 1 --train-per-class 50 --dev-per-class 50 --out $OUT/sources-B.jsonl
  echo "sources-B wall_s=$(( $(date +%s) - start ))"
) > $OUT/B.log 2>&1 &
wait
