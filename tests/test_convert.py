"""regops.convert: swapping torch's Dropout and BatchNorm modules for regops'
in place (parameters, buffers and flags handed over), fusing BatchNorm + ReLU
inside Sequential containers, on nested and shared modules."""

import pytest
import torch
from torch import nn

import regops


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU())
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(self.body(x))


class Net(nn.Module):
    """Nested containers: a custom module in a ModuleList, a ModuleDict, all three BatchNorms."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv3d(2, 4, 1), nn.BatchNorm3d(4), nn.ReLU(inplace=True))
        self.blocks = nn.ModuleList([Block(4), Block(4)])
        self.head = nn.ModuleDict({"norm": nn.BatchNorm1d(4), "drop": nn.Dropout(0.5), "fc": nn.Linear(4, 3)})
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.stem(x).mean(2)
        for block in self.blocks:
            x = block(x)
        x = self.act(self.head["norm"](x.mean((2, 3))))
        return self.head["fc"](self.head["drop"](x))


def trained_net(dtype=torch.float32) -> Net:
    """A Net whose running statistics and affine parameters are not at their initial values."""
    torch.manual_seed(0)
    net = Net().to(dtype)
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(5, 2, 3, 6, 6, dtype=dtype))
    return net.eval()


def test_convert_dropout_keeps_state_and_flags():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.25, inplace=True), nn.Sequential(nn.Dropout(0.75)))
    model[2].eval()
    converted = regops.convert(model)
    assert converted is model
    assert type(model[1]) is regops.nn.Dropout and (model[1].p, model[1].inplace, model[1].training) == (0.25, True, True)
    assert type(model[2][0]) is regops.nn.Dropout and (model[2][0].p, model[2][0].training) == (0.75, False)
    # Not converted: the channel-wise variants and user subclasses compute something else.
    class MyDropout(nn.Dropout):
        pass
    others = nn.Sequential(nn.Dropout2d(0.5), MyDropout(0.5), nn.AlphaDropout(0.5))
    regops.convert(others)
    assert [type(m) for m in others] == [nn.Dropout2d, MyDropout, nn.AlphaDropout]
    # A module that is itself a Dropout is returned converted.
    assert type(regops.convert(nn.Dropout(0.1))) is regops.nn.Dropout


def test_convert_errors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        regops.convert("model")
    with pytest.raises(TypeError, match="fuse_bn_relu must be a bool"):
        regops.convert(nn.Linear(2, 2), fuse_bn_relu="yes")


def test_convert_dropout_trains_like_regops_dropout():
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5))
    converted = regops.convert(nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5)))
    converted.load_state_dict(model.state_dict())
    x = torch.randn(8, 16)
    torch.manual_seed(3)
    out = converted(x)
    torch.manual_seed(3)
    expected = regops.dropout(model[0](x), 0.5)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("fuse", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_convert_nested_model_eval_outputs(fuse, dtype):
    net = trained_net(dtype)
    net.blocks[1].train()  # mixed train/eval flags must survive
    reference = trained_net(dtype)
    reference.blocks[1].train()
    parameters = {name: p for name, p in net.named_parameters()}
    buffers = {name: b for name, b in net.named_buffers()}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    regops.convert(net, fuse_bn_relu=fuse)

    expected_types = {"stem.1": regops.nn.BatchNorm3d, "blocks.0.body.1": regops.nn.BatchNorm2d,
                      "blocks.1.body.1": regops.nn.BatchNorm2d, "head.norm": regops.nn.BatchNorm1d,
                      "blocks.0.drop": regops.nn.Dropout, "blocks.1.drop": regops.nn.Dropout,
                      "head.drop": regops.nn.Dropout}
    modules = dict(net.named_modules())
    for name, cls in expected_types.items():
        assert type(modules[name]) is cls, name
        assert modules[name].training == dict(reference.named_modules())[name].training, name
    # The same tensor objects: device, dtype and values kept, and the optimizer still drives them.
    assert all(p is parameters[name] for name, p in net.named_parameters())
    assert all(b is buffers[name] for name, b in net.named_buffers())
    assert optimizer.param_groups[0]["params"][0] is net.stem[0].weight

    fused = ["stem", "blocks.0.body", "blocks.1.body"]
    for name in fused:
        sequential = modules[name]
        assert (type(sequential[2]) is nn.Identity) == fuse
        assert getattr(sequential[1], "activation", None) == ("relu" if fuse else None)
    # head.norm is followed by self.act only in forward(), not in a Sequential: never fused.
    assert getattr(net.head["norm"], "activation", None) is None and type(net.act) is nn.ReLU

    net.eval(), reference.eval()
    x = torch.randn(4, 2, 3, 6, 6, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x))
    assert net.state_dict().keys() == reference.state_dict().keys()


def test_convert_fuse_bn_relu_trains_like_unfused():
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.Conv2d(5, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    fused = regops.convert(copyable(plain), fuse_bn_relu=True)
    assert [type(m) for m in fused] == [nn.Conv2d, regops.nn.BatchNorm2d, nn.Identity, nn.Conv2d,
                                        regops.nn.BatchNorm2d, nn.Identity]
    x = torch.randn(4, 3, 9, 8)
    weights = torch.randn(4, 4, 5, 4)  # a loss whose gradient BatchNorm does not cancel
    expected = plain(x)
    out = fused(x)
    torch.testing.assert_close(out, expected)
    (expected * weights).sum().backward()
    (out * weights).sum().backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * float(p.grad.abs().max()), msg=name)
    for a, b in zip(plain.buffers(), fused.buffers()):
        torch.testing.assert_close(b, a)


def copyable(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def test_convert_shared_modules():
    norm, relu = nn.BatchNorm1d(6), nn.ReLU()
    model = nn.Sequential(nn.Linear(6, 6), norm, relu, nn.Linear(6, 6), norm, relu)
    regops.convert(model, fuse_bn_relu=True)
    # One BatchNorm used twice: converted once, shared, and not fused (its second use would change).
    assert model[1] is model[4] and type(model[1]) is regops.nn.BatchNorm1d
    assert getattr(model[1], "activation", None) is None and type(model[2]) is nn.ReLU
    block = nn.Sequential(nn.BatchNorm1d(6), nn.ReLU())
    twice = nn.Sequential(block, block)
    regops.convert(twice, fuse_bn_relu=True)
    assert twice[0] is twice[1] and type(twice[0][0]) is regops.nn.BatchNorm1d and type(twice[0][1]) is nn.Identity


def test_convert_root_batch_norm_and_subclasses():
    bn = nn.BatchNorm2d(3, momentum=None, affine=False, track_running_stats=True, eps=1e-3)
    new = regops.convert(bn)
    assert type(new) is regops.nn.BatchNorm2d
    assert (new.momentum, new.affine, new.eps) == (None, False, 1e-3)
    assert new.running_mean is bn.running_mean
    lazy = nn.Sequential(nn.LazyBatchNorm2d(), nn.SyncBatchNorm(3))
    regops.convert(lazy)
    assert [type(m) for m in lazy] == [nn.LazyBatchNorm2d, nn.SyncBatchNorm]
