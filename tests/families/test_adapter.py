from pathlib import Path

import pytest
import tiny_models as tm
import torch

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
    assert "gpt2" in str(e.value) and "llama" in str(e.value) and "--adapter FILE" in str(e.value)


@pytest.mark.parametrize("model_type", list(tm.TINY))
def test_config_keys_agree_with_the_loaded_modules(model_type):
    """The sizes the adapter reads from the config are the ones the weights have."""
    model = tm.build(model_type)
    adapter = adapter_for(model)
    config = model.config
    for stack in adapter.stack_names():
        layer = adapter.layers(model, stack)[0]
        assert adapter.config_layers(config, stack) == adapter.num_layers(model, stack)
        assert adapter.d_ff(config, stack) == adapter.ff_dim(layer)
        assert adapter.d_model(config) == adapter.model_dim(layer)
        kv_heads, head_dim = adapter.attention(config, stack)
        assert kv_heads >= 1 and head_dim >= 1 and adapter.activation(config)


def test_family_quirks_are_data():
    """RoBERTa reserves two positions; DeiT adds a distillation token to ViT's CLS token."""
    roberta, bert = tm.build("roberta"), tm.build("bert")
    assert adapter_for(roberta).max_positions(roberta.config) == roberta.config.max_position_embeddings - 2
    assert adapter_for(bert).max_positions(bert.config) == bert.config.max_position_embeddings
    vit, deit = tm.build("vit"), tm.build("deit")
    patches = (16 // 4) ** 2
    assert adapter_for(vit).image_tokens(vit.config) == patches + 1
    assert adapter_for(deit).image_tokens(deit.config) == patches + 2
    with torch.no_grad():  # the model agrees: its hidden states hold that many tokens
        hidden = deit(pixel_values=torch.randn(1, 3, 16, 16)).last_hidden_state
    assert hidden.shape[1] == patches + 2


def test_gpt2_ff_width_defaults_to_four_times_the_model_width():
    import transformers as T

    config = T.GPT2Config(n_embd=32, n_inner=None)
    assert adapter_for(config).d_ff(config) == 128


def test_a_fused_adapter_file_is_checked_and_read(tmp_path):
    import json

    from ffmerge_onnx.errors import InputError
    from ffmerge_onnx.families.adapter import read_adapter

    data = json.loads((Path(__file__).parents[2] / "ffmerge_onnx/families/llama.json").read_text())
    data.update(name="my-phi3", model_types=["phi3"], fused=["gate", "in"])
    data["ff"] = {"in": ["mlp.gate_up_proj"], "gate": None, "out": ["mlp.down_proj"]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    adapter = read_adapter(tmp_path / "a.json")
    assert adapter.fused == ("gate", "in") and [(r.name, r.blocks) for r in adapter.roles()] == [
        ("fc_in.weight", 2),
        ("fc_out.weight", 1),
    ]
    layer = adapter.layers(tm.build("phi3"), "decoder")[0]
    assert adapter.ff_dim(layer) == 48 and adapter.up_block() == 1
    for bad in (["gate", "up"], "gate,in", ["in"]):
        (tmp_path / "b.json").write_text(json.dumps(dict(data, fused=bad)))
        with pytest.raises(InputError, match="fused must be the order"):
            read_adapter(tmp_path / "b.json")
    data["ff"]["gate"] = ["mlp.gate_proj"]  # a fused matrix and a separate gate contradict each other
    (tmp_path / "c.json").write_text(json.dumps(data))
    with pytest.raises(InputError, match="fused must be the order"):
        read_adapter(tmp_path / "c.json")
