"""Split a real model's torch.fx graph into encoder / processing / decoder at dotted node names.

Node names follow torchvision's feature_extraction (``NodePathTracer``): ``layer1.2.relu_1`` for an op,
and a module prefix such as ``layer1.2`` means the module's last op (as an encoder end) or its first op
(as a decoder start).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch.fx as fx
from torch import nn
from torchvision.models.feature_extraction import NodePathTracer

from .errors import CvError, one_line


@dataclass
class SplitParts:
    encoder: fx.GraphModule
    processing: fx.GraphModule
    decoder: fx.GraphModule | None  # None: the decoder is only the final unrotation
    qualnames: dict[fx.Node, str]


def trace(model: nn.Module, leaf_modules=()) -> tuple[fx.GraphModule, dict]:
    tracer = NodePathTracer(leaf_modules=list(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types for untraceable control flow
        raise CvError(f"cannot trace {type(model).__name__} with torch.fx: {one_line(exc)}") from None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    names = {gm_node: tracer.node_to_qualname.get(orig, gm_node.name)
             for gm_node, orig in zip(gm.graph.nodes, graph.nodes)}
    return gm, names


def node_names(model: nn.Module, leaf_modules=()) -> list[str]:
    """The dotted names usable in ``--split ENCODER_END:DECODER_START``."""
    gm, names = trace(model, leaf_modules)
    return [names[n] for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]


def _find(order, names, name, last: bool):
    exact = [n for n in order if names[n] == name]
    if exact:
        return exact[0]
    pref = [n for n in order if names[n].startswith(name + ".")]
    if pref:
        return pref[-1] if last else pref[0]
    sample = ", ".join(dict.fromkeys(names[n].split(".")[0] for n in order))
    raise CvError(f"no node named {name!r} in the model (top-level names: {sample}; see `cvconvert list --nodes ARCH`)")


def _subgraph(gm: fx.GraphModule, nodes, inp: fx.Node, out: fx.Node) -> fx.GraphModule:
    g = fx.Graph()
    env = {inp: g.placeholder("x")}

    def arg(a):
        if a not in env:  # get_attr nodes are copied into every part that uses them
            env[a] = g.node_copy(a, arg)
        return env[a]

    for n in nodes:
        env[n] = g.node_copy(n, arg)
    g.output(env[out])
    sub = fx.GraphModule(gm, g)
    sub.graph.lint()
    return sub


def split_model(model: nn.Module, encoder_end: str, decoder_start: str | None, leaf_modules=()) -> SplitParts:
    gm, names = trace(copy.deepcopy(model), leaf_modules)
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise CvError(f"the model takes {len(inputs)} inputs; only single-input models can be split")
    (inp,), out_node = inputs, nodes[-1]
    order = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr")]
    e_node = _find(order, names, encoder_end, last=True)
    e = order.index(e_node)
    d = order.index(_find(order, names, decoder_start, last=False)) if decoder_start else len(order)
    if d <= e:
        raise CvError(f"decoder start {decoder_start!r} does not come after encoder end {encoder_end!r}")
    enc, proc, dec = order[: e + 1], order[e + 1: d], order[d:]
    if not proc:
        raise CvError(f"split {encoder_end}:{decoder_start or ''} leaves the processing module empty")
    part_of = {n: "encoder" for n in enc} | {n: "processing" for n in proc} | {n: "decoder" for n in dec}
    part_of[inp] = "input"

    def crossing(user, used):
        return CvError(f"a skip connection crosses the split: {names.get(user, user.name)} "
                       f"({part_of.get(user, 'output')}) uses {names.get(used, used.name)} ({part_of[used]})")

    for n in proc:
        for u in n.all_input_nodes:
            if part_of.get(u) in ("input", "encoder") and u is not e_node:
                raise crossing(n, u)
    proc_out = set()
    for n in dec + [out_node]:
        for u in n.all_input_nodes:
            where = part_of.get(u)
            if where in ("input", "encoder"):
                raise crossing(n, u)
            if where == "processing":
                proc_out.add(u)
    if len(proc_out) != 1:
        raise CvError(f"the processing module must hand exactly one tensor to the decoder, found {len(proc_out)}")
    (p_node,) = proc_out
    if dec and any(u in proc_out for u in out_node.all_input_nodes):
        raise crossing(out_node, p_node)
    return SplitParts(
        encoder=_subgraph(gm, enc, inp, e_node),
        processing=_subgraph(gm, proc, e_node, p_node),
        decoder=_subgraph(gm, dec, p_node, out_node.args[0]) if dec else None,
        qualnames=names,
    )
