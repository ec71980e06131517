"""The ONNX graphs of a model dir as data: names, shapes, example inputs, and how x is formed.

numpy only, never torch: the device runtime imports this module.

Graphs of a complex model (float32, batch axis symbolic "N", opset >= 17):

    encoder     image [N,C,H,W], fool [N,C,H,W], theta [N]  ->  x [N,2,C',H',W']
    features    image [N,C,H,W]                              ->  a [N,C',H',W']   the encoder's g
    processing  x                                            ->  h [N,2,...]      runs in the cloud
    decoder     h, theta [N]                                 ->  logits [N,K]

P-part models (manifest "parts" P > 2) take an orthogonal key in place of theta:

    encoder     image [N,C,H,W], fool [N,P-1,C,H,W], key [N,P,P]  ->  x [N,P,C',H',W']   x = key @ [a; b_1; ...]
    processing  x -> h [N,P,...]                                       unchanged: h(Q x) = Q h(x)
    decoder     h, key [N,P,P]                                     ->  logits              d((key^T h)[0])

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
from .keys import combine_parts_np, haar_orthogonal, secure_angles


class Signature(NamedTuple):
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


# Per variant kind (is it complex?), each graph's names, in an order where a graph's inputs are the
# outputs of graphs before it (or sources: image, fool, theta).
SIGNATURES: dict[bool, dict[str, Signature]] = {
    True: {"encoder": Signature(("image", "fool", "theta"), ("x",)), "features": Signature(("image",), ("a",)),
           "processing": Signature(("x",), ("h",)), "decoder": Signature(("h", "theta"), ("logits",))},
    False: {"encoder": Signature(("image",), ("x",)), "processing": Signature(("x",), ("h",)),
            "decoder": Signature(("h",), ("logits",)), "original": Signature(("image",), ("logits",))},
    "parts": {"encoder": Signature(("image", "fool", "key"), ("x",)), "features": Signature(("image",), ("a",)),
              "processing": Signature(("x",), ("h",)), "decoder": Signature(("h", "key"), ("logits",))},
}
CHAIN = ("encoder", "processing", "decoder")  # the split network, device -> cloud -> device
OPTIONAL = frozenset({"features"})  # graphs that exports made before they existed lack


def is_complex(manifest: dict) -> bool:
    return manifest.get("variant", "complex") == "complex"


def parts_of(manifest: dict) -> int:
    """P: the number of parts of x (2 for complex models without the key, and for the baselines)."""
    return int(manifest.get("parts", 2)) if is_complex(manifest) else 2


def kind(complex_: bool, parts: int = 2):
    """The SIGNATURES key of a model: True (complex, two parts), False (a baseline) or "parts" (P > 2)."""
    return "parts" if complex_ and parts > 2 else bool(complex_)


def model_signatures(model) -> dict[str, Signature]:
    """The graphs of a SplitModel (anything with ``is_complex`` and ``parts``), by name."""
    return SIGNATURES[kind(model.is_complex, getattr(model, "parts", 2))]


def signatures(manifest: dict) -> dict[str, Signature]:
    """The graphs a model dir's onnx/ folder holds, by name (encoder, processing, ...)."""
    return SIGNATURES[kind(is_complex(manifest), parts_of(manifest))]


def sources(sigs: dict[str, Signature], parts=CHAIN) -> tuple[str, ...]:
    """The inputs of `parts` that no earlier part produces (complex: image, fool, theta)."""
    made, out = set(), []
    for part in parts:
        out += [n for n in sigs[part].inputs if n not in made and n not in out]
        made.update(sigs[part].outputs)
    return tuple(out)


def expected_shapes(manifest: dict, h_shape=None) -> dict[str, tuple | None]:
    """Per tensor name, its shape without the batch axis (None where the manifest does not say)."""
    feat, p, image = tuple(manifest["feature_shape"]), parts_of(manifest), tuple(manifest["input_shape"])
    return {"image": image, "fool": ((p - 1,) if p > 2 else ()) + image, "theta": (), "key": (p, p),
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
    """Random source tensors at batch n: pixels in [0, 1) for image/fool (P-1 fools per image for P > 2),
    theta or the key from the OS's CSPRNG (even for tests and timing, so no code path ever draws a key
    from a seeded generator)."""
    out = {}
    for name in names:
        if name == "theta":
            out[name] = secure_angles(n)
        elif name == "key":
            out[name] = haar_orthogonal(n, parts)
        elif name == "fool" and parts > 2:
            out[name] = rng.random((n, parts - 1) + tuple(input_shape), dtype=np.float32)
        elif name in ("image", "fool"):
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

def rotate_np(x: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """e^{i theta} x on the [N, 2, ...] layout: real' = re cos t - im sin t, imag' = re sin t + im cos t."""
    t = np.asarray(theta, dtype=np.float32).reshape((-1,) + (1,) * (x.ndim - 2))
    re, im = x[:, 0], x[:, 1]
    c, s = np.cos(t), np.sin(t)
    return np.stack((re * c - im * s, re * s + im * c), axis=1).astype(np.float32, copy=False)


# The fool's sign per angle (manifest key "fool_sign"). "quadrant": +1 where theta lies in the 1st or 3rd
# quarter-circle, -1 in the 2nd or 4th; it depends on the secret theta only, so it hides which of x's two
# readings holds the image while the decoder needs nothing new. float32, as the encoder graph computes it.
FOOL_SIGN_RULES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda t: np.ones_like(t),
    "quadrant": lambda t: np.where(np.sin(2 * t) >= 0, np.float32(1), np.float32(-1)),
}


def combine_np(a: np.ndarray, b: np.ndarray, theta: np.ndarray, fool_sign: str = "none") -> np.ndarray:
    """x = e^{i theta}(a + i s b) as [N, 2, C', H', W'] float32: what encoder.onnx computes after g.

    a: the image's features (features.onnx), b: the fooling image's (precomputed), theta [N]: the secret
    angles, fool_sign: the model's rule for s (manifest "fool_sign": "none" or "quadrant").
    """
    rule = FOOL_SIGN_RULES.get(fool_sign)
    if rule is None:
        raise CvError(f"unknown fool_sign {fool_sign!r} (choose from {', '.join(FOOL_SIGN_RULES)})")
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    theta = np.asarray(theta, dtype=np.float32).reshape(-1)
    if a.shape != b.shape or a.ndim < 2 or len(theta) != a.shape[0]:
        raise CvError(f"features a {list(a.shape)}, b {list(b.shape)} and theta [{len(theta)}] do not match: "
                      "a and b need the same [N, ...] shape and theta one angle per sample")
    shape = (-1,) + (1,) * (a.ndim - 1)
    s, c, sn = rule(theta).reshape(shape), np.cos(theta).reshape(shape), np.sin(theta).reshape(shape)
    # rotate([a, s b], theta) written out so the sign folds into the per-sample factors: two passes over
    # a and two over b into the preallocated x, instead of stacking [a, s b] and rotating the copy.
    x = np.empty((a.shape[0], 2) + a.shape[1:], dtype=np.float32)
    tmp = np.multiply(b, s * sn)
    np.subtract(np.multiply(a, c, out=x[:, 0]), tmp, out=x[:, 0])
    np.multiply(b, s * c, out=tmp)
    np.add(np.multiply(a, sn, out=x[:, 1]), tmp, out=x[:, 1])
    return x


def combine_key_np(a: np.ndarray, b: np.ndarray, key: np.ndarray, parts: int = 2,
                   fool_sign: str = "none") -> np.ndarray:
    """x as encoder.onnx forms it after g, for any number of parts: `combine_np` with the angles theta
    [N] for two parts, else Q [a; b_1; ...] with b [N, P-1, ...] and the orthogonal keys [N, P, P]."""
    return combine_np(a, b, key, fool_sign) if parts == 2 else combine_parts_np(a, b, key)
