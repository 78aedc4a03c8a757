"""The budget solver on layouts its config formulas do not know, counted from the model's modules.

Qwen2 (biased q/k/v), Phi-3 (fused qkv_proj and gate_up_proj), GPT-2 (Conv1D) and a LLaVA-style VLM (a
CLIP vision tower and a projector beside a Llama language model) are built from tiny configs written here
(no hub). For each, the solver's count must equal the trainable parameters of the model the method registry
really builds (on the meta device, as test_budget.py checks the formula layouts), and a solved budget must
train what it said. In the VLM only the language model's linears are adapted and counted.
"""

from __future__ import annotations

import pytest

from sftlab.methods.budget import (BudgetError, count_trainable, measure_trainable, method_names, model_shape,
                                   solve_all, solve_budget)
from sftlab.methods.budget_rules import ModelShape

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              # GPT-2's Conv1D: PEFT says it sets fan_in_fan_out itself
              pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")]

TEXT = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 300, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
QWEN2 = {"model_type": "qwen2", **TEXT, "tie_word_embeddings": False}
PHI3 = {"model_type": "phi3", **TEXT}
GPT2 = {"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": 300, "n_positions": 64,
        "bos_token_id": 1, "eos_token_id": 2}
LLAVA = {"model_type": "llava", "image_token_index": 299,
         "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 48,
                           "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                           "projection_dim": 32},
         "text_config": {"model_type": "llama", **TEXT}}
LAYOUTS = {"qwen2": QWEN2, "phi3": PHI3, "gpt2": GPT2, "llava": LLAVA}
# Other VLMs: the language model is found by its config, whatever its name (Idefics3 calls it text_model).
VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}
VLMS = {
    "idefics3": {"model_type": "idefics3", "text_config": {"model_type": "llama", **TEXT}, "vision_config": VISION,
                 "scale_factor": 2},
    "qwen2_vl": {"model_type": "qwen2_vl", "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64,
                                                             "num_heads": 2},
                 "text_config": {**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}},
    "gemma3": {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", **TEXT, "head_dim": 16},
               "vision_config": {"model_type": "siglip_vision_model", **VISION}, "mm_tokens_per_image": 4},
}
VLM_SETTINGS = [("full", {}), ("lora", {"r": 2}),
                ("lora", {"r": 2, "target_modules": ["q_proj", "v_proj"], "layers": [1]}),
                ("oft", {"block_size": 4}), ("boft", {"block_size": 4}),
                ("ia3", {"target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
                ("prefix", {"num_virtual_tokens": 3}), ("prompt", {"num_virtual_tokens": 3})]

# Every method with its main knob, a module subset and a layer subset. IA3 names its modules where PEFT has no
# default for the architecture (Phi-3, LLaVA), as PEFT itself requires; OFT/BOFT cannot adapt GPT-2's Conv1D.
ATTN = {"qwen2": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "llava": ["q_proj", "v_proj"]}
MLP = {"qwen2": ["down_proj"], "phi3": ["down_proj"], "gpt2": ["mlp.c_proj"], "llava": ["down_proj"]}


def settings(layout: str) -> list[tuple[str, dict]]:
    attn, mlp = ATTN[layout], MLP[layout]
    out = [("full", {}), ("full", {"freeze": ["embed_tokens", "wte"]}),
           ("lora", {"r": 2}), ("lora", {"r": 3, "target_modules": attn + mlp, "layers": [0, 2]}),
           ("dora", {"r": 2, "target_modules": mlp}),
           ("ia3", {"target_modules": attn + mlp, "feedforward_modules": mlp}),
           ("ia3", {"target_modules": attn, "feedforward_modules": [], "layers": [1]}),
           ("prefix", {"num_virtual_tokens": 3}), ("prefix", {"num_virtual_tokens": 2, "projection": True,
                                                              "encoder_hidden_size": 8}),
           ("prompt", {"num_virtual_tokens": 5})]
    if layout != "gpt2":
        out += [("oft", {"block_size": 4}), ("oft", {"block_size": 8, "target_modules": mlp, "layers": [1]}),
                ("oft", {"block_size": 16, "block_share": True}), ("boft", {"block_size": 4}),
                ("boft", {"block_size": 8, "target_modules": attn, "layers": [0]})]
    if layout in ("qwen2", "gpt2"):  # PEFT's IA3 defaults for the architecture
        out.append(("ia3", {}))
    return out


CASES = [(layout, m, o) for layout in LAYOUTS for m, o in settings(layout)]


@pytest.mark.parametrize("layout,method,options", CASES,
                         ids=[f"{lay}-{m}-{i}" for i, (lay, m, _) in enumerate(CASES)])
def test_module_count_matches_the_built_model(layout, method, options):
    assert count_trainable(LAYOUTS[layout], method, options) == measure_trainable(LAYOUTS[layout], method, options)


@pytest.mark.parametrize("vlm", list(VLMS))
def test_other_vlms_count_their_language_model(vlm):
    shape = model_shape(VLMS[vlm])
    assert shape.scope == ("model.text_model" if vlm == "idefics3" else "model.language_model")
    for method, options in VLM_SETTINGS:
        assert count_trainable(shape, method, options) == measure_trainable(VLMS[vlm], method, options), method


def test_shapes_are_read_from_the_modules():
    qwen, phi, gpt, llava = (model_shape(LAYOUTS[k]) for k in ("qwen2", "phi3", "gpt2", "llava"))
    assert qwen.source == "modules" and qwen.linears["k_proj"] == (64, 32)
    # Phi-3's fused projections: q, k and v in one (64 + 2 * 32 outputs), gate and up in one
    assert phi.linears == {"o_proj": (64, 64), "qkv_proj": (64, 128), "gate_up_proj": (64, 192),
                           "down_proj": (96, 64)}
    # GPT-2's two c_proj are told apart by their container; all four are Conv1D
    assert set(gpt.linears) == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"} == set(gpt.conv1d)
    assert gpt.sets["attention"] == ("c_attn", "attn.c_proj")
    # the VLM: the language model's layers only; its base parameters include the vision tower's
    assert llava.scope == "model.language_model" and llava.layers == 3 and llava.hidden == 64
    assert any("vision_tower" in n for n, _ in llava.base_params())


def test_the_formula_layouts_agree_with_the_walk():
    """SmolLM2's shape written down from config.json counts what the walk of its built model counts."""
    from test_budget import SETTINGS, SMOLLM2

    from sftlab.methods.model_walk import walk

    written, walked = model_shape(SMOLLM2), walk(SMOLLM2)
    assert written.source == "config" and walked.source == "modules"
    assert sorted(written.base_params()) == sorted(walked.base_params())
    assert dict(written.linears) == dict(walked.linears)
    for method, options in SETTINGS:
        assert count_trainable(written, method, options) == count_trainable(walked, method, options)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_solved_budgets_train_what_they_say(layout):
    """Every method at a share of the base: within tolerance or refused in one line; a solution builds exactly."""
    shape = model_shape(LAYOUTS[layout])
    for name, sol in solve_all(shape, 2_000).items():
        if isinstance(sol, str):
            assert sol.startswith("budget: ") and "\n" not in sol, (name, sol)
            continue
        assert sol.within_tolerance or sol.method == "full" or sol.warning, (name, sol)
        assert measure_trainable(LAYOUTS[layout], sol.method, sol.options) == sol.trainable, (name, sol)
    assert set(solve_all(shape, 2_000)) == set(method_names())


def test_refusals_name_what_is_missing():
    with pytest.raises(BudgetError, match="cannot adapt Conv1D"):
        solve_budget(GPT2, "oft", 2_000)
    # IA3 as configured (no target_modules) is what PEFT refuses on Phi-3; a search names its modules
    with pytest.raises(BudgetError, match="no default IA3 modules for phi3"):
        count_trainable(PHI3, "ia3", {})
    sol = solve_budget(PHI3, "ia3", 500)
    assert sol.options["feedforward_modules"] == ["down_proj"] and sol.trainable == measure_trainable(
        PHI3, "ia3", sol.options)
    # a VLM's search starts from PEFT's default for its text model (Llama: k, v and down)
    assert solve_budget(LLAVA, "ia3", 480).options["target_modules"] == ["k_proj", "v_proj", "down_proj"]
    with pytest.raises(BudgetError, match="not projections of a qwen2 decoder layer"):
        count_trainable(QWEN2, "lora", {"target_modules": ["c_attn"]})
    with pytest.raises(BudgetError, match="not known to this transformers"):
        model_shape({"model_type": "no_such_model"})
    assert isinstance(model_shape(model_shape(QWEN2)), ModelShape)
