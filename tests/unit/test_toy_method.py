"""A method defined in this file alone passes every method contract and trains in the arena (issue 22, item 1).

The toy: a learned per-channel scale on the outputs of chosen projections (o_proj and down_proj: what each
attention and MLP block writes to the residual stream), through PEFT's IA3 layers. Its one registration gives
its options, apply, budget rule (counted from the model's projections, as the shape reads them), default learning
rate and merge behaviour (an object of its own, moving additively: W0·diag(1 + a(s − 1)) = W0 + a·ΔW); a preset
of it ("toy_scale_mlp") is registered too. Nothing in sftlab names it. It is registered for this module only and
taken out again afterwards, so no other test sees it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

import test_budget as budget_contract
import test_methods as method_contract
from conftest import arena_config
from sftlab.configtools import check, doc
from sftlab.methods import METHODS, PRESETS, BudgetRule, Method, register_method, register_preset
from sftlab.methods.base import peft_wrap, unregister
from sftlab.methods.budget_rules import (Family, knob, layer_choices, layer_count, layers_label, module_names,
                                         modules_label)
from sftlab.methods.merge import AdditivePath

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

NAME = "toy_scale"


@dataclass
class ScaleOptions:
    modules: list[str] = doc("projections whose outputs get a learned per-channel scale",
                             default_factory=lambda: ["o_proj", "down_proj"])
    layers: list[int] | None = doc("only these layer indices (null: all layers)", default=None)

    def __post_init__(self):
        check(bool(self.modules), "method.modules", "list at least one projection")


def apply(model, o: ScaleOptions, token_indices=None):
    from peft import IA3Config

    from sftlab.methods.ia3 import other_layers

    cfg = IA3Config(task_type="CAUSAL_LM", target_modules=list(o.modules), feedforward_modules=[],
                    exclude_modules=other_layers(o.layers) if o.layers is not None else None)
    return peft_wrap(model, cfg, token_indices)


def count(shape, o) -> int:
    return sum(shape.linear(n)[1] for n in module_names(o.modules, shape)) * layer_count(shape, o.layers)


def candidates(shape, o, pinned, search):
    sets = knob(pinned, "modules", o.modules, [["o_proj"], ["o_proj", "down_proj"]])
    for layers, changed in layer_choices(shape, pinned, o.layers, search):
        for i, mods in enumerate(sets):
            yield Family(1 + i + 2 * int(changed), {"modules": mods, "layers": layers})


def describe(shape, o) -> str:
    return f"output scales on {modules_label(o.modules, shape=shape)}, {layers_label(shape, o.layers)}"


@dataclass(frozen=True)
class ScaleMerge:
    """The toy's own merge behaviour: a scale merges into W as W·diag(s), which is additive in s."""

    kind: str = "scale"
    rotation: bool = False
    holds_adapter: bool = False
    also: tuple = field(default=())

    def path(self, run, step):
        return AdditivePath(run, step)


TOY = Method(NAME, ScaleOptions, apply, "learned output scales (a test's toy)", token_rows=True,
             budget=BudgetRule(count, candidates, describe), default_lr=5e-2, merge=ScaleMerge())


@pytest.fixture(scope="module", autouse=True)
def toy():
    register_method(TOY)
    register_preset("toy_scale_mlp", NAME, {"modules": ["down_proj"]})
    method_contract.OVERRIDES[NAME] = {"lr": 1e-1}  # the tiny learnable model, as IA3 there
    budget_contract.TINY_BUDGETS[NAME] = 240  # hidden 64, 2 layers: at most 256 scales
    yield TOY
    method_contract.OVERRIDES.pop(NAME, None)
    budget_contract.TINY_BUDGETS.pop(NAME, None)
    unregister(NAME)
    assert NAME not in METHODS and "toy_scale_mlp" not in PRESETS


@pytest.fixture(scope="module")
def trained(tmp_path_factory, learnable_model_dir, chats_file):
    return method_contract.train_method(NAME, tmp_path_factory, learnable_model_dir, chats_file)


learnable_model_dir = method_contract.learnable_model_dir
chats_file = method_contract.chats_file


# ---- the method contract (tests/unit/test_methods.py) --------------------------------------------------

def test_method_contract(trained, learnable_model_dir, tmp_path):
    method_contract.test_training_halves_eval_loss(trained)
    method_contract.test_checkpoint_reloads_to_identical_logits(trained, learnable_model_dir)
    method_contract.test_run_records_trainable_share(trained)
    method_contract.test_packing_refused_for_virtual_token_methods(NAME, tmp_path)


# ---- the budget contract (tests/unit/test_budget.py) ---------------------------------------------------

@pytest.mark.parametrize("method,options", [(NAME, {}), (NAME, {"modules": ["o_proj"], "layers": [0, 29]}),
                                            ("toy_scale_mlp", {})])
def test_budget_formula_matches_the_built_model(method, options):
    budget_contract.test_formula_matches_the_built_model(method, options)


def test_budget_solves_and_lists_the_toy_and_its_preset(tmp_path, tiny_model_dir):
    from sftlab.methods.budget import method_names, solve_budget

    names = method_names()
    assert names.index("toy_scale_mlp") == names.index(NAME) + 1
    sol = solve_budget(budget_contract.SMOLLM2, NAME, 10_000)
    assert sol.method == NAME and sol.within_tolerance and sol.description.startswith("output scales on")
    budget_contract.test_bisection_finds_what_counting_every_setting_finds(NAME, 10_000)
    budget_contract.test_trainer_trains_what_the_solver_counted(NAME, tmp_path, tiny_model_dir)


# ---- rewinding along the path, with the toy's own merge object ----------------------------------------

def test_interpolation_endpoints(trained):
    import torch

    from sftlab.interpolate import Interpolator
    from sftlab.runs import Run

    run = Run(trained.run_dir)
    interp = Interpolator(run)
    assert interp.kind == "scale"
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        at0 = interp.at(0.0)(input_ids=ids).logits
        base = run.load_initial().eval()(input_ids=ids).logits
        at1 = interp.at(1.0)(input_ids=ids).logits
        ckpt = run.load()[0].eval()(input_ids=ids).logits
    torch.testing.assert_close(at0, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(at1, ckpt, atol=1e-5, rtol=0)
    assert (at1 - at0).abs().max() > 1e-3


# ---- the arena: planned at the registered default rate, trained, on the leaderboard --------------------

def test_toy_trains_in_the_arena(tmp_path, tiny_model_dir):
    from sftlab.arena import load_arena, plan_trials
    from sftlab.cli import main

    path = arena_config(tmp_path, tiny_model_dir, data={"packing": True}, name="toy", methods=[NAME, "toy_scale_mlp"],
                        budgets=["240"], lr_factors=[1.0], lrs={})
    trials = plan_trials(*load_arena(path))
    assert [t.lr for t in trials] == [TOY.default_lr, TOY.default_lr]  # the registration's rate (the preset's too)
    assert all(not t.refused and t.cfg.method.name == NAME and t.cfg.data.packing for t in trials)
    assert main(["arena", str(path)]) == 0
    meta = json.loads((tmp_path / "out" / "toy" / "arena.json").read_text())
    assert {t["method"] for t in meta["trials"]} == {NAME, "toy_scale_mlp"}
    assert all(t["status"] == "done" for t in meta["trials"]), meta["trials"]
    board = json.loads((tmp_path / "out" / "toy" / "leaderboard.json").read_text())
    assert {r["method"] for r in board["rows"]} == {NAME, "toy_scale_mlp"}
