from pathlib import Path

import numpy as np
import pytest

from featpipe.dataset import DatasetError, fingerprint, load_dataset, read_styles


def test_comma_rows_are_kept_with_name_as_tail(dataset_dir: Path):
    header, rows, skipped = read_styles(dataset_dir / "styles.csv")
    names = [r[header.index("productDisplayName")] for r in rows]
    assert "Shirt, Tie, and Socks, Set" in names
    assert all(len(r) == len(header) for r in rows)
    assert skipped == {}


def test_skips_are_counted_by_reason(dataset_dir: Path):
    ds = load_dataset(dataset_dir, min_per_class=5)
    assert ds.classes == ["Heels", "Tshirts", "Watches"]
    assert len(ds.skipped["missing_image"]) == 1
    assert len(ds.skipped["rare_class"]) == 2
    # corrupt and truncated files are found only when decoded, at extraction
    assert len(ds) == 36 + 1 + 4 + 2
    assert list(ds.ids) == sorted(ds.ids)


def test_split_is_deterministic_stratified_and_seeded(dataset_dir: Path):
    a = load_dataset(dataset_dir, min_per_class=5)
    b = load_dataset(dataset_dir, min_per_class=5)
    c = load_dataset(dataset_dir, min_per_class=5, seed=1)
    assert np.array_equal(a.split, b.split)
    assert not np.array_equal(a.split, c.split)
    for k in range(len(a.classes)):
        assert set(a.split[a.labels == k]) == {0, 1, 2}
    custom = load_dataset(dataset_dir, min_per_class=5, fractions=(0.5, 0.25, 0.25))
    assert (custom.split == 0).mean() < (a.split == 0).mean()


def test_other_targets(dataset_dir: Path):
    ds = load_dataset(dataset_dir, target="masterCategory", min_per_class=3)
    assert ds.classes == ["Accessories", "Apparel"]  # Footwear has 2 rows with images


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty"),
        ("id,gender\n1,Men\n", "missing column(s) articleType"),
        ("id,articleType\nx,Tshirts\n", "no usable rows"),
    ],
)
def test_malformed_csv_one_clear_line(tmp_path: Path, content: str, message: str):
    (tmp_path / "images").mkdir()
    (tmp_path / "styles.csv").write_text(content)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_dataset(tmp_path)
    assert "styles.csv" in str(info.value) and "\n" not in str(info.value)


def test_filter_leaving_one_class_is_an_error(dataset_dir: Path):
    with pytest.raises(DatasetError, match="--min-per-class 100 leaves 0 class"):
        load_dataset(dataset_dir, min_per_class=100)


def test_fingerprint_changes_with_images(dataset_dir: Path):
    ds = load_dataset(dataset_dir, min_per_class=5)
    before = fingerprint(ds)
    (dataset_dir / "images" / "99999.jpg").write_bytes(b"x")
    assert fingerprint(ds) != before
