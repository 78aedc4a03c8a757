"""Bad input never shows a traceback: every subcommand, given unknown names, overrides nested into a scalar,
list indices out of range, wrong types, missing or unreadable files or a folder of the wrong kind, exits
non-zero with exactly one line on stderr that says what to do. Real bugs still raise (and --debug shows them).

Each case runs `sftlab.cli.main` in-process (a subprocess costs seconds of imports) and fails before any
model loads: the config's model path does not exist, so a case that got past validation could not train."""

from __future__ import annotations

import json

import pytest

from sftlab import cli
from sftlab.configtools import ConfigError
from sftlab.errors import SftlabError
from sftlab.registry import Registry, RegistryError, UnknownNameError

# (test id, argv with {d} for the fixture folder, a piece of the expected message)
CASES = [
    # train: overrides
    ("train-override-into-a-number", "train {d}/ok.yaml train.lr.x=1", "train.lr is a number"),
    ("train-override-into-a-string", "train {d}/ok.yaml data.train.0.path.x=1", "data.train.0.path is a string"),
    ("train-override-into-an-int", "train {d}/ok.yaml method.r.x=1", "method.r is a number"),
    ("train-list-index-out-of-range", "train {d}/ok.yaml train.betas.5=0.1", "train.betas has 2 entries"),
    ("train-source-index-out-of-range", "train {d}/ok.yaml data.train.3.path=x", "data.train has 1 entry"),
    ("train-probe-index-out-of-range", "train {d}/ok.yaml probes.1.name=x", "probes has 1 entry"),
    ("train-list-index-not-a-number", "train {d}/ok.yaml train.betas.x=0.1", "train.betas is a list"),
    ("train-index-into-unset-list", "train {d}/ok.yaml data.eval.0.path=x", "data.eval is not set"),
    ("train-override-without-value", "train {d}/ok.yaml train.lr", "key.path=value"),
    ("train-override-empty-key", "train {d}/ok.yaml =3", "empty part"),
    ("train-override-double-dot", "train {d}/ok.yaml train..lr=3", "empty part"),
    # train: names and types
    ("train-unknown-key", "train {d}/ok.yaml train.lrr=1", "did you mean 'lr'"),
    ("train-unknown-section", "train {d}/ok.yaml bogus.x=1", "bogus: unknown key"),
    ("train-unknown-method", "train {d}/ok.yaml method.name=lorra", "did you mean 'lora'"),
    ("train-unknown-probe", "train {d}/ok.yaml probes.0.name=nope", "unknown probe 'nope'"),
    ("train-method-name-a-list", "train {d}/ok.yaml method.name=[a,b]", "unknown method"),
    ("train-number-expected", "train {d}/ok.yaml train.lr=abc", "expected a number"),
    ("train-integer-expected", "train {d}/ok.yaml train.steps=1.5", "expected an integer"),
    ("train-bool-expected", "train {d}/ok.yaml train.compile=maybe", "expected true or false"),
    ("train-choice-misspelt", "train {d}/ok.yaml model.dtype=float8", "did you mean 'float32'"),
    ("train-section-given-a-number", "train {d}/ok.yaml run=3", "expected a section"),
    ("train-method-given-a-number", "train {d}/ok.yaml method=7", "expected a section like"),
    ("train-value-out-of-range", "train {d}/ok.yaml train.steps=-1", "must be >= 0"),
    # forgetting remedies and checkpoint.keep (docs/remedies.md)
    ("train-unknown-remedy", "train {d}/ok.yaml remedies=[kll]", "unknown remedy 'kll'; did you mean 'kl'"),
    ("train-remedy-bad-option", 'train {d}/ok.yaml remedies=[{"name":"kl","weight":-1}]',
     "remedies[0].weight: must be > 0"),
    ("train-remedy-unknown-option", 'train {d}/ok.yaml remedies=[{"name":"l2sp","wieght":1}]',
     "did you mean 'weight'"),
    ("train-remedy-twice", "train {d}/ok.yaml remedies=[kl,kl]", "'kl' is listed twice"),
    ("train-remedy-not-a-list", "train {d}/ok.yaml remedies=kl", "remedies: expected a list"),
    ("train-replay-share-out-of-range", 'train {d}/ok.yaml remedies=[{"name":"replay","share":1.5}]',
     "must be in (0, 1)"),
    ("train-dft-with-dpo", "train {d}/ok.yaml remedies=[dft] objective.name=dpo", "works with objective sft"),
    ("train-ema-without-probes", "train {d}/ok.yaml remedies=[ema] probes=[]", "scores checkpoints of its own"),
    ("train-wise-on-prompt-tuning", "train {d}/ok.yaml remedies=[wise] method=prompt", "virtual tokens"),
    # vision-language models (docs/multimodal.md)
    ("train-vision-part-misspelt", "train {d}/ok.yaml vision.train=[visual]", "'visual' is not allowed; use one of"),
    ("train-vision-part-twice", "train {d}/ok.yaml vision.train=[vision,vision]", "'vision' is listed twice"),
    ("train-vision-no-part", "train {d}/ok.yaml vision.train=[]", "name at least one part"),
    ("train-vision-pixels-negative", "train {d}/ok.yaml vision.max_image_pixels=-1", "must be >= 0 (0: no limit)"),
    ("train-vision-unknown-key", "train {d}/ok.yaml vision.max_pixels=1", "did you mean 'max_image_pixels'"),
    ("train-keep-misspelt", "train {d}/ok.yaml checkpoint.keep=frontiers", "did you mean 'frontier'"),
    ("train-keep-frontier-without-probes", "train {d}/ok.yaml checkpoint.keep=frontier probes=[]",
     "keep: frontier needs probes"),
    # the quality probe's writing dimensions (docs/writing-quality.md)
    ("train-quality-unknown-dimension",
     'train {d}/ok.yaml probes=[{"name":"quality","path":"p.jsonl","dimensions":["empaty"]}]',
     "probes[0].dimensions: unknown writing scorer 'empaty'; did you mean 'empathy'"),
    ("train-quality-dimension-twice",
     'train {d}/ok.yaml probes=[{"name":"quality","path":"p.jsonl","dimensions":["safety","safety"]}]',
     "'safety' is listed twice"),
    ("train-quality-dimensions-not-a-list", 'train {d}/ok.yaml probes=[{"name":"quality","path":"p.jsonl",'
     '"dimensions":3}]', "probes[0].dimensions: expected"),
    ("train-quality-judge-without-model", 'train {d}/ok.yaml probes=[{"name":"quality","path":"p.jsonl",'
     '"metric":"judge"}]', "probes[0].judge_model: the judge needs a model"),
    ("train-quality-metric-misspelt", 'train {d}/ok.yaml probes=[{"name":"quality","path":"p.jsonl",'
     '"metric":"empaty"}]', "did you mean 'empathy'"),
    # train: files
    ("train-missing-config", "train {d}/missing.yaml", "config file not found"),
    ("train-invalid-yaml", "train {d}/bad.yaml", "not valid YAML"),
    ("train-yaml-not-a-mapping", "train {d}/list.yaml", "must be a mapping"),
    ("train-config-not-utf8", "train {d}/binary.yaml", "not UTF-8"),
    ("train-folder-as-config", "train {d}/empty", "a folder"),
    ("train-unknown-flag", "train --bogus {d}/ok.yaml", "unrecognized arguments"),
    # config, data inspect
    ("config-override-into-a-number", "config {d}/ok.yaml train.lr.x=1", "train.lr is a number"),
    ("config-missing-file", "config {d}/missing.yaml", "config file not found"),
    ("data-inspect-choice-misspelt", "data inspect {d}/ok.yaml model.dtype=float8", "did you mean"),
    ("data-inspect-n-not-a-number", "data inspect {d}/ok.yaml -n x", "invalid int value"),
    ("data-without-subcommand", "data", "required: data_command"),
    ("data-unknown-subcommand", "data nope", "invalid choice: 'nope'"),
    # export, chat: run folders of the wrong kind, unknown steps
    ("export-empty-folder", "export {d}/empty -o {d}/out", "not a run directory"),
    ("export-missing-folder", "export {d}/nope -o {d}/out", "not a run directory"),
    ("export-file-as-run", "export {d}/ok.yaml -o {d}/out", "not a run directory"),
    ("export-arena-as-run", "export {d}/arena -o {d}/out", "not a run directory"),
    ("export-unknown-step", "export {d}/run --step 7 -o {d}/out", "no checkpoint at step 7"),
    ("export-step-not-a-number", "export {d}/run --step x -o {d}/out", "invalid int value"),
    ("export-non-empty-output", "export {d}/run -o {d}/full", "not empty"),
    ("export-no-output", "export {d}/run", "required: -o/--output"),
    ("export-step-and-select", "export {d}/run --step 2 --select -o {d}/out", "give one"),
    ("export-alpha-out-of-range", "export {d}/run --alpha 2 -o {d}/out", "alpha must be in [0, 1]"),
    ("export-unknown-format", "export {d}/run --format onnx -o {d}/out", "invalid choice"),
    ("export-unknown-quant", "export {d}/run --format gguf --quant q4_k -o {d}/out", "invalid choice"),
    # push: folders that are not exports, repository ids that are not OWNER/NAME (dry runs: no network)
    ("push-missing-folder", "push {d}/nope --repo me/m --dry-run", "no such folder"),
    ("push-not-an-export", "push {d}/full --repo me/m --dry-run", "not an sftlab export"),
    ("push-bad-repo-id", "push {d}/exported --repo just-a-name --dry-run", "OWNER/NAME"),
    ("push-no-repo", "push {d}/exported", "required: --repo"),
    ("chat-empty-folder", "chat {d}/empty", "not a run directory"),
    ("chat-unknown-step", "chat {d}/run --step 7", "no checkpoint at step 7"),
    ("chat-temperature-not-a-number", "chat {d}/run --temperature hot", "invalid float value"),
    # eval, frontier, rewind
    ("eval-steps-not-numbers", "eval {d}/run --steps 1,x", "comma list of steps"),
    ("eval-negative-step", "eval {d}/run --steps -3", "steps are >= 0"),
    ("eval-arena-as-run", "eval {d}/arena", "not a run directory"),
    ("frontier-empty-folder", "frontier {d}/empty", "not a run directory"),
    ("frontier-arena-as-run", "frontier {d}/arena", "not a run directory"),
    ("frontier-unknown-score", "frontier {d}/run --retention nope", "no score named 'nope'"),
    ("frontier-tol-not-a-number", "frontier {d}/run --tol x", "invalid float value"),
    ("rewind-unknown-policy", "rewind {d}/run --policy kne", "did you mean 'knee'"),
    ("rewind-policy-option-out-of-range", "rewind {d}/run --policy weighted --weight 2", "w must be in [0, 1]"),
    ("rewind-alphas-not-numbers", "rewind {d}/run --search --alphas 0.5,x", "comma list of numbers"),
    ("rewind-unknown-task-score", "rewind {d}/run --task nope", "no score named 'nope'"),
    ("rewind-non-empty-output", "rewind {d}/run -o {d}/full", "not empty"),
    ("rewind-empty-folder", "rewind {d}/empty", "not a run directory"),
    # analyze, report
    ("analyze-steps-not-numbers", "analyze {d}/run --steps x", "--steps"),
    ("analyze-unknown-step", "analyze {d}/run --steps 7", "no checkpoint at step(s) [7]"),
    ("analyze-layers-not-numbers", "analyze {d}/run --layers x", "comma list of layer indices"),
    ("analyze-negative-layer", "analyze {d}/run --layers 1,-2", "comma list of layer indices"),
    ("analyze-arena-as-run", "analyze {d}/arena", "not a run directory"),
    ("report-missing-folder", "report {d}/nope", "no such folder"),
    ("report-neither-run-nor-arena", "report {d}/empty", "neither a run folder"),
    ("report-output-is-a-folder", "report {d}/run -o {d}/empty", "a folder; give the HTML file"),
    # pairs
    ("pairs-missing-input", "pairs {d}/nope.jsonl -o {d}/pairs.jsonl", "file not found"),
    ("pairs-folder-as-input", "pairs {d}/empty -o {d}/pairs.jsonl", "file not found"),
    ("pairs-input-not-json", "pairs {d}/binary.yaml -o {d}/pairs.jsonl", "not valid JSON"),
    ("pairs-input-of-unknown-format", "pairs {d}/train.jsonl -o {d}/pairs.jsonl", "cannot tell the format"),
    ("pairs-rule-not-a-number", "pairs {d}/train.jsonl -o {d}/pairs.jsonl --min-score x", "--min-score"),
    ("pairs-unknown-format", "pairs {d}/train.jsonl -o {d}/pairs.jsonl --format csv", "invalid choice: 'csv'"),
    # pipeline, arena
    ("pipeline-missing-file", "pipeline {d}/missing.yaml", "pipeline file not found"),
    ("pipeline-run-config-as-pipeline", "pipeline {d}/ok.yaml", "stages"),
    ("pipeline-folder-as-file", "pipeline {d}/empty", "a folder"),
    ("pipeline-unknown-stage", "pipeline {d}/pipeline.yaml dpo.train.lr=1", "with a stage of ['sft']"),
    ("pipeline-override-into-a-number", "pipeline {d}/pipeline.yaml sft.train.lr.x=1", "train.lr is a number"),
    # pipeline: which checkpoint a stage starts from (`from`, docs/dpo.md)
    ("pipeline-from-unknown-suffix", "pipeline {d}/from-best.yaml", "after @ write selected or last"),
    ("pipeline-from-step-not-a-number", "pipeline {d}/from-x.yaml", "STEP must be a checkpoint's step"),
    ("pipeline-from-step-zero", "pipeline {d}/from-0.yaml", "STEP must be a checkpoint's step"),
    ("pipeline-from-itself", "pipeline {d}/from-dpo.yaml", "must name an earlier stage (sft)"),
    ("pipeline-from-not-a-string", "pipeline {d}/from-list.yaml", "stages[1].from: expected NAME"),
    ("pipeline-selected-without-probes", "pipeline {d}/from-selected.yaml", "sft has no probes to score it"),
    ("pipeline-select-rule-without-probes", "pipeline {d}/from-sft.yaml sft.select.max_kl=0.1", "or write from: sft@last"),
    ("pipeline-select-from-offline-scores",
     "pipeline {d}/from-sft.yaml sft.probes=[kl_to_base] sft.scoring.during_training=false",
     "sets scoring.during_training: false"),
    ("pipeline-generation-unknown", "pipeline {d}/gen-all.yaml", "generation: 'all'; write one of selected"),
    # compare: points and pipelines (docs/writing-quality.md)
    ("compare-not-a-pipeline", "compare {d}/empty", "not a pipeline folder (no pipeline.json)"),
    ("compare-not-a-run", "compare {d}/empty:0 {d}/run:2", "not a run directory"),
    ("compare-bad-suffix", "compare {d}/run@best {d}/run:2", "after @ write selected or last"),
    ("compare-bad-step", "compare {d}/run:x {d}/run:2", "STEP must be a checkpoint's step"),
    ("compare-no-generation-scores", "compare {d}/run:0 {d}/run:2", "--generation --steps 0"),
    ("compare-unknown-score", "compare {d}/run:0 {d}/run:2 --score qualty", "no 'qualty' score"),
    ("arena-missing-file", "arena {d}/missing.yaml", "arena config file not found"),
    ("arena-run-config-as-arena", "arena {d}/ok.yaml --plan", "arena config has no method section"),
    ("arena-invalid-yaml", "arena {d}/bad.yaml --plan", "not valid YAML"),
    ("arena-folder-as-file", "arena {d}/arena", "a folder"),
    ("arena-unknown-remedy", "arena {d}/arena.yaml arena.remedies=[none,kll] --plan",
     "arena.remedies[1].name: unknown remedy 'kll'"),
    ("arena-remedy-twice", "arena {d}/arena.yaml arena.remedies=[kl,kl] --plan", "lists a variant twice"),
    ("arena-method-options-not-a-mapping", "arena {d}/arena.yaml arena.method_options.lora=3 --plan",
     "arena.method_options.lora: expected a mapping"),
    ("arena-unknown-quantization", "arena {d}/arena.yaml arena.quantizations=[none,q3] --plan",
     "'q3' is not one of none, nf4, fp4, int8"),
    # study
    ("study-missing-file", "study {d}/missing.yaml", "study config file not found"),
    ("study-folder-as-file", "study {d}/empty --plan", "a folder"),
    ("study-invalid-yaml", "study {d}/bad.yaml --plan", "not valid YAML"),
    # setup, demo
    ("setup-extra-argument", "setup extra", "unrecognized arguments: extra"),
    ("demo-output-dir-is-a-file", "demo --quick --output-dir {d}/ok.yaml", "a file, not a folder"),
    ("demo-flag-given-a-value", "demo --quick=3", "ignored explicit argument"),
    # budget
    ("budget-params-not-a-count", "budget smollm2 --params abc --method lora", "parameter count"),
    ("budget-negative-params", "budget smollm2 --params -5 --method lora", "parameter count"),
    ("budget-unknown-method", "budget smollm2 --params 1M --method lorra", "did you mean 'lora'"),
    ("budget-no-method", "budget smollm2 --params 1M", "name a method"),
    ("budget-pin-without-value", "budget smollm2 --params 1M --method lora --pin r", "KEY=VALUE"),
    ("budget-pin-unknown-option", "budget smollm2 --params 1M --method lora --pin bogus=3", "unknown key"),
    ("budget-pin-wrong-type", "budget smollm2 --params 1M --method lora --pin r=abc", "expected an integer"),
    ("budget-folder-without-model", "budget {d}/empty --params 1M --method lora", "no config.json"),
    ("budget-unknown-layer-pattern", "budget smollm2 --params 1M --method lora --layer-pattern mid",
     "invalid choice: 'mid'"),
    # the command itself
    ("unknown-command", "bogus", "invalid choice: 'bogus'"),
    ("no-command", "", "required: command"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Inputs of every kind: a valid config whose model does not exist, broken files, a scored run with one
    checkpoint, an arena folder, a pipeline, a non-empty folder."""
    d = tmp_path_factory.mktemp("bad-invocations")
    from sftlab.models import ensure_default_model

    ensure_default_model()  # `make setup` converts it; here too, so no case prints the conversion's progress bars
    (d / "train.jsonl").write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    (d / "ok.yaml").write_text(
        f"run: {{name: x, output_dir: {d / 'runs'}}}\nmodel: {{path: {d / 'no-model'}}}\n"
        f"method: {{name: lora, r: 4}}\ndata: {{train: [{{path: {d / 'train.jsonl'}}}]}}\n"
        "train: {lr: 1.0e-4, steps: 2, betas: [0.9, 0.99]}\nprobes: [{name: kl_to_base}]\n", encoding="utf-8")
    (d / "bad.yaml").write_text("run: [1\n", encoding="utf-8")
    (d / "arena.yaml").write_text(
        f"arena: {{methods: [lora]}}\nmodel: {{path: {d / 'no-model'}}}\n"
        f"data: {{train: [{{path: {d / 'train.jsonl'}}}]}}\ntrain: {{steps: 2}}\n", encoding="utf-8")
    (d / "list.yaml").write_text("- a\n- b\n", encoding="utf-8")
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    (d / "empty").mkdir()
    (d / "full").mkdir()
    (d / "full" / "file").write_text("x")
    (d / "arena").mkdir()
    (d / "arena" / "arena.json").write_text("{}")
    (d / "exported").mkdir()
    (d / "exported" / "README.md").write_text("---\n---\n")
    (d / "exported" / "sftlab_export.json").write_text("{}")
    (d / "pipeline.yaml").write_text(
        f"output_dir: {d / 'pipe'}\nstages:\n  - name: sft\n    config: {{run: {{name: a}}, train: {{lr: 1.0e-4}}, "
        f"model: {{path: {d / 'no-model'}}}}}\n", encoding="utf-8")
    (d / "gen-all.yaml").write_text(
        f"output_dir: {d / 'pipe'}\ngeneration: all\nstages:\n  - name: sft\n    config: {{model: {{path: "
        f"{d / 'no-model'}}}}}\n", encoding="utf-8")
    for name, source in (("best", "sft@best"), ("x", "sft:x"), ("0", "sft:0"), ("dpo", "dpo"), ("list", "[sft]"),
                         ("selected", "sft@selected"), ("sft", "sft")):  # sft has no probes
        (d / f"from-{name}.yaml").write_text(
            f"output_dir: {d / 'pipe'}\nstages:\n  - name: sft\n    config: {{model: {{path: {d / 'no-model'}}}, "
            f"data: {{train: [{{path: {d / 'train.jsonl'}}}]}}}}\n  - name: dpo\n    from: {source}\n    config: "
            f"{{objective: {{name: dpo}}, data: {{train: [{{path: {d / 'train.jsonl'}}}]}}}}\n", encoding="utf-8")
    run = d / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "config.yaml").write_text(f"run: {{name: run}}\nmodel: {{path: {d / 'no-model'}}}\n", encoding="utf-8")

    def scores(task, kl):
        return {"acc": {"value": task, "kind": "task"},
                "kl": {"value": kl, "kind": "retention", "higher_is_better": False}}

    (run / "trajectory.jsonl").write_text(
        json.dumps({"step": 0, "scores": scores(0.1, 0.0)}) + "\n"
        + json.dumps({"step": 2, "path": "checkpoints/step-000002", "scores": scores(0.6, 0.3)}) + "\n")
    return d


def run_cli(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's errors
        return e.code


@pytest.mark.parametrize("argv, expected", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_bad_invocation_is_one_line_and_non_zero(argv, expected, folder, capsys, monkeypatch):
    monkeypatch.delenv("SFTLAB_DEBUG", raising=False)
    args = [a.replace("{d}", str(folder)) for a in argv.split()]
    code = run_cli(args)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code not in (0, None), f"exit {code!r}; stderr: {err!r}"
    assert "Traceback" not in err + out
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert expected in lines[0], lines[0]


def test_cases_cover_every_subcommand():
    commands = {c[1].split()[0] for c in CASES if c[1]}
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert set(sub.choices) <= commands, set(sub.choices) - commands
    assert len(CASES) >= 40


def test_debug_shows_the_traceback_of_a_user_error(folder):
    with pytest.raises(ConfigError, match="train.lr is a number"):
        cli.main(["--debug", "train", str(folder / "ok.yaml"), "train.lr.x=1"])


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch):
    def broken(args):
        raise TypeError("a bug in sftlab")

    monkeypatch.setattr(cli, "cmd_config", broken)
    with pytest.raises(TypeError, match="a bug in sftlab"):
        cli.main(["config"])


def test_a_registry_miss_is_a_user_error_and_a_duplicate_a_bug():
    reg: Registry[int] = Registry("widget")
    reg.register("knee", 1)
    with pytest.raises(UnknownNameError, match="did you mean 'knee'") as miss:
        reg.get("kne")
    assert isinstance(miss.value, SftlabError) and isinstance(miss.value, KeyError)
    with pytest.raises(UnknownNameError):
        reg.get(["not", "hashable"])
    with pytest.raises(RegistryError, match="already registered") as dup:
        reg.register("knee", 2)
    assert not isinstance(dup.value, SftlabError)


def test_a_missing_scorer_library_is_one_line_before_any_model(folder, tmp_path, capsys, monkeypatch):
    """`sftlab eval RUN --generation` with a quality probe whose dimension needs an absent library: one line that
    says what to install, before the (missing) model is looked at."""
    import importlib.util

    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "config.yaml").write_text(
        f"run: {{name: run}}\nmodel: {{path: {folder / 'no-model'}}}\n"
        f"probes: [{{name: quality, path: {folder / 'train.jsonl'}, dimensions: [readability, empathy]}}]\n",
        encoding="utf-8")
    (run / "trajectory.jsonl").write_text(json.dumps({"step": 2, "path": "checkpoints/step-000002"}) + "\n")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "vaderSentiment" else real(name, *a))
    monkeypatch.delenv("SFTLAB_DEBUG", raising=False)
    code = run_cli(["eval", str(run), "--generation"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code not in (0, None) and len(err) == 1, err
    assert "empathy needs vaderSentiment (not installed); pip install 'sftlab[quality]'" in err[0]
