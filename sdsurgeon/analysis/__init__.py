"""Finding, not changing: residual sites, survival-probability schedules, block influence, the plan record.

Analysis traces and runs models (to capture their blocks, to measure influence and fidelity on calibration
inputs), with train/eval modes, hooks and ``requires_grad`` flags put back after; it never changes a model.
What changes one (installing graphs, folding, pruning) lives in surgery.
"""
