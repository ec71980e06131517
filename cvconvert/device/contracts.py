"""The ONNX graphs of a model dir as data: names, shapes, example inputs, and how x is formed.

numpy only, never torch: the device runtime imports this module.

Graphs of a keyed (complex) model with P parts, P >= 2 (float32, batch axis symbolic "N", opset >= 17):

    encoder     image [N,C,H,W], fool [N,P-1,C,H,W], key [N,P,P]  ->  x [N,P,C',H',W']   x = key @ [a; b_1; ...]
    features    image [N,C,H,W]                                    ->  a [N,C',H',W']     the encoder's g
    processing  x                                                  ->  h [N,P,...]        cloud: h(Q x) = Q h(x)
    decoder     h, key [N,P,P]                                     ->  logits [N,K]       d((key^T h)[0])

The key is orthogonal; how it is drawn is the model's key law (keylaws.py): for P = 2 the paper's angle
is the key R(theta), the exchange defense's R(theta) diag(1, s). Model dirs of format 1 exported P = 2 with
`theta` [N] and `fool` [N,C,H,W]; such an onnx/ is refused (`check_key_form`): `cvconvert export DIR`
rebuilds it from model.pt. processing.onnx is the same in both formats.

The baselines (variants original, noisy, additional) have encoder ``image -> x [N,C',H',W']``,
processing ``x -> h``, decoder ``h -> logits`` (the same names, so one server and one pipeline take
every variant) and original ``image -> logits`` (the whole model, for benchmarks).

``features.onnx`` lets a device precompute the fooling images' features: online it runs g on the image
only and forms x with `combine_np`, exactly as encoder.onnx does.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from ..errors import CvError
from .keys import haar_orthogonal, transform_np


class Signature(NamedTuple):
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


# Per variant kind (is it keyed, i.e. complex?), each graph's names, in an order where a graph's inputs are
# the outputs of graphs before it (or sources: image, fool, key).
SIGNATURES: dict[bool, dict[str, Signature]] = {
    True: {"encoder": Signature(("image", "fool", "key"), ("x",)), "features": Signature(("image",), ("a",)),
           "processing": Signature(("x",), ("h",)), "decoder": Signature(("h", "key"), ("logits",))},
    False: {"encoder": Signature(("image",), ("x",)), "processing": Signature(("x",), ("h",)),
            "decoder": Signature(("h",), ("logits",)), "original": Signature(("image",), ("logits",))},
}
CHAIN = ("encoder", "processing", "decoder")  # the split network, device -> cloud -> device
OPTIONAL = frozenset({"features"})  # graphs that exports made before they existed lack


def is_complex(manifest: dict) -> bool:
    return manifest.get("variant", "complex") == "complex"


def parts_of(manifest: dict) -> int:
    """P: the number of parts of x (2 for the baselines, whose x is one real feature)."""
    return int(manifest.get("parts", 2)) if is_complex(manifest) else 2


def model_signatures(model) -> dict[str, Signature]:
    """The graphs of a SplitModel (anything with ``is_complex``), by name."""
    return SIGNATURES[bool(model.is_complex)]


def signatures(manifest: dict) -> dict[str, Signature]:
    """The graphs a model dir's onnx/ folder holds, by name (encoder, processing, ...)."""
    return SIGNATURES[is_complex(manifest)]


def check_key_form(label: str, input_names, model_dir) -> None:
    """Refuse a graph exported in model-dir format 1's theta form (P = 2 encoder/decoder took `theta`)."""
    if "theta" in tuple(input_names):
        raise CvError(f"{label} takes `theta` (model-dir format 1); this cvconvert feeds an orthogonal `key`: "
                      f"rebuild the graphs from model.pt with `cvconvert export {model_dir}`")


def sources(sigs: dict[str, Signature], parts=CHAIN) -> tuple[str, ...]:
    """The inputs of `parts` that no earlier part produces (complex: image, fool, key)."""
    made, out = set(), []
    for part in parts:
        out += [n for n in sigs[part].inputs if n not in made and n not in out]
        made.update(sigs[part].outputs)
    return tuple(out)


def expected_shapes(manifest: dict, h_shape=None) -> dict[str, tuple | None]:
    """Per tensor name, its shape without the batch axis (None where the manifest does not say)."""
    feat, p, image = tuple(manifest["feature_shape"]), parts_of(manifest), tuple(manifest["input_shape"])
    return {"image": image, "fool": (p - 1,) + image, "key": (p, p),
            "x": ((p,) if is_complex(manifest) else ()) + feat, "a": feat,
            "h": tuple(h_shape) if h_shape is not None else None, "logits": (int(manifest["num_classes"]),)}


def check_signature(label: str, inputs, outputs, names: tuple, shapes: dict) -> None:
    """inputs/outputs: [(name, shape)] with shape as ONNX Runtime reports it (str for symbolic dims).

    Fails (CvError) on a wrong name, a fixed or missing batch axis, or a wrong non-batch dim.
    """
    for kind, got, want in (("inputs", inputs, names[0]), ("outputs", outputs, names[1])):
        got_names = tuple(n for n, _ in got)
        if got_names != tuple(want):
            raise CvError(f"{label}: {kind} are {list(got_names)}, expected {list(want)} (the ONNX contract)")
        for name, shape in got:
            shape = list(shape or [])
            if not shape:
                raise CvError(f"{label}: {name} has no batch axis")
            if not isinstance(shape[0], str):
                raise CvError(f"{label}: the batch axis of {name} is frozen to {shape[0]}; it must be symbolic "
                              "(re-export with `cvconvert export`)")
            rest, exp = shape[1:], shapes.get(name)
            if any(not isinstance(d, int) for d in rest):
                raise CvError(f"{label}: {name} has symbolic non-batch dims {rest}")
            if exp is not None and tuple(rest) != tuple(exp):
                raise CvError(f"{label}: {name} has shape [N, {', '.join(map(str, rest))}], "
                              f"expected [N, {', '.join(map(str, exp))}]")


def example_inputs(names, input_shape, n: int, rng: np.random.Generator, parts: int = 2) -> dict[str, np.ndarray]:
    """Random source tensors at batch n: pixels in [0, 1) for image and the P-1 fools per image, Haar
    keys from the OS's CSPRNG (even for tests and timing, so no code path ever draws a key from a seeded
    generator; Haar covers every law's keys, reflections included)."""
    out = {}
    for name in names:
        if name == "key":
            out[name] = haar_orthogonal(n, parts)
        elif name == "fool":
            out[name] = rng.random((n, parts - 1) + tuple(input_shape), dtype=np.float32)
        elif name == "image":
            out[name] = rng.random((n,) + tuple(input_shape), dtype=np.float32)
        else:
            raise CvError(f"no example input for {name!r}: it is computed by another graph")
    return out


def run_chain(run: Callable, sigs: dict[str, Signature], parts, values: dict) -> dict:
    """Run `parts` in order, each on the values its signature names; returns `values` plus each output.

    run(part, feeds) -> the part's single output, with feeds in signature order (any array type: numpy,
    torch tensors, ONNX Runtime OrtValues). An output already in `values` is not overwritten.
    """
    values = dict(values)
    for part in parts:
        ins, outs = sigs[part]
        out = run(part, {k: values[k] for k in ins})
        values.setdefault(outs[0], out)
    return values


# ---------------------------------------------------------------- forming x on the device

def combine_np(a: np.ndarray, b: np.ndarray, key: np.ndarray) -> np.ndarray:
    """x = Q [a; b_1; ...; b_{P-1}] as [N, P, ...] float32: what encoder.onnx computes after g.

    a [N, ...]: the image's features (features.onnx), b [N, P-1, ...]: its fools' features (precomputed),
    key [N, P, P]: the secret orthogonal keys (drawn by the model's key law).
    """
    a, b, key = (np.asarray(v, dtype=np.float32) for v in (a, b, key))
    n, p = a.shape[0], key.shape[-1] if key.ndim == 3 else 0
    if b.shape != (n, p - 1) + a.shape[1:] or key.shape != (n, p, p):
        raise CvError(f"features a {list(a.shape)}, fools b {list(b.shape)} and key {list(key.shape)} do not "
                      "match: b must be [N, P-1, ...] with a's [N, ...] and the key [N, P, P]")
    x = np.empty((n, p) + a.shape[1:], dtype=np.float32)
    x[:, 0], x[:, 1:] = a, b  # one copy into x, then Q in place of it
    return transform_np(x, key)
