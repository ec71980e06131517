"""Latency / throughput of the complex split network against the original model, part by part.

Every configuration (model x part x engine) of one batch size is timed round-robin, one call each per
round, so that both models see the same machine load (the ratios are what matter on a shared CPU).
Warm-up calls are excluded; the reported latency is the median (p50) and p90 over the timed rounds.

Stages: each graph on its own (encoder, processing, decoder, and the complex model's features), the
chain end to end (image and fool through the encoder), and the complex model's online device path:
features on the image only, x formed in numpy from a precomputed fool feature, processing, decoder.
The original model's encoder and end to end are the baselines of features and online.

Engines: ONNX Runtime (CPU, or CUDA with IO binding so tensors stay on the GPU between the parts)
and PyTorch eager (torch.inference_mode). The ONNX graphs come from DIR/onnx/ when `cvconvert export`
wrote them all; otherwise they are exported here (`prepare_graphs`).
"""

from __future__ import annotations

import math
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CvError

STAGES = ("encoder", "features", "processing", "decoder", "end_to_end", "online")
# The original model has neither a feature graph nor an online path: the complex model's features
# (the device's work per image) are compared with the original's encoder, and online with its end to end.
BASELINE_STAGE = {"features": "encoder", "online": "end_to_end"}


def baseline_stage(stage: str) -> str:
    return BASELINE_STAGE.get(stage, stage)


# ----------------------------------------------------------------------------- ONNX graphs

def _graphs_needed(model) -> list[str]:
    from .device.contracts import model_signatures

    return [p for p in model_signatures(model) if p != "original"]  # original.onnx: not timed


def prepare_graphs(model_dir, model, manifest: dict, work_dir: Path, log=None) -> tuple[dict[str, Path], str]:
    """The ONNX graphs of a model: DIR/onnx/ when `cvconvert export` wrote them all, else exported
    with `cvconvert export` (same folding, validation and graph) into a copy of the model dir under
    work_dir, so the user's dir is never written to. `model_dir` None: a model built in memory."""
    from .export import export_model_dir
    from .modeldir import write_model_dir

    needed = _graphs_needed(model)
    onnx_dir = Path(model_dir) / "onnx" if model_dir is not None else None
    missing = [p for p in needed if onnx_dir is None or not (onnx_dir / f"{p}.onnx").is_file()]
    if not missing:
        return {p: onnx_dir / f"{p}.onnx" for p in needed}, str(onnx_dir)
    tmp = Path(work_dir)
    write_model_dir(tmp, {k: v.detach().cpu() for k, v in model.state_dict().items()}, manifest, force=True)
    if log:
        why = f" ({onnx_dir} lacks {', '.join(p + '.onnx' for p in missing)})" if onnx_dir and onnx_dir.is_dir() else ""
        log(f"exporting the {manifest['variant']} model for timing (`cvconvert export` into a temporary copy){why}")
    export_model_dir(tmp)
    return {p: tmp / "onnx" / f"{p}.onnx" for p in needed}, "exported by bench (cvconvert export)"


def stage_feeds(model, n: int) -> dict[str, dict[str, np.ndarray]]:
    """Numpy inputs per stage at batch n: random images and fools, keys, and what the model's earlier
    parts make of them. end_to_end takes the sources (image, fool, key); online takes the image, the key
    and b [n, P-1, ...], the fools' features as a fool pool stores them (computed once, outside the timed call)."""
    import torch

    from .device.contracts import example_inputs, model_signatures, sources
    from .export import reference, torch_parts

    sigs = {p: s for p, s in model_signatures(model).items() if p != "original"}
    mods = torch_parts(model.eval())  # eval: b as a pool stores it, not through training-mode batch-norm
    parts = getattr(model, "parts", 2)
    src = example_inputs(sources(sigs, list(sigs)), model.spec.input_shape, n, np.random.default_rng(n), parts)
    device = next(model.parameters()).device  # the eager runner may have moved the model to the GPU
    feeds = {part: feeds for part, (feeds, _) in reference(mods, sigs, src, device).items()}
    feeds["end_to_end"] = {k: src[k] for k in sources(sigs)}
    if "features" in mods:
        with torch.inference_mode():
            fool = torch.from_numpy(src["fool"]).to(device)
            b = mods["features"](fool.flatten(0, 1)).unflatten(0, (n, parts - 1)).cpu().numpy()
        feeds["online"] = {"image": src["image"], "b": b, "key": src["key"]}
    return feeds


# ----------------------------------------------------------------------------- runners

class OrtPipeline:
    """The ONNX Runtime sessions of one model; `run(stage, feeds)` times one graph, the chain
    (end_to_end) or, with features.onnx, the online device path: features on the image, x formed in
    numpy from a precomputed fool feature (`contracts.combine_np`), processing, decoder."""

    def __init__(self, paths: dict[str, Path], provider: str, threads: int | None, is_complex: bool):
        from .device.contracts import SIGNATURES, check_key_form
        from .device.sessions import make_session

        self.provider = provider
        self.sigs = {p: s for p, s in SIGNATURES[is_complex].items() if p in paths}
        self.sessions = {p: make_session(paths[p], provider, threads) for p in self.sigs}  # the runtime's options
        for p, sess in self.sessions.items():  # a format-1 export (theta graphs): one line naming the fix
            check_key_form(f"{p} graph {paths[p]}", [i.name for i in sess.get_inputs()], Path(paths[p]).parent.parent)
        self.stages = tuple(self.sessions) + ("end_to_end",) + (("online",) if "features" in self.sessions else ())

    def prepare(self, feeds: dict[str, dict]):
        """Move the inputs once (CUDA: OrtValues on the device, so timing excludes host copies). The
        online path keeps b and a copy of the key on the host, where a device combines them."""
        import onnxruntime as ort

        if self.provider != "cuda":
            return feeds
        out = {stage: {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in f.items()}
               for stage, f in feeds.items()}
        if "online" in feeds:
            out["online"].update(b=feeds["online"]["b"], key_host=feeds["online"]["key"])
        return out

    def _run_part(self, part, feeds):
        sess = self.sessions[part]
        if self.provider != "cuda":
            return sess.run(None, feeds)[0]
        binding = sess.io_binding()
        for k, v in feeds.items():
            binding.bind_ortvalue_input(k, v)
        binding.bind_output(sess.get_outputs()[0].name, "cuda", 0)
        sess.run_with_iobinding(binding)
        return binding.get_outputs()[0]  # an OrtValue that stays on the GPU

    def _online(self, feeds):
        import onnxruntime as ort

        from .device.contracts import combine_np

        a = self._run_part("features", {"image": feeds["image"]})
        cuda = self.provider == "cuda"
        a = a.numpy() if cuda else a
        x = combine_np(a, feeds["b"], feeds.get("key_host", feeds["key"]))
        h = self._run_part("processing", {"x": ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0) if cuda else x})
        return self._run_part("decoder", {"h": h, "key": feeds["key"]})

    def run(self, stage: str, feeds: dict):
        from .device.contracts import CHAIN, run_chain

        if stage == "end_to_end":
            out = run_chain(self._run_part, self.sigs, CHAIN, feeds)[self.sigs[CHAIN[-1]].outputs[0]]
        elif stage == "online":
            out = self._online(feeds)
        else:
            out = self._run_part(stage, feeds)
        if self.provider == "cuda":
            out = out.numpy()  # the result back on the host ends the timed call (synchronises)
        return out


class EagerPipeline:
    """The same stages in PyTorch eager; online forms x with the encoder's own combine."""

    def __init__(self, model, device: str):
        import torch

        from .device.contracts import model_signatures
        from .export import torch_parts

        self.model, self.device, self.torch = model.eval().to(device), device, torch
        self.mods = torch_parts(self.model)
        self.sigs = model_signatures(model)
        self.stages = tuple(self.mods) + ("end_to_end",) + (("online",) if "features" in self.mods else ())

    def prepare(self, feeds):
        return {stage: {k: self.torch.from_numpy(v).to(self.device) for k, v in f.items()}
                for stage, f in feeds.items()}

    def _run(self, stage: str, feeds: dict):
        from .device.contracts import CHAIN, run_chain

        m = self.mods
        if stage == "end_to_end":
            return run_chain(lambda p, f: m[p](*f.values()), self.sigs, CHAIN, feeds)[self.sigs[CHAIN[-1]].outputs[0]]
        if stage == "online":
            x = self.model.encoder.combine(m["features"](feeds["image"]), feeds["b"], feeds["key"])
            return m["decoder"](m["processing"](x), feeds["key"])
        return m[stage](*feeds.values())

    def run(self, stage: str, feeds: dict):
        with self.torch.inference_mode():
            out = self._run(stage, feeds)
            if self.device == "cuda":
                self.torch.cuda.synchronize()
        return out


# ----------------------------------------------------------------------------- timing

@dataclass
class BenchConfig:
    batch_sizes: tuple[int, ...] = (1, 32, 128)
    repeats: int = 20
    warmup: int = 3
    provider: str = "auto"  # auto | cpu | cuda
    threads: int | None = None
    engines: tuple[str, ...] = ("ort", "eager")
    stages: tuple[str, ...] = STAGES
    progress: bool = True
    meta: dict = field(default_factory=dict)


def resolve_provider(provider: str) -> str:
    import onnxruntime as ort

    if provider not in ("auto", "cpu", "cuda"):
        raise CvError(f"unknown provider {provider!r} (choose auto, cpu or cuda)")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if has_cuda:
        import torch
        has_cuda = torch.cuda.is_available()
    if provider == "cuda" and not has_cuda:
        raise CvError("--provider cuda: no CUDA device / CUDA execution provider here")
    return "cuda" if provider == "cuda" or (provider == "auto" and has_cuda) else "cpu"


def _stats(times: list[float], n: int) -> dict:
    t = np.asarray(times)
    p50 = float(np.median(t))
    return {"p50_ms": p50 * 1e3, "p90_ms": float(np.percentile(t, 90)) * 1e3, "mean_ms": float(t.mean()) * 1e3,
            "throughput_per_s": n / p50 if p50 > 0 else float("inf"), "runs": len(times)}


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20


def run_bench(models: dict, graphs: dict, cfg: BenchConfig, log=None) -> dict:
    """models/graphs: {"complex": SplitModel, "original": SplitModel} and their ONNX paths.

    Returns {"results": [row...], "ratios": [...], "peak_rss_mb": ..., ...}; one row per
    (batch, model, engine, stage) with p50/p90/mean latency and throughput.
    """
    device = resolve_provider(cfg.provider)
    runners = {}
    for name, model in models.items():
        if "ort" in cfg.engines:
            runners[(name, "ort")] = OrtPipeline(graphs[name], device, cfg.threads, model.is_complex)
        if "eager" in cfg.engines:
            runners[(name, "eager")] = EagerPipeline(model, device)
    import torch
    saved_threads = torch.get_num_threads()
    try:
        if device == "cpu" and "eager" in cfg.engines:
            from .device.sessions import default_threads
            torch.set_num_threads(cfg.threads or default_threads())  # same pool size as ORT: a fair comparison
        return _timed_rounds(models, runners, cfg, device)
    finally:
        torch.set_num_threads(saved_threads)  # library callers keep their own setting


def _timed_rounds(models, runners, cfg: BenchConfig, device: str) -> dict:
    rows, memory = [], {}
    total = len(cfg.batch_sizes) * (cfg.warmup + cfg.repeats)
    progress = _progress(cfg.progress, total)
    with progress as bar:
        task = bar.add_task("bench", total=total) if bar else None
        for n in cfg.batch_sizes:
            feeds = {name: stage_feeds(m, n) for name, m in models.items()}
            prepared = {key: r.prepare(feeds[key[0]]) for key, r in runners.items()}
            cases = [(name, eng, stage, r, prepared[(name, eng)][stage])
                     for (name, eng), r in runners.items() for stage in cfg.stages if stage in r.stages]
            times = {c[:3]: [] for c in cases}
            for i in range(cfg.warmup + cfg.repeats):
                for name, eng, stage, runner, feed in cases:  # round-robin: same load for every case
                    t0 = time.perf_counter()
                    runner.run(stage, feed)
                    dt = time.perf_counter() - t0
                    if i >= cfg.warmup:
                        times[(name, eng, stage)].append(dt)
                if bar:
                    bar.update(task, advance=1, description=f"batch {n}")
            for (name, eng, stage), t in times.items():
                rows.append({"batch": n, "model": name, "engine": eng, "stage": stage, **_stats(t, n)})
            memory[str(n)] = round(peak_rss_mb(), 1)
            if device == "cuda":
                import torch
                memory[f"{n}_cuda_eager_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return {"device": device, "engines": list(cfg.engines), "batch_sizes": list(cfg.batch_sizes),
            "repeats": cfg.repeats, "warmup": cfg.warmup, "threads": cfg.threads or _threads_used(device),
            "results": rows, "ratios": ratios(rows), "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_mb_after_batch": memory, **cfg.meta}


def _threads_used(device):
    from .device.sessions import default_threads
    return default_threads() if device == "cpu" else None


def ratios(rows: list[dict]) -> list[dict]:
    """complex/original per (batch, engine, stage), and ORT/eager per (batch, model, stage), from p50s.
    The complex model's features and online stages are divided by the original's encoder and end to end."""
    p50 = {(r["batch"], r["model"], r["engine"], r["stage"]): r["p50_ms"] for r in rows}
    out = []
    for (n, model, eng, stage), v in p50.items():
        base = (n, "original", eng, baseline_stage(stage))
        if model == "complex" and base in p50:
            out.append({"kind": "complex/original", "batch": n, "engine": eng, "stage": stage,
                        "baseline_stage": base[3], "ratio": v / p50[base]})
    for (n, model, eng, stage), v in p50.items():
        if eng == "ort" and (n, model, "eager", stage) in p50:
            out.append({"kind": "ort/eager", "batch": n, "model": model, "stage": stage,
                        "ratio": v / p50[(n, model, "eager", stage)]})
    return out


def _progress(enabled: bool, total: int):
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=True)


# ----------------------------------------------------------------------------- whole command

def load_pair(model_dir, baseline=None, log=None):
    """(complex model, original model, original's dir or None): the baseline from --baseline, or the
    same manifest rebuilt with variant original (random weights: timing only)."""
    from .model import build_model
    from .modeldir import load_model, spec_from_manifest

    model, manifest = load_model(model_dir)
    if not model.is_complex:
        raise CvError(f"{model_dir} holds the {manifest['variant']!r} variant; bench needs the complex one "
                      f"(pass the original with --baseline)")
    if baseline is not None:
        orig, om = load_model(baseline)
        if om["variant"] != "original":
            raise CvError(f"--baseline {baseline} holds the {om['variant']!r} variant, not an original one")
        if list(om["input_shape"]) != list(manifest["input_shape"]):
            raise CvError(f"--baseline {baseline} has input shape {om['input_shape']}, "
                          f"the model {manifest['input_shape']}")
        return (model, manifest), (orig, om), Path(baseline)
    import dataclasses
    spec = dataclasses.replace(spec_from_manifest(manifest), variant="original")
    if log:
        log("baseline: the same architecture and split as variant original, random weights (timing only)")
    return (model, manifest), (build_model(spec).eval(), {**manifest, "variant": "original"}), None


def bench_dir(model_dir, baseline=None, cfg: BenchConfig | None = None, log=None) -> dict:
    cfg = cfg or BenchConfig()
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise CvError("batch sizes must be positive integers")
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise CvError("--repeats must be >= 1 and --warmup >= 0")
    resolve_provider(cfg.provider)  # refuse --provider cuda before any export work
    (model, manifest), (orig, om), orig_dir = load_pair(model_dir, baseline, log)
    with tempfile.TemporaryDirectory(prefix="cvconvert-bench-") as tmp:
        g_c = g_o = None
        src_c = src_o = "not used (no ort engine)"
        if "ort" in cfg.engines:
            g_c, src_c = prepare_graphs(Path(model_dir), model, manifest, Path(tmp) / "complex", log)
            g_o, src_o = prepare_graphs(orig_dir, orig, om, Path(tmp) / "original", log)
        cfg.meta = {**cfg.meta, "model_dir": str(model_dir), "arch": model.spec.arch,
                    "baseline": str(orig_dir) if orig_dir else "built from the manifest (variant original)",
                    "graphs": {"complex": src_c, "original": src_o}, "machine": machine_info()}
        return run_bench({"complex": model, "original": orig}, {"complex": g_c, "original": g_o}, cfg, log)


def machine_info() -> dict:
    import os
    import platform

    import onnxruntime as ort
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__, "onnxruntime": ort.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ----------------------------------------------------------------------------- picture

def where_run(report: dict) -> str:
    """The GPU, or the CPU and its thread count, for the table's and the plot's headings."""
    m = report.get("machine", {})
    return m.get("gpu") if report["device"] == "cuda" else f"{m.get('cpu', '?')}, {report['threads']} threads"


def plot_report(report: dict, path) -> None:
    """p50 latency per stage, original vs complex for each engine, one panel per batch size (log
    scale), with the complex/original ratio above each complex bar; written atomically as PNG."""
    from .figures import pyplot, save_png

    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    p50 = {(r["batch"], r["model"], r["engine"], r["stage"]): r["p50_ms"] for r in report["results"]}
    stages = [s for s in STAGES if any(k[3] == s for k in p50)]
    engines = report["engines"]
    sizes = report["batch_sizes"]
    colors = {"original": "#9db4c8", "complex": "#c8553d"}
    width = 0.8 / (2 * len(engines))
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.4 * len(sizes), 3.8), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for j, eng in enumerate(engines):
            for k, model in enumerate(("original", "complex")):
                offset = (2 * j + k - (2 * len(engines) - 1) / 2) * width
                xs = [i + offset for i in range(len(stages))]
                ys = [p50.get((n, model, eng, s), float("nan")) for s in stages]
                ax.bar(xs, ys, width, color=colors[model], edgecolor="black", linewidth=0.4,
                       hatch="//" if eng == "eager" else None, label=f"{model} ({eng})")
                if model == "complex":
                    for x, s, y in zip(xs, stages, ys):
                        base = p50.get((n, "original", eng, baseline_stage(s)))
                        if base:
                            ax.annotate(f"{y / base:.1f}x", (x, y), ha="center", va="bottom", fontsize=6)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1, 1, 10 rather than 10^-1
        ax.yaxis.set_minor_formatter(FuncFormatter(  # label 2x and 5x between decades, not every minor tick
            lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 5) else ""))
        ax.tick_params(axis="y", which="both", labelsize=7)
        ax.set_xticks(range(len(stages)), [s.replace("_", " ") for s in stages], fontsize=8)
        ax.set_title(f"batch {n}", fontsize=9)
    axes[0][0].set_ylabel("p50 latency (ms), log scale", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{report['arch']}: complex split network vs original on {report['device']} ({where_run(report)}); "
                 "labels: complex/original", fontsize=9)
    save_png(fig, path)
