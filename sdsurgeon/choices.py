"""Fixed choices the command line's help names, defined here without torch so that --help never imports it."""

# Gate settings (gate.spec validates them; DESIGN.md, semantics 2): one draw per step or per sample; scale by p at
# inference (the paper) or by 1/p in training.
MODES = ("batch", "row")
SCALINGS = ("paper", "inverted")
# What inject takes: a scaling, or auto (surgery.inject.resolve_scaling: inverted for a model that brings its own
# save path, so what that path writes is the inference model; paper otherwise).
SCALING_CHOICES = ("auto", *SCALINGS)
