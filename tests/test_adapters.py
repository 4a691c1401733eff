import pytest
import tiny_models as tm

from ffmerge_onnx import adapter_for, registry
from ffmerge_onnx.errors import UnsupportedArchitectureError


def test_every_registered_family_has_a_tiny_model():
    covered = {adapter for adapter, _, _ in tm.TINY.values()}
    missing = set(registry()) - covered
    assert not missing, f"families without a tiny test model: {missing}"


@pytest.mark.parametrize("model_type", list(tm.TINY))
def test_tiny_model_resolves(model_type):
    model = tm.build(model_type)
    adapter = adapter_for(model)
    assert adapter.name == tm.TINY[model_type][0]
    for stack in adapter.stack_names():
        layers = adapter.layers(model, stack)
        assert len(layers) == 4
        params = adapter.ff_params(layers[0])
        assert {r.name for r in adapter.roles()} == set(params)
        assert adapter.ff_dim(layers[0]) == 48


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(UnsupportedArchitectureError) as e:
        adapter_for("t5")
    assert "gpt2" in str(e.value) and "llama" in str(e.value) and "architectures" in str(e.value)
