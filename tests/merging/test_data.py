"""Calibration loaders: image folders."""

from __future__ import annotations

import numpy as np
import tiny_models as tm
import torch
from PIL import Image
from transformers import ViTImageProcessor

from ffmerge_onnx.families import adapter_for
from ffmerge_onnx.merging import load_calibration
from ffmerge_onnx.quality.search import default_score


def _images(folder, names, count=3):
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return folder


def test_image_folders_in_class_subfolders_carry_labels_with_classes_interleaved(tmp_path):
    model = tm.build("vit")  # 5 classes: LABEL_0 ... LABEL_4
    proc = ViTImageProcessor(do_resize=True, size={"height": 16, "width": 16})
    per_image = adapter_for(model).image_tokens(model.config)  # 4 x 4 patches + CLS

    def load(folder, images):
        return load_calibration(folder, model=model, processor=proc, budget=images * per_image - 1, batch_size=2)

    # a class name and a class id (a folder cannot be named "T-shirt/top"); a prefix takes both in turn
    cal = load(_images(tmp_path / "named", ["LABEL_3", "1"]), 4)
    assert [b["labels"].tolist() for b in cal.batches] == [[1, 3], [1, 3]]
    assert cal.description["labelled"] is True
    assert default_score(model, cal.batches)[2] == "accuracy"  # windows and methods then chosen by accuracy
    with torch.no_grad():
        model(**cal.batches[0])  # a labelled batch is a valid model input

    # any folder that is not a class, or images at the top: no labels, the images still calibrate
    for folder in (_images(tmp_path / "other", ["LABEL_0", "cats"]), _images(tmp_path / "flat", [""], count=4)):
        cal = load(folder, 4)
        assert all("labels" not in b for b in cal.batches) and len(cal.batches) == 2
        assert cal.description["labelled"] is False
    assert default_score(model, cal.batches)[2] == "cosine to original"

    # a model without a classifier head (it takes no labels) reads the same folder without them
    cal = load_calibration(tmp_path / "named", model=model.vit, processor=proc, budget=4 * per_image, batch_size=2)
    assert all("labels" not in b for b in cal.batches) and len(cal.batches) == 2


def test_rebatch_splits_rows_and_keeps_other_entries():
    from ffmerge_onnx.merging.data import rebatch

    batch = {"input_ids": torch.arange(10).view(5, 2), "attention_mask": torch.ones(5, 2), "scale": 3}
    parts = rebatch([batch], 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 3]
    assert [p["input_ids"].shape[0] for p in rebatch([batch], 8)] == [5]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert all(p["scale"] == 3 for p in parts) and rebatch([batch], 0)[0] is batch
