"""Recipe: what a surgery did (sites, p_l, options), as data that a fresh model can replay."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..capture.inputs import ExampleInputs, InputSpec, make_example_inputs

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

    def examples(self) -> ExampleInputs | None:
        """The example tensors its input specs make (None without specs), made on first use and kept: every stage
        of one job (capture, the owners' re-trace, the fold's observed call, export, verify) runs on the same
        inputs instead of each drawing its own (they are one seeded draw, so equal anyway)."""
        if self.inputs is None:
            return None
        made = self.__dict__.get("_examples")
        if made is None or made[0] != self.inputs:  # the specs it was made from, should a caller replace them
            self.keep_examples(make_example_inputs(self.inputs))
        return self.__dict__["_examples"][1]

    def keep_examples(self, examples: ExampleInputs) -> None:
        """Take ``examples`` as the ones its input specs make (a caller that drew them from these specs already)."""
        # not a field: to_dict and asdict leave it out; a deep copy of the model (the fold's) copies them
        self.__dict__["_examples"] = (list(self.inputs), examples)

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
