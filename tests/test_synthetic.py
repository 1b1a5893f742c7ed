import hashlib

import numpy as np
import pytest
from PIL import Image

from vqflow.data.synthetic import CATEGORIES, generate, render_sample


def _tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_two_runs_are_byte_identical(tmp_path):
    kwargs = dict(
        categories=["wood", "washer"],
        train_per_category=3,
        test_good_per_category=1,
        test_per_defect=1,
        size=96,
        seed=7,
        progress=False,
    )
    first = _tree_digest(generate(tmp_path / "a", **kwargs))
    second = _tree_digest(generate(tmp_path / "b", **kwargs))
    assert first == second
    assert len(first) == 2 * (3 + 1 + 4 + 4)  # train + good + 4 defect images + 4 masks per category


def test_seed_changes_the_images(tmp_path):
    a, _, _ = render_sample("fabric", "train", 0, seed=0)
    b, _, _ = render_sample("fabric", "train", 0, seed=1)
    assert not np.array_equal(a, b)


def test_at_least_four_categories_with_textures_and_objects():
    assert len(CATEGORIES) >= 4
    assert {c.kind for c in CATEGORIES.values()} == {"texture", "object"}


@pytest.mark.parametrize("category,defect", [(c, d) for c, spec in CATEGORIES.items() for d in spec.defects])
def test_mask_is_exactly_where_the_defect_is(category, defect):
    for index in range(3):
        image, mask, clean = render_sample(category, "test", index, defect)
        changed = (image != clean).any(axis=-1)
        assert mask.sum() >= 12
        assert not changed[~mask].any(), "pixels outside the mask must equal the clean image"
        assert changed[mask].mean() > 0.9, "the mask must cover pixels that the defect changed"


def test_layout_and_mask_files(tiny_dataset):
    chip = tiny_dataset / "chip"
    assert len(list((chip / "train" / "good").glob("*.png"))) == 6
    for defect in CATEGORIES["chip"].defects:
        image = Image.open(chip / "test" / defect / "000.png")
        mask = Image.open(chip / "ground_truth" / defect / "000_mask.png")
        assert image.size == mask.size == (64, 64)
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= {0, 255} and 255 in values


def test_unknown_category_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic categories"):
        generate(tmp_path / "x", ["marble"], progress=False)
