"""The folder loader with and without the decoded-image cache (``data.cache_images``), interleaved in one run.

Times ``PretrainDataset`` items (decode or cache read, crops, both views' parameters, mask) in this one process,
so the numbers are items/s per CPU core, as ``cmim bench --data-items`` reports them. Rounds alternate between
the two settings over the same items; the cache is warmed (filled) before the first timed round, as it is after
a run's first epoch.

    python benchmarks/loader_cache.py configs/conmim_folder_cpu.yaml data.root=/usr/share/openclipart/png \\
        --items 400 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from cmim.bench import machine
from cmim.config import load_config
from cmim.data.views import build_pretrain_dataset
from cmim.methods import build_method


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cache_dir = tempfile.mkdtemp(prefix="cmim-loader-cache-")
    sets = {}
    spec = build_method(load_config(args.config, args.overrides)).view_spec()
    for name, on in (("decoded each time", "false"), ("cache", "true")):
        cfg = load_config(args.config, [*args.overrides, f"data.cache_images={on}", f"data.cache_dir={cache_dir}"])
        sets[name] = build_pretrain_dataset(cfg.data, cfg.data.train_split, spec, seed=0)
    n = min(args.items, len(sets["cache"]))
    step = len(sets["cache"]) // n
    items = [i * step for i in range(n)]
    t0 = time.perf_counter()
    for i in items:
        sets["cache"][i]
    print(f"cache filled for {n} items in {time.perf_counter() - t0:.1f} s", flush=True)
    rates: dict[str, list[float]] = {k: [] for k in sets}
    for r in range(args.rounds):
        for name, ds in sets.items():
            t0 = time.perf_counter()
            for i in items:
                ds[i]
            rates[name].append(n / (time.perf_counter() - t0))
            print(f"round {r}: {name}: {rates[name][-1]:.1f} items/s", flush=True)
    for name, xs in rates.items():
        print(f"{name}: best {max(xs):.1f}, median {statistics.median(xs):.1f} items/s per core")
    ratio = max(rates["cache"]) / max(rates["decoded each time"])
    print(f"cache / decoded: x{ratio:.2f} (best); {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
