"""What a cache says about the extraction that made it (summed over resumed runs).

    python bench/cache_summary.py --cache-dir cache --backbone mobilenet_v2
"""
from __future__ import annotations

import argparse
from collections import Counter

import h5py

from featpipe.store import find_cache, open_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--backbone", default="mobilenet_v2")
    args = ap.parse_args()
    c = open_cache(find_cache(args.cache_dir, args.backbone))
    a = c.attrs
    print("| cache | images | classes | skipped | feature dim | dtype | weights | device | extraction s | images/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with h5py.File(c.path) as f:
        skipped = Counter(r.decode() for r in f["skipped/reason"][...])
    print(f"| {c.path.name} | {a['n_images']} | {len(c.classes)} | {dict(skipped)} | {a['feature_dim']} | {a['dtype']} | "
          f"{a['weights_id'][:20]}... | {a['device']} | {a['extract_seconds']:.0f} | {a['images_per_s']:.1f} |")
    print(f"\nsplit sizes: train {int((c.split == 0).sum())}, val {int((c.split == 1).sum())}, test {int((c.split == 2).sum())}; "
          f"versions {a['versions']}")


if __name__ == "__main__":
    main()
