"""The audit's stages, each one loop over its list of attacks (attacks/registry.py): utility, angle,
reconstruction, property inference, then the pictures and the targets. ``Run`` carries what the
stages hand on to each other."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..complex.functional import unrotate_real
from ..device.keylaws import key_angle
from ..registry import put
from .base import Public
from .common import batched, make_partners
from .inference import Classifier, n_outputs
from .inversion import FeatureInverter, simulate_x
from .metrics import angle_summary, chance_error, circular_error, error_rate, reconstruction
from . import multiquery, queries
from .registry import ADAPTIVE_PROPERTY_ATTACKS, ANGLE_ATTACKS, PROPERTY_ATTACKS, RECONSTRUCTION_ATTACKS


class Clock:
    """Wall and CPU seconds per stage (CPU = what 2 free cores would need), summed over its laps."""

    def __init__(self, timings: dict):
        self.timings, self.last = timings, (time.time(), time.process_time())

    def lap(self, stage: str) -> None:
        now = (time.time(), time.process_time())
        t = self.timings.setdefault(stage, {"wall_s": 0.0, "cpu_s": 0.0})
        t["wall_s"] = round(t["wall_s"] + now[0] - self.last[0], 1)
        t["cpu_s"] = round(t["cpu_s"] + now[1] - self.last[1], 1)
        self.last = now


@dataclass
class Run:
    public: Public
    model: object
    base: list                      # [(name, model, manifest)] of the baselines
    tr: dict                        # the attacker's images (and targets, props)
    ev: dict                        # the victims'
    R: dict
    victim: object                  # (model, images, device, rule) -> (x, key, logits)
    clock: Clock = None
    angle: dict = field(default_factory=dict)     # id -> fitted angle attack
    recon: dict = field(default_factory=dict)     # id -> fitted reconstruction attack (complex model)
    out: dict = field(default_factory=dict)       # id -> its reconstruction of the victims
    bfeat: dict = field(default_factory=dict)     # baseline -> (attacker's a, victims' a)
    binv: dict = field(default_factory=dict)      # baseline -> (its inverter, its reconstruction)
    inverter: FeatureInverter = None
    raw_classifier: Classifier = None
    x_ev: torch.Tensor = None       # what the victims transmitted
    key_ev: torch.Tensor = None     # their secret keys [N, P, P]: used to score only
    a_ev: torch.Tensor = None       # their true features: a reference only
    reference: torch.Tensor = None  # dec(a) with the true key
    angle_errors: dict = None       # angle attack label -> per-victim error
    shared: dict = field(default_factory=dict)    # P parts: fitted attacks that later ones build on, by name

    @property
    def parts(self) -> int:
        return self.model.parts

    @property
    def theta_ev(self) -> torch.Tensor:
        """The victims' angles, read from their two-part keys R(theta) diag(1, s) (angle audit only)."""
        return torch.from_numpy(key_angle(self.key_ev.numpy()))

    @property
    def monitor(self):
        return self.x_ev, self.theta_ev


def utility(run: Run) -> None:
    """Features, the victim's transmissions and each model's classification error."""
    pub, model, dev = run.public, run.model, run.public.device
    model.to(dev).eval()
    feat = lambda m: (lambda i: m.features(i))  # noqa: E731
    I_tr, I_ev = run.tr["images"], run.ev["images"]
    pub.tr = {"images": I_tr, "a": batched(feat(model), I_tr, device=dev)}
    run.a_ev = batched(feat(model), I_ev, device=dev)  # the victim's real feature: a reference only
    pub.partners = make_partners(pub.fool_rule, I_tr, torch.Generator().manual_seed(pub.seed + 11))
    run.x_ev, run.key_ev, logits = run.victim(model, I_ev, dev, pub.fool_rule)
    rows = [{"model": "complex", "error": error_rate(logits, run.ev["targets"]),
             "chance": chance_error(run.tr["targets"], run.ev["targets"])}]
    for name, bm, _ in run.base:
        bm.to(dev).eval()
        run.bfeat[name] = (batched(feat(bm), I_tr, device=dev), batched(feat(bm), I_ev, device=dev))
        blog = batched(lambda i: bm(i), I_ev, device=dev)
        rows.append({"model": name, "error": error_rate(blog, run.ev["targets"]), "chance": rows[0]["chance"]})
    run.R["tables"]["utility"] = rows
    run.clock.lap("features and utility")


def angles(run: Run) -> None:
    rows, run.angle_errors = [], {}
    for entry in ANGLE_ATTACKS:
        atk = entry(run).fit(run.public)
        put(run.angle, atk.id, atk, "angle attack")  # two attacks of one id: the report would keep one
        run.R["history"].update(atk.history)
        th = atk.estimate(run.x_ev)
        err = run.angle_errors[atk.label] = circular_error(th, run.theta_ev[:len(th)])
        rows.append({"id": atk.id, "attack": atk.label, **angle_summary(err),
                     **({"n": len(th)} if atk.limit is not None else {})})
        run.clock.lap(atk.stage)
    run.R["tables"]["angle"] = rows
    run.R["angle_errors"] = {k: v.tolist() for k, v in run.angle_errors.items()}
    run.R["phase_support_calibration"] = {a.kind: a.calibration_error for a in run.angle.values()
                                          if hasattr(a, "calibration_error")}


def reconstructions(run: Run, attacks=RECONSTRUCTION_ATTACKS) -> None:
    """Every reconstruction attack on the complex model's x, then the inverter of each baseline on its a."""
    pub, I_tr, I_ev = run.public, run.tr["images"], run.ev["images"]
    run.inverter = FeatureInverter()
    plan = [("complex", entry(run), run.x_ev) for entry in attacks]
    for name, _, _ in run.base:
        b_tr, b_ev = run.bfeat[name]
        plan.append((name, FeatureInverter(f"{name}_inversion_from_a", f"{name}: U-Net L1 (train)", b_tr,
                                           "baseline inversion"), b_ev))
    mean_img = I_tr.mean(0, keepdim=True).expand_as(I_ev)
    rows = [{"id": "chance", "model": "-", "attack": "constant image (attacker's training mean): chance level",
             **reconstruction(mean_img, I_ev)}]
    for model, atk, sent in plan:
        atk.fit(pub)
        run.R["history"].update(atk.history)
        out = atk.reconstruct(sent)
        n = len(I_ev) if atk.limit is None else min(atk.limit, len(I_ev))
        rows.append({"id": atk.id, "model": model, "attack": atk.label,
                     **({"n": n} if atk.limit is not None else {}), **atk.score(out, I_ev[:n])})
        if model == "complex":
            put(run.recon, atk.id, atk, "reconstruction attack")
            run.out[atk.id] = out
        else:
            run.binv[model] = (atk, out)
        run.clock.lap(atk.stage)
    run.reference = run.inverter.reconstruct(run.a_ev)
    rows.insert(1, {"id": "reference", "model": "complex",
                    "attack": "reference: dec(a) with the true key (not an attack)",
                    **reconstruction(run.reference, I_ev)})
    run.R["tables"]["reconstruction"] = rows
    if "whitebox" in run.angle:
        run.R["whitebox_residual"] = float(run.angle["whitebox"].run(run.x_ev)[3].mean())


@dataclass
class Views:
    """What the property attacks read for one model: view name -> (attacker's inputs, victims' inputs)."""
    model: str
    fa: str                 # the feature's name in labels: a* (estimated) or a
    views: dict


def _views(run: Run) -> list:
    """The complex model's views come from the attacker's own simulated x for its images (to train on) and
    the victims' x; a baseline's from its a."""
    pub, x_ev = run.public, run.x_ev
    x_tr = simulate_x(pub, torch.arange(len(run.tr["images"])), torch.Generator().manual_seed(pub.seed + 5))
    paper, inv, reg = run.recon["inversion1_dprime"], run.recon["invariant"], run.angle["regressor"]
    out = [Views("complex", "a*", {
        "feature": (paper.a_star(x_tr), paper.a_star(x_ev)),
        "decoded": (paper.reconstruct(x_tr), run.out["inversion1_dprime"]),
        "invariants": (inv.features(x_tr), inv.features(x_ev)),
        "regressor a*": (unrotate_real(x_tr, reg.estimate(x_tr)), unrotate_real(x_ev, reg.estimate(x_ev)))})]
    for name, _, _ in run.base:
        b_tr, b_ev = run.bfeat[name]
        ub, b_dec = run.binv[name]
        out.append(Views(name, "a", {"feature": (b_tr, b_ev), "decoded": (ub.reconstruct(b_tr), b_dec)}))
    return out


def properties(run: Run, with_prop: bool) -> None:
    R, pub = run.R, run.public
    if not with_prop:
        R["tables"]["property"] = []
        R["property_skipped"] = "the data set has no hidden-property labels (prop = -1): property attacks skipped"
        run.clock.lap("property inference")
        return
    P_tr, P_ev = run.tr["props"], run.ev["props"]
    pub.n_props = n_outputs(torch.cat((P_tr, P_ev)) if P_tr.dim() == 1 else P_tr)
    chance = chance_error(P_tr, P_ev)
    run.raw_classifier = Classifier(pub, "property_raw_images").fit(run.tr["images"], P_tr)
    rows = [{"id": "reference", "model": "-", "attack": "reference: raw-image classifier on raw test images",
             "error": error_rate(run.raw_classifier.predict(run.ev["images"]), P_ev), "chance": chance}]
    models = _views(run)
    plan = [(m, e) for m in models for e in PROPERTY_ATTACKS] + [(models[0], e) for e in ADAPTIVE_PROPERTY_ATTACKS]
    for m, (aid, label, view, make) in plan:
        inp_tr, inp_ev = m.views[view]
        atk = make(run, m).fit(inp_tr, P_tr, monitor=(inp_ev, P_ev))
        R["history"].update(atk.history)
        rows.append({"id": aid, "model": m.model, "attack": label.format(fa=m.fa),
                     "error": error_rate(atk.predict(inp_ev), P_ev), "chance": chance})
    R["tables"]["property"] = rows
    run.clock.lap("property inference")


def pictures(run: Run) -> None:
    I_ev = run.ev["images"]
    k = min(8, len(I_ev))
    grid = [("input", I_ev[:k])]
    grid += [(f"{name}: dec(a)", run.binv[name][1][:k]) for name, _, _ in run.base]
    grid.append(("complex: dec(a), true key", run.reference[:k]))
    for aid, atk in run.recon.items():
        grid += atk.pictures(run.out[aid], k)
    sweep_n = min(4, len(I_ev))
    sweep_t = torch.arange(8) * (2 * math.pi / 8)
    sweep = [run.inverter.reconstruct(unrotate_real(run.x_ev[:sweep_n], torch.full((sweep_n,), float(t))))
             for t in sweep_t]
    run.R["_pictures"] = {"grid": grid, "sweep": (I_ev[:sweep_n], sweep, sweep_t.tolist()),
                          "angles": run.angle_errors}
    run.clock.lap("pictures")


def multi_query(run: Run, model_dir, enabled: bool = True) -> None:
    """Every usage mode of the device, before and after its cross-query rules (attacks/multiquery.py);
    needs the exported graphs, since the transmissions are built by the device runtime."""
    why = multiquery.skipped(model_dir) if enabled else "turned off (--no-multi-query)"
    if why:
        run.R["tables"]["multi_query"], run.R["multi_query"] = [], {"skipped": why}
        return
    sizes = queries.SIZES.get(run.public.budget.name, queries.SIZES["quick"])
    run.R["tables"]["multi_query"], run.R["multi_query"] = multiquery.measure(model_dir, run, sizes)
    run.clock.lap("multi-query")


def targets(R: dict, base) -> list:
    """The paper's bars, where the needed baselines were given (rows found by their ids)."""
    rec = {(r["model"], r["id"]): r["mae"] for r in R["tables"]["reconstruction"]}
    out = []
    paper = next(r for r in R["tables"]["angle"] if r["id"] == "paper_dprime")
    out.append({"target": "paper's angle attack error >= 0.75 rad", "value": paper["mean_abs_error_rad"],
                "threshold": 0.75, "met": paper["mean_abs_error_rad"] >= 0.75})
    names = [n for n, _, _ in base]
    if "original" in names:
        r = rec[("complex", "inversion1_dprime")] / max(rec[("original", "inversion")], 1e-9)
        out.append({"target": "reconstruction error from a* >= 3x the original's from a", "value": r,
                    "threshold": 3.0, "met": r >= 3.0})
    if "additional" in names and R["tables"]["property"]:
        err = {(r["model"], r["id"]): r["error"] for r in R["tables"]["property"]}
        for k in (1, 3, 5):
            d = err[("complex", f"knn{k}")] - err[("additional", f"knn{k}")]
            out.append({"target": f"property {k}-NN error >= additional baseline + 0.15", "value": d,
                        "threshold": 0.15, "met": d >= 0.15})
    return out
