"""`regmean`: per projection, W = (sum_l W_l G_l)(sum_l G_l + ridge)^-1 with G_l the Gram matrix of
that projection's inputs in layer l (bias folded in as a constant input)."""

from __future__ import annotations

import torch

from .common import RIDGE, MergeMethod, WindowFit, augment, linear, solve, store


def regmean(fit: WindowFit, ridge: float = RIDGE) -> dict[str, torch.Tensor]:
    adapter, bias, layers = fit.adapter, fit.adapter.bias, fit.layers
    cap = fit.capture()
    out = fit.average()
    x_gram = {}
    for i in layers:
        r = cap.input_rows(i, bias)
        x_gram[i] = r.T @ r
    for name in ["fc_in"] + (["gate"] if adapter.gated else []):
        ws = [augment(linear(t[f"{name}.weight"], adapter).double(), t.get(f"{name}.bias")) for t in fit.aligned]
        num = sum(w @ x_gram[i] for w, i in zip(ws, layers))
        store(out, name, solve(sum(x_gram.values()), num.T, ridge).T, bias, adapter)
    grams = []
    for i, p in zip(layers, fit.perms):
        idx = torch.cat([p, torch.tensor([len(p)])]) if bias else p
        grams.append(cap.h_gram[i][idx][:, idx])  # into anchor order
    ws = [augment(linear(t["fc_out.weight"], adapter).double(), t.get("fc_out.bias")) for t in fit.aligned]
    num = sum(w @ g for w, g in zip(ws, grams))
    store(out, "fc_out", solve(sum(grams), num.T, ridge).T, bias, adapter)
    return out


REGMEAN = MergeMethod(
    "regmean",
    "per projection, the weights that best reproduce every layer's projection on its own inputs (Gram-weighted mean)",
    regmean,
    params={"ridge": RIDGE},
)
