import numpy as np
import torch

from ffmerge_onnx.merging.stats import Moments


def _direct(x, y):
    x, y = x.double().numpy(), y.double().numpy()
    cov = (x - x.mean(0)).T @ (y - y.mean(0)) / len(x)
    return cov / np.outer(x.std(0), y.std(0))


def test_streaming_equals_direct_float64_for_any_split():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 7, generator=g) * 3 + 1
    y = x[:, [3, 1, 0, 6, 5, 4, 2]] + 0.1 * torch.randn(301, 7, generator=g)
    dims, pairs = {"a": 7, "b": 7}, [("a", "b")]
    results = []
    for splits in ([301], [1, 300], [100, 100, 101], [7] * 43):
        m, start = Moments(dims, pairs), 0
        for n in splits:
            m.update({"a": x[start : start + n], "b": y[start : start + n]})
            start += n
        results.append(m.correlation("a", "b"))
    direct = _direct(x, y)
    for r in results:
        np.testing.assert_allclose(r, direct, rtol=1e-10, atol=1e-12)


def test_moments_add_across_processes():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 4, generator=g), torch.randn(50, 5, generator=g)
    whole, a, b = (Moments({"x": 4, "y": 5}, [("x", "y")]) for _ in range(3))
    whole.update({"x": x, "y": y})
    a.update({"x": x[:20], "y": y[:20]})
    b.update({"x": x[20:], "y": y[20:]})
    both = a + b
    assert both.n == 50
    torch.testing.assert_close(both.cross[("x", "y")], whole.cross[("x", "y")], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both.covariance("x", "y"), whole.covariance("x", "y"), rtol=1e-10, atol=1e-12)


def test_constant_feature_does_not_divide_by_zero():
    m = Moments({"a": 2, "b": 2}, [("a", "b")])
    m.update({"a": torch.tensor([[1.0, 0.0], [1.0, 1.0]]), "b": torch.tensor([[0.0, 2.0], [1.0, 2.0]])})
    c = m.correlation("a", "b")
    assert np.isfinite(c).all() and c[0, 0] == 0.0


def test_released_correlation_is_computed_in_the_cross_sum_buffer_with_the_same_values():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(80, 6, generator=g)
    y = x[:, [2, 0, 1, 5, 3, 4]] + 0.3 * torch.randn(80, 6, generator=g)
    m = Moments({"a": 6, "b": 6}, [("a", "b")])
    m.update({"a": x, "b": y})
    kept = m.correlation("a", "b")
    buffer = m.cross[("a", "b")]
    released = m.correlation("a", "b", release=True)
    assert released.ctypes.data == buffer.data_ptr()  # no new d_a x d_b matrix
    assert ("a", "b") not in m.cross and m.pairs == []
    np.testing.assert_allclose(released, kept, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(released, _direct(x, y), rtol=1e-10, atol=1e-12)
