"""Fixed choices the command line's help names, defined here without torch so that --help never imports it."""

# Gate settings (gate.spec validates them; DESIGN.md, semantics 2): one draw per step or per sample; scale by p at
# inference (the paper) or by 1/p in training.
MODES = ("batch", "row")
SCALINGS = ("paper", "inverted")
# What inject takes: a scaling, or auto (surgery.inject.resolve_scaling: inverted for a model that brings its own
# save path, so what that path writes is the inference model; paper otherwise).
SCALING_CHOICES = ("auto", *SCALINGS)
# Which p_l each site gets (analysis.schedule.RULES holds the functions), how a graph is read (capture.fx), which
# blocks pruning removes first (surgery.prune), what export writes (deploy.plain): here so that options.py checks
# them on a low floor, and --help names them without torch.
RULE_NAMES = ("linear", "uniform", "exponential")
CAPTURES = ("auto", "fx", "export")
DROP_RULES = ("schedule", "influence", "angular")
FORMATS = ("onnx", "safetensors", "hf")
# inject --early-exit (surgery.early_exit): how each exit's loss is weighted (torchtune's early_exit_loss scale types)
# and which exits are on at a training step (LayerSkip's curricula).
EXIT_SCALES = ("one", "l", "sum_l", "inv_l", "sqrt_l", "inv_sqrt_l")
EXIT_CURRICULA = ("none", "rotational", "gradual")
