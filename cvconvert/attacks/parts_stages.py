"""The row audit of a P-part model: x = Q [a; b_1; ...; b_{P-1}] with a secret orthogonal key (Haar for
P > 2; for two parts, the complex encoder's rotation, read as its 2x2 matrix, so P = 2, 3, 4 can be
compared with the same attacks).

Stages: utility (shared with the two-part audit), the best rotation search, which row is the image,
reconstruction (the two-part stage with the P-part list), class/property probes, pictures, targets.
The victims' keys and true rows F = Q^T x are used to score only.
"""

from __future__ import annotations

import torch

from . import stages
from .inference import Classifier, n_outputs
from .metrics import chance_error, error_rate
from .registry import PARTS_PROPERTY_ATTACKS, PARTS_RECONSTRUCTION_ATTACKS, PARTS_SEARCH, PARTS_WHICH_ROW
from .rowsearch import cosines, random_recovery, rows, simulate
from .whichrow import shuffled, take

FOUND = 0.95  # |cos| with the image's feature at which a candidate counts as the image


def audit(run, with_prop: bool):
    R = run.R
    stages.utility(run)
    rotation(run)
    which_row(run)
    stages.reconstructions(run, PARTS_RECONSTRUCTION_ATTACKS)
    if "whitebox" in run.shared:
        R["whitebox_residual"] = float(run.shared["whitebox"].run(run.x_ev)[1].mean())
    properties(run, with_prop)
    pictures(run)
    R["tables"]["targets"] = targets(R, run.parts)
    R["tables"]["multi_query"] = []
    R["multi_query"] = {"skipped": "not part of the row audit (the default audit of a two-part model runs it)"}
    return run


def rotation(run) -> None:
    """The best rotation search on the victims' x: how close its best candidate comes to the image's
    feature, and how well its P candidates match the P true rows (against a random orthogonal R)."""
    pub = run.public
    search = run.shared["search"] = PARTS_SEARCH(run).fit(pub)
    run.R["history"].update(search.history)
    cand = run.shared["cand_ev"] = search.candidates(run.x_ev)
    keys = run.key_ev
    true_rows = run.shared["rows_ev"] = rows(keys.transpose(1, 2), run.x_ev)  # F = Q^T x (scoring only)
    cos = run.shared["cos_ev"] = cosines(cand, run.a_ev)
    gen = torch.Generator().manual_seed(pub.seed + 23)
    rand = random_recovery(run.x_ev, run.a_ev, gen)

    def matched(c):  # mean over candidate rows of the best |cos| with any true row
        return float(torch.stack([cosines(true_rows, c[:, j]).max(1).values for j in range(c.shape[1])]).mean())

    rand_cand = rows(torch.linalg.qr(torch.randn(len(cand), run.parts, run.parts, generator=gen))[0], run.x_ev)
    run.R["tables"]["rotation"] = [
        {"id": search.id, "attack": search.label, "image_cos": float(cos.max(1).values.mean()),
         "image_found": float((cos.max(1).values >= FOUND).float().mean()), "rows_cos": matched(cand)},
        {"id": "random", "attack": "a random orthogonal R (chance level)", "image_cos": float(rand.mean()),
         "image_found": float((rand >= FOUND).float().mean()), "rows_cos": matched(rand_cand)}]
    run.clock.lap(search.stage)


def which_row(run) -> None:
    """Accuracy of naming the image's row: on the search's candidates (right = the candidate closest to
    a), and on the true rows in a random order (a perfect de-rotation). Chance is 1/P."""
    which = run.shared["which"] = PARTS_WHICH_ROW(run).fit(run.public)
    run.R["history"].update(which.history)
    cand, cos = run.shared["cand_ev"], run.shared["cos_ev"]
    pick = which.pick(cand)
    shuf, target = shuffled(run.shared["rows_ev"], torch.Generator().manual_seed(run.public.seed + 29))
    chance = 1.0 / run.parts
    run.R["tables"]["which_row"] = [
        {"id": which.id, "attack": which.label, "accuracy": float((pick == cos.argmax(1)).float().mean()),
         "picked_cos": float(take(cos, pick).mean()), "chance": chance},
        {"id": "which_row_oracle", "attack": "which-row classifier on the true rows, shuffled (perfect de-rotation)",
         "accuracy": float((which.pick(shuf) == target).float().mean()), "picked_cos": None, "chance": chance}]
    run.clock.lap(which.stage)


def properties(run, with_prop: bool) -> None:
    """Classifiers of the hidden property (the class when the data set has none) from the key-free
    features and from the picked candidate, beside a raw-image classifier and the baselines' a."""
    pub, R = run.public, run.R
    what = "property" if with_prop else "class"
    y_tr, y_ev = (run.tr["props"], run.ev["props"]) if with_prop else (run.tr["targets"], run.ev["targets"])
    pub.n_props = n_outputs(torch.cat((y_tr, y_ev)) if y_tr.dim() == 1 else y_tr)
    chance = chance_error(y_tr, y_ev)
    gram = run.recon["gram_inversion"]
    x_tr = simulate(pub, torch.arange(len(run.tr["images"])), run.parts, torch.Generator().manual_seed(pub.seed + 5))[0]
    cand = run.shared["cand_ev"]
    views = {"raw": (run.tr["images"], run.ev["images"]), "gram": (gram.features(x_tr), gram.features(run.x_ev)),
             "picked": (pub.tr["a"], take(cand, run.shared["which"].pick(cand)))}
    plan = [("reference", "-", "reference: raw-image classifier on raw test images", "raw")]
    plan += [(f"{name}_a", name, "classifier on a", name) for name, _, _ in run.base]
    plan += [(aid, "complex", label, view) for aid, label, view in PARTS_PROPERTY_ATTACKS]
    out = []
    for aid, model, label, view in plan:
        inp_tr, inp_ev = run.bfeat[view] if view in run.bfeat else views[view]
        clf = Classifier(pub, f"parts_{what}_{aid}").fit(inp_tr, y_tr)
        out.append({"id": aid, "model": model, "attack": label, "error": error_rate(clf.predict(inp_ev), y_ev),
                    "chance": chance})
    R["tables"]["property"], R["property_target"] = out, what
    run.clock.lap("property inference")


def pictures(run) -> None:
    k = min(8, len(run.ev["images"]))
    grid = [("input", run.ev["images"][:k])]
    grid += [(f"{name}: dec(a)", run.binv[name][1][:k]) for name, _, _ in run.base]
    grid.append(("complex: dec(a), true key", run.reference[:k]))
    for aid, atk in run.recon.items():
        grid += atk.pictures(run.out[aid], k)
    run.R["_pictures"] = {"grid": grid}
    run.clock.lap("pictures")


ORACLE = ("best_of_rows", "whitebox_parts")  # scored with the truth: bounds, not attacks


def targets(R: dict, parts: int) -> list:
    """The P-part bars: which-is-real at most 1/P + 0.05; the best reconstruction without the key at least
    3x the original's (when an original baseline was given)."""
    t = R["tables"]
    best_acc = max(r["accuracy"] for r in t["which_row"])
    out = [{"target": f"which-row accuracy of the best attack <= 1/P + 0.05 (P = {parts})", "value": best_acc,
            "threshold": 1 / parts + 0.05, "met": best_acc <= 1 / parts + 0.05}]
    rec = t["reconstruction"]
    orig = next((r["mae"] for r in rec if r["model"] == "original"), None)
    attacks = [r for r in rec if r["model"] == "complex" and r["id"] not in ("reference",) + ORACLE]
    if orig is not None and attacks:
        best = min(r["mae"] for r in attacks) / max(orig, 1e-9)
        out.append({"target": "best reconstruction without the key >= 3x the original's (issue's bar at P = 4)",
                    "value": best, "threshold": 3.0, "met": best >= 3.0})
    return out
