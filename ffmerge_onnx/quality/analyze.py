"""Layer-by-layer FF similarity: mean matched neuron correlation and linear CKA of FF outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import nn

from ..families import adapter_for
from ..merging import Calibration
from ..merging import calibration as calibrate
from ..merging.align import match
from ..progress import track


def similarity(
    model: nn.Module,
    calibration: Calibration,
    *,
    stacks: list[str] | None = None,
    progress: bool = True,
    max_stat_bytes: int = calibrate.DEFAULT_MAX_STAT_BYTES,
) -> dict:
    adapter = adapter_for(model)
    stacks = stacks or adapter.stack_names()
    pairs = []
    for s in stacks:
        n = adapter.num_layers(model, s)
        pairs += [(f"{s}.{i}.pre", f"{s}.{j}.pre") for i in range(n) for j in range(i + 1, n)]
        pairs += [(f"{s}.{i}.out", f"{s}.{j}.out") for i in range(n) for j in range(i, n)]
    moments = calibrate.collect(model, adapter, calibration, pairs, max_bytes=max_stat_bytes, progress=progress)
    result = {"model": getattr(model.config, "_name_or_path", ""), "calibration": calibration.description, "stacks": {}}
    for s in stacks:
        n = adapter.num_layers(model, s)
        corr, cka = np.eye(n), np.eye(n)
        pairs_here = [(p, q) for p in range(n) for q in range(p + 1, n)]
        for i, j in track(pairs_here, f"aligning {s}", enabled=progress):
            a, b = f"{s}.{i}.pre", f"{s}.{j}.pre"
            corr[i, j] = corr[j, i] = match(calibrate.find(moments, a, b).correlation(a, b)).score
            a, b = f"{s}.{i}.out", f"{s}.{j}.out"
            cka[i, j] = cka[j, i] = _cka(moments, a, b)
        result["stacks"][s] = {"layers": n, "matched_correlation": corr.round(6).tolist(), "cka": cka.round(6).tolist()}
    return result


def _cka(moments, a: str, b: str) -> float:
    import torch

    cab = calibrate.find(moments, a, b).covariance(a, b)
    caa = calibrate.find(moments, a, a).covariance(a, a)
    cbb = calibrate.find(moments, b, b).covariance(b, b)
    denom = torch.linalg.norm(caa) * torch.linalg.norm(cbb)
    return float((cab * cab).sum() / denom) if denom > 0 else 0.0


def write(result: dict, folder: Path) -> list[Path]:
    """similarity.json and one heatmap PNG per stack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    paths = [folder / "similarity.json"]
    paths[0].write_text(json.dumps(result, indent=2))
    for stack, data in result["stacks"].items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
        for ax, key, title in (
            (axes[0], "matched_correlation", "mean matched correlation (FF pre-activations)"),
            (axes[1], "cka", "linear CKA (FF outputs)"),
        ):
            m = np.array(data[key])
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            if len(m) <= 16:
                for i in range(len(m)):
                    for j in range(len(m)):
                        ax.text(
                            j,
                            i,
                            f"{m[i, j]:.2f}",
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if m[i, j] < 0.6 else "black",
                        )
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"{result.get('model', '')} — {stack} FF similarity")
        fig.tight_layout()
        path = folder / f"similarity_{stack}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
