"""The converter: every zoo processing module is equivariant, weights are carried, baselines are exact."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from cvconvert import zoo
from cvconvert.complex import CConv2d, CDelta, rotate
from cvconvert.convert import LEAF_MODULES
from cvconvert.complex.functional import rotation_key
from cvconvert.complex.layers import max_pool_gaps
from cvconvert.errors import ConversionError, CvError
from cvconvert.export import compare_outside_ties
from cvconvert.model import ModelSpec, build_model
from cvconvert.split import split_model

ZOO_SPLITS = [(name, split) for name in zoo.list_models() for split in zoo.get_entry(name).splits]


def spec_for(arch, split="", variant="complex", shape=(3, 32, 32), classes=10):
    entry = zoo.get_entry(arch)
    _, (enc, dec) = zoo.resolve_split(entry, split or None)
    mode, c = entry.activation
    return ModelSpec(arch, enc, dec, variant, classes, shape, [0.5] * shape[0], [0.5] * shape[0], mode, c)


@pytest.mark.parametrize("arch,split", ZOO_SPLITS, ids=[f"{a}-{s}" for a, s in ZOO_SPLITS])
def test_zoo_processing_is_rotation_equivariant(arch, split):
    model = build_model(spec_for(arch, split))
    x = torch.randn((8, 2) + model.feature_shape)
    t = torch.rand(8) * 2 * math.pi
    for train in (False, True):
        model.processing.train(train)
        torch.manual_seed(7)
        with max_pool_gaps(model.processing) as pools:
            h = model.processing(x)
        torch.manual_seed(7)  # dropout draws the same mask for both calls
        h_rot = model.processing(rotate(x, t))
        # relative to the peak, so atol 1e-4 x peak; a sample at a max-modulus tie may flip (export.TIE_GAP)
        peak = float(h.abs().max())
        compare_outside_ties(f"{arch}-{split} train={train}", (h_rot / peak).detach().numpy(),
                             (rotate(h, t) / peak).detach().numpy(), pools.gaps, 1e-4, 0.0)
    # The decoded prediction does not depend on the key: Re[Phi(e^{it}(a+ib)) e^{-it}] is the same for any t,
    # and (Q^T Phi(Q [a; b]))[0] for any orthogonal Q (a reflection too)
    model.eval()
    img = torch.rand(2, 3, 32, 32)
    reflection = torch.tensor([[[1.0, 0.0], [0.0, -1.0]], [[0.0, 1.0], [1.0, 0.0]]])
    with torch.no_grad():
        l1 = model(img, img.flip(0)[:, None], rotation_key(torch.tensor([0.3, 4.0])))
        l2 = model(img, img.flip(0)[:, None], rotation_key(torch.tensor([2.0, 1.1])))
        l3 = model(img, img.flip(0)[:, None], reflection)
    torch.testing.assert_close(l1, l2, atol=1e-3 * l1.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(l1, l3, atol=1e-3 * l1.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("arch", ["lenet", "resnet20", "alexnet"])
def test_original_variant_reproduces_source_logits(arch):
    real = zoo.create_model(arch, 10, (3, 32, 32)).eval()
    for m in real.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    spec = spec_for(arch, variant="original")
    model = build_model(spec, real).eval()
    img = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = real(model.encoder.normalize(img))
        parts = model.decoder(model.processing(model.encoder(img)))
    assert torch.equal(parts, expected)


def test_complex_processing_carries_source_conv_weights():
    real = zoo.create_model("resnet20", 10, (3, 32, 32))
    model = build_model(spec_for("resnet20", "alpha"), real)
    src = dict(real.named_modules())
    convs = [(n, m) for n, m in model.processing.named_modules() if isinstance(m, CConv2d)]
    assert len(convs) == 2 * 4  # layer2 (3 blocks) + layer3.0, two convs each
    for name, m in convs:
        assert torch.equal(m.weight, src[name].weight), name
    # The encoder's first conv is the source's too.
    assert torch.equal(model.encoder.features.body.conv1.weight, real.conv1.weight)


def test_lenet_final_bias_moves_to_decoder():
    real = zoo.create_model("lenet", 10, (3, 32, 32))
    model = build_model(spec_for("lenet"), real)
    assert torch.equal(model.decoder.decoder.bias, real.fc3.bias)


@pytest.mark.parametrize("arch,split", [("resnet18", "layer1:layer4"), ("vgg11", "features.5:classifier")])
def test_torchvision_models_convert(arch, split):
    entry = zoo.get_entry(arch)
    _, (enc, dec) = zoo.resolve_split(entry, split)
    model = build_model(ModelSpec(arch, enc, dec, "complex", 10, (3, 32, 32), [0.5] * 3, [0.5] * 3))
    assert any(isinstance(m, CDelta) for m in model.processing.modules())
    x = torch.randn((2, 2) + model.feature_shape)
    t = torch.rand(2) * 6
    model.eval()
    h = model.processing(x)
    assert (model.processing(rotate(x, t)) - rotate(h, t)).abs().max() / h.abs().max() < 1e-4


def test_split_refuses_skip_crossing_and_empty_parts():
    real = zoo.create_model("resnet20", 10, (3, 32, 32))
    with pytest.raises(CvError, match="skip connection crosses"):
        split_model(real, "layer1.0.conv1", "layer3", LEAF_MODULES)
    with pytest.raises(CvError, match="processing module empty"):
        split_model(real, "layer1", "layer2", LEAF_MODULES)
    with pytest.raises(CvError, match="does not come after"):
        split_model(real, "layer2", "layer1", LEAF_MODULES)
    with pytest.raises(CvError, match="no node named"):
        split_model(real, "layer9", None, LEAF_MODULES)


def test_converter_refuses_non_equivariant_layers_by_name():
    real = torchvision.models.mobilenet_v2(num_classes=10)
    spec = ModelSpec("mobilenet_v2", "features.1", "classifier", "complex", 10, (3, 32, 32), [0.5] * 3, [0.5] * 3)
    with pytest.raises(ConversionError, match=r"features\.2\.conv\.0\.2 \(ReLU6\)"):
        build_model(spec, real)

    class AddsConstant(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.conv2(self.conv1(x) + 1.0)

    with pytest.raises(ConversionError, match="adds a constant"):
        build_model(dataclasses.replace(spec, arch="x", encoder_end="conv1", decoder_start=None), AddsConstant())


def test_zoo_registers_its_own_layers_and_the_converter_imports_no_zoo():
    """The converter knows no model family: importing it loads no zoo module, and the zoo's option-A
    shortcut maps to its complex twin (traced as one leaf) because the zoo registered it."""
    code = ("import sys, cvconvert.convert, cvconvert.complex; "
            "print(sorted(m for m in sys.modules if m.startswith(('zoo', 'cvconvert.zoo'))))")
    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo).stdout
    assert out.strip() == "[]"
    from cvconvert.zoo.resnet_cifar import CShortcutA
    from cvconvert.convert import DEFAULT_MAPPING, register_complex, swap_module

    assert DEFAULT_MAPPING[zoo.ShortcutA] is CShortcutA and zoo.ShortcutA in LEAF_MODULES
    assert isinstance(swap_module(zoo.ShortcutA(4), "layer2.0.shortcut"), CShortcutA)

    class Twice(nn.Module):  # a new linear layer: one registration makes it convertible
        def forward(self, x):
            return 2 * x

    class CTwice(Twice):
        @classmethod
        def from_real(cls, mod, **_):
            return cls()

    with pytest.raises(ConversionError, match="Twice"):
        swap_module(Twice(), "scale")
    register_complex(Twice, CTwice, leaf=True)
    try:
        assert isinstance(swap_module(Twice(), "scale"), CTwice) and Twice in LEAF_MODULES
    finally:
        DEFAULT_MAPPING.pop(Twice)
        LEAF_MODULES.remove(Twice)
