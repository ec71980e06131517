"""The audit's attacks, in report order: one list per stage.

Adding an attack: write a class implementing one of the interfaces of ``attacks/base.py`` in its own
module, and add one entry to the list of its stage here. Entries are factories ``entry(run) -> attack``;
``run`` gives what was found by the earlier stages (``run.angle``: the fitted angle attacks by id,
``run.inverter``: the U-Net from a to the image, ``run.monitor``: the victim's x and theta, only for
per-epoch logs).

P-part models (P > 2) have no angle: their audit (attacks/parts_stages.py) runs the best rotation search
and the which-row classifiers first (kept in ``run.shared`` as "search" and "which"), then the lists
PARTS_* below.
"""

from __future__ import annotations

from ..registry import put
from . import angle, gram, inference, inversion, invariant, phase_support, regressor, rowsearch, whitebox, \
    whitebox_parts, whichrow


def _phase_support_reading(run):
    best = phase_support.best(run.angle.values())  # chosen on the attacker's own data
    return inversion.FromAngle("phase_support_astar", f"adaptive: dec(a*), phase-support angle ({best.kind})",
                               best, run.inverter)


ANGLE_ATTACKS = (
    lambda run: angle.PaperDPrime(),
    lambda run: regressor.LearnedRegressor(monitor=run.monitor),
    lambda run: phase_support.PhaseSupport("window"),
    lambda run: phase_support.PhaseSupport("mean"),
    lambda run: whitebox.WhiteBox(),
)

RECONSTRUCTION_ATTACKS = (
    lambda run: inversion.FromAngle("inversion1_dprime", "inversion 1: dec(a*), paper D' angle",
                                    run.angle["paper_dprime"], run.inverter),
    lambda run: inversion.FromX(),
    lambda run: inversion.FromAngle("regressor_astar", "adaptive: dec(a*), learned regressor angle",
                                    run.angle["regressor"], run.inverter),
    _phase_support_reading,
    lambda run: invariant.InvariantInverter(),
    lambda run: whitebox.WhiteBoxImage(run.angle["whitebox"]),
    lambda run: whitebox.WhiteBoxPair(run.angle["whitebox"]),
)

# Property attacks on each model (the complex one and every baseline): (id, label, view, factory).
# Views: "feature" (a* for the complex model, a for a baseline) and "decoded" (the inverter's output).
# {fa} in a label is the feature's name.
PROPERTY_ATTACKS = (
    ("inference1", "inference 1: raw-image classifier on dec({fa})", "decoded", lambda run, m: run.raw_classifier),
    ("inference2", "inference 2: classifier on {fa}", "feature",
     lambda run, m: inference.Classifier(run.public, f"{m.model}_property_2_features",
                                         f"inference 2 ({m.model}, {m.fa})")),
    ("inference3", "inference 3: classifier on dec({fa})", "decoded",
     lambda run, m: inference.Classifier(run.public, f"{m.model}_property_3_decoded",
                                         f"inference 3 ({m.model}, dec({m.fa}))")),
    *((f"knn{k}", f"inference 4: {k}-NN of {{fa}}", "feature", lambda run, m, k=k: inference.KNN(run.public, k))
      for k in (1, 3, 5)),
)

# Adaptive property attacks on the complex model only, after the above: views of x that need no D'.
ADAPTIVE_PROPERTY_ATTACKS = (
    ("invariant_probe", "adaptive: classifier on |x|, x_j conj x_k", "invariants",
     lambda run, m: inference.Classifier(run.public, "property_invariant_probe", "adaptive invariant probe (complex)")),
    ("regressor_probe", "adaptive: classifier on a* from the learned regressor", "regressor a*",
     lambda run, m: inference.Classifier(run.public, "property_regressor_astar")),
)

# --- P-part models (P > 2) ---------------------------------------------------------------------------------

PARTS_SEARCH = lambda run: rowsearch.RowSearch(run.parts)  # noqa: E731  (the best rotation search)
PARTS_WHICH_ROW = lambda run: whichrow.WhichRow(run.parts)  # noqa: E731  (which candidate is the image)

def _parts_whitebox(run):
    """One white-box image search, shared by its two rows."""
    return run.shared.setdefault("whitebox", whitebox_parts.WhiteBoxParts(run.shared["search"]))


PARTS_RECONSTRUCTION_ATTACKS = (
    lambda run: whichrow.FromPicked(run.shared["search"], run.shared["which"], run.inverter),
    lambda run: whichrow.BestOfRows(run.shared["search"], run.shared["which"], run.inverter),
    lambda run: gram.GramInverter(run.parts),
    lambda run: whitebox_parts.WhiteBoxPicked(_parts_whitebox(run), run.shared["which"]),
    _parts_whitebox,
)

# Class / attribute probes on P-part transmissions: (id, label, view); views are made in parts_stages.
PARTS_PROPERTY_ATTACKS = (
    ("gram_probe", "key-free: classifier on |x_j|, sum_p x_pj x_pk", "gram"),
    ("picked_probe", "classifier on the picked candidate", "picked"),
)


def check_ids(*tables) -> None:
    """Warn on an id listed twice across TABLES of (id, ...) entries (the report keys rows by id)."""
    seen: dict = {}
    for table in tables:
        for entry in table:
            put(seen, entry[0], entry, "attack")


check_ids(PROPERTY_ATTACKS, ADAPTIVE_PROPERTY_ATTACKS)
check_ids(PARTS_PROPERTY_ATTACKS)
