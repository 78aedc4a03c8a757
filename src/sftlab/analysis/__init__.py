"""Geometry of fine-tuning: what an update does to the weights, and how far representations move.

Two lenses (after PEFT-Arena 2026): weight space (`weights`: the singular-value structure of dW per
linear module) and activation space (`activations`: base vs fine-tuned module outputs on the same
tokens). `run.analyze_run` applies both to a run's checkpoints; `sftlab analyze RUN` is its CLI.

Files written under RUN/analysis/ (JSON, floats as numbers, NaN/inf as null):

weights-step-NNNNNN.json
    {step, method, weight_change: bool, note?, modules: {module name: M}}
    M = {changed: false, shape} for an untouched module, else
        {changed: true, shape: [out, in], layer: int | null,
         rel_update_spectral, rel_update_frob,        ||dW||_2/||W0||_2, ||dW||_F/||W0||_F
         effective_rank, energy90_rank,               stable rank of dW, smallest k with 90% of its energy
         intruders, intruder_index, intruder_max_cos, Wft's top-k singular vectors vs W0's (k=10, eps=0.5)
         dp_mean, dp_max, dp_smoothness, e_mean, e_max,
         spectrum_index: [i ...] (<= 64 indices into W0's spectrum, evenly spaced, first and last kept),
         dp: [dP(i) ...], e: [E(i) ...], s0: [s_i ...] at those indices,
         alignment_mean, alignment: [...]             rotation methods (OFT, BOFT) only}
    Prefix/prompt tuning: weight_change false, modules {} and a note.

activations-step-NNNNNN.json
    {step, layers: [int], points: ["block", "attn", "mlp"], task_source,
     sets: {"general" | "task": {texts, tokens,
            layers: {layer: {point: {tokens, cosine_drift, norm_log_ratio, cka, procrustes_residual,
                                     raw_distance, procrustes_gain, procrustes_centred, gram_distortion,
                                     subspace_k32, subspace_k64}}},
            response: {module name: E||dW h||^2 / E||W0 h||^2},     every changed linear module
            response_per_layer: {layer: mean response}}}}
    "block" is a decoder layer's output (the residual stream), "attn"/"mlp" its sublayer outputs.

summary.json (steps accumulate over calls; a call overwrites what it recomputes for its steps; settings are
the last call's)
    {schema: 1, run, method, base_model, base_sha256, weight_change, settings: {..., layers_used, task_source},
     steps: {"N": {step, scores: {name: {value, kind, higher_is_better}}, seconds: {load, weights, activations?},
                   weights: {modules, modules_total, <means of M's scalars; intruders summed>,
                             per_layer: {layer: {same keys}}} | {note},
                   activations: {set: {mean: {<ACT_KEYS means over layers, 'block' point>, update_response},
                                       per_layer: {layer: {ACT_KEYS}}, response_per_layer: {layer: float}}}}}}
"""

from .run import AnalyzeOptions, analyze_run, summary_table

__all__ = ["AnalyzeOptions", "analyze_run", "summary_table"]
