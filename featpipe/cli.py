"""Command line: thin click wrappers over the library; every error is one line."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .backbones import BACKBONES, WeightsError
from .dataset import TARGETS, DatasetError
from .store import CacheError

USER_ERRORS = (DatasetError, WeightsError, CacheError, ValueError, FileNotFoundError)


class _Group(click.Group):
    """Turn the library's user errors into `featpipe: error: ...` and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            click.echo(f"featpipe: error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log details (skipped rows, resume points).")
def main(verbose: bool) -> None:
    """Product photos -> feature cache -> classifier heads, auto-tagging and similarity search."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _fractions(value: str) -> tuple[float, float, float]:
    parts = tuple(float(x) for x in value.split(","))
    if len(parts) != 3:
        raise click.BadParameter("give train,val,test fractions, e.g. 0.8,0.1,0.1")
    return parts  # type: ignore[return-value]


@main.command()
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Folder with styles.csv and images/.")
@click.option("--backbone", type=click.Choice(sorted(BACKBONES)), default="mobilenet_v2", show_default=True)
@click.option("--weights", default="imagenet", show_default=True, help="imagenet | none | PATH to a state dict.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default="cache", show_default=True)
@click.option("--target", type=click.Choice(TARGETS), default="articleType", show_default=True)
@click.option("--min-per-class", type=int, default=50, show_default=True)
@click.option("--image-size", type=int, default=224, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=None, help="DataLoader workers [default: 1 per 2 cores on CPU].")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--split", "fractions", default="0.8,0.1,0.1", show_default=True, help="train,val,test fractions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Split seed.")
@click.option("--limit", type=int, default=None, help="Extract a seeded random subset of N images.")
@click.option("--overwrite", is_flag=True, help="Discard an existing or unfinished cache with these settings.")
@click.option("--no-progress", is_flag=True)
def extract(data, backbone, weights, cache_dir, target, min_per_class, image_size, batch_size, workers, device,
            dtype, fractions, seed, limit, overwrite, no_progress):
    """Run a frozen backbone over every image once and write the HDF5 feature cache."""
    from .extract import extract as run

    summary = run(data, backbone, weights, cache_dir, target, min_per_class, image_size, batch_size, workers,
                  device, dtype, _fractions(fractions), seed, limit, overwrite, progress=not no_progress)
    click.echo(str(summary))


if __name__ == "__main__":
    main()
