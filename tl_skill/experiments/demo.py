"""The demo's settings (`DemoConfig`) and record (`DemoResult`); `tl_skill.pipelines.run_demo` runs it."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tl_skill.experiments.results import Result
from tl_skill.files import read_json
from tl_skill.tuning.runs import TuneConfig

DEMO_JSON = "demo.json"


@dataclasses.dataclass(frozen=True, repr=False)
class DemoResult(Result):
    """The demo's settings and the seconds each phase took (summed over reruns)."""

    FILE = DEMO_JSON

    config: dict[str, Any]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dataframe(self) -> Any:
        """One row per phase: `phase` and the `seconds` it took."""
        import pandas as pd

        return pd.DataFrame(list(self.timings.items()), columns=["phase", "seconds"])

    def facts(self) -> dict[str, Any]:
        return {k: self.config.get(k) for k in ("model", "task") if k in self.config}


def legacy_demo_identity(out: Path) -> dict[str, Any] | None:
    if not (out / DEMO_JSON).exists():
        return None
    return read_json(out / DEMO_JSON, "demo file").get("config") or {}


@dataclass
class DemoConfig:
    """Settings of `tl-skill demo`; `quick()` is the ~3-minute variant."""

    model: str = "smollm2-135m"
    task: str = "rotten_tomatoes"
    quick: bool = False
    tune: TuneConfig = field(
        default_factory=lambda: TuneConfig(
            prompt_length=8, steps=120, eval_every=40, max_dev_examples=200, max_test_examples=500
        )
    )
    find_train_examples: int = 1000
    find_dev_examples: int | None = 500
    ablation_mode: str = "noise"
    ablation_fractions: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2)
    ablation_seeds: int = 2
    ablation_examples: int = 300
    top: int = 10
    dashboard_top: int = 10
    dashboard_examples: int = 60
    batch_size: int = 32

    @classmethod
    def quick_config(cls, **kw) -> DemoConfig:
        return cls(
            quick=True,
            tune=TuneConfig(
                prompt_length=8,
                steps=30,
                eval_every=15,
                max_train_examples=480,
                max_dev_examples=100,
                max_test_examples=200,
            ),
            find_train_examples=300,
            find_dev_examples=200,
            ablation_fractions=(0.02, 0.2),
            ablation_seeds=1,
            ablation_examples=150,
            dashboard_top=3,
            dashboard_examples=40,
            **kw,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ablation_fractions"] = list(self.ablation_fractions)
        return d
