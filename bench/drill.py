"""Fault drill: replays bad input, damaged files, full disks, signals and races against the featpipe CLI
on a small copy of real catalogue photos, and sorts every outcome into one table.

    python bench/drill.py --data ../shared/data/fashion-product-images-small \
        --weights ../shared/weights/mobilenet_v2-imagenet.pth

Outcomes: clean (a one-line `featpipe: error:` or click usage error naming the problem, exit 2, or a
correct result), unclear (refused or answered, but the message or result misses what the case asks for),
traceback (a Python traceback for a user's mistake, or a crash), silent wrong (exit 0 with a wrong
result), lost (exit 0 with rows missing, or an input overwritten), hang (still running after its time limit,
then killed). Each case runs the real CLI in a fresh process.
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from PIL import Image

CLASSES = ("Tshirts", "Watches", "Casual Shoes", "Handbags")
PER_CLASS = 16
OUTCOMES = ("clean", "unclear", "traceback", "silent wrong", "lost", "hang")


@dataclass
class Result:
    rc: int
    out: str
    err: str
    hung: bool = False

    @property
    def last_error(self) -> str:
        lines = [x for x in self.err.strip().splitlines() if x.strip()]
        return lines[-1] if lines else ""


class Drill:
    def __init__(self, data: Path, weights: Path, work: Path):
        self.weights, self.work = weights, work
        self.exe = str(Path(sys.executable).with_name("featpipe"))
        self.env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
        self.rows: list[tuple[str, str, str]] = []
        self.data = self._copy_catalogue(data, work / "data")
        self.common = ["--weights", str(weights), "--image-size", "96", "--runtime", "torch", "--batch-size", "8",
                       "--min-per-class", "5", "--split", "0.5,0.25,0.25", "--no-progress"]

    # -- set-up ----------------------------------------------------------------------------------
    @staticmethod
    def _copy_catalogue(src: Path, dst: Path, per_class: int = PER_CLASS) -> Path:
        """per_class real photos of each of CLASSES (Men and Women only: a two-class gender target)."""
        (dst / "images").mkdir(parents=True)
        with open(src / "styles.csv", encoding="utf-8") as fh:
            header = fh.readline()
            picked: Counter = Counter()
            lines = [header.rstrip("\n")]
            for line in fh:
                cells = line.rstrip("\n").split(",")
                if len(cells) < 10 or cells[4] not in CLASSES or cells[1] not in ("Men", "Women"):
                    continue
                if picked[cells[4]] >= per_class or not (src / "images" / f"{cells[0]}.jpg").is_file():
                    continue
                picked[cells[4]] += 1
                shutil.copy(src / "images" / f"{cells[0]}.jpg", dst / "images")
                lines.append(line.rstrip("\n"))
        (dst / "styles.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return dst

    def copy_data(self, name: str) -> Path:
        return Path(shutil.copytree(self.data, self.work / name / "data", copy_function=shutil.copy2))

    def run(self, *args: str, timeout: float = 600, preexec: Callable | None = None, wrap: list[str] | None = None,
            ) -> Result:
        cmd = (wrap or []) + [self.exe, *map(str, args)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout, preexec_fn=preexec)
        except subprocess.TimeoutExpired as exc:  # killed by subprocess.run
            return Result(-9, exc.stdout or "", exc.stderr or "", hung=True)
        return Result(p.returncode, p.stdout, p.stderr)

    def extract(self, data: Path, cache_dir: Path, *extra: str, **kw) -> Result:
        return self.run("extract", "--data", data, "--cache-dir", cache_dir, *self.common, *extra, **kw)

    def start_extract(self, data: Path, cache_dir: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([self.exe, "extract", "--data", str(data), "--cache-dir", str(cache_dir),
                                 *self.common, *extra], env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    # -- judging -----------------------------------------------------------------------------------
    def record(self, name: str, outcome: str, detail: str) -> None:
        self.rows.append((name, outcome, detail.replace("|", "/").replace("\n", " ")[:150]))
        print(f"{outcome:12s} {name}: {detail[:150]}", file=sys.stderr, flush=True)

    def expect_error(self, name: str, r: Result, pattern: str) -> None:
        """The case is a user mistake: one line, exit 2, saying what matches `pattern`."""
        if r.hung:
            self.record(name, "hang", "killed after its time limit")
        elif "Traceback" in r.err or r.rc not in (0, 2, 130):
            self.record(name, "traceback", f"exit {r.rc}: {r.last_error}")
        elif r.rc == 0:
            self.record(name, "silent wrong", "exit 0: accepted; " + (r.out.strip().splitlines() or [""])[-1])
        elif re.search(pattern, r.err, re.I):
            self.record(name, "clean", r.last_error)
        else:
            self.record(name, "unclear", f"exit {r.rc}: {r.last_error}")

    def expect_ok(self, name: str, r: Result, check: Callable[[Result], str | None], lost: bool = False) -> None:
        """The case must succeed; `check` returns None when the result is right, else what is wrong."""
        if r.hung:
            self.record(name, "hang", "killed after its time limit")
        elif "Traceback" in r.err or r.rc not in (0, 2, 130):
            self.record(name, "traceback", f"exit {r.rc}: {r.last_error}")
        elif r.rc != 0:
            self.record(name, "unclear", f"refused: {r.last_error}")
        else:
            problem = check(r)
            if problem is None:
                self.record(name, "clean", (r.out.strip().splitlines() or [""])[-1])
            else:
                self.record(name, "lost" if lost else "silent wrong", problem)

    # -- helpers -----------------------------------------------------------------------------------
    @staticmethod
    def features(cache_dir: Path) -> dict[int, np.ndarray]:
        (path,) = cache_dir.glob("*.h5")
        with h5py.File(path, "r") as f:
            return dict(zip(f["ids"][...].tolist(), f["features"][...]))

    def same_features(self, cache_dir: Path, base: Path | None = None, rtol: float = 0.0) -> str | None:
        """None when the cache holds the images of `base` (the drill's baseline) and their features, bit for
        bit (rtol 0) or within rtol of the features' scale; else what is lost, extra or different."""
        got, want = self.features(cache_dir), self.features(base or self.base_cache)
        if set(got) != set(want):
            return f"{len(set(want) - set(got))} images missing, {len(set(got) - set(want))} extra"
        scale = max(float(np.abs(f).max()) for f in want.values())
        differ = sum(not np.allclose(got[i], want[i], rtol=rtol, atol=rtol * scale) for i in want)
        return f"{differ} of {len(want)} images' features differ from an uninterrupted run" if differ else None

    def predicted(self, r: Result) -> list[str]:
        rows = list(csv.DictReader(r.out.splitlines()))
        return [row["label"] for row in rows]

    # -- the drill ---------------------------------------------------------------------------------
    def baseline(self) -> None:
        self.base_cache = self.work / "base" / "cache"
        r = self.extract(self.data, self.base_cache)
        if r.rc != 0:
            raise SystemExit(f"baseline extraction failed: {r.err}")
        self.model = self.work / "base" / "model.pt"
        r = self.run("fit-head", "--cache-dir", self.base_cache, "--preset", "tuned", "--out", self.model)
        if r.rc != 0:
            raise SystemExit(f"baseline fit-head failed: {r.err}")
        print(r.out, file=sys.stderr)

    def csv_cases(self) -> None:
        def edited(name: str, change: Callable[[list[str]], list[str]], encoding: str = "utf-8") -> Path:
            data = self.copy_data(name)
            lines = (data / "styles.csv").read_text(encoding="utf-8").splitlines()
            (data / "styles.csv").write_bytes(("\n".join(change(lines)) + "\n").encode(encoding, "replace"))
            return data

        def cache_of(name):
            return self.work / name / "cache"

        d = self.work / "nothing-here"
        self.expect_error("--data folder missing", self.extract(d, cache_of("missing")), r"no such file")
        d = edited("empty-csv", lambda lines: [])
        self.expect_error("styles.csv empty", self.extract(d, cache_of("empty-csv")), r"empty")
        d = edited("no-column", lambda lines: [lines[0].replace("articleType", "kind")] + lines[1:])
        self.expect_error("styles.csv without articleType", self.extract(d, cache_of("no-column")), r"missing column")

        def unbalanced(lines):
            cells = lines[5].split(",")
            cells[9] = '"' + cells[9]
            return lines[:5] + [",".join(cells)] + lines[6:]
        d = edited("quote", unbalanced)
        self.expect_error("unbalanced quote in styles.csv", self.extract(d, cache_of("quote")), r"line 6 opens a quote")

        def accented(lines):
            cells = lines[3].split(",")
            cells[9] = "Caf\u00e9 " + cells[9]
            return lines[:3] + [",".join(cells)] + lines[4:]
        d = edited("latin1", accented, encoding="latin-1")
        self.expect_error("Latin-1 styles.csv", self.extract(d, cache_of("latin1")), r"line 4 is not UTF-8")

        def short(lines):
            return lines[:4] + [",".join(lines[4].split(",")[:5])] + lines[5:]
        d = edited("short-row", short)
        self.expect_ok("a row with too few columns", self.extract(d, cache_of("short-row")),
                       lambda r: None if "1 short_row" in r.out else "the short row is not reported")
        d = edited("duplicate", lambda lines: lines + [lines[1]])
        self.expect_ok("a duplicate id", self.extract(d, cache_of("duplicate")),
                       lambda r: None if "1 duplicate_id" in r.out else "the duplicate is not reported")
        d = self.copy_data("missing-image")
        first = sorted((d / "images").iterdir())[0]
        first.unlink()
        self.expect_ok("a row whose image is missing", self.extract(d, cache_of("missing-image")),
                       lambda r: None if "1 missing_image" in r.out else "the missing image is not reported", lost=True)
        d = self.copy_data("no-images")
        shutil.rmtree(d / "images")
        self.expect_error("no images folder", self.extract(d, cache_of("no-images")), r"no images folder")

    def image_cases(self) -> None:
        d = self.copy_data("corrupt")
        files = sorted((d / "images").iterdir())
        files[0].write_bytes(b"not a jpeg at all")
        files[1].write_bytes(files[1].read_bytes()[:300])
        cache = self.work / "corrupt" / "cache"

        def two_skipped(r):
            n = len(self.features(cache))
            return None if "2 unreadable_image" in r.out and n == len(files) - 2 else f"skips not reported ({n} cached)"
        self.expect_ok("a corrupt and a truncated JPEG", self.extract(d, cache), two_skipped, lost=True)

        # 16-bit greyscale and EXIF-rotated photos must be predicted like their plain versions
        src = sorted((self.data / "images").iterdir())[:4]
        case = self.work / "decode"
        case.mkdir()
        plain, odd = [], []
        for i, p in enumerate(src):
            img = Image.open(p).convert("L")
            img.save(case / f"grey8-{i}.png")
            Image.fromarray(np.asarray(img, np.uint16) * 257).save(case / f"grey16-{i}.png")
            rgb = Image.open(p).convert("RGB")
            rgb.save(case / f"upright-{i}.jpg", quality=95)
            exif = Image.Exif()
            exif[0x0112] = 6  # rotate 90 degrees clockwise to view
            rgb.transpose(Image.Transpose.ROTATE_90).save(case / f"exif-{i}.jpg", quality=95, exif=exif)
            plain += [case / f"grey8-{i}.png", case / f"upright-{i}.jpg"]
            odd += [case / f"grey16-{i}.png", case / f"exif-{i}.jpg"]
        want = self.predicted(self.run("predict", "--model", self.model, "--format", "csv", *plain))
        r = self.run("predict", "--model", self.model, "--format", "csv", *odd)
        self.expect_ok("16-bit greyscale PNG and EXIF-rotated JPEG", r,
                       lambda r: None if self.predicted(r) == want else f"{self.predicted(r)} vs plain {want}")

        d = self.copy_data("replaced")
        cache = self.work / "replaced" / "cache"
        self.extract(d, cache)
        a, b = sorted((d / "images").iterdir())[:2]
        size = a.stat().st_size
        other = b.read_bytes()
        a.write_bytes((other + b"\0" * size)[:size] if len(other) <= size else other[:size])
        self.expect_ok("an image replaced by other content of the same size", self.extract(d, cache),
                       self.updated(changed=1))
        d2 = self.copy_data("replaced-same-mtime")
        cache2 = self.work / "replaced-same-mtime" / "cache"
        self.extract(d2, cache2, "--fingerprint", "content")
        a2 = sorted((d2 / "images").iterdir())[0]
        st = a2.stat()
        a2.write_bytes(bytes(reversed(a2.read_bytes())))
        os.utime(a2, ns=(st.st_atime_ns, st.st_mtime_ns))
        self.expect_ok("same size and time stamp, other bytes (--fingerprint content)",
                       self.extract(d2, cache2, "--fingerprint", "content"), self.updated(changed=1))
        gone = sorted((d2 / "images").iterdir())[1]
        gone.unlink()
        self.expect_ok("an image deleted after extraction", self.extract(d2, cache2, "--fingerprint", "content"),
                       self.updated(removed=1))  # the image made unreadable above is retried, not counted as new

    @staticmethod
    def updated(new: int = 0, changed: int = 0, removed: int = 0) -> Callable[[Result], str | None]:
        """An update that extracted exactly the new and changed images."""
        want = f"{new} new, {changed} changed, {removed} removed"
        return lambda r: None if want in r.out else f"expected '{want}': {r.out.strip()[-200:]}"

    def option_cases(self) -> None:
        (self.work / "options").mkdir()
        cache = self.work / "options" / "cache"
        for opt, value in (("--batch-size", "0"), ("--batch-size", "-1"), ("--image-size", "0"),
                           ("--device", "tpu"), ("--split", "0.9,0.2"), ("--split", "a,b,c"), ("--split", "0.9,0.2,0.1")):
            args = [a for a in self.common]
            if opt in args:
                args[args.index(opt) + 1] = value
            else:
                args += [opt, value]
            r = self.run("extract", "--data", self.data, "--cache-dir", cache, *args)
            self.expect_error(f"extract {opt} {value}", r, r"invalid value|fractions|use auto|sum")
        f = self.work / "options" / "a-file"
        f.write_text("x")
        self.expect_error("--cache-dir is a file", self.extract(self.data, f), r"is a file, not a folder")
        self.expect_error("--weights file missing", self.extract(self.data, cache, "--weights", self.work / "no.pth"),
                          r"no\.pth")
        junk = self.work / "options" / "junk.pth"
        import torch
        torch.save({"layer.weight": torch.zeros(3)}, junk)
        self.expect_error("--weights of another architecture",
                          self.extract(self.data, cache, "--weights", junk), r"junk\.pth")
        self.expect_error("random-init weights into a float16 cache",
                          self.extract(self.data, cache, "--weights", "none"), r"float16|float32")
        for opt, value in (("--epochs", "0"), ("--lr", "-1"), ("--target-precision", "1.5"), ("--dropout", "1")):
            r = self.run("fit-head", "--cache-dir", self.base_cache, "--out", self.work / "options" / "m.pt", opt, value)
            self.expect_error(f"fit-head {opt} {value}", r, r"invalid value")
        for opt, value in (("--lrs", "abc"), ("--heads", "fc,xx"), ("--optimizers", "rmsprop")):
            r = self.run("sweep", "--cache-dir", self.base_cache, "--out", self.work / "options" / "s.csv", opt, value)
            self.expect_error(f"sweep {opt} {value}", r, r"invalid value")
        r = self.run("compare", "--cache-dir", self.base_cache, "--models", "fc,forest", "--out-dir",
                     self.work / "options" / "compare")
        self.expect_error("compare --models with an unknown name", r, r"unknown model")
        r = self.run("-v", "extract", "--data", self.work / "nothing", "--cache-dir", cache)
        self.record("-v shows the traceback of a user error",
                    "clean" if "Traceback" in r.err and r.last_error.startswith("featpipe: error:") and r.rc == 2
                    else "unclear", r.last_error)

    def damage_cases(self) -> None:
        (base,) = self.base_cache.glob("*.h5")
        case = self.work / "damage"

        def damaged_copy(name: str, edit: Callable[[Path], None], on_shard: bool = True) -> Path:
            """A copy of the cache (its manifest and shards); `edit` damages its first shard or the manifest."""
            folder = case / name
            folder.mkdir(parents=True)
            path = Path(shutil.copy(base, folder / base.name))
            shards = shutil.copytree(Path(f"{base}.shards"), Path(f"{path}.shards"))
            edit(sorted(Path(shards).glob("part-*.h5"))[0] if on_shard else path)
            return folder

        def flip(path: Path, start: int, n: int = 256) -> None:
            data = bytearray(path.read_bytes())
            for i in range(start, min(start + n, len(data))):
                data[i] ^= 0xFF
            path.write_bytes(bytes(data))

        def truncate(path: Path) -> None:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

        def nan_features(path: Path) -> None:
            with h5py.File(path, "a") as f:
                x = f["features"][...]
                x[3, :5] = np.nan
                f["features"][...] = x

        def first_feature_byte(path: Path) -> int:
            with h5py.File(path, "r") as f:
                return f["features"].id.get_chunk_info(0).byte_offset + 64

        folder = damaged_copy("flipped", lambda p: flip(p, first_feature_byte(p)))
        self.expect_error("cache with 256 flipped bytes", self.run("fit-head", "--cache-dir", folder, "--out",
                          case / "m.pt"), r"damaged|checksum")
        folder = damaged_copy("truncated", truncate, on_shard=False)
        self.expect_error("truncated cache via --cache", self.run("fit-head", "--cache", folder / base.name, "--out",
                          case / "m.pt"), r"not a readable HDF5|damaged")
        self.expect_error("truncated cache via --cache-dir", self.run("fit-head", "--cache-dir", folder, "--out",
                          case / "m.pt"), r"unreadable|truncated")
        folder = damaged_copy("missing-shard", Path.unlink)
        self.expect_error("a shard file missing", self.run("fit-head", "--cache-dir", folder, "--out", case / "m.pt"),
                          r"missing")
        folder = damaged_copy("nan", nan_features)
        self.expect_error("cache holding NaN features", self.run("fit-head", "--cache-dir", folder, "--out",
                          case / "m.pt"), r"NaN")
        folder = damaged_copy("nan-similar", nan_features)
        self.expect_error("similar on a cache holding NaN", self.run("similar", "--cache-dir", folder, "--id",
                          sorted(self.features(self.base_cache))[0]), r"NaN")
        self.expect_error("sweep with no cache", self.run("sweep", "--cache-dir", case / "empty"), r"no complete")

        bad_model = case / "flipped.pt"
        shutil.copy(self.model, bad_model)
        flip(bad_model, bad_model.stat().st_size // 2)
        pic = sorted((self.data / "images").iterdir())[0]
        self.expect_error("model file with 256 flipped bytes", self.run("predict", "--model", bad_model, pic),
                          r"damaged|checksum|not a featpipe model")
        text_model = case / "text.pt"
        text_model.write_text("hello")
        self.expect_error("model file that is text", self.run("predict", "--model", text_model, pic),
                          r"not a featpipe model|damaged|cannot read")

        # a model meeting a cache of other classes
        d = self.copy_data("other-classes")
        lines = (d / "styles.csv").read_text().splitlines()
        keep = [lines[0]] + [x for x in lines[1:] if x.split(",")[4] != "Watches"]
        (d / "styles.csv").write_text("\n".join(keep) + "\n")
        other = self.work / "other-classes" / "cache"
        self.extract(d, other)
        (other_h5,) = other.glob("*.h5")
        self.expect_error("report on a cache with other classes", self.run("report", "--model", self.model, "--cache",
                          other_h5, "--out-dir", case / "report"), r"classes")
        first_id = sorted(self.features(other))[0]
        self.expect_error("similar --model on a cache with other classes", self.run(
            "similar", "--cache", other_h5, "--model", self.model, "--id", first_id), r"classes")

    def use_cases(self) -> None:
        case = self.work / "use"
        case.mkdir()
        pics = sorted((self.data / "images").iterdir())
        (case / "notes.jpg").write_text("not an image")

        def one_error(r):
            rows = list(csv.DictReader(r.out.splitlines()))
            bad = [x for x in rows if x["decision"] == "error"]
            return None if len(rows) == 3 and len(bad) == 1 and "notes.jpg" in bad[0]["path"] else f"rows: {rows}"
        self.expect_ok("predict with one unreadable file among three", self.run(
            "predict", "--model", self.model, "--format", "csv", pics[0], case / "notes.jpg", pics[1]), one_error,
            lost=True)
        def named_error(r):  # one missing file among a batch is a counted, named row, not the end of the batch
            rows = list(csv.DictReader(r.out.splitlines()))
            ok = (len(rows) == 2 and rows[1]["decision"] == "error" and "No such file" in rows[1]["error"]
                  and "1 unreadable" in r.err)
            return None if ok else f"rows: {rows}; {r.last_error}"
        self.expect_ok("predict on a file that does not exist (beside one that does)", self.run(
            "predict", "--model", self.model, "--format", "csv", pics[0], case / "nope.jpg"), named_error, lost=True)
        (case / "empty").mkdir()
        self.expect_error("predict on an empty folder", self.run("predict", "--model", self.model, case / "empty"),
                          r"no images")
        self.expect_error("predict with another runtime, unasked",
                          self.run("predict", "--model", self.model, "--runtime", "openvino", pics[0]),
                          r"allow-runtime-mix")
        ids = sorted(self.features(self.base_cache))
        self.expect_error("similar --id not in the cache", self.run("similar", "--cache-dir", self.base_cache, "--id",
                          "1"), r"not in")
        self.expect_error("similar -k larger than the catalogue", self.run("similar", "--cache-dir", self.base_cache,
                          "--id", ids[0], "-k", "100000"), r"-k")
        self.expect_error("similar --where without =", self.run("similar", "--cache-dir", self.base_cache, "--id",
                          ids[0], "--where", "gender"), r"COL=VALUE")
        labels = case / "labels.csv"
        labels.write_text("path,articleType\n" + "".join(f"{p},Tshirts\n" for p in pics[:3]))
        self.expect_error("evaluate: labels csv without a file column",
                          self.run("evaluate", "--model", self.model, "--labels", labels), r"no column file")
        labels.write_text("file,articleType\n" + "".join(f"{p.name},Jeans\n" for p in pics[:3]))
        self.expect_ok("evaluate: labels the model cannot give", self.run("evaluate", "--model", self.model, "--labels",
                       labels, "--root", pics[0].parent),
                       lambda r: None if "cannot give" in r.err and "Jeans (3)" in r.err else r.err[-200:])
        gender = self.work / "gender" / "cache"
        self.extract(self.data, gender, "--target", "gender")
        self.expect_ok("compare on a two-class target", self.run("compare", "--cache-dir", gender, "--out-dir",
                       case / "compare", "--models", "fc,logreg,lightgbm"),
                       lambda r: None if "lightgbm" in r.out and "logreg" in r.out else "no table")

    def filesystem_cases(self) -> None:
        case = self.work / "fs"

        def file_limit(limit: int) -> Callable[[], None]:
            def pre() -> None:  # a write past `limit` bytes fails with EFBIG, as a full disk fails with ENOSPC
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            return pre

        (manifest,) = self.base_cache.glob("*.h5")
        shard = max(p.stat().st_size for p in Path(f"{manifest}.shards").glob("part-*.h5"))
        r = self.extract(self.data, case / "full-batches", preexec=file_limit(shard // 2))
        self.expect_error("disk full while writing batches", r, r"too large|space")
        if manifest.stat().st_size > shard:  # a limit every shard fits under and the manifest does not
            r = self.extract(self.data, case / "full-h5", preexec=file_limit((shard + manifest.stat().st_size) // 2))
            self.expect_error("disk full while writing the cache's manifest", r, r"too large|space")
            r = self.extract(self.data, case / "full-h5")
            self.expect_ok("rerun after the disk was full", r,
                           lambda r: self.same_features(case / "full-h5") if "resumed" in r.out else "did not resume")
        else:
            self.record("disk full while writing the cache's manifest", "unclear",
                        f"not simulated: the manifest ({manifest.stat().st_size} B) is no larger than a shard ({shard} B)")

        readonly = case / "readonly"
        readonly.mkdir(parents=True)
        if os.geteuid() != 0:
            readonly.chmod(0o555)
            wrap = None
        elif shutil.which("unshare") and subprocess.run(["unshare", "-rm", "true"]).returncode == 0:
            # root ignores permission bits: a read-only bind mount in a private mount namespace instead
            wrap = ["unshare", "-rm", "sh", "-c", f'mount --bind -o ro "{readonly}" "{readonly}" && exec "$@"', "sh"]
        else:
            self.record("read-only folders", "unclear", "skipped: running as root without unshare")
            return
        r = self.extract(self.data, readonly / "cache", wrap=wrap)
        self.expect_error("extract into a read-only folder", r, r"read-only|permission|cannot write")
        r = self.run("fit-head", "--cache-dir", self.base_cache, "--out", readonly / "m.pt", wrap=wrap)
        self.expect_error("fit-head --out in a read-only folder (before training)", r,
                          r"read-only|permission|cannot write")
        r = self.run("compare", "--cache-dir", self.base_cache, "--out-dir", readonly / "compare", wrap=wrap)
        self.expect_error("compare --out-dir in a read-only folder", r, r"read-only|permission|cannot write")

    # -- trust: no test photo that trained, no input overwritten, no hang, confined labelled paths --------------
    def split_of(self, cache_dir: Path) -> dict[int, int]:
        (path,) = cache_dir.glob("*.h5")
        with h5py.File(path, "r") as f:
            return dict(zip(f["ids"][...].tolist(), f["split"][...].tolist()))

    def copy_cache(self, folder: Path) -> Path:
        """A copy of the baseline cache (manifest and shards) in `folder`; returns the manifest."""
        (base,) = self.base_cache.glob("*.h5")
        folder.mkdir(parents=True)
        shutil.copytree(Path(f"{base}.shards"), folder / f"{base.name}.shards")
        return Path(shutil.copy(base, folder / base.name))

    def split_cases(self) -> None:
        case = self.work / "splits"
        d = self.copy_data("leave-and-return")
        cache = case / "leave-and-return"
        self.extract(d, cache)
        styles = (d / "styles.csv").read_text()
        lines = styles.splitlines()
        (d / "styles.csv").write_text("\n".join(lines[:1] + lines[1::2]) + "\n")
        self.extract(d, cache)
        (d / "styles.csv").write_text(styles)
        self.extract(d, cache)
        want, got = self.split_of(self.base_cache), self.split_of(cache)
        r = self.run("report", "--model", self.model, "--cache", next(cache.glob("*.h5")), "--out-dir", case / "r1")
        self.expect_ok("report on a cache whose images left for one extract and came back", r,
                       lambda r: None if got == want else f"{sum(got[i] != want[i] for i in want)} images came back "
                       "in another split: the model was scored on some of its own training photos")
        moved = self.copy_cache(case / "moved-split")
        with h5py.File(moved, "a") as f:  # one training and one test image trade places: the same images
            split = f["split"][...]
            a, b = np.flatnonzero(split == 0)[0], np.flatnonzero(split == 2)[0]
            split[[a, b]] = split[[b, a]]
            f["split"][...] = split
        self.expect_error("report on the same images with another test split", self.run(
            "report", "--model", self.model, "--cache", moved, "--out-dir", case / "r2"), r"test split")

    def guarded(self, name: str, r: Result, pattern: str, inputs: dict[Path, bytes]) -> None:
        """expect_error, and every input still holds its bytes (else the user lost it; the drill puts them back
        for the next case)."""
        spoilt = [p for p, data in inputs.items() if not p.is_file() or p.read_bytes() != data]
        if spoilt:
            self.record(name, "lost", f"exit {r.rc}: overwrote {', '.join(p.name for p in spoilt)}")
        else:
            self.expect_error(name, r, pattern)
        for p in spoilt:
            p.write_bytes(inputs[p])

    def overwrite_cases(self) -> None:
        case = self.work / "overwrite"
        cache = self.copy_cache(case / "cache")
        (case / "link.pt").symlink_to(cache)
        shop = case / "shop"
        shop.mkdir()
        pics = [Path(shutil.copy(p, shop)) for p in sorted((self.data / "images").iterdir())[:3]]
        labels = shop / "labels.csv"
        labels.write_text("file,articleType\n" + "".join(f"{p.name},Handbags\n" for p in pics))
        inputs = {p: p.read_bytes() for p in (cache, labels, *pics)}
        fit = ("fit-head", "--cache", cache)
        self.guarded("fit-head --out onto the cache it reads", self.run(*fit, "--out", cache), r"--out .*--cache",
                     inputs)
        self.guarded("fit-head --out onto a symlink to its cache", self.run(*fit, "--out", case / "link.pt"),
                     r"--out .*--cache", inputs)
        self.guarded("evaluate --out onto its --labels csv", self.run(
            "evaluate", "--model", self.model, "--labels", labels, "--out", labels), r"--out .*--labels", inputs)
        self.guarded("evaluate --sheet onto one of its photos", self.run(
            "evaluate", "--model", self.model, "--labels", labels, "--sheet", pics[0]), r"--sheet .*photo", inputs)
        self.guarded("predict --out onto one of its photos", self.run(
            "predict", "--model", self.model, "--out", pics[1], shop), r"--out .*IMAGE", inputs)

        # labelled photos that are catalogue test photos (same bytes, another name)
        split = self.split_of(self.base_cache)
        test_id = next(i for i, s in sorted(split.items()) if s == 2)
        train_id = next(i for i, s in sorted(split.items()) if s == 0)
        label = {int(x.split(",")[0]): x.split(",")[4] for x in (self.data / "styles.csv").read_text().splitlines()[1:]}
        reviewed = case / "reviewed"
        reviewed.mkdir()
        for i in (test_id, train_id):
            shutil.copy(self.data / "images" / f"{i}.jpg", reviewed / f"shop-{i}.jpg")
        csv_path = reviewed / "labels.csv"
        csv_path.write_text(f"file,articleType\nshop-{test_id}.jpg,{label[test_id]}\nshop-{train_id}.jpg,{label[train_id]}\n")
        fit = ("fit-head", "--cache", cache, "--labelled", csv_path, "--out", case / "m.pt")
        self.expect_error("fit-head --labelled with a catalogue test photo", self.run(*fit), r"line 2: .*test image")
        self.expect_ok("fit-head --labelled --drop-overlap", self.run(*fit, "--drop-overlap"),
                       lambda r: None if "1 photos, 1 dropped" in r.out else r.out.strip()[-200:])

    def special_file_cases(self) -> None:
        case = self.work / "special"
        shop = case / "shop"
        shop.mkdir(parents=True)
        train_id = next(i for i, s in sorted(self.split_of(self.base_cache).items()) if s == 0)
        shutil.copy(self.data / "images" / f"{train_id}.jpg", shop / "a.jpg")  # training photos may be labelled
        os.mkfifo(shop / "pipe.jpg")

        def rows_with(n: int, what: str) -> Callable[[Result], str | None]:
            def check(r: Result) -> str | None:
                rows = list(csv.DictReader(r.out.splitlines()))
                bad = [x for x in rows if x["decision"] == "error"]
                return None if len(rows) == n and len(bad) == 1 and what in bad[0]["error"] else f"rows: {rows}"
            return check
        self.expect_ok("predict on a folder holding a named pipe", self.run(
            "predict", "--model", self.model, "--format", "csv", shop, timeout=120), rows_with(2, "named pipe"))
        self.expect_ok("predict on a device (/dev/zero)", self.run(
            "predict", "--model", self.model, "--format", "csv", shop / "a.jpg", "/dev/zero", timeout=120),
            rows_with(2, "device"))
        labels = shop / "labels.csv"
        labels.write_text("file,articleType\na.jpg,Tshirts\npipe.jpg,Watches\n")
        self.expect_ok("fit-head --labelled with a named pipe as a row", self.run(
            "fit-head", "--cache-dir", self.base_cache, "--labelled", labels, "--out", case / "m.pt", timeout=300),
            lambda r: None if "1 unreadable skipped" in r.out else r.out.strip()[-200:])
        self.expect_ok("evaluate --labels with a named pipe as a row", self.run(
            "evaluate", "--model", self.model, "--labels", labels, timeout=120),
            lambda r: None if "1 unreadable" in r.err and "named pipe" in r.err else r.err.strip()[-200:])
        d = self.copy_data("pipe-in-catalogue")
        first = sorted((d / "images").iterdir())[0]
        first.unlink()
        os.mkfifo(first)
        self.expect_ok("extract --fingerprint content with a named pipe among the images", self.extract(
            d, case / "cache", "--fingerprint", "content", timeout=300),
            lambda r: None if "1 not_a_file" in r.out else r.out.strip()[-200:])

    def labelled_path_cases(self) -> None:
        case = self.work / "paths"
        root = case / "root"
        root.mkdir(parents=True)
        pics = sorted((self.data / "images").iterdir())
        shutil.copy(pics[0], root / "a.jpg")
        shutil.copy(pics[1], case / "outside.jpg")
        (root / "link.jpg").symlink_to(case / "outside.jpg")
        labels = root / "labels.csv"
        said = {}
        for what, name in (("'..' to a file that exists", "../outside.jpg"), ("'..' to no file", "../nothing.jpg"),
                           ("an absolute path", str(case / "outside.jpg")), ("a symlink leading out", "link.jpg")):
            labels.write_text(f"file,articleType\n{name},Tshirts\na.jpg,Tshirts\n")
            r = self.run("fit-head", "--cache-dir", self.base_cache, "--labelled", labels, "--out", case / "m.pt")
            self.expect_error(f"fit-head --labelled row with {what}", r, r"line 2: .*outside the root")
            said[what] = r.last_error.replace(repr(name), "NAME")
        same = said["'..' to a file that exists"] == said["'..' to no file"]
        self.record("the refusal does not say whether the outside file exists", "clean" if same else "unclear",
                    said["'..' to no file"])
        labels.write_text("file,articleType\n../outside.jpg,Tshirts\n")
        self.expect_error("evaluate --labels row with '..'", self.run("evaluate", "--model", self.model, "--labels",
                          labels), r"line 2: .*outside the root")
        labels.write_text("file,articleType\na.jpg,Tshirts\n./a.jpg,Watches\n")
        self.expect_error("the same file listed with two labels", self.run("evaluate", "--model", self.model,
                          "--labels", labels), r"lines 2 and 3")
        labels.write_text("file,articleType\na.jpg,Tshirts\na.jpg,Tshirts\n")
        self.expect_ok("the same row twice", self.run("evaluate", "--model", self.model, "--labels", labels),
                       lambda r: None if "1 images" in r.out and "repeat" in r.err else (r.out + r.err)[-200:])

    def edited_model(self, name: str, edit: Callable[[dict], None]) -> Path:
        """A copy of the baseline model with `edit` applied to its values, its checksum made to match."""
        import torch

        from featpipe.models import content_digest

        d = torch.load(self.model, weights_only=True)
        edit(d)
        body = {k: v for k, v in d.items() if k not in ("format", "format_version", "checksum")}
        out = self.work / "messages" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(d | {"checksum": content_digest(body)}, out)
        return out

    def message_cases(self) -> None:
        case = self.work / "messages"
        case.mkdir(exist_ok=True)
        pics = sorted((self.data / "images").iterdir())
        labels = case / "labels.csv"
        labels.write_text("file,articleType\n" + "".join(f"{p.name},Tshirts\n" for p in pics[:3]))
        self.expect_error("evaluate with a wrong --root (no photo readable)", self.run(
            "evaluate", "--model", self.model, "--labels", labels), r"none of its 3 photos.*--root")
        keyless = self.edited_model("keyless.pt", lambda d: d.pop("threshold"))
        self.expect_error("a model file missing a key", self.run("predict", "--model", keyless, pics[0]),
                          r"no threshold")
        alien = self.edited_model("alien.pt", lambda d: d["provenance"].update(backbone="mobilenet_v9"))
        self.expect_error("a model with an unknown backbone", self.run("predict", "--model", alien, pics[0]),
                          r"backbone 'mobilenet_v9'.*cannot build")
        moved = self.edited_model("moved.pt", lambda d: d["provenance"].update(cache=str(case / "gone" / "c.h5")))
        self.expect_error("report on a model moved away from its cache", self.run("report", "--model", moved),
                          r"pass --cache")
        first = sorted(self.features(self.base_cache))[0]
        self.expect_error("similar --where that matches nothing", self.run(
            "similar", "--cache-dir", self.base_cache, "--id", first, "--where", "gender=Robots"),
            r"matches no catalogue item.*Men")
        odd = case / "two\nlines.jpg"
        shutil.copy(pics[0], odd)
        self.expect_ok("predict table with a newline in a file name", self.run("predict", "--model", self.model, odd),
                       lambda r: None if len(r.out.strip().splitlines()) == 2 else f"{r.out!r}")

        d = self.copy_data("relabelled")
        self.extract(d, case / "relabelled")
        lines = (d / "styles.csv").read_text().splitlines()
        row = next(k for k, x in enumerate(lines) if x.split(",")[4] == "Tshirts")
        lines[row] = lines[row].replace(",Tshirts,", ",Watches,", 1)
        (d / "styles.csv").write_text("\n".join(lines) + "\n")
        self.expect_ok("a label-only change to styles.csv", self.extract(d, case / "relabelled"),
                       self.updated(changed=1))
        d = self.copy_data("case-clash")
        lines = (d / "styles.csv").read_text().splitlines()
        row = next(k for k, x in enumerate(lines) if x.split(",")[4] == "Tshirts")
        lines[row] = lines[row].replace(",Tshirts,", ",tshirts,", 1)
        (d / "styles.csv").write_text("\n".join(lines) + "\n")
        self.expect_error("'tshirts' beside 'Tshirts' in styles.csv", self.extract(d, case / "case-clash"),
                          r"'Tshirts'.*'tshirts'.*differ only in case")

    def signal_cases(self, kills: int, seed: int) -> None:
        case = self.work / "signals"
        parts_of = lambda cache: sorted(cache.glob("*.shards/part-*.h5"))  # noqa: E731
        n_batches = -(-len(self.features(self.base_cache)) // 8)

        # SIGTERM: one line, work kept; the rerun resumes
        cache = case / "sigterm"
        p = self.start_extract(self.data, cache)
        self._wait_for_parts(cache, 2, p)
        self.terminate("SIGTERM during extract", p)
        self.expect_ok("rerun after SIGTERM", self.extract(self.data, cache), lambda r: self.same_features(cache))

        # SIGKILL at random batch counts: resuming gives bit-equal features
        rng = random.Random(seed)
        for k in range(kills):
            cache = case / f"sigkill-{k}"
            at = rng.randint(1, n_batches - 1)
            p = self.start_extract(self.data, cache)
            self._wait_for_parts(cache, at, p)
            p.kill()
            p.communicate()
            done = len(parts_of(cache))
            self.expect_ok(f"SIGKILL after {done} of {n_batches} batches, then resume",
                           self.extract(self.data, cache),
                           lambda r, cache=cache: self.same_features(cache) if "resumed" in r.out else "no resume")

        # two extractions of one cache at once: the second waits, both end with the right cache
        cache = case / "concurrent"
        first, second = self.start_extract(self.data, cache), self.start_extract(self.data, cache)
        out1, err1 = first.communicate(timeout=600)
        out2, err2 = second.communicate(timeout=600)
        if first.returncode == 0 and second.returncode == 0:
            problem = self.same_features(cache)
            self.record("two extracts on one cache at once", "clean" if problem is None else "silent wrong",
                        problem or (out1 + out2).strip().replace("\n", " / "))
        else:
            tb = "Traceback" in err1 + err2
            self.record("two extracts on one cache at once", "traceback" if tb else "unclear",
                        f"exits {first.returncode}, {second.returncode}: {(err1 + err2).strip()[-150:]}")

    def terminate(self, name: str, p: subprocess.Popen) -> None:
        """SIGTERM to a running command: it must end with featpipe's one line, exit 130."""
        p.send_signal(signal.SIGTERM)
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            self.record(name, "hang", "still running 120 s after SIGTERM")
            return
        r = Result(p.returncode, "", err)
        if p.returncode == 130 and "rerun the same command" in r.last_error and "Traceback" not in err:
            self.record(name, "clean", r.last_error)
        else:  # killed by the signal itself (< 0) or dying in another handler (Ray's: 134) is a crash
            crashed = "Traceback" in err or p.returncode not in (2, 130)
            self.record(name, "traceback" if crashed else "unclear", f"exit {p.returncode}: {r.last_error}")

    def ray_cases(self, src: Path, per_class: int = 64, shard: int = 8) -> None:
        """--engine ray: an actor SIGKILLed mid-run, and a worker node of a simulated two-node cluster removed
        mid-run. Ray Data restarts the actor and retries the batch it held; nothing may be lost or twice."""
        try:
            from ray.cluster_utils import Cluster
        except ImportError:
            print("ray is not installed (pip install 'featpipe[ray]'): Ray cases left out", file=sys.stderr)
            return
        case = self.work / "ray"
        data = self._copy_catalogue(src, case / "data", per_class)
        base = case / "local"
        if self.extract(data, base).rc != 0:
            raise SystemExit("local extraction for the Ray cases failed")
        total = -(-len(self.features(base)) // shard)
        ray_args = ("--engine", "ray", "--shard-size", str(shard))
        cache = case / "sigterm"
        p = self.start_extract(data, cache, *ray_args)
        self._wait_for_parts(cache, 1, p)
        self.terminate("SIGTERM during extract --engine ray", p)

        def judge(name: str, p: subprocess.Popen, cache: Path, at: int, rtol: float) -> None:
            out, err = p.communicate(timeout=600)
            r = Result(p.returncode, out, err)
            if at >= total:
                self.record(name, "unclear", f"the run had finished ({at} of {total} shards) before the kill")
            else:
                self.expect_ok(f"{name} after {at} of {total} shards", r,
                               lambda r: self.same_features(cache, base, rtol), lost=True)

        cache = case / "actor-kill"
        p = self.start_extract(data, cache, *ray_args)
        self._wait_for_parts(cache, 2, p)
        killed = subprocess.run(["pkill", "-KILL", "-f", r"MapBatches\(Embedder\)"]).returncode == 0
        at = len(list(cache.glob("*.shards/part-*.h5")))
        if killed:
            judge("Ray actor SIGKILLed", p, cache, at, rtol=0.0)
        else:
            p.communicate(timeout=600)
            self.record("Ray actor SIGKILLed", "unclear", "no actor process found to kill")

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        try:
            worker = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            cache = case / "node-removed"
            p = self.start_extract(data, cache, *ray_args, "--address", cluster.address)
            self._wait_for_parts(cache, 2, p)
            cluster.remove_node(worker)
            # one thread per actor on these one-CPU nodes, two in the local run: sums in another order, which
            # can move a feature by one float16 step (2**-10 of its value)
            judge("worker node of a two-node Ray cluster removed", p, cache,
                  len(list(cache.glob("*.shards/part-*.h5"))), rtol=2e-3)
        finally:
            cluster.shutdown()

    @staticmethod
    def _wait_for_parts(cache: Path, n: int, p: subprocess.Popen, timeout: float = 300) -> None:
        t0 = time.monotonic()
        while len(list(cache.glob("*.shards/part-*.h5"))) < n:
            if p.poll() is not None or time.monotonic() - t0 > timeout:
                raise SystemExit(f"extraction ended before {n} batches: {p.stderr.read() if p.stderr else ''}")
            time.sleep(0.02)

    def table(self) -> str:
        counts = Counter(outcome for _, outcome, _ in self.rows)
        lines = ["| tried | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 1) + "|",
                 f"| {len(self.rows)} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |", "",
                 "| case | outcome | what featpipe said or did |", "|---|---|---|"]
        lines += [f"| {name} | {outcome} | {detail} |" for name, outcome, detail in self.rows]
        return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--kills", type=int, default=5, help="SIGKILL points (random batch counts) to resume from.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="Keep the scratch folder.")
    ap.add_argument("--strict", action="store_true",
                    help="Exit 1 when any case ends in a traceback, a silent wrong answer, lost rows or a hang (the table "
                         "says so either way; make bench keeps going to write it).")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="featpipe-drill-"))
    t0 = time.perf_counter()
    try:
        drill = Drill(args.data.resolve(), args.weights.resolve(), work)
        drill.baseline()
        for part in (drill.csv_cases, drill.image_cases, drill.option_cases, drill.damage_cases, drill.use_cases,
                     drill.filesystem_cases, drill.split_cases, drill.overwrite_cases, drill.special_file_cases,
                     drill.labelled_path_cases, drill.message_cases):
            part()
        drill.signal_cases(args.kills, args.seed)
        drill.ray_cases(args.data.resolve())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(drill.rows)} cases on a copy of {len(CLASSES) * PER_CLASS} catalogue photos "
          f"({', '.join(CLASSES)}), {time.perf_counter() - t0:.0f} s; each case runs the CLI in a fresh process.\n")
    print(drill.table())
    bad = sum(outcome in ("traceback", "silent wrong", "lost", "hang") for _, outcome, _ in drill.rows)
    sys.exit(1 if bad and args.strict else 0)


if __name__ == "__main__":
    main()
