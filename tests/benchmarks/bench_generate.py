"""Benchmark: cost of StampPruner.generate vs one forward pass, and real speed of pruned nets.

Figures (medians; the machine is shared, so ratios matter more than absolutes):

1. generate() incl. feature extraction for a 400-image set at 32x32, against one plain forward pass
   of the same 400 images through the backbone (the floor), for every generator (the channel and outcome
   generators also pool every gated channel's response in that pass; the outcome generator then computes the
   task features, ranks its candidates and calibrates the chosen one, L1's allocation included). Target:
   resnet18 <= 1.2x; resnet20 < 1 s; the outcome generator <= 1.2x (issue 25).
2. CPU latency at batch 64 of the pruned net / the full net at r = 0.3 for vgg19 and resnet18,
   against the MACs ratio. Target: latency ratio within 1.5x of the MACs ratio.

Run: .venv/bin/python tests/benchmarks/bench_generate.py [--threads 2] [--repeats 5] [--generators faithful channel outcome]
     [--backbones resnet20 resnet18] [--skip-latency] [--outcome-candidates separability_in_synflow]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.config import DEFAULT_CANDIDATES
from stamp_core import StampPruner, measure_latency


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, one-time tracing caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_generate(name: str, repeats: int, generator: str = "faithful",
                   candidates: list[str] | None = None) -> dict[str, float]:
    torch.manual_seed(0)
    extra = {"candidates": list(candidates or DEFAULT_CANDIDATES)} if generator == "outcome" else {}
    pruner = StampPruner.create(name, 10, generator=generator, **extra).eval()
    x = torch.rand(400, 3, 32, 32) * 2 - 1
    y = torch.arange(400) % 10

    def forward() -> None:
        with torch.no_grad():
            pruner.backbone(x)

    floor = _median_seconds(forward, repeats)
    gen = _median_seconds(lambda: pruner.generate(x, y, macs_ratio=0.3), repeats)
    return {"forward_s": floor, "generate_s": gen, "ratio": gen / floor}


def bench_latency(name: str, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    pruner = StampPruner.create(name, 10).eval()
    x = torch.rand(100, 3, 32, 32) * 2 - 1
    spec = pruner.generate(x, torch.arange(100) % 10, macs_ratio=0.3)
    pruned = pruner.build_pruned(spec).eval()
    full = measure_latency(pruner.backbone, (3, 32, 32), 64, repeats=repeats)
    small = measure_latency(pruned, (3, 32, 32), 64, repeats=repeats)
    return {"macs_ratio": spec.macs_ratio, "latency_ratio": small / full, "full_ms": 1e3 * full, "pruned_ms": 1e3 * small}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--generators", nargs="+", default=["faithful", "channel", "outcome"],
                        choices=["faithful", "channel", "outcome"])
    parser.add_argument("--skip-latency", action="store_true", help="only the generate() figures")
    parser.add_argument("--backbones", nargs="+", default=["resnet20", "resnet18"], help="for the generate() figures")
    parser.add_argument("--outcome-candidates", nargs="+", default=None,
                        help="the outcome generator's candidates (its untrained predictor picks the first): e.g. "
                             "separability_in_synflow for the costliest choice, SynFlow scores + the probe's statistics")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print("\ngenerate() on 400 images at 32x32 vs one forward pass of them")
    print(f"{'backbone':<10} {'generator':<9} {'forward s':>10} {'generate s':>11} {'ratio':>7}")
    for name in args.backbones:
        for generator in args.generators:
            r = bench_generate(name, args.repeats, generator, args.outcome_candidates)
            print(f"{name:<10} {generator:<9} {r['forward_s']:>10.3f} {r['generate_s']:>11.3f} {r['ratio']:>7.2f}")
    if args.skip_latency:
        return
    print("\npruned / full CPU latency at batch 64, r = 0.3")
    print(f"{'backbone':<10} {'MACs ratio':>10} {'latency ratio':>14} {'full ms':>9} {'pruned ms':>10} {'lat/MACs':>9}")
    for name in ("vgg19", "resnet18"):
        r = bench_latency(name, args.repeats)
        print(f"{name:<10} {r['macs_ratio']:>10.3f} {r['latency_ratio']:>14.3f} {r['full_ms']:>9.1f} {r['pruned_ms']:>10.1f} "
              f"{r['latency_ratio'] / r['macs_ratio']:>9.2f}")


if __name__ == "__main__":
    main()
