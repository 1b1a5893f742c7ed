import csv
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SHARED_DATA, needs_shared
from vqflow.data.sources import read_sources
from vqflow.data.cifar import read_cifar_semantic
from vqflow.data.magnetic_tile import read_magnetic_tile
from vqflow.data.manifest import assign_validation, build_manifest
from vqflow.data.mvtec import read_mvtec
from vqflow.data.sample import DatasetLayoutError
from vqflow.data.visa import read_visa


def test_mvtec_reader_counts_labels_and_masks(tiny_dataset):
    samples = list(read_mvtec(tiny_dataset))
    assert {s.category for s in samples} == {"chip", "fabric"}
    for category in ("chip", "fabric"):
        mine = [s for s in samples if s.category == category]
        assert sum(s.split == "train" for s in mine) == 6
        assert sum(s.split == "test" and s.label == 0 for s in mine) == 2
        assert sum(s.label == 1 for s in mine) == 4
    for s in samples:
        assert (s.label == 1) == bool(s.mask_path)
        assert s.split == "test" or s.label == 0
        if s.mask_path:
            assert Image.open(s.mask_path).size == Image.open(s.path).size
            assert s.mask_path.endswith(f"ground_truth/{s.defect_type}/{s.path.rsplit('/', 1)[1][:-4]}_mask.png")
    assert {s.category for s in read_mvtec(tiny_dataset, ["chip"])} == {"chip"}
    with pytest.raises(FileNotFoundError, match="marble"):
        list(read_mvtec(tiny_dataset, ["marble"]))


def test_mvtec_missing_mask_is_named(tiny_dataset, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(tiny_dataset, root)
    (root / "chip" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match="scratch/000.png: no ground-truth mask"):
        list(read_mvtec(root))


def test_a_category_with_upper_case_file_names_reads_like_lower_case(tiny_dataset, tmp_path):
    import shutil

    root = tmp_path / "upper"
    shutil.copytree(tiny_dataset, root)
    for path in sorted((root / "chip").rglob("*.png")):  # 000.png -> 000.PNG, 000_mask.png -> 000_MASK.PNG
        path.rename(path.with_name(path.stem.upper() + ".PNG"))
    jpeg = next((root / "chip/train/good").glob("*.PNG"))
    Image.open(jpeg).convert("RGB").save(jpeg.with_suffix(".JPEG"), quality=95)
    jpeg.unlink()
    lower = {(s.split, s.label, s.defect_type, Path(s.path).stem.lower()) for s in read_mvtec(tiny_dataset, ["chip"])}
    samples = list(read_mvtec(root, ["chip"]))
    assert {(s.split, s.label, s.defect_type, Path(s.path).stem.lower()) for s in samples} == lower
    for s in samples:
        assert (s.label == 1) == bool(s.mask_path)
        if s.mask_path:
            assert s.mask_path.endswith(f"ground_truth/{s.defect_type}/{Path(s.path).stem}_MASK.PNG")
    frame = build_manifest(samples, 0.25, 0, progress=False)
    assert (frame.decode_error == "").all() and (frame[frame.label == 1].mask_fraction > 0).all()


def test_a_mask_of_no_image_fails_prepare_with_the_file_named(tiny_dataset, tmp_path):
    import shutil

    from vqflow import cli

    root = tmp_path / "copy"
    shutil.copytree(tiny_dataset, root)
    shutil.copy(root / "chip/ground_truth/scratch/000_mask.png", root / "chip/ground_truth/scratch/017_mask.png")
    with pytest.raises(DatasetLayoutError, match="chip/ground_truth/scratch/017_mask.png"):
        list(read_mvtec(root))
    params = tmp_path / "params.yaml"
    params.write_text(f"prepare:\n  sources: [{{kind: mvtec, root: {root}}}]\n  manifest: {tmp_path / 'm.csv'}\n")
    assert cli.main(["--params", str(params), "prepare"]) == 1  # bad data (like the gate), not bad params
    assert not (tmp_path / "m.csv").exists()


def _png(path, value=128, size=(16, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(path)


def test_visa_reader_on_generated_tree(tmp_path):
    rows = [("candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", "")]
    rows += [("candle", "test", "normal", "candle/Data/Images/Normal/0001.JPG", "")]
    rows += [("candle", "test", "anomaly", "candle/Data/Images/Anomaly/0002.JPG", "candle/Data/Masks/Anomaly/0002.png")]
    rows += [("pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", "")]
    for _, _, _, image, mask in rows:
        _png(tmp_path / image)
        if mask:
            _png(tmp_path / mask, 255)
    (tmp_path / "split_csv").mkdir()
    with open(tmp_path / "split_csv" / "1cls.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    samples = list(read_visa(tmp_path, "split_csv/1cls.csv"))
    assert [(s.category, s.split, s.label) for s in samples] == [
        ("candle", "train", 0),
        ("candle", "test", 0),
        ("candle", "test", 1),
        ("pcb1", "train", 0),
    ]
    assert samples[2].mask_path.endswith("0002.png") and samples[1].mask_path == ""
    assert len(list(read_visa(tmp_path, "split_csv/1cls.csv", ["pcb1"]))) == 1


def test_magnetic_tile_reader_on_generated_tree(tmp_path):
    _png(tmp_path / "MT_Free/Imgs/a.jpg")
    _png(tmp_path / "MT_Free/Imgs/a.png", 0)
    _png(tmp_path / "MT_Crack/Imgs/b.jpg")
    _png(tmp_path / "MT_Crack/Imgs/b.png", 255)
    (tmp_path / "split.csv").write_text(
        "image,mask,label,defect_type,split\n"
        "MT_Free/Imgs/a.jpg,MT_Free/Imgs/a.png,0,good,train\n"
        "MT_Crack/Imgs/b.jpg,MT_Crack/Imgs/b.png,1,crack,test\n"
    )
    a, b = read_magnetic_tile(tmp_path, "split.csv")
    assert (a.split, a.label, a.mask_path) == ("train", 0, "")
    assert (b.split, b.label, b.defect_type) == ("test", 1, "crack") and b.mask_path.endswith("b.png")


def test_cifar_semantic_on_generated_zip(tmp_path):
    from vqflow.data.cifar import CLASSES
    from vqflow.data.images import load_image

    archive = tmp_path / "cifar10_jpeg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for split in ("train", "test"):
            for cls in CLASSES:
                for i in range(2):
                    buf = __import__("io").BytesIO()
                    Image.new("RGB", (32, 32), (i * 50, 0, 0)).save(buf, format="JPEG")
                    zf.writestr(f"{split}/{cls}/{i:04d}.jpg", buf.getvalue())
    samples = list(read_cifar_semantic(tmp_path, [0, 1, 2, 3, 4]))
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert len(train) == 10 and all(s.label == 0 for s in train)
    assert len(test) == 20 and sum(s.label for s in test) == 10
    assert {s.defect_type for s in test if s.label} == {"dog", "frog", "horse", "ship", "truck"}
    assert load_image(test[0].path).size == (32, 32)
    with pytest.raises(ValueError, match="normal_classes"):
        list(read_cifar_semantic(tmp_path, [11]))


def test_validation_split_is_seeded_and_only_from_train(tiny_dataset):
    samples = list(read_mvtec(tiny_dataset))
    first = assign_validation(samples, 0.34, seed=1)
    assert first == assign_validation(samples, 0.34, seed=1)
    val = [s for s, split in first if split == "val"]
    assert len(val) == 4 and all(s.split == "train" and s.label == 0 for s in val)
    assert {s.category for s in val} == {"chip", "fabric"}
    assert first != assign_validation(samples, 0.34, seed=2)


def test_manifest_rows(tiny_dataset):
    frame = build_manifest(read_mvtec(tiny_dataset), 0.2, 0, progress=False)
    assert len(frame) == 2 * (6 + 2 + 4)
    assert frame.image_id.is_unique and frame.sha256.str.len().eq(64).all()
    assert (frame.width == 64).all() and (frame["mode"] == "RGB").all()
    defective = frame[frame.label == 1]
    assert (defective.mask_width == defective.width).all() and (defective.mask_fraction > 0).all()
    assert set(frame.split) == {"train", "val", "test"}


def test_unknown_source_kind_is_named():
    with pytest.raises(ValueError, match=r"prepare.sources\[0\].kind"):
        list(read_sources([{"kind": "kaggle", "root": "x"}]))


@needs_shared("mvtec_ad", "bottle")
def test_shared_bottle_manifest_counts():
    frame = build_manifest(read_mvtec(SHARED_DATA / "mvtec_ad", ["bottle"]), 0.0, 0, progress=False)
    assert (frame.split == "train").sum() == 209
    assert (frame.split == "test").sum() == 83
    assert (frame.label == 1).sum() == 63 and (frame.decode_error == "").all()
    assert (frame[frame.label == 1].mask_width == 900).all()


@needs_shared("magnetic_tile")
def test_shared_magnetic_tile_counts():
    samples = list(read_magnetic_tile(SHARED_DATA / "magnetic_tile"))
    assert sum(s.split == "train" for s in samples) == 762
    assert sum(s.label for s in samples) == 392


@needs_shared("cifar10_jpeg")
def test_shared_cifar_counts():
    samples = list(read_cifar_semantic(SHARED_DATA / "cifar10_jpeg", [0, 2, 4, 6, 8], test_per_class=100))
    assert sum(s.split == "train" for s in samples) == 25000
    assert sum(s.split == "test" for s in samples) == 1000
