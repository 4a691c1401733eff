"""Train the ViT reference model on Fashion-MNIST, deterministically, and write it to models/.

    .venv/bin/python tools/train_vit.py --device cuda            # what made models/vit-fashion-mnist
    .venv/bin/python tools/train_vit.py --device cpu --epochs 2  # a quick look on a CPU

A 6-layer ViT (hidden 128, FF 512, 4x4 patches of the 28x28 image, 1 channel), AdamW with a
warm-up and cosine decay, label smoothing, random shifts of up to 2 pixels and horizontal flips.
Seeds are fixed and deterministic kernels are required, so the same device and library versions
give the same weights. Writes config.json, model.safetensors, preprocessor_config.json and
recipe.json (data, settings, time, test accuracy) to --out, through a temporary folder."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST train pixels


def build(seed: int):
    from transformers import ViTConfig, ViTForImageClassification

    from ffmerge_onnx.families.builtin import FASHION_MNIST_CLASSES

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=28,
        patch_size=4,
        num_channels=1,
        hidden_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
        id2label=dict(enumerate(FASHION_MNIST_CLASSES)),
        label2id={c: i for i, c in enumerate(FASHION_MNIST_CLASSES)},
    )
    return ViTForImageClassification(config)


def pixels(images: np.ndarray, device) -> torch.Tensor:
    x = torch.from_numpy(np.array(images)).to(device=device, dtype=torch.float32) / 255.0
    return ((x - MEAN) / STD)[:, None]


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (zero padding in pixel space) and horizontal flips."""
    b = x.shape[0]
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-MEAN / STD)
    dy = torch.randint(0, 5, (b,), generator=g).to(x.device)
    dx = torch.randint(0, 5, (b,), generator=g).to(x.device)
    flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
    ar = torch.arange(28, device=x.device)
    rows = (dy[:, None] + ar)[:, :, None]
    cols = (dx[:, None] + ar)[:, None, :]
    out = pad[torch.arange(b, device=x.device)[:, None, None], 0, rows, cols][:, None]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    right = 0
    for i in range(0, len(x), batch):
        right += int((model(pixel_values=x[i : i + batch]).logits.argmax(-1) == y[i : i + batch]).sum())
    return right / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-images", type=int, default=None, help="use only the first N (a quick check)")
    ap.add_argument("--out", type=Path, default=Path("models/vit-fashion-mnist"))
    a = ap.parse_args()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from transformers import ViTImageProcessor

    from ffmerge_onnx.families.builtin import fashion_mnist

    device = torch.device(a.device)
    train_x, train_y = fashion_mnist("train")
    train_x, train_y = train_x[: a.train_images], train_y[: a.train_images]
    test_x, test_y = fashion_mnist("test")
    xtr, ytr = pixels(train_x, device), torch.from_numpy(train_y).to(device)
    xte, yte = pixels(test_x, device), torch.from_numpy(test_y).to(device)
    model = build(a.seed).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=a.lr
    )
    steps_per_epoch = len(xtr) // a.batch_size
    total = a.epochs * steps_per_epoch
    warmup = min(total // 10, 5 * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + np.cos(np.pi * (s - warmup) / (total - warmup)))
    )
    g = torch.Generator().manual_seed(a.seed)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    start = time.time()
    for epoch in range(a.epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=g).to(device)
        seen, running = 0, 0.0
        for s in range(steps_per_epoch):
            idx = order[s * a.batch_size : (s + 1) * a.batch_size]
            loss = loss_fn(model(pixel_values=augment(xtr[idx], g)).logits, ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) if s % 50 == 0 else 0.0
            seen += 1
        print(
            f"epoch {epoch + 1}/{a.epochs}  loss {running / max(1, (seen + 49) // 50):.4f}  "
            f"{time.time() - start:.0f} s",
            flush=True,
        )
    seconds = time.time() - start
    acc = accuracy(model, xte, yte)
    print(f"test accuracy {acc:.4f} after {seconds:.0f} s on {a.device}", flush=True)
    model = model.to("cpu").eval()
    cpu_acc = accuracy(model, xte.cpu(), yte.cpu())
    tmp = a.out.with_name(a.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    ViTImageProcessor(
        do_resize=False,
        size={"height": 28, "width": 28},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[MEAN],
        image_std=[STD],
    ).save_pretrained(tmp)
    recipe = {
        "data": "Fashion-MNIST (Debian package dataset-fashion-mnist): 60,000 train, 10,000 test images",
        "script": "tools/train_vit.py",
        "args": {k: str(v) for k, v in vars(a).items()},
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "train_seconds": round(seconds, 1),
        "test_accuracy": acc,
        "test_accuracy_cpu_float32": cpu_acc,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    (tmp / "recipe.json").write_text(json.dumps(recipe, indent=2))
    if a.out.exists():
        shutil.rmtree(a.out)
    tmp.replace(a.out)
    print(json.dumps(recipe, indent=2))


if __name__ == "__main__":
    main()
