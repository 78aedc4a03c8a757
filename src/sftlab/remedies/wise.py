"""wise: WiSE-FT, the final weights interpolated towards the base, scored at a few alphas at the end.

Wortsman et al. 2022, "Robust fine-tuning of zero-shot models": W0 + alpha * (W - W0) for 0 < alpha < 1 keeps
much of the fine-tuned task gain with less of the drift. This is the rewinding machinery (interpolate.search,
the method's merge path: additive, or scaled generators for OFT/BOFT) run once after training on the final
checkpoint; the point the run's `select:` rule picks among the alphas (and the base) is written with every
scored alpha to RUN/wise.json. `sftlab rewind RUN --search ...` does the same by hand on any checkpoint, and
`sftlab export` at that alpha writes the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..configtools import check, doc
from .base import Hooks, RemedySpec, register_remedy

FILE = "wise.json"


@dataclass
class WiseOptions:
    alphas: list[float] = doc("interpolation weights to score between the base (0) and the final checkpoint (1)",
                              default_factory=lambda: [0.25, 0.5, 0.75])

    def __post_init__(self):
        check(bool(self.alphas) and all(0 < a <= 1 for a in self.alphas), "alphas",
              f"must be numbers in (0, 1], got {self.alphas}")


class Wise(Hooks):
    def __init__(self, options: WiseOptions):
        self.options = options

    def on_train_end(self, trainer) -> None:
        from ..interpolate import search
        from ..rewinding import run_points, stated_policy
        from ..runs import Run
        from ..scoring import score_model, write_json_atomic
        from ..trajectory import point_from_scores

        if trainer.scorer is None:
            return
        run_dir = trainer.run_dir
        points, t, r = run_points(run_dir)
        policy, params, called = stated_policy(run_dir, None, {})
        run = Run(run_dir)
        scored = {}

        def score_fn(model, tokenizer, step, alpha):
            s = score_model(model, tokenizer, trainer.scorer.probes, trainer.scorer.ctx)
            scored[alpha] = s
            return point_from_scores(step, s[t], s[r], alpha=alpha)

        base = next((p for p in points if p.step == 0), None)
        res = search(run, None, sorted({*self.options.alphas, 1.0}), score_fn, policy, base=base, **params)
        c = res.choice.point
        write_json_atomic(run_dir / FILE, {
            "step": run.checkpoint(None)["step"], "task": t, "retention": r, "rule": called,
            "chosen": {"alpha": c.alpha if c.step else 0.0, "reason": res.choice.reason},
            "points": [{"alpha": a, "scores": scored[a]} for a in sorted(scored)]})

    def provenance(self) -> dict:
        return {"alphas": list(self.options.alphas), "file": FILE}


register_remedy(RemedySpec("wise", WiseOptions, Wise,
                           "WiSE-FT: the final weights interpolated towards the base at a few alphas, scored at "
                           "the end (RUN/wise.json)", "average", cite="Wortsman et al. 2022", needs_probes=True,
                           needs_merge=True))
