"""Fixed choices the command line's help names, defined here without torch so that --help never imports it."""

# Gate settings (gate.spec validates them; DESIGN.md, semantics 2): one draw per step or per sample; scale by p at
# inference (the paper) or by 1/p in training.
MODES = ("batch", "row")
SCALINGS = ("paper", "inverted")
