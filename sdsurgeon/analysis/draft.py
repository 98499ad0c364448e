"""Self-speculative decoding from an early exit, measured: per layer, how often the exit's greedy token is the full model's on calibration tokens, and the speed-up that share predicts (runs the model; changes nothing)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..capture.inputs import normalize_inputs
from ..errors import ConfigError
from ..gate import gates
from .exits import find_final_norm, find_head, first_tensor
from .influence import run_hooked
from .layers import find_layers

# transformers 5's default draft length for assisted generation, assistant_early_exit included: the global generation
# default num_assistant_tokens = 20 with num_assistant_tokens_schedule = "constant"
# (transformers/generation/configuration_utils.py, GenerationConfig._get_default_generation_params).
DRAFT_TOKENS = 20

# What the report measures and predicts, in words (the CLI and the docs quote it).
AGREEMENT_MEASURE = ("agreement = share of the calibration positions (attention mask 1) where argmax head(norm(h_l)), "
                     "the exit after layer l through the model's own final norm and LM head, is the full model's "
                     "argmax (model in eval)")
SPEEDUP_MODEL = ("speed-up = (1 - a^(g+1)) / ((1 - a) (g c + 1)), Leviathan et al. 2023 (arXiv 2211.17192, eq. 1 and "
                 "Theorem 3.8), with a = the agreement (taken as each drafted token's acceptance rate, independent of "
                 "position), g = the draft length and c = (l + 1) / L, the draft's share of the layers (embedding, "
                 "final norm and LM head not counted)")


def speculative_speedup(alpha: float, gamma: int, cost: float) -> float:
    """The expected walltime improvement of speculative decoding (Leviathan et al. 2023, "Fast Inference from
    Transformers via Speculative Decoding", arXiv 2211.17192, Theorem 3.8):

        speed-up = (1 - alpha^(gamma + 1)) / ((1 - alpha) (gamma c + 1))

    ``alpha``: the chance that the target accepts a drafted token (0 to 1); ``gamma``: tokens drafted per round;
    ``cost`` (c): the cost of one draft step over one target step. Each round drafts ``gamma`` tokens (cost gamma c)
    and verifies them in one target step (cost 1), and yields (1 - alpha^(gamma+1)) / (1 - alpha) tokens on
    average. At alpha = 1 the limit (gamma + 1) / (gamma c + 1)."""
    if not 0.0 <= alpha <= 1.0 or gamma < 1 or cost < 0:
        raise ValueError(f"speculative_speedup needs 0 <= alpha <= 1, gamma >= 1, cost >= 0 (got {alpha}, {gamma}, "
                         f"{cost})")
    tokens = gamma + 1.0 if alpha == 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)
    return tokens / (gamma * cost + 1.0)


@dataclass(frozen=True)
class ExitAgreement:
    """One exit: after layer ``layer`` (0-based), which ``generate(assistant_early_exit=layer + 1)`` drafts with."""

    layer: int
    assistant_early_exit: int
    agreement: float  # share of positions where the exit's argmax is the full model's
    cost: float  # c = (layer + 1) / L
    speedup: float  # speculative_speedup(agreement, draft_tokens, cost)


@dataclass(frozen=True)
class DraftReport:
    """exit_agreement's result: where the parts are, what was measured on, and one ExitAgreement per layer."""

    layer_list: str
    head: str
    norm: str  # "" where the head reads the last layer's output itself
    n_layers: int
    positions: int  # the calibration positions counted (attention mask 1)
    draft_tokens: int
    exits: tuple[ExitAgreement, ...]

    def best(self) -> ExitAgreement | None:
        """Of the layers before the last (the last one is the full model), the exit of the highest predicted
        speed-up above 1 (the shallowest of equals); None where none predicts one."""
        ahead = [e for e in self.exits[:-1] if e.speedup > 1.0]
        return max(ahead, key=lambda e: (e.speedup, -e.layer)) if ahead else None

    def to_dict(self) -> dict:
        return {"layer_list": self.layer_list, "head": self.head, "norm": self.norm, "n_layers": self.n_layers,
                "positions": self.positions, "draft_tokens": self.draft_tokens,
                "measure": AGREEMENT_MEASURE, "speedup_model": SPEEDUP_MODEL,
                "best_exit": None if self.best() is None else self.best().layer, "exits": [asdict(e) for e in self.exits]}


def _tokens(inputs, option: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token ids (``input_ids``, else the first positional input) and attention mask of ``inputs``."""
    normal = normalize_inputs(inputs)
    args, kwargs = normal if normal is not None else ((), {})
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() \
            or ids.dtype == torch.bool:
        got = "nothing" if ids is None else (f"{ids.dtype} of shape {tuple(ids.shape)}"
                                             if isinstance(ids, torch.Tensor) else type(ids).__name__)
        raise ConfigError(f"{option} needs token ids: an integer tensor (batch, positions) as input_ids or the first "
                          f"input, not {got}", what="inputs are not token ids", option=option)
    mask = kwargs.get("attention_mask")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape):
        raise ConfigError(f"{option} attention_mask must have the shape of input_ids {tuple(ids.shape)}",
                          what="attention mask does not fit", option=option)
    return ids, mask


def exit_agreement(model: nn.Module, inputs, *, draft_tokens: int = DRAFT_TOKENS,
                   option: str = "--calibration") -> DraftReport:
    """Per layer l of the model's layer list: the share of ``inputs``' positions where ``argmax head(norm(h_l))``
    (h_l the layer's output, norm and head the model's own, found by rule: analysis.exits) equals the full model's
    ``argmax logits``, and ``speculative_speedup(share, draft_tokens, (l + 1) / L)``.

    ``inputs``: token ids (a tensor, or a dict with ``input_ids`` and optionally ``attention_mask``: positions whose
    mask is 0 are not counted). One forward in eval without grad, with forward hooks on the layers and the root: no
    reliance on ``output_hidden_states``, whose last entry some models give after the final norm. The share stands
    in for the acceptance rate of Leviathan et al.'s model: the prefixes are the calibration text's, not the
    model's own generations, and acceptance is taken as independent of the position in the draft. The last layer
    agrees with the full model by construction (a check of the parts found). Read-only: modes restored.
    Raises EarlyExitError (no LM head, no final norm), LayerError (no layer list), ConfigError (not token ids).
    """
    ids, mask = _tokens(inputs, option)
    head_path = find_head(model, option="draft")
    layers = find_layers(model) if gates(model) else find_layers(model, gated=False)
    norm_path = find_final_norm(model, layers.path, head_path, inputs, option="draft")
    head = model.get_submodule(head_path)
    norm = model.get_submodule(norm_path) if norm_path else nn.Identity()
    blocks = model.get_submodule(layers.path)
    n = len(blocks)
    predicted: dict[int, torch.Tensor] = {}
    full: list[torch.Tensor] = []

    def layer_hook(l: int):
        def hook(module, args, output):
            h = first_tensor(output)
            if h is not None and l not in predicted:
                predicted[l] = head(norm(h)).argmax(-1)
        return hook

    def root_hook(module, args, output):
        logits = output["logits"] if hasattr(output, "keys") and "logits" in output.keys() else first_tensor(output)
        full.append(logits.argmax(-1))

    run_hooked(model, inputs, [(m, layer_hook(l)) for l, m in enumerate(blocks)] + [(model, root_hook)])
    counted = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    positions = int(counted.sum())
    if not positions:
        raise ConfigError(f"{option} has no position to count (its attention mask is all 0)", option=option)
    exits = []
    for l in range(n):
        if l not in predicted or predicted[l].shape != full[0].shape:
            raise ConfigError(f"draft: layer {l} of {layers.path} gave no hidden state of the logits' positions on "
                              f"{option}", option=option)
        share = float((predicted[l] == full[0])[counted].double().mean())
        cost = (l + 1) / n
        exits.append(ExitAgreement(l, l + 1, share, cost, speculative_speedup(share, draft_tokens, cost)))
    return DraftReport(layers.path, head_path, norm_path, n, positions, draft_tokens, tuple(exits))


__all__ = ["AGREEMENT_MEASURE", "DRAFT_TOKENS", "DraftReport", "ExitAgreement", "SPEEDUP_MODEL", "exit_agreement",
           "speculative_speedup"]
