"""Command line: thin click wrappers over the library; every error is one line."""
from __future__ import annotations

import logging
import re
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from .augment import AUGMENTATIONS
from .backbones import BACKBONES, get_spec
from .dataset import FINGERPRINTS, TARGETS
from .errors import UserError, os_error_text
from .files import check_outputs
from .heads import HEADS, OPTIMIZERS
from .runtimes import RUNTIMES

WORKERS_HELP = ("Image-decoding worker processes; 0 decodes each batch in this process between forward passes "
                "[default: 0 on CPU, up to 8 on CUDA].")

# Numeric options are checked where they are parsed: a bad value is one line, before any work is done.
COUNT = click.IntRange(min=1)
COUNT_OR_ZERO = click.IntRange(min=0)
IMAGE_SIZE = click.IntRange(min=16)
POSITIVE = click.FloatRange(min=0, min_open=True)
LEARNING_RATE = POSITIVE
NON_NEGATIVE = click.FloatRange(min=0)
FRACTION = click.FloatRange(0, 1, max_open=True)  # dropout, label smoothing, momentum: 1 would stop learning
PROBABILITY = click.FloatRange(0, 1, min_open=True, max_open=True)  # target precision, alpha


def check_writable(path: Path, folder: bool = False) -> Path:
    """Fail before any work when an output cannot be written (read-only or missing-permission folder):
    a fit that trains for minutes and then cannot save is a lost run. Tries a real file, since
    permission bits say nothing about read-only mounts or root."""
    where = path if folder else path.parent
    try:
        where.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=where, prefix=".featpipe-write-test-"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write {path}: {os_error_text(exc)}") from None
    if not folder and path.is_dir():
        raise UserError(f"{path} is a folder; give a file name for the output")
    return path


def _writable(folder: bool):
    """A click callback: the option's path must be writable (checked when the command line is read)."""
    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return check_writable(value, folder)
        except UserError as exc:
            raise click.BadParameter(str(exc)) from None
    return callback


class Device(click.ParamType):
    """auto | cpu | cuda | cuda:N; whether CUDA is there is checked when the device is used."""

    name = "device"

    def convert(self, value, param, ctx):
        if re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(value)):
            return str(value)
        self.fail(f"{value!r}: use auto, cpu, cuda or cuda:N", param, ctx)


DEVICE = Device()

RUNTIME_HELP = ("Where the backbone runs: torch (eager, the reference), openvino (fp32: same features, faster on a "
                "CPU), openvino-bf16 (bf16 arithmetic on CPUs with bf16 instructions: faster still, as accurate) "
                "or openvino-int8 (NNCF post-training quantization: less accurate on photos unlike the catalogue) "
                "[default: openvino-bf16 on a CPU that has bf16, else openvino where installed, else torch].")


def _backbone(ctx, param, value: str) -> str:
    """A built-in backbone or timm:NAME, checked before any work (timm: that the model exists)."""
    try:
        get_spec(value)
    except UserError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def runtime_options(f):
    """predict/evaluate/serve: the runtime the features were made with, unless told to mix; test-time flips;
    where the backbone weights may be."""
    f = click.option("--weights-path", multiple=True, type=click.Path(path_type=Path),
                     help="A folder (or file) where the backbone weights the model was made with may be, found by "
                          "their digest; repeatable; also FEATPIPE_WEIGHTS_PATH. Not needed for a bundle, or once "
                          "the model's networks are cached.")(f)
    f = click.option("--flip", is_flag=True,
                     help="Test-time augmentation: average each photo's features with its mirror image's.")(f)
    f = click.option("--allow-runtime-mix", is_flag=True,
                     help="Run another --runtime than the model's features were made with.")(f)
    return click.option("--runtime", type=click.Choice(RUNTIMES), default=None,
                        help="[default: the runtime the model's features were made with]")(f)


class Terminated(Exception):
    """SIGTERM, turned into an exception so that finally-blocks and the journal's atomic writes finish."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


class _Group(click.Group):
    """The library's user errors and the file system's refusals become `featpipe: error: ...`, exit 2;
    -v also prints their traceback. Anything else is a featpipe bug and keeps its traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            self._fail(ctx, str(exc), 2)
        except OSError as exc:
            self._fail(ctx, os_error_text(exc), 2)
        except (KeyboardInterrupt, Terminated) as exc:
            how = "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"
            self._fail(ctx, f"stopped by {how}; finished work is kept: rerun the same command to resume", 130)

    @staticmethod
    def _fail(ctx, message: str, code: int) -> None:
        if (ctx.obj or {}).get("verbose"):
            traceback.print_exc()
        click.echo(f"featpipe: error: {message}", err=True)
        sys.exit(code)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log details (skipped rows, resume points) and show tracebacks.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Product photos -> feature cache -> classifier heads, auto-tagging and similarity search."""
    ctx.obj = {"verbose": verbose}
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _on_sigterm)


def _fractions(value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise click.BadParameter(f"{value!r}: give three train,val,test fractions, e.g. 0.8,0.1,0.1",
                                 param_hint="--split")
    return parts  # type: ignore[return-value]


@main.command()
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Folder with styles.csv and images/.")
@click.option("--backbone", default="mobilenet_v2", show_default=True, callback=_backbone,
              help=f"{', '.join(sorted(BACKBONES))}, or timm:NAME for any timm model (pip install 'featpipe[timm]').")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet | none | PATH to a state dict.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default="cache", show_default=True)
@click.option("--target", type=click.Choice(TARGETS), default="articleType", show_default=True)
@click.option("--min-per-class", type=COUNT, default=50, show_default=True)
@click.option("--image-size", type=IMAGE_SIZE, default=None,
              help="Square input size [default: the backbone's training resolution, 224 for most].")
@click.option("--batch-size", type=COUNT, default=64, show_default=True)
@click.option("--workers", type=COUNT_OR_ZERO, default=None, help=WORKERS_HELP)
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="auto | cpu | cuda[:N]")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--split", "fractions", default="0.8,0.1,0.1", show_default=True, help="train,val,test fractions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Split seed.")
@click.option("--limit", type=COUNT, default=None, help="Extract a seeded random subset of N images.")
@click.option("--overwrite", is_flag=True,
              help="Rebuild from scratch. Without it, a cache of a changed dataset is updated: only new and changed "
                   "images are extracted, and existing images keep their split.")
@click.option("--no-progress", is_flag=True)
@click.option("--runtime", type=click.Choice(RUNTIMES), default=None, help=RUNTIME_HELP)
@click.option("--calibration-images", type=COUNT, default=300, show_default=True,
              help="Training images that calibrate openvino-int8.")
@click.option("--fingerprint", "fingerprint_mode", type=click.Choice(FINGERPRINTS), default="stat", show_default=True,
              help="How changed images are noticed: stat (image names, sizes, modification times) or content "
                   "(also hashes every image: slower, catches files rewritten with their old time stamp).")
@click.option("--views", type=COUNT_OR_ZERO, default=0, show_default=True,
              help="Also store this many augmented views of every training image beside the cache.")
@click.option("--augment", type=click.Choice(sorted(AUGMENTATIONS)), default="seller", show_default=True,
              help="How views are made. seller: the product cut from its background onto generated textures, "
                   "cropped, turned, relit, blurred and re-encoded, like photos sellers upload.")
@click.option("--activations", is_flag=True,
              help="Also store the output of the backbone's inner block that `fit-head --finetune` trains from "
                   "(mobilenet_v2: features.16) for every image.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: a Ray Data actor pool does the extraction (pip install 'featpipe[ray]'), on the cluster at "
                   "--address or on a local one; same features, so either engine resumes the other's run.")
@click.option("--address", default=None, help="With --engine ray: the cluster (auto, HOST:PORT or ray://...).")
@click.option("--actors", type=COUNT, default=None,
              help="With --engine ray: actors in the pool [default: one per GPU, else one per node].")
@click.option("--shard-size", type=COUNT, default=512, show_default=True,
              help="With --engine ray: images per actor call and per shard.")
def extract(data, backbone, weights, cache_dir, target, min_per_class, image_size, batch_size, workers, device,
            dtype, fractions, seed, limit, overwrite, no_progress, runtime, calibration_images, fingerprint_mode,
            views, augment, activations, engine, address, actors, shard_size):
    """Run a frozen backbone over every image once and write the HDF5 feature cache; on a dataset that
    changed since, extract only its new and changed images."""
    from .extract import extract as run
    from .finetune import extract_activations
    from .store import open_cache
    from .views import extract_views

    summary = run(data, backbone, weights, cache_dir, target, min_per_class, image_size, batch_size, workers,
                  device, dtype, _fractions(fractions), seed, limit, overwrite, progress=not no_progress,
                  runtime=runtime, calibration_images=calibration_images,
                  fingerprint_mode=fingerprint_mode, engine=engine, address=address, actors=actors,
                  shard_size=shard_size)
    click.echo(str(summary))
    if views:
        click.echo(str(extract_views(open_cache(summary.cache), views, augment, batch_size, workers, device,
                                     progress=not no_progress)))
    if activations:
        click.echo(str(extract_activations(open_cache(summary.cache), batch_size, workers, device,
                                           progress=not no_progress)))


def cache_options(f):
    """--cache-dir/--backbone find the one matching cache; --cache FILE picks one explicitly. Two or more
    (--backbone a+b, or --cache repeated) are joined: their features side by side (store.join_caches)."""
    f = click.option("--cache", "cache_file", type=click.Path(path_type=Path), multiple=True,
                     help="An explicit cache file (when several match); repeat it to join caches.")(f)
    f = click.option("--backbone", default="mobilenet_v2", show_default=True,
                     help="Whose cache to use; a+b joins the caches of backbones a and b.")(f)
    return click.option("--cache-dir", type=click.Path(path_type=Path), default="cache", show_default=True)(f)


def _open(cache_dir, backbone, cache_files):
    from .store import find_cache, open_caches

    return open_caches(list(cache_files or ()) or [find_cache(cache_dir, b) for b in backbone.split("+")])


def _cache_paths(cache) -> list[Path]:
    """The cache file(s) behind an opened cache (several when joined)."""
    return [Path(p) for p in cache.attrs["cache"]] if "parts" in cache.attrs else [cache.path]


def _words(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def _learning_rates(ctx, param, value: str) -> list[float]:
    """A comma list of positive numbers, checked when the command line is read."""
    try:
        rates = [float(x) for x in _words(value)]
    except ValueError:
        rates = []
    if not rates or min(rates) <= 0:
        raise click.BadParameter(f"{value!r}: give positive learning rates separated by commas, e.g. 0.1,0.01")
    return rates


def _choices(allowed: tuple[str, ...]):
    """A click callback: a comma list whose every item is one of `allowed`."""
    def callback(ctx, param, value: str) -> list[str]:
        items = _words(value)
        wrong = [x for x in items if x not in allowed]
        if wrong or not items:
            raise click.BadParameter(f"{', '.join(wrong) or repr(value)}: choose from {', '.join(allowed)}")
        return items
    return callback


@main.command("fit-head")
@cache_options
@click.option("--head", type=click.Choice(["fc", "batchnorm"]), default="batchnorm", show_default=True)
@click.option("--preset", type=click.Choice(["study", "tuned"]), default="study", show_default=True,
              help="study: the report's settings (the defaults below); tuned: compare's tuned settings for this "
                   "head. Options given explicitly override either.")
@click.option("--out", type=click.Path(path_type=Path), default=None, callback=_writable(False),
              help="Model file [default: runs/<backbone>-<head>.pt].")
@click.option("--hidden", type=COUNT, default=512, show_default=True, help="batchnorm hidden size.")
@click.option("--dropout", type=FRACTION, default=0.5, show_default=True, help="1 - keep_prob of the study.")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--lr", type=LEARNING_RATE, default=0.01, show_default=True)
@click.option("--momentum", type=FRACTION, default=0.9, show_default=True)
@click.option("--epochs", type=COUNT, default=10, show_default=True)
@click.option("--batch-size", type=COUNT, default=256, show_default=True)
@click.option("--weight-decay", type=NON_NEGATIVE, default=0.0, show_default=True)
@click.option("--class-weight", type=click.Choice(["none", "balanced"]), default="none", show_default=True)
@click.option("--label-smoothing", type=FRACTION, default=0.0, show_default=True)
@click.option("--schedule", type=click.Choice(["none", "cosine"]), default="none", show_default=True)
@click.option("--no-standardize", is_flag=True, help="Train on raw features (the study's way).")
@click.option("--power", type=POSITIVE, default=1.0, show_default=True,
              help="Power normalisation: the head reads sign(x)|x|^power of each feature (0.5: square roots).")
@click.option("--clip/--no-clip", default=False, show_default=True,
              help="Clip each feature of a photo to the range the training rows span before the head reads it, so "
                   "photos unlike the catalogue cannot push it past anything it was fitted to (the tuned preset "
                   "clips).")
@click.option("--members", type=COUNT, default=1, show_default=True,
              help="Train this many copies (seeds seed, seed+1, ...) and average their logits: a deep ensemble, "
                   "better calibrated, at that many times the training and head cost (the tuned batchnorm preset "
                   "uses 3, one per copy with --cross-fit; --finetune always trains one).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--target-precision", type=PROBABILITY, default=0.99, show_default=True, help="Precision of auto-tags.")
@click.option("--alpha", type=PROBABILITY, default=0.05, show_default=True, help="1 - confidence of the precision bound.")
@click.option("--cross-fit", type=COUNT, default=None, metavar="K",
              help="Train K copies of the head, each on all but one of K folds of train + val, and keep the mean "
                   "of their logits (a bag); calibrate (temperature, auto-tag threshold) on every row's logits from "
                   "the copy that held it out, not on the val split: a tighter precision bound, so more is "
                   "auto-tagged, for K fits and K heads in the model file (--preset tuned then trains one member "
                   "per copy).")
@click.option("--augment", type=click.Choice(sorted(AUGMENTATIONS)), default=None,
              help="Also train on the augmented views stored beside the cache (`extract --views K --augment`).")
@click.option("--views", "n_views", type=COUNT, default=None, help="Which view set, when several [default: the only one].")
@click.option("--labelled", type=click.Path(path_type=Path), default=None, metavar="CSV",
              help="Also train on these photos from outside the catalogue (e.g. sellers' photos that reviewers "
                   "tagged): a csv of file,<target> rows, the layout `evaluate --labels` reads. Calibration and "
                   "test scores stay on the catalogue.")
@click.option("--labelled-root", type=click.Path(path_type=Path), default=None,
              help="Folder the --labelled csv's files are relative to [default: the csv's folder].")
@click.option("--allow-outside-root", is_flag=True,
              help="Read --labelled (or --labels) rows whose files lie outside their root folder ('..', absolute "
                   "paths, symlinks leading out); without it such a row is an error.")
@click.option("--drop-overlap", is_flag=True,
              help="Drop (and count) --labelled photos with the same bytes as the catalogue's validation or test "
                   "photos; without it such a row is an error.")
@click.option("--labelled-repeat", type=COUNT, default=10, show_default=True,
              help="Train on each --labelled photo this many times, so a few hundred of them weigh against tens "
                   "of thousands of catalogue photos.")
@click.option("--finetune", is_flag=True,
              help="Also train the backbone's last blocks, from the activations `extract --activations` stored.")
@click.option("--top-lr", type=LEARNING_RATE, default=1e-4, show_default=True,
              help="With --finetune: the learning rate of the backbone's blocks (--lr is the head's).")
@click.option("--patience", type=COUNT, default=3, show_default=True,
              help="With --finetune: stop after this many epochs without a better validation loss.")
@click.pass_context
def fit_head(ctx, cache_dir, backbone, cache_file, head, preset, out, hidden, dropout, optimizer, lr, momentum, epochs,
             batch_size, weight_decay, class_weight, label_smoothing, schedule, no_standardize, power, clip, members,
             seed, device, target_precision, alpha, cross_fit, augment, n_views, labelled, labelled_root,
             allow_outside_root, drop_overlap, labelled_repeat, finetune, top_lr, patience):
    """Train a head on the cached features; keep the best-validation-loss epoch; calibrate; save the model."""
    from click.core import ParameterSource
    from sklearn.base import clone

    from .comparators import candidates
    from .finetune import fit_finetune, open_activations
    from .harness import fit_head as run
    from .heads import TorchHead
    from .labelled import labelled_features, read_labels
    from .store import file_stem
    from .views import open_views

    cache = _open(cache_dir, backbone, cache_file)
    given = dict(hidden=hidden, dropout=dropout, optimizer=optimizer, lr=lr, momentum=momentum, epochs=epochs,
                 batch_size=batch_size, weight_decay=weight_decay,
                 class_weight=None if class_weight == "none" else class_weight, label_smoothing=label_smoothing,
                 standardize=not no_standardize, power=power, clip=clip, members=members, seed=seed, device=device)
    if preset == "tuned":
        cli_name = {"standardize": "no_standardize"}
        given = {k: v for k, v in given.items()
                 if ctx.get_parameter_source(cli_name.get(k, k)) == ParameterSource.COMMANDLINE}
        if finetune or cross_fit:  # fine-tuning trains one network; a cross-fit bag is itself the ensemble
            given.setdefault("members", 1)
        est = clone(candidates(seed, device)[head]).set_params(**given)
    else:
        est = TorchHead(head=head, **given)
    epochs = est.epochs
    out = out or check_writable(Path("runs") / f"{file_stem(cache.backbone)}-{head}.pt")
    if finetune and augment:
        raise UserError("--finetune trains on the clean photos' activations; leave --augment out")
    if finetune and cross_fit:
        raise UserError("--finetune calibrates on the val split; leave --cross-fit out")
    if finetune and labelled:
        raise UserError("--finetune trains on the activations cached for the catalogue; leave --labelled out")
    for flag, given in (("--labelled-root", labelled_root), ("--allow-outside-root", allow_outside_root),
                        ("--drop-overlap", drop_overlap)):
        if given and not labelled:
            raise UserError(f"{flag}: give the csv too (--labelled CSV)")
    rows = read_labels(labelled, labelled_root, cache.attrs["target"], allow_outside_root) if labelled else None
    check_outputs({"--out": [out, out.with_suffix(".curves.csv"), out.with_suffix(".curves.png")]},
                  {"--cache": _cache_paths(cache), "--labelled": [labelled] if labelled else [],
                   "a photo of --labelled": rows.paths if rows else []})
    if finetune:
        m = fit_finetune(cache, open_activations(cache), out, est, top_lr, target_precision, alpha, patience).metrics
    else:
        views = open_views(cache, augment, n_views) if augment else None
        photos = labelled_features(cache.provenance(), cache.classes, rows, device=device) if rows else None
        m = run(cache, out, est, target_precision, alpha, views, cross_fit, photos, labelled_repeat,
                drop_overlap).metrics
    best = m["best_epoch"]  # an ensemble's: one per member
    best = ", ".join(map(str, best)) if isinstance(best, list) else best
    click.echo(f"{out}: test accuracy {m['accuracy']:.4f}, weighted-F1 {m['weighted_f1']:.4f}, "
               f"macro-F1 {m['macro_f1']:.4f} (best epoch {best}/{epochs}, fit {m['fit_seconds']:.1f} s, "
               f"{m['n_train']} training rows, views: {m['train_views']}, "
               f"labelled photos: {m['train_labelled']})")
    click.echo(f"calibration on {m['n_calibration']} rows ({m['calibrated_on']}): temperature {m['temperature']:.3f}, "
               f"test ECE {m['ece_test_before']:.4f} -> {m['ece_test_after']:.4f}")
    click.echo(f"auto-tag threshold {m['threshold']:.4f} for {target_precision:.0%} precision: test coverage "
               f"{m['test_coverage']:.1%} at precision {m['test_precision']:.4f} ({m['test_auto']} of {m['n_test']} images)")


@main.command()
@click.option("--cache-dir", type=click.Path(path_type=Path), default="cache", show_default=True)
@click.option("--backbones", default="mobilenet_v2", show_default=True, help="Comma list; each needs a cache.")
@click.option("--cache", "cache_files", type=click.Path(path_type=Path), multiple=True,
              help="Explicit cache file(s), instead of --backbones.")
@click.option("--lrs", default="0.1,0.01,0.001", show_default=True, callback=_learning_rates)
@click.option("--optimizers", default="adam,sgd", show_default=True, callback=_choices(OPTIMIZERS))
@click.option("--heads", default="fc,batchnorm", show_default=True, callback=_choices(HEADS))
@click.option("--epochs", type=COUNT, default=3, show_default=True)
@click.option("--hidden", type=COUNT, default=512, show_default=True)
@click.option("--batch-size", type=COUNT, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@click.option("--stack-size", type=COUNT, default=16, show_default=True,
              help="Conditions of one backbone trained together as one stack (memory grows with it).")
@click.option("--out", type=click.Path(path_type=Path), default="runs/sweep.csv", show_default=True,
              callback=_writable(False))
def sweep(cache_dir, backbones, cache_files, lrs, optimizers, heads, epochs, hidden, batch_size, seed, device, stack_size, out):
    """The study's grid: backbone x learning rate x optimizer x head; top-10 by validation loss."""
    from .evaluate import markdown_table, write_csv
    from .harness import sweep as run, top_by_val_loss

    caches = ([_open(cache_dir, None, [f]) for f in cache_files] if cache_files
              else [_open(cache_dir, b, None) for b in _words(backbones)])
    check_outputs({"--out": [out]}, {"--cache": [p for c in caches for p in _cache_paths(c)]})
    t0 = time.perf_counter()
    rows = run(caches, lrs, optimizers, heads, epochs, hidden=hidden,
               batch_size=batch_size, seed=seed, device=device, stack_size=stack_size)
    write_csv(out, rows)
    click.echo(markdown_table(top_by_val_loss(rows)))
    click.echo(f"{len(rows)} runs in {time.perf_counter() - t0:.1f} s, {len({r['stack'] for r in rows})} stacks; "
               f"all runs in {out}")


@main.command()
@cache_options
@click.option("--models", default=None, help="Comma list [default: fc,batchnorm,logreg,linear_svm,knn,lightgbm].")
@click.option("--ensemble-size", type=COUNT, default=3, show_default=True)
@click.option("--out-dir", type=click.Path(path_type=Path), default="runs/compare", show_default=True,
              callback=_writable(True))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True)
def compare(cache_dir, backbone, cache_file, models, ensemble_size, out_dir, seed, device):
    """Every head and comparator on the same split: one table (Markdown, CSV, bar plot) and a report of the best."""
    from .evaluate import markdown_table
    from .harness import compare as run

    rows = run(_open(cache_dir, backbone, cache_file), out_dir, _words(models) if models else None, ensemble_size,
               seed, device, log=click.echo)
    click.echo(markdown_table(rows))
    click.echo(f"written: {out_dir}/compare.md, compare.csv, compare.png, report/")


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path))
@click.option("--cache", "cache_file", type=click.Path(path_type=Path), default=None,
              help="Cache to evaluate on [default: the one the model was trained on].")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None, callback=_writable(True),
              help="[default: <model stem>.report/]")
def report(model_path, cache_file, out_dir):
    """Per-class precision/recall/F1, most confused pairs and a confusion-matrix PNG for a model file."""
    from .harness import Splits, write_report
    from .models import load_model
    from .store import open_caches

    model = load_model(model_path)
    recorded = model.provenance["cache"]
    recorded = recorded if isinstance(recorded, list) else [recorded]
    gone = [p for p in recorded if not Path(p).is_file()]
    if not cache_file and gone:
        raise UserError(f"{gone[0]}: the cache this model was trained on is not there (moved, or the model was); "
                        "pass --cache FILE")
    cache = open_caches([cache_file] if cache_file else recorded)
    model.check_features(cache.attrs)
    model.check_labels(cache.provenance(), cache.classes)
    out_dir = out_dir or check_writable(model_path.with_suffix(".report"), folder=True)
    r = write_report(model.head, Splits.from_cache(cache), out_dir, f"{model_path.name} on {cache.path.name}")
    worst = ", ".join(f"{c['class']} ({c['f1']:.2f})" for c in r["per_class"][:5])
    click.echo(f"{out_dir}/report.md, per_class.csv, confused_pairs.csv, confusion.png; worst F1: {worst}")


def _emit(rows: list[dict], fmt: str, out: Path | None) -> None:
    """Rows as an aligned table, CSV or JSON, to stdout or a file."""
    import csv
    import io
    import json

    if fmt == "json":
        text = json.dumps(rows, indent=1)
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()} for r in rows)
        text = buf.getvalue()
    else:
        cols = list(rows[0]) if rows else []
        cells = [[_cell(r[c]) for c in cols] for r in rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
        text = "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in [cols] + cells)
    if out:
        Path(out).write_text(text + ("" if text.endswith("\n") else "\n"))
    else:
        click.echo(text)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):
        return " ".join(f"{d['label']}:{d['p']:.3f}" for d in v)
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], str(v))  # a newline in a name stays in its row


MODEL_HELP = "A model file (fit-head) or a bundle folder (featpipe bundle)."


def _predictor(model_path: Path, device: str, runtime, allow_runtime_mix: bool, flip: bool, weights_path,
               batch_size: int = 64):
    from .workflows.predictor import Predictor

    return Predictor.load(model_path, device=device, runtime=runtime, allow_runtime_mix=allow_runtime_mix, flip=flip,
                          batch_size=batch_size, search_path=list(weights_path))


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help=MODEL_HELP)
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--top-k", type=COUNT, default=3, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, callback=_writable(False),
              help="Write to a file instead of stdout.")
@click.option("--batch-size", type=COUNT, default=64, show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@runtime_options
def predict(inputs, model_path, fmt, top_k, out, batch_size, device, runtime, allow_runtime_mix, flip, weights_path):
    """Tag new photos (files or folders): top-k labels, calibrated confidence, and 'auto' or 'review'."""
    from .workflows.predictor import expand_inputs

    check_outputs({"--out": [out] if out else []}, {"--model": [model_path], "IMAGE": expand_inputs(inputs)})
    predictor = _predictor(model_path, device, runtime, allow_runtime_mix, flip, weights_path, batch_size)
    preds = predictor.predict(inputs, top_k)
    rows = [p.as_row() for p in preds]
    if fmt == "table":
        rows = [{k: v for k, v in r.items() if k not in ("error", "reason") or any(x[k] for x in rows)} for r in rows]
    _emit(rows, fmt, out)
    counts = {d: sum(p.decision == d for p in preds) for d in ("auto", "review", "error")}
    click.echo(f"{len(preds)} images: {counts['auto']} auto, {counts['review']} review, {counts['error']} unreadable "
               f"(threshold {predictor.threshold:.4f} for {predictor.model.target_precision:.0%} precision)", err=True)


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help=MODEL_HELP)
@click.option("--labels", "labels_csv", required=True, type=click.Path(path_type=Path),
              help="csv with a header; columns file (relative to --root) and the label column.")
@click.option("--root", type=click.Path(path_type=Path), default=None, help="[default: the csv's folder]")
@click.option("--allow-outside-root", is_flag=True,
              help="Read rows whose files lie outside --root ('..', absolute paths, symlinks leading out).")
@click.option("--label-column", default=None, help="[default: the model's target, e.g. articleType]")
@click.option("--top-k", type=COUNT, default=3, show_default=True)
@click.option("--sheet", type=click.Path(path_type=Path), default=None, callback=_writable(False),
              help="Write a contact sheet of the mistakes.")
@click.option("--out", type=click.Path(path_type=Path), default=None, callback=_writable(False),
              help="Write every prediction to this csv.")
@click.option("--batch-size", type=COUNT, default=64, show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@runtime_options
def evaluate(model_path, labels_csv, root, allow_outside_root, label_column, top_k, sheet, out, batch_size, device,
             runtime, allow_runtime_mix, flip, weights_path):
    """Score a model on a labelled folder of photos: accuracy, top-k, F1, per class and auto-tagging."""
    from .evaluate import markdown_table
    from .labelled import read_labels, score_folder
    from .search import contact_sheet

    predictor = _predictor(model_path, device, runtime, allow_runtime_mix, flip, weights_path, batch_size)
    data = read_labels(labels_csv, root, label_column or predictor.model.provenance.get("target", "articleType"),
                       allow_outside_root)
    check_outputs({"--out": [out] if out else [], "--sheet": [sheet] if sheet else []},
                  {"--model": [model_path], "--labels": [labels_csv], "a photo of --labels": data.paths})
    result = score_folder(predictor, data, top_k)
    s = result.summary
    click.echo(f"{labels_csv}: {s['images']} images, {s['classes']} classes; accuracy {s['accuracy']:.4f}, "
               f"top-{top_k} {s[f'top{top_k}']:.4f}, weighted-F1 {s['weighted_f1']:.4f}, macro-F1 {s['macro_f1']:.4f}")
    click.echo(f"auto-tagged {s['auto']} ({s['auto_coverage']:.1%}) at precision {s['auto_precision']:.4f} "
               f"(threshold {predictor.threshold:.4f} for {predictor.model.target_precision:.0%})")
    click.echo(markdown_table(result.per_class, ".3f"))
    if s["unreadable"]:
        bad = [f"{p.path} ({p.error})" for p in result.predictions if p.decision == "error"]
        click.echo(f"{s['unreadable']} unreadable, left out: {'; '.join(bad[:5])}" + (" ..." if len(bad) > 5 else ""),
                   err=True)
    if result.unknown_labels:
        names = ", ".join(f"{c} ({n})" for c, n in sorted(result.unknown_labels.items()))
        click.echo(f"{s['unknown_label']} photo(s) carry labels this model cannot give, counted wrong: {names}",
                   err=True)
    if out:
        _emit([{"truth": t} | p.as_row() for p, t in zip(result.predictions, result.truth)], "csv", out)
    if sheet:
        tiles = [(f"{t} ->\n{p.label} {p.confidence:.2f}", p.path) for p, t in result.mistakes()]
        if tiles:
            click.echo(f"mistakes: {contact_sheet(tiles, sheet, columns=10)}", err=True)


@main.command()
@click.argument("image", required=False, type=click.Path(path_type=Path))
@cache_options
@click.option("--id", "query_id", type=int, default=None, help="Query with an image already in the cache.")
@click.option("-k", "k", type=COUNT, default=10, show_default=True)
@click.option("--same", multiple=True, help="Metadata column that must match the query's (e.g. gender).")
@click.option("--where", multiple=True, help="COL=VALUE filter on metadata (e.g. gender=Women).")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Search in this trained head's embedding instead of raw features (a model file or a bundle; the "
                   "catalogue is the one it was trained on, embedded once and kept).")
@click.option("--approx", is_flag=True, help="Use the HNSW index (built once, stored beside the cache, and "
              "updated item by item when the cache is).")
@click.option("--rebuild-index", is_flag=True, help="With --approx: build the HNSW index afresh (say so when due).")
@click.option("--sheet", type=click.Path(path_type=Path), default=None, callback=_writable(False),
              help="Write a contact-sheet PNG.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--weights-path", multiple=True, type=click.Path(path_type=Path),
              help="A folder (or file) where the backbone weights may be, found by their digest; repeatable.")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
def similar(image, cache_dir, backbone, cache_file, query_id, k, same, where, model_path, approx, rebuild_index, sheet,
            fmt, weights_path, device):
    """The k most similar cached products to a cached --id or a new IMAGE."""
    from .search import contact_sheet, find_similar, neighbour_tiles

    filters = {}
    for item in where:
        col, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: use COL=VALUE", param_hint="--where")
        filters[col] = value
    if model_path and not approx:
        if (query_id is None) == (image is None):
            raise UserError("give exactly one query: --id ID (an image in the catalogue) or an IMAGE file")
        predictor = _predictor(model_path, device, None, False, False, weights_path)
        inputs = {"--model": [model_path]}
        if cache_file:  # another catalogue than the model's own, if it is of the same features and classes
            from .workflows.catalogue import Catalogue

            cache = _open(cache_dir, backbone, cache_file)
            predictor.catalogue = Catalogue.of_cache(cache, predictor.model)
            inputs["--cache"] = _cache_paths(cache)
        root, ids = predictor.catalogue.image_root, predictor.catalogue.ids
    else:
        from .models import load_model

        cache = _open(cache_dir, backbone, cache_file)
        inputs = {"--cache": _cache_paths(cache), "--model": [model_path] if model_path else []}
        root, ids = cache.attrs["dataset_root"], cache.ids
    if sheet:
        catalogue = Path(root) / "images" if root else None
        check_outputs({"--sheet": [sheet]}, inputs | {"IMAGE": [image] if image else [], "a catalogue image":
                                                      [catalogue / f"{i}.jpg" for i in ids] if catalogue else []})
    if model_path and not approx:
        hits = predictor.similar(query_id if query_id is not None else image, k, filters, tuple(same))
    else:
        model = load_model(model_path) if model_path else None
        hits = find_similar(cache, k, query_id, image, tuple(same), filters, model, approx, list(weights_path), device,
                            rebuild_index=rebuild_index)
    _emit([{c: v for c, v in h.items() if c != "path"} for h in hits], fmt, None)
    if sheet:
        query = image or (Path(root) / "images" / f"{query_id}.jpg" if root else None)
        click.echo(f"contact sheet: {contact_sheet(neighbour_tiles(query, hits), sheet, columns=len(hits) + 1)}", err=True)


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help=MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; another than this machine's loopback is reachable from the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port.")
@click.option("--max-upload-mb", type=POSITIVE, default=20, show_default=True, help="Largest request body.")
@click.option("--max-pixels", type=COUNT, default=50_000_000, show_default=True,
              help="Largest photo, in pixels before resizing (a decompression bomb is refused).")
@click.option("--max-batch", type=COUNT, default=16, show_default=True,
              help="Photos from concurrent requests run in one forward pass.")
@click.option("--batch-window-ms", type=NON_NEGATIVE, default=5.0, show_default=True,
              help="How long the first photo waits for others to join its batch.")
@click.option("--max-queue", type=COUNT, default=256, show_default=True, help="Photos waiting; more get 503.")
@click.option("--timeout", type=POSITIVE, default=30.0, show_default=True,
              help="Seconds a request may wait for its answer; then 504.")
@click.option("--drain", type=COUNT_OR_ZERO, default=30, show_default=True,
              help="On SIGTERM, seconds to let requests in flight finish.")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@runtime_options
def serve(model_path, host, port, max_upload_mb, max_pixels, max_batch, batch_window_ms, max_queue, timeout, drain,
          device, runtime, allow_runtime_mix, flip, weights_path):
    """Serve a model over HTTP: POST /predict, POST /similar, GET /health, GET /model, docs at /docs."""
    try:
        from .service.server import is_loopback, serve as run
        from .service.uploads import Limits
    except ImportError as exc:
        raise UserError(f"serve needs pip install 'featpipe[serve]' ({exc.name} is missing)") from None

    t0 = time.perf_counter()
    predictor = _predictor(model_path, device, runtime, allow_runtime_mix, flip, weights_path, max_batch)
    limits = Limits(int(max_upload_mb * 1024 * 1024), max_pixels, max_batch=max_batch,
                    batch_window=batch_window_ms / 1000, max_queue=max_queue, timeout=timeout)
    if not is_loopback(host):
        click.echo(f"featpipe: warning: --host {host} is reachable from the network; the service has no "
                   "authentication: put it behind a proxy that has", err=True)

    def announce(url: str) -> None:
        click.echo(f"featpipe serve: {url} ({model_path}, {len(predictor.classes)} classes, ready in "
                   f"{time.perf_counter() - t0:.1f} s); API docs at {url}/docs", err=True)

    try:
        run(predictor, host, port, limits, drain, announce,
            lambda text: click.echo(f"featpipe: warning: {text}", err=True))
    except Terminated:  # uvicorn drained the requests in flight, then passed the signal on
        click.echo("featpipe serve: stopped by SIGTERM after answering the requests in flight", err=True)
    except OSError as exc:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); pick another "
                        "port, or 0 for any free one") from None


@main.command()
@click.argument("photos", nargs=-1, required=True)
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help=MODEL_HELP)
@click.option("--out", type=click.Path(path_type=Path), default=Path("reviews.csv"), show_default=True,
              callback=_writable(False),
              help="The reviews csv (what fit-head --labelled reads); its journal and stored features go beside it, "
                   "and the same --out resumes a review.")
@click.option("--source", default=None, help="Where the photos come from (e.g. a shop), for the auto-tag gate and "
                                             "spot checks [default: each photo's folder name].")
@click.option("--strategy", type=click.Choice(["badge", "margin", "confidence"]), default="badge", show_default=True,
              help="Queue order: badge (uncertain and diverse in the head's embedding), margin (smallest gap between "
                   "the top two), confidence (least confident first).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0: any free port.")
@click.option("--allow-remote", is_flag=True, help="Allow a --host other than this machine's loopback.")
@click.option("--cv-folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Retrain: cross-validation folds over the reviewed photos.")
@click.option("--batch-size", type=COUNT, default=64, show_default=True)
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@runtime_options
def review(photos, model_path, out, source, strategy, host, port, allow_remote, cv_folds, batch_size, device, runtime,
           allow_runtime_mix, flip, weights_path):
    """A web page to review the photos a model is unsure of, spot-check its auto-tags per source, and retrain on
    the labels: opens on this machine only, at the URL it prints (with its token)."""
    import secrets

    from tqdm import tqdm

    try:
        from .service.server import is_loopback, serve_review
    except ImportError as exc:
        raise UserError(f"review needs pip install 'featpipe[serve]' ({exc.name} is missing)") from None
    from .workflows.retrain import RetrainSettings
    from .workflows.review import ReviewSession

    if not is_loopback(host):
        if not allow_remote:
            raise UserError(f"--host {host} is reachable from the network; add --allow-remote to mean it")
        click.echo(f"featpipe: warning: --host {host}: the review page is reachable from the network; anyone with "
                   "the printed URL (its token) can read the photos and record decisions", err=True)

    def load(path: Path):
        return _predictor(path, device, runtime, allow_runtime_mix, flip, weights_path, batch_size)

    with tqdm(desc="embedding photos", unit="photo", file=sys.stderr, disable=None) as bar:
        session = ReviewSession(load(model_path), photos, out, source=source, strategy=strategy,
                                load_predictor=load, progress=bar.update)
    p = session.progress()
    click.echo(f"featpipe review: {p['photos']} photos, {p['to_review']} to review, {p['decided']} decided so far; "
               f"decisions go to {session.journal.path} and {out}", err=True)

    def announce(url: str) -> None:
        click.echo(f"featpipe review: {url}", err=True)

    try:
        serve_review(session, secrets.token_urlsafe(18), host, port, announce, RetrainSettings(device, cv_folds))
    except Terminated:
        click.echo("featpipe review: stopped by SIGTERM; every acknowledged decision is in the journal", err=True)
    except OSError as exc:
        raise UserError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); pick another "
                        "port, or 0 for any free one") from None


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path), help="A model file.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The bundle folder to write (new).")
@click.option("--no-catalogue", is_flag=True, help="Leave the catalogue out (no similar products from the bundle).")
@click.option("--weights-path", multiple=True, type=click.Path(path_type=Path),
              help="A folder (or file) where the backbone weights may be, found by their digest; repeatable.")
def bundle(model_path, out, no_catalogue, weights_path):
    """Write a self-contained folder (model, backbone networks, catalogue) that predict, evaluate, similar and
    serve load on a machine without the dataset, the cache or the weights."""
    from .files import disk_size
    from .workflows.bundle import write_bundle

    t0 = time.perf_counter()
    path = write_bundle(model_path, out, search_path=list(weights_path), catalogue=not no_catalogue)
    click.echo(f"{path}: bundle of {model_path} ({disk_size(path) / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s; "
               f"use it as --model {path}")


if __name__ == "__main__":
    main()
