"""P-part models: encoder/decoder modules, fool indices, and (end to end) convert -> train -> export -> serve."""

import pytest
import torch
from torch import nn

from cvconvert.complex.functional import transform
from cvconvert.errors import CvError
from cvconvert.parts import PartsDecoder, PartsEncoder, check_parts, fool_indices, random_key


@pytest.mark.parametrize("parts", [3, 4])
def test_parts_encoder_decoder_roundtrip(parts):
    g = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU())
    enc, dec = PartsEncoder(g, parts), PartsDecoder(nn.Flatten())
    image, fool = torch.rand(5, 1, 6, 6), torch.rand(5, parts - 1, 1, 6, 6)
    key = random_key(5, parts)
    x = enc(image, fool, key)
    assert x.shape == (5, parts, 3, 6, 6)
    f = torch.stack([g(image)] + [g(fool[:, i]) for i in range(parts - 1)], 1)
    torch.testing.assert_close(x, transform(f, key), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dec(x, key), g(image).flatten(1), atol=1e-5, rtol=1e-5)


def test_fool_indices_distinct_and_never_self():
    idx = fool_indices(6, 3)
    assert idx.shape == (6, 3)
    assert all(len(set(row.tolist())) == 3 and i not in row.tolist() for i, row in enumerate(idx))
    law = torch.zeros(6, 6)
    law[:, 0], law[:, 1] = 1.0, 1.0
    idx = fool_indices(6, 1, law)
    assert all(int(j) in (0, 1) and int(j) != i for i, j in enumerate(idx[:, 0]) if i > 1)


@pytest.mark.parametrize("bad", [1, 5, "x", 2.5])
def test_check_parts_refuses(bad):
    with pytest.raises(CvError):
        check_parts(bad)
