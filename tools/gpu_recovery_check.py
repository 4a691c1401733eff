"""Recovery fine-tuning on a GPU: a merged checkpoint (save_merged folder) is fine-tuned on the
device with the same data, seed and settings as tools/compare_quality.py uses for the ViT
reference model, and the script checks that the ties survive on the device and reports test
accuracy before and after, and the time per step.

    .venv/bin/python tools/gpu_recovery_check.py --merged DIR --steps 100 --lr 1e-4 --out report.json

Pixel values are computed from preprocessor_config.json's mean and std (no image library needed)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ffmerge_onnx import MergeResult, adapter_for, load_merged
from ffmerge_onnx.families.builtin import FASHION_MNIST_SPLITS, fashion_mnist
from ffmerge_onnx.families.loading import load_model
from ffmerge_onnx.quality.finetune import recover
from ffmerge_onnx.quality.metrics import batch_accuracy


def pixels(images, config: dict) -> torch.Tensor:
    x = torch.from_numpy(images.copy()).float() * config["rescale_factor"]
    return ((x - config["image_mean"][0]) / config["image_std"][0])[:, None]


def ties(merged: MergeResult) -> bool:
    model = merged.model
    adapter = adapter_for(model)
    for w in merged.manifest.windows:
        layers = adapter.layers(model, w.stack)
        first = adapter.ff_params(layers[w.start])
        for i in range(w.start + 1, w.end + 1):
            other = adapter.ff_params(layers[i])
            if any(other[k] is not v or other[k].data_ptr() != v.data_ptr() for k, v in first.items()):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merged", type=Path, required=True)
    ap.add_argument("--original", default="vit-fashion-mnist")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--finetune-images", type=int, default=6_400)
    ap.add_argument("--objective", default=None, help="classify (default for labelled images), kl or distill")
    ap.add_argument("--train", default="all", help="all, merged or merged+norms")
    ap.add_argument("--out", type=Path, default=Path("gpu_recovery.json"))
    a = ap.parse_args()
    device = torch.device(a.device)
    config = json.loads((a.merged / "preprocessor_config.json").read_text())
    images, labels = fashion_mnist("train")
    test_images, test_labels = fashion_mnist("test")
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(50_000, generator=g)[: a.finetune_images]
    train_x = pixels(images[order.numpy()], config)
    train = [
        {"pixel_values": train_x[i : i + 64], "labels": torch.from_numpy(labels[order[i : i + 64].numpy()])}
        for i in range(0, len(order), 64)
    ]
    lo, hi = FASHION_MNIST_SPLITS["validation"]
    val = [
        {"pixel_values": pixels(images[i : i + 500], config), "labels": torch.from_numpy(labels[i : i + 500])}
        for i in range(lo, hi, 500)
    ]
    test = [
        {
            "pixel_values": pixels(test_images[i : i + 1000], config),
            "labels": torch.from_numpy(test_labels[i : i + 1000]),
        }
        for i in range(0, len(test_images), 1000)
    ]
    original = load_model(a.original).eval().to(device)
    merged = load_merged(a.merged)
    model = merged.model.to(device)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "ties_after_move": ties(merged),
        "original_test": batch_accuracy(original, test),
        "merged_test_before": batch_accuracy(model, test),
    }
    t = time.time()
    result = recover(
        merged,
        original,
        train,
        val,
        steps=a.steps,
        lr=a.lr,
        eval_every=max(1, a.steps // 4),
        progress=False,
        objective=a.objective,
        train=a.train,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    report.update(
        seconds=time.time() - t,
        steps=a.steps,
        best_step=result.best_step,
        objective=merged.manifest.finetune["objective"],
        train=a.train,
        lr=a.lr,
        finetune_images=a.finetune_images,
        ties_after_training=ties(merged),
        param_devices=sorted({str(p.device) for p in model.parameters()}),
        merged_test_after=batch_accuracy(model, test),
        history=result.history,
    )
    a.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if not (report["ties_after_move"] and report["ties_after_training"]):
        raise SystemExit("ties were lost on the device")


if __name__ == "__main__":
    main()
