"""The GX gate: every kind of bad data fails with the right check named and the offending file listed."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from vqflow.data.manifest import build_manifest
from vqflow.data.mvtec import read_mvtec
from vqflow.validation import validate_manifest

LIMITS = {"min_train_per_category": 3, "min_test_per_category": 2}


@pytest.fixture()
def dataset(tiny_dataset, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    return root


def _manifest(root):
    return build_manifest(read_mvtec(root), 0.2, 0, progress=False)


def _failed(report):
    return {f.check: f for f in report.failures}


def test_clean_dataset_passes(dataset):
    report = validate_manifest(_manifest(dataset), LIMITS)
    assert report.success and report.failures == []


def _corrupt_file(root):
    path = root / "chip/train/good/001.png"
    path.write_bytes(path.read_bytes()[:80])
    return "decodable", path


def _mask_wrong_size(root):
    path = root / "fabric/ground_truth/hole/000_mask.png"
    Image.open(path).resize((32, 32)).save(path)
    return "mask_matches_image", root / "fabric/test/hole/000.png"


def _mask_not_binary(root):
    path = root / "fabric/ground_truth/crack/000_mask.png"
    mask = np.asarray(Image.open(path)).astype(float)
    Image.fromarray(np.where(mask > 0, 200, 60).astype(np.uint8)).save(path)
    return "mask_binary", root / "fabric/test/crack/000.png"


def _mask_empty(root):
    path = root / "chip/ground_truth/scratch/000_mask.png"
    Image.new("L", Image.open(path).size, 0).save(path)
    return "mask_not_empty", root / "chip/test/scratch/000.png"


def _leakage(root):
    shutil.copy(root / "chip/test/good/000.png", root / "chip/train/good/leaked.png")
    return "no_train_test_leakage", root / "chip/train/good/leaked.png"


def _duplicate_in_split(root):
    shutil.copy(root / "fabric/train/good/002.png", root / "fabric/train/good/copy.png")
    return "no_duplicates_in_split", root / "fabric/train/good/copy.png"


def _tiny_category(root):
    for split in ("train/good", "test/good"):
        (root / "screw" / split).mkdir(parents=True)
    for i in range(3):
        Image.open(root / "chip/train/good/000.png").rotate(90 * i).save(root / f"screw/train/good/{i}.png")
    Image.open(root / "chip/test/good/000.png").rotate(45).save(root / "screw/test/good/0.png")
    return "min_images_per_category", root / "screw/test/good/0.png"


def _black_image(root):
    path = root / "fabric/train/good/003.png"
    Image.new("RGB", (64, 64), (0, 0, 0)).save(path)
    return "not_blank", path


def _blurred_image(root):
    path = root / "fabric/train/good/004.png"
    Image.open(path).filter(ImageFilter.GaussianBlur(1)).save(path)  # contrast stays, detail goes
    return "not_blurred", path


def _too_small(root):
    path = root / "chip/train/good/002.png"
    Image.open(path).resize((16, 16)).save(path)
    return "size_allowed", path


def _cmyk(root):
    path = root / "chip/train/good/003.png"
    jpg = path.with_suffix(".jpg")
    Image.open(path).convert("CMYK").save(jpg)
    path.unlink()
    return "mode_allowed", jpg


def _bad_category_name(root):
    (root / "chip").rename(root / "chip!?")
    return "category_allowed", root / "chip!?/train/good/000.png"


def _grey_small_defect(root):
    path = root / "chip/ground_truth/scratch/000_mask.png"  # the defect drawn in 77 instead of 255
    mask = np.asarray(Image.open(path).convert("L"))
    Image.fromarray(np.where(mask > 127, 77, 0).astype(np.uint8)).save(path)
    return "mask_binary", root / "chip/test/scratch/000.png"


def _odd_size_in_category(root):
    path = root / "fabric/train/good/005.png"
    Image.open(path).crop((0, 0, 48, 40)).save(path)  # a cut-out: valid on its own, not this category's size
    return "size_consistent_in_category", path


def _mask_for_a_normal_image(root):
    folder = root / "chip/ground_truth/good"
    folder.mkdir()
    shutil.copy(root / "chip/ground_truth/scratch/000_mask.png", folder / "000_mask.png")
    return "normal_has_no_mask", root / "chip/test/good/000.png"


FILE_CORRUPTIONS = [
    _grey_small_defect,
    _odd_size_in_category,
    _mask_for_a_normal_image,
    _corrupt_file,
    _mask_wrong_size,
    _mask_not_binary,
    _mask_empty,
    _leakage,
    _duplicate_in_split,
    _tiny_category,
    _black_image,
    _blurred_image,
    _too_small,
    _cmyk,
    _bad_category_name,
]


@pytest.mark.parametrize("corrupt", FILE_CORRUPTIONS, ids=lambda f: f.__name__.strip("_"))
def test_corrupted_files_fail_with_the_check_and_file_named(dataset, corrupt):
    check, offender = corrupt(dataset)
    report = validate_manifest(_manifest(dataset), LIMITS)
    failed = _failed(report)
    assert not report.success
    assert check in failed, f"expected {check}, got {sorted(failed)}"
    assert str(offender) in failed[check].files


def test_defective_image_labelled_as_training_data_fails(dataset):
    manifest = _manifest(dataset)
    row = manifest.index[manifest.split == "train"][0]
    manifest.loc[row, "label"] = 1
    failed = _failed(validate_manifest(manifest, LIMITS))
    assert manifest.path[row] in failed["train_is_normal"].files


def test_a_category_allowed_to_vary_in_size_passes(dataset):
    _odd_size_in_category(dataset)
    report = validate_manifest(_manifest(dataset), {**LIMITS, "variable_size_categories": ["fabric"]})
    assert report.success, [(f.check, f.files) for f in report.failures]


def test_mask_on_a_normal_image_fails(dataset):
    manifest = _manifest(dataset)
    row = manifest.index[(manifest.split == "test") & (manifest.label == 0)][0]
    manifest.loc[row, "mask_path"] = str(dataset / "chip/ground_truth/scratch/000_mask.png")
    failed = _failed(validate_manifest(manifest, LIMITS))
    assert manifest.path[row] in failed["normal_has_no_mask"].files


def test_named_checks_can_be_downgraded_to_warnings(dataset):
    _, path = _blurred_image(dataset)
    report = validate_manifest(_manifest(dataset), {**LIMITS, "warn_only": ["not_blurred"]})
    assert report.success
    assert [(f.check, f.warning) for f in report.failures] == [("not_blurred", True)]
    assert str(path) in report.failures[0].files


def test_data_docs_are_written(dataset, tmp_path):
    _black_image(dataset)
    report = validate_manifest(_manifest(dataset), LIMITS, tmp_path / "docs")
    assert not report.success
    assert (tmp_path / "docs" / "index.html").is_file()
    assert list((tmp_path / "docs" / "validations").rglob("*.html"))


def test_inbox_batch_is_validated_against_the_dataset(dataset, tmp_path):
    from vqflow.validation import validate_inbox

    manifest = _manifest(dataset)
    inbox = tmp_path / "inbox"
    (inbox / "chip").mkdir(parents=True)
    fresh = np.asarray(Image.open(dataset / "chip/train/good/000.png")).copy()
    fresh[:8] = 255 - fresh[:8]  # a new, different normal image
    Image.fromarray(fresh).save(inbox / "chip" / "new_ok.png")
    shutil.copy(dataset / "chip/test/good/001.png", inbox / "chip" / "copy_of_test.png")
    (inbox / "chip" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    verdict = validate_inbox(inbox, manifest, LIMITS)
    assert verdict.accepted == [str(inbox / "chip" / "new_ok.png")]
    assert any(
        r.startswith("no_train_test_leakage") for r in verdict.rejected[str(inbox / "chip" / "copy_of_test.png")]
    )
    assert any(r.startswith("decodable") for r in verdict.rejected[str(inbox / "chip" / "broken.png")])
    assert validate_inbox(tmp_path / "empty", manifest, LIMITS).accepted == []


@pytest.mark.parametrize(
    "transform",
    [
        lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        lambda im: im.transpose(Image.Transpose.ROTATE_90),
        lambda im: im.resize((60, 60), Image.BICUBIC),
        lambda im: im.point(lambda v: min(255, v + 12)),
    ],
    ids=["mirrored", "turned", "resized", "brightened"],
)
def test_a_near_copy_of_a_training_image_in_test_fails_naming_both_files(dataset, transform):
    original = dataset / "chip/train/good/002.png"
    copy = dataset / "chip/test/good/099.jpg"
    transform(Image.open(original).convert("RGB")).save(copy, quality=85)  # and re-encoded as JPEG
    report = validate_manifest(_manifest(dataset), {**LIMITS, "variable_size_categories": ["chip"]})
    failed = _failed(report)
    assert not report.success and "no_near_copies_across_splits" in failed
    described = dict(zip(failed["no_near_copies_across_splits"].files, failed["no_near_copies_across_splits"].details))
    assert f"near-copy of {original}" in described[str(copy)]
    assert f"near-copy of {copy}" in described[str(original)]
    assert "of 256 bits differ" in described[str(copy)]


def test_near_copies_inside_one_split_are_a_warning_with_the_pair(dataset):
    original = dataset / "fabric/train/good/001.png"
    Image.open(original).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(dataset / "fabric/train/good/050.png")
    report = validate_manifest(_manifest(dataset), LIMITS)
    assert report.success  # a warning does not stop the gate
    (warning,) = report.failures
    assert (warning.check, warning.warning) == ("no_near_copies_in_split", True)
    assert sorted(warning.files) == [str(original), str(dataset / "fabric/train/good/050.png")]
    assert "flipped top-bottom" in warning.details[0]


def test_an_image_over_max_size_is_refused_for_its_size_not_as_undecodable(dataset):
    big = dataset / "chip/train/good/003.png"
    Image.new("RGB", (9000, 9000), (90, 120, 150)).save(big)
    report = validate_manifest(_manifest(dataset), {**LIMITS, "max_size": 8192})
    failed = _failed(report)
    assert "decodable" not in failed  # it decodes
    (detail,) = [d for f, d in zip(failed["size_allowed"].files, failed["size_allowed"].details) if f == str(big)]
    assert "9000x9000 px" in detail and "8192" in detail


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_an_unreadable_mask_is_named_with_what_is_wrong(dataset, damage):
    mask = dataset / "fabric/ground_truth/hole/000_mask.png"
    mask.write_bytes(b"" if damage == "empty" else mask.read_bytes()[:60])
    failed = _failed(validate_manifest(_manifest(dataset), LIMITS))
    assert "mask_matches_image" not in failed  # the mask is there; it cannot be read
    (detail,) = failed["mask_readable"].details
    assert failed["mask_readable"].files == [str(dataset / "fabric/test/hole/000.png")]
    assert str(mask) in detail and ("empty file" if damage == "empty" else "cannot decode") in detail
