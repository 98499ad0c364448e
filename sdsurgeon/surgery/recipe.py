"""Recipe: what a surgery did (sites, p_l, options), as data that a fresh model can replay."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..capture.inputs import InputSpec

RECIPE_ATTR = "sdsurgeon_recipe"


@dataclass
class Recipe:
    """Everything needed to redo the same surgery on a fresh instance of the architecture."""

    sites: list[tuple[str, float]]  # (site id, p) of every gated site, in depth order
    mode: str = "batch"
    scaling: str = "paper"
    seed: int | None = None
    p_L: float | None = None
    rule: str | None = None
    leaves: list[str] = field(default_factory=list)
    inputs: list[InputSpec] | None = None
    capture: str = "fx"  # the front-end that found the sites ("fx" | "export"): used again to rebuild
    sync_ranks: bool = True  # under torch.distributed, every rank draws the same gates
    keep_existing: bool = False  # drop-path modules the model had keep their rates (else switched off)
    replaced: list[list] = field(default_factory=list)  # [module path, rate] of drop paths switched off
    schedule: dict | None = None  # p_L over training steps (analysis.schedule.ScheduleSpec as a dict), if any
    early_exit: dict | None = None  # inject --early-exit: surgery.early_exit.resolve's record (settings and parts)

    def __setstate__(self, state: dict) -> None:
        # a model pickled while recipes kept their drawn example tensors (``_examples``): drawn inputs belong to
        # the job that drew them, not to the recipe, so they are let go here
        state = dict(state)
        state.pop("_examples", None)
        self.__dict__.update(state)

    @property
    def scales(self) -> bool:
        """Its fold scales some branch (paper scaling, some p below 1): the folded weights differ from the trained
        ones. Else (inverted scaling, or p = 1 everywhere) the trained weights already compute the model in eval."""
        return self.scaling != "inverted" and any(p != 1.0 for _, p in self.sites)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sites"] = [[s, p] for s, p in self.sites]
        d["inputs"] = None if self.inputs is None else [i.to_dict() for i in self.inputs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        d = dict(d)
        d["sites"] = [(str(s), float(p)) for s, p in d["sites"]]
        if d.get("inputs") is not None:
            d["inputs"] = [InputSpec.from_dict(i) for i in d["inputs"]]
        return cls(**d)
