"""Merge methods (average, regmean, refit): exact on planted redundancy, equal to a direct
float64 least-squares solution on random data."""

from __future__ import annotations

import copy

import pytest
import tiny_models as tm
import torch
from tiny_models import plant

from ffmerge_onnx import Window, adapter_for, merge
from ffmerge_onnx.merging.methods.common import RIDGE, Capture

FAMILIES = ["gpt2", "llama", "bert", pytest.param("phi3", marks=pytest.mark.slow)]


@pytest.mark.parametrize("method", ["average", "regmean", "refit", "sequential"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_method_returns_the_planted_ff(model_type, method):
    model = tm.build(model_type, gentle=True)
    adapter = adapter_for(model)
    stack = adapter.stack_names()[-1]
    plant(model, stack, 1, 2, 0.0)
    planted = {k: v.detach().clone() for k, v in adapter.ff_params(adapter.layers(model, stack)[1]).items()}
    result = merge(model, [Window(stack, 1, 2)], calibration=tm.calibration(model, n=64), method=method, progress=False)
    got = adapter.ff_params(adapter.layers(model, stack)[1])
    for name, want in planted.items():
        assert torch.allclose(got[name], want, atol=2e-4, rtol=1e-3), (name, float((got[name] - want).abs().max()))
    assert result.manifest.windows[0].method == method


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_regmean_and_refit_equal_direct_least_squares(model_type):
    """Re-derive both solutions from the captured activations with torch.linalg.lstsq in float64."""
    base = tm.build(model_type, gentle=True)
    adapter = adapter_for(base)
    stack = adapter.stack_names()[-1]
    cal = tm.calibration(base, n=64)
    layers = [1, 2]
    cap = Capture(base, adapter, stack, layers, cal, adapter.bias)
    lin = (lambda t: t) if adapter.layout == "linear" else (lambda t: t.T)

    def rows(i, x):  # real-token rows of layer i's FF input, + a ones column when the FF has biases
        r = torch.cat([x.reshape(m.shape[0], -1, x.shape[-1])[m] for x, m in zip(cap.x[i], cap.masks)]).double()
        return torch.cat([r, torch.ones(len(r), 1, dtype=r.dtype)], 1) if adapter.bias else r

    def ridge_lstsq(a, b):  # argmin |a w - b|^2 + lam |w|^2, lam as the implementation scales it
        lam = RIDGE * float((a.T @ a).diagonal().mean() / len(layers)) * len(layers)
        big_a = torch.cat([a, lam**0.5 * torch.eye(a.shape[1], dtype=a.dtype)])
        big_b = torch.cat([b, torch.zeros(a.shape[1], b.shape[1], dtype=b.dtype)])
        return torch.linalg.lstsq(big_a, big_b, driver="gelsd").solution

    params = [adapter.ff_params(adapter.layers(base, stack)[i]) for i in layers]

    def aug(p, name):
        w = lin(p[f"{name}.weight"].detach()).double()
        return torch.cat([w, p[f"{name}.bias"].detach().double()[:, None]], 1) if adapter.bias else w

    # regmean of the input projection: the W minimising sum_l |X_l W^T - X_l W_l^T|^2
    a = torch.cat([rows(i, None) for i in layers])
    b = torch.cat([rows(i, None) @ aug(p, "fc_in").T for i, p in zip(layers, params)])
    want_in = ridge_lstsq(a, b).T
    # refit of the output projection from merged (averaged) inputs
    m_rg = merge(
        copy.deepcopy(base), [Window(stack, 1, 2)], calibration=cal, align="none", method="regmean", progress=False
    ).model
    got = adapter.ff_params(adapter.layers(m_rg, stack)[1])
    got_in = aug(got, "fc_in")
    assert torch.allclose(got_in, want_in.to(got_in.dtype), atol=1e-4, rtol=1e-3), float((got_in - want_in).abs().max())

    m_rf = merge(
        copy.deepcopy(base), [Window(stack, 1, 2)], calibration=cal, align="none", method="refit", progress=False
    ).model
    merged = adapter.ff_params(adapter.layers(m_rf, stack)[1])
    # hidden rows of the merged input projections on each layer's own inputs, through the model's FF code
    clone = copy.deepcopy(base)
    hidden, targets = [], []
    for i in layers:
        layer = adapter.layers(clone, stack)[i]
        for role in adapter.roles():
            if role.projection != "out":
                setattr(
                    adapter.projection(layer, role.projection),
                    role.attr,
                    torch.nn.Parameter(merged[role.name].detach().clone()),
                )
        caught = []
        h = adapter.projection(layer, "out").register_forward_pre_hook(
            lambda _m, args, caught=caught: caught.append(args[0])
        )
        for x, m in zip(cap.x[i], cap.masks):
            with torch.no_grad():
                _call_ff(adapter, layer, x)
        h.remove()
        r = torch.cat([c.reshape(m.shape[0], -1, c.shape[-1])[m] for c, m in zip(caught, cap.masks)]).double()
        hidden.append(torch.cat([r, torch.ones(len(r), 1, dtype=r.dtype)], 1) if adapter.bias else r)
        targets.append(torch.cat(cap.y[i]).double())
    want_out = ridge_lstsq(torch.cat(hidden), torch.cat(targets)).T
    got_out = aug(merged, "fc_out")
    assert torch.allclose(got_out, want_out.to(got_out.dtype), atol=1e-4, rtol=1e-3), float(
        (got_out - want_out).abs().max()
    )


def _call_ff(adapter, layer, x):
    """Run a layer's FF block on x (the input of its first projection)."""
    mlp = getattr(layer, "mlp", None)
    if mlp is not None:
        return mlp(x)
    raise NotImplementedError


def test_aligned_layers_are_read_lazily_from_the_weights_as_they_were_and_averaged_in_float64():
    from torch import nn

    model = tm.build("llama")
    adapter = adapter_for(model)
    layers = adapter.layers(model, "decoder")
    fit = tm.shuffled_window(model, "decoder")
    aligned, perms = fit.aligned, fit.perms
    before = [aligned[j] for j in range(3)]
    for role in adapter.roles():  # a method swapping other tensors in (as `swapped` does) changes nothing read
        module = adapter.projection(layers[2], role.projection)
        setattr(module, role.attr, nn.Parameter(torch.zeros_like(getattr(module, role.attr))))
    for j, want in enumerate(before):
        got = aligned[j]
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert all(got[k].data_ptr() != want[k].data_ptr() for k in want)  # a fresh copy each read
    role = next(r for r in adapter.roles() if r.hidden_axis is not None)
    original = adapter.ff_params(layers[1])[role.name].detach()
    assert torch.equal(before[0][role.name], original.index_select(role.hidden_axis, role.index(perms[0])))
    mean = fit.average()
    for name in before[0]:
        want = torch.stack([b[name].double() for b in before]).mean(0).float()
        assert mean[name].dtype == before[0][name].dtype
        torch.testing.assert_close(mean[name], want, rtol=2e-7, atol=1e-9)  # float64 sums, rounded once
