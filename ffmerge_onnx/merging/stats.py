"""Streaming, additive first and second moments in float64.

`Moments` holds, for named feature streams seen on the same tokens, the count, per-feature
sums and sums of squares, and the cross outer-product sum for each requested pair. Updates
add, so the result does not depend on how the data was batched, and two accumulators from
different processes can be summed with `+`.

Memory: 8 * (sum over pairs of d_a * d_b) bytes plus O(sum of d). For GPT-2-small
(d_ff 3072) one pair is 75.5 MB; for a 7B-class shape (d_ff 11008) one pair is 0.97 GB.
"""

from __future__ import annotations

import numpy as np
import torch

CORR_EPS = 1e-7


class Moments:
    def __init__(self, dims: dict[str, int], pairs: list[tuple[str, str]]):
        self.dims = dict(dims)
        self.pairs = list(dict.fromkeys(pairs))
        self.n = 0
        self.sum = {k: torch.zeros(d, dtype=torch.float64) for k, d in self.dims.items()}
        self.sumsq = {k: torch.zeros(d, dtype=torch.float64) for k, d in self.dims.items()}
        self.cross = {(a, b): torch.zeros(self.dims[a], self.dims[b], dtype=torch.float64) for a, b in self.pairs}

    @staticmethod
    def nbytes_for(dims: dict[str, int], pairs: list[tuple[str, str]]) -> int:
        return 8 * sum(dims[a] * dims[b] for a, b in pairs) + 16 * sum(dims.values())

    def update(self, feats: dict[str, torch.Tensor]) -> None:
        """Add a block of tokens: each value is [tokens, dim], same tokens for every stream."""
        counts = {f.shape[0] for f in feats.values()}
        if len(counts) != 1:
            raise ValueError(f"streams saw different token counts: {counts}")
        x64 = {k: feats[k].detach().to(torch.float64) for k in self.dims}
        self.n += counts.pop()
        for k, x in x64.items():
            self.sum[k] += x.sum(0)
            self.sumsq[k] += (x * x).sum(0)
        for a, b in self.pairs:
            self.cross[(a, b)].addmm_(x64[a].T, x64[b])  # in place: no d_a x d_b temporary

    def __add__(self, other: Moments) -> Moments:
        if self.dims != other.dims or self.pairs != other.pairs:
            raise ValueError("can only add Moments over the same streams and pairs")
        out = Moments(self.dims, self.pairs)
        out.n = self.n + other.n
        for k in self.dims:
            out.sum[k] = self.sum[k] + other.sum[k]
            out.sumsq[k] = self.sumsq[k] + other.sumsq[k]
        for p in self.pairs:
            out.cross[p] = self.cross[p] + other.cross[p]
        return out

    # -- derived quantities -------------------------------------------------------------
    def mean(self, k: str) -> torch.Tensor:
        return self.sum[k] / self.n

    def var(self, k: str) -> torch.Tensor:
        return (self.sumsq[k] / self.n - self.mean(k) ** 2).clamp_min(0.0)

    def covariance(self, a: str, b: str) -> torch.Tensor:
        return self.cross[(a, b)] / self.n - torch.outer(self.mean(a), self.mean(b))

    def correlation(self, a: str, b: str, eps: float = CORR_EPS, release: bool = False) -> np.ndarray:
        """Pearson correlation [d_a, d_b]; denominators clipped at eps. `release`: computed in the pair's
        cross-sum buffer, which the Moments then no longer hold (one d_a x d_b temporary instead of five)."""
        if release:
            self.pairs.remove((a, b))
            out = self.cross.pop((a, b))
        else:
            out = self.cross[(a, b)].clone()
        out.div_(self.n).addr_(self.mean(a), self.mean(b), alpha=-1.0)  # the covariance
        out.div_(torch.outer(self.var(a).sqrt(), self.var(b).sqrt()).clamp_min_(eps))
        return out.numpy()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors, e.g. for safetensors, to sum across processes."""
        out = {"n": torch.tensor([self.n], dtype=torch.int64)}
        for k in self.dims:
            out[f"sum/{k}"] = self.sum[k]
            out[f"sumsq/{k}"] = self.sumsq[k]
        for a, b in self.pairs:
            out[f"cross/{a}|{b}"] = self.cross[(a, b)]
        return out
