"""Privacy audit of a split model: the paper's attacks (Sec. 4.3 / 5.1) plus adaptive ones.

One module per attack; ``runner.run_audit`` puts them together and ``report`` writes the results.
The attacker sees the public weights and the transmitted features x, never theta.
"""
