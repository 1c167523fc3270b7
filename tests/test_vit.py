"""ViT validation (benchmarks/vit.py) on a tiny model: the torch, converted
and fused implementations share a state_dict, compute the same eval
outputs, and train in lockstep with the same masks; with other masks the
check fails."""

import os
import sys

import pytest
import torch

import regops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import vit  # noqa: E402


@pytest.fixture(scope="module")
def tensors():
    """A few hundred MNIST-shaped images (the check needs no real digits)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(192, 1, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (192,), generator=generator)
    return {"train_x": images[:128], "train_y": labels[:128], "test_x": images[128:], "test_y": labels[128:]}


def test_implementations_share_state_and_eval_outputs():
    config = vit.Config.small()
    initial = vit.initial_model(config, 10, torch.device("cpu"), 0)
    models = {name: vit.build(name, initial, config)[0] for name in vit.IMPLEMENTATIONS}
    assert type(models["converted"].blocks[0].norm1) is regops.nn.LayerNorm
    assert type(models["converted"].blocks[1].drop_path2) is regops.nn.DropPath
    assert type(models["converted"].blocks[0].mlp.drop) is regops.nn.Dropout
    assert type(models["fused"].blocks[1].norm2) is regops.nn.DropoutAddLayerNorm
    assert type(models["fused"].blocks[0].mlp.drop) is regops.nn.Dropout
    keys = initial.state_dict().keys()
    for name, model in models.items():
        assert model.state_dict().keys() == keys, name
    # The fused model's state loads into torch's and back.
    torch_model = vit.ViT(config)
    torch_model.load_state_dict(models["fused"].state_dict())
    models["fused"].load_state_dict(initial.state_dict())
    images = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        expected = initial.eval()(images)
        for name, model in models.items():
            torch.testing.assert_close(model.eval()(images), expected, rtol=1e-5, atol=1e-5, msg=name)


def test_torch_twin_draws_the_regops_masks():
    x = torch.randn(6, 5, 7)
    for layout in (x, x.transpose(1, 2)):  # contiguous, and dense in another memory order
        torch.manual_seed(4)
        expected = regops.nn.Dropout(0.3)(layout)
        torch.manual_seed(4)
        torch.testing.assert_close(vit.TorchDropout(0.3)(layout), expected)
    torch.manual_seed(5)
    expected = regops.nn.DropPath(0.5)(x)
    torch.manual_seed(5)
    torch.testing.assert_close(vit.DropPath(0.5, regops_rule=True)(x), expected)
    assert (expected.flatten(1) == 0).all(1).any() and (expected.flatten(1) != 0).any(1).any()


def test_lockstep_parity(tensors):
    check = vit.parity(vit.Config.small(), tensors, 10, steps=4, seed=0, device=torch.device("cpu"))
    assert check["steps"] == 4
    for name in ("converted", "fused"):
        result = check["implementations"][name]
        assert result["max_relative_loss_diff"] <= vit.PARITY_LOSS_RTOL, (name, result["max_relative_loss_diff"])
        assert result["max_relative_update_diff"] <= vit.PARITY_UPDATE_RTOL, (name, result["max_relative_update_diff"])
        assert result["passed"]


def test_lockstep_parity_detects_other_masks(tensors, monkeypatch):
    """The torch run with torch's own dropout masks must fail the check."""
    build = vit.build

    def own_masks(implementation, initial, config, *, parity=False):
        return build(implementation, initial, config, parity=False)

    monkeypatch.setattr(vit, "build", own_masks)
    check = vit.parity(vit.Config.small(), tensors, 10, steps=2, seed=0, device=torch.device("cpu"))
    for name in ("converted", "fused"):
        result = check["implementations"][name]
        assert result["max_relative_loss_diff"] > 1e-3 and not result["passed"], name


def test_short_training_run(tensors):
    results = vit.run(vit.Config.small(), tensors, 10, epochs=1, seed=0)
    for name in vit.IMPLEMENTATIONS:
        assert len(results[name]["losses"]) == 2
        assert 0.0 <= results[name]["test_accuracy"][-1] <= 1.0
        assert results[name]["memory_mib"] > 0

