"""The loader on an image folder against tar shards of the same folder (``cmim shards --max-side``), interleaved.

Three settings of one recipe: the folder with every image decoded each time (``data.cache_images=false``: the first
epoch on a new folder), the folder from its decoded-image cache (warmed first, as after a first epoch), and the
shards (``data.name=shards``). Each round times every setting in turn, two ways:

- one process: ``cmim bench --data-items``'s own measurement (:func:`cmim.bench.data_pipeline`), items/s per core;
- the feed: a ``DataLoader`` with ``--workers`` workers (2: the cores of this machine) over the same items in
  batches of ``--batch``, as the trainer iterates an epoch (workers started per pass), items/s.

    python benchmarks/loader_shards.py configs/conmim_folder_cpu.yaml --folder /tmp/clip400 \\
        --shards /tmp/clip400_shards256 --shards /tmp/clip400_shards128 --items 400 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from torch.utils.data import DataLoader

from cmim.bench import data_pipeline, machine
from cmim.config import load_config
from cmim.data.decode import collate_pretrain
from cmim.data.views import build_pretrain_dataset
from cmim.methods import build_method


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--folder", required=True, help="the image folder")
    ap.add_argument("--shards", required=True, action="append",
                    help="its shards (cmim shards FOLDER SHARDS --max-side ...); repeat to time several")
    ap.add_argument("--items", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    cache_dir = tempfile.mkdtemp(prefix="cmim-loader-shards-")
    settings = {
        "folder, decoded each time": [f"data.root={args.folder}", "data.cache_images=false"],
        "folder, decoded-image cache": [f"data.root={args.folder}", "data.cache_images=true"],
        **{f"shards {path}": ["data.name=shards", f"data.root={path}"] for path in args.shards},
    }
    cfgs = {k: load_config(args.config, [*args.overrides, *v, f"data.cache_dir={cache_dir}", "data.val_fraction=0",
                                           "data.train_split=''"])
            for k, v in settings.items()}
    spec = build_method(next(iter(cfgs.values()))).view_spec()
    sets = {k: build_pretrain_dataset(c.data, c.data.train_split, spec, seed=0) for k, c in cfgs.items()}
    n = min(args.items, *(len(ds) for ds in sets.values()))
    t0 = time.perf_counter()
    for i in range(len(sets["folder, decoded-image cache"])):
        sets["folder, decoded-image cache"][i]
    print(f"cache filled in {time.perf_counter() - t0:.1f} s; {n} items per timing", flush=True)
    batches = [list(range(s, min(s + args.batch, n))) for s in range(0, n, args.batch)]
    per_core: dict[str, list[float]] = {k: [] for k in sets}
    feed: dict[str, list[float]] = {k: [] for k in sets}
    for r in range(args.rounds):
        for name, ds in sets.items():
            per_core[name].append(data_pipeline(cfgs[name], spec, n, "recipe")["items_per_s_per_core"])
            t0 = time.perf_counter()
            loader = DataLoader(ds, batch_sampler=batches, num_workers=args.workers, collate_fn=collate_pretrain)
            got = sum(len(b["index"]) for b in loader)
            feed[name].append(got / (time.perf_counter() - t0))
            print(f"round {r}: {name}: {per_core[name][-1]:.1f} items/s per core, "
                  f"{feed[name][-1]:.1f} items/s from {args.workers} workers", flush=True)
    for name in sets:
        print(f"{name}: per core best {max(per_core[name]):.1f} median {statistics.median(per_core[name]):.1f}; "
              f"{args.workers} workers best {max(feed[name]):.1f} median {statistics.median(feed[name]):.1f} items/s")
    slow = "folder, decoded each time"
    for name in list(sets)[1:]:
        print(f"{name} / {slow}: x{max(per_core[name]) / max(per_core[slow]):.2f} per core, "
              f"x{max(feed[name]) / max(feed[slow]):.2f} with {args.workers} workers (best)")
    print(machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
