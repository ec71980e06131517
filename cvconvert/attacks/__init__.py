"""Privacy audit of a split model: the paper's attacks (Sec. 4.3 / 5.1) plus adaptive ones.

Each attack is a class behind one of three small interfaces (``base.py``: angle, reconstruction,
property); ``registry.py`` lists them in report order, ``stages.py`` runs one loop per stage,
``runner.run_audit`` loads the model and the data, and ``report`` writes the results. The attacker sees
the public weights and the transmitted features x, never theta.
"""
