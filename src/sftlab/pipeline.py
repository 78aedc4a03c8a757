"""`sftlab pipeline CONFIG.yaml`: stages (SFT, then DPO, then DPO again) run one after another, each a run directory.

    output_dir: runs/pipe            # the pipeline folder (default: runs/<config file name>)
    stages:
      - name: sft
        config: {model: {path: smollm2}, data: {...}, train: {...}, probes: [...]}   # a run config, or a path
      - name: dpo_a
        from: sft                    # sft's selected checkpoint (its select: rule); sft@last, sft:STEP
        config: {objective: {name: dpo}, data: {...}, ...}
      - name: dpo_b
        from: dpo_a                  # a second round: starts from (and its reference is) dpo_a's selected model
        config: {objective: {name: dpo}, data: {...}, ...}

Each stage is `PIPELINE/<name>`, trained by the ordinary trainer; a stage that names `from` gets
`model.init_from` set to the checkpoint it starts from (and the chain's model.path), so it reads that run and
never writes into it. Which checkpoint (`from`):

- `NAME` (the default) or `NAME@selected`: the one stage NAME's `select:` rule picks on its own trajectory
  (default: the knee above the base's task CI), the rule `sftlab rewind`, the report and the leaderboard use.
  When the rule keeps NAME's starting model (no checkpoint beat it), the stage starts where NAME started. A
  plain `NAME` whose stage has no probes (nothing to select with) means its last checkpoint, and says so;
  `NAME@selected` there, or a `select:` rule without probes, is refused before anything trains.
- `NAME@last`: its last checkpoint; `NAME:STEP`: that checkpoint.

The choice is made when NAME has finished, printed, recorded in PIPELINE/pipeline.json (under the stage that
starts from it: `start`) and in that stage's provenance.json (`pipeline.start`, beside the trainer's `start`:
NAME's run directory, step, checkpoint and sha256). Adapters are never stacked: a stage starts from its source
merged (an adapter merged into the model it was trained on, recursively down to the base), applies its own
method on top, and a DPO stage's reference is that merged starting model (runs.StartPoint, train/dpo.py).

Generation probes (quality, generate) are not scored during training; once a stage has finished, the pipeline
scores them at its selected checkpoint (and the first stage's at its starting model, the base), so that
`sftlab compare PIPELINE` can show what each stage changed; `generation: frontier` adds each stage's last and
frontier checkpoints, `generation: none` scores none.

PIPELINE/pipeline.json records each finished stage with its config hash, last checkpoint, the start it was
given and its own selected checkpoint: a rerun skips finished stages, resumes a started one with the trainer's
--resume, and starts the rest.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .config import read_yaml
from .configtools import ConfigError, apply_overrides
from .errors import SftlabError
from .faults import fault

STATE = "pipeline.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
FROM_FORMS = "NAME (its selected checkpoint), NAME@selected, NAME@last or NAME:STEP"
GENERATION = ("selected", "frontier", "none")


@dataclass(frozen=True)
class Source:
    """A stage's `from`: an earlier stage and which of its checkpoints."""

    stage: str
    how: str  # "default" (selected; last when the stage has no probes) | "selected" | "last" | "step"
    step: int | None = None
    text: str = ""  # as written


@dataclass
class Stage:
    name: str
    config: dict  # the raw run config, before the pipeline sets run.* and model.init_from
    source: Source | None  # `from`


def parse_source(text: str, where: str) -> Source:
    """`NAME`, `NAME@selected`, `NAME@last` or `NAME:STEP`."""
    name, at, how = text.partition("@")
    if at:
        if how not in ("selected", "last"):
            raise ConfigError(f"{where}: {text!r}: after @ write selected or last ({FROM_FORMS})")
        return Source(name, how, None, text)
    name, colon, step = text.partition(":")
    if colon:
        if not step.isdigit() or int(step) < 1:
            raise ConfigError(f"{where}: {text!r}: STEP must be a checkpoint's step, a positive integer ({FROM_FORMS})")
        return Source(name, "step", int(step), text)
    return Source(name, "default", None, text)


def read_pipeline(path: str | Path, overrides: list[str] = ()) -> tuple[Path, list[Stage]]:
    """(pipeline folder, stages) from the YAML file; `overrides` are STAGE.key.path=value."""
    p = Path(path)
    data = read_yaml(p, "pipeline")
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise ConfigError(f"{p}: expected 'stages: [{{name: sft, config: {{...}}}}, {{name: dpo, from: sft, "
                          "config: {...}}]'")
    unknown = set(data) - {"stages", "output_dir", "generation"}
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {sorted(unknown)}; a pipeline has 'output_dir', 'generation' and "
                          "'stages'")
    generation_mode(data, p)
    folder = Path(data.get("output_dir") or Path("runs") / p.stem)
    stages = [_stage(i, s, p.parent) for i, s in enumerate(data["stages"])]
    _check_names(stages)
    by_name = {s.name: s for s in stages}
    for item in overrides:
        stage, dot, rest = item.partition(".")
        if not dot or stage not in by_name:
            raise ConfigError(f"override {item!r}: write STAGE.key.path=value with a stage of {sorted(by_name)}, "
                              "e.g. sft.train.steps=20")
        apply_overrides(by_name[stage].config, [rest])
    return folder, stages


def generation_mode(data: dict, where) -> str:
    """`generation:` where a finished stage's generation probes (quality, generate) are scored: `selected` (default:
    its selected checkpoint, and the first stage's starting model, the base), `frontier` (also its last checkpoint
    and its frontier, as `sftlab eval --generation`) or `none`."""
    mode = data.get("generation", "selected")
    if mode not in GENERATION:
        raise ConfigError(f"{where}: generation: {mode!r}; write one of {', '.join(GENERATION)}")
    return mode


def generation_points(run_dir: Path, mode: str, selected: dict | None, first: bool) -> list[int]:
    """The steps of a finished stage whose generation probes the pipeline scores (see generation_mode)."""
    from .rewinding import generation_steps

    if mode == "none":
        return []
    steps = {0} if first else set()
    if selected and "step" in selected:
        steps.add(int(selected["step"]))
    if mode == "frontier":
        steps |= set(generation_steps(run_dir)) - ({0} if not first else set())
    return sorted(steps)


def _stage(i: int, s, base: Path) -> Stage:
    if not isinstance(s, dict) or "name" not in s or "config" not in s:
        raise ConfigError(f"stages[{i}]: expected {{name: ..., config: {{...}} or a config file, from: ...}}")
    extra = set(s) - {"name", "config", "from"}
    if extra:
        raise ConfigError(f"stages[{i}]: unknown key(s) {sorted(extra)}; a stage has name, config and from")
    cfg = s["config"]
    if isinstance(cfg, str):  # a config file, relative to the pipeline file
        f = Path(cfg) if Path(cfg).is_absolute() else base / cfg
        if not f.is_file():
            raise ConfigError(f"stages[{i}].config: {f} not found")
        cfg = read_yaml(f)
    if not isinstance(cfg, dict):
        raise ConfigError(f"stages[{i}].config: expected a run config (mapping) or a path to one")
    src = s.get("from")
    if src is not None and not isinstance(src, str):
        raise ConfigError(f"stages[{i}].from: expected {FROM_FORMS}, got {src!r}")
    return Stage(str(s["name"]), copy.deepcopy(cfg), None if src is None else parse_source(src, f"stages[{i}].from"))


def _check_names(stages: list[Stage]) -> None:
    seen: list[str] = []
    for i, s in enumerate(stages):
        if not NAME.match(s.name):
            raise ConfigError(f"stages[{i}].name: {s.name!r} must be a plain folder name (letters, digits, _.-)")
        if s.name in seen:
            raise ConfigError(f"stages[{i}].name: {s.name!r} is used twice")
        if s.source is not None and s.source.stage not in seen:
            raise ConfigError(f"stages[{i}].from: {s.source.text!r} must name an earlier stage "
                              f"({', '.join(seen) or 'none'}) as {FROM_FORMS}")
        seen.append(s.name)


def _base_path(name: str, stages: dict[str, Stage]) -> str:
    """The model.path a stage inherits: its own, else its source's, down the chain (else the default)."""
    model = stages[name].config.get("model")
    if isinstance(model, dict) and model.get("path"):
        return model["path"]
    src = stages[name].source
    return _base_path(src.stage, stages) if src is not None else "smollm2"


def _placeholder(folder: Path, src: Source) -> str:
    """model.init_from before the source has finished: what validates the config (and the pre-selection form)."""
    return str(folder / src.stage) + (f":{src.step}" if src.how == "step" else "")


def stage_config(folder: Path, stage: Stage, stages: dict[str, Stage], init_from: str | None = None):
    """The stage's RunConfig: its run directory is PIPELINE/<name>; `from` becomes model.init_from (`init_from`:
    the resolved checkpoint, '' for the bare base; None: the source's folder, which validates the rest)."""
    from .config import config_from_dict

    d = copy.deepcopy(stage.config)
    run = d.setdefault("run", {})
    if not isinstance(run, dict):
        raise ConfigError(f"stage {stage.name}: run: expected a section")
    run["name"], run["output_dir"] = stage.name, str(folder)
    if stage.source is not None:
        model = d.setdefault("model", {})
        if not isinstance(model, dict):
            raise ConfigError(f"stage {stage.name}: model: expected a section")
        spec = _placeholder(folder, stage.source) if init_from is None else init_from
        if spec:
            model["init_from"] = spec
        model.setdefault("path", _base_path(stage.source.stage, stages))
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"stage {stage.name}: {e}") from None


def check_sources(stages: list[Stage], configs: dict) -> None:
    """Before anything trains: a stage whose checkpoint is to be selected has probes scored during training."""
    for i, s in enumerate(stages):
        src = s.source
        if src is None or src.how in ("last", "step"):
            continue
        cfg = configs[src.stage]
        rule = {k: v for k, v in cfg.to_dict()["select"].items() if v is not None}
        alt = f"or write from: {src.stage}@last (its last checkpoint) or {src.stage}:STEP"
        if not cfg.probes and (src.how == "selected" or rule):
            raise ConfigError(f"stages[{i}].from: {src.text!r} selects stage {src.stage}'s checkpoint with its "
                              f"select: rule, but {src.stage} has no probes to score it; add task and retention "
                              f"probes to {src.stage}, {alt}")
        if cfg.probes and not cfg.scoring.during_training:
            raise ConfigError(f"stages[{i}].from: {src.text!r} selects stage {src.stage}'s checkpoint from the "
                              f"scores of its training, but {src.stage} sets scoring.during_training: false; "
                              f"set it to true, {alt}")


def plan(path: str | Path, overrides: list[str] = ()) -> tuple[Path, list[Stage], dict]:
    """(folder, stages, {name: RunConfig}): every stage validates before anything runs."""
    folder, stages = read_pipeline(path, overrides)
    by_name = {s.name: s for s in stages}
    configs = {s.name: stage_config(folder, s, by_name) for s in stages}
    check_sources(stages, configs)
    return folder, stages, configs


def _read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_state(folder: Path, state: dict) -> None:
    tmp = folder / f".{STATE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
    os.replace(tmp, folder / STATE)


def select_in(run_dir: Path, cfg) -> dict:
    """The checkpoint a finished stage's `select:` rule picks on its trajectory (what `sftlab rewind` without
    --policy picks): {step, checkpoint, sha256, rule, reason}; step 0 is the stage's starting model."""
    from .rewinding import run_points
    from .runs import Run
    from .trajectory import rewind, rule_text, select_params

    rule = select_params(cfg.to_dict()["select"])
    points, task, retention = run_points(run_dir)
    if not points:
        raise SftlabError(f"no point of {run_dir} has both a {task!r} and a {retention!r} score")
    choice = rewind(points, "select", **rule)
    out = {"step": choice.point.step, "rule": rule_text(rule), "reason": choice.reason, "task": task,
           "retention": retention}
    if choice.point.step:
        entry = Run(run_dir).checkpoint(choice.point.step)
        out.update(checkpoint=entry["path"], sha256=entry["sha256"])
    return out


def resolve_start(folder: Path, stage: Stage, source_cfg) -> tuple[str, dict]:
    """(model.init_from for `stage`, '' for the bare base; the record of which checkpoint and why), once its
    source stage has finished."""
    from .runs import Run

    src = stage.source
    run_dir = folder / src.stage
    run = Run(run_dir)
    rec = {"from": src.stage, "spec": src.text, "run": str(run_dir)}
    how = "last" if src.how == "default" and not source_cfg.probes else src.how
    if how in ("last", "step"):
        entry = run.checkpoint(src.step)  # None: the last; a missing step is a one-line error naming those there
        why = {"step": f"named in from: {src.text}", "last": f"the last checkpoint (from: {src.text})"}[how]
        if src.how == "default":
            why = f"stage {src.stage} has no probes, so no select: rule can choose: its last checkpoint"
        rec.update(how=how, step=entry["step"], checkpoint=entry["path"], sha256=entry["sha256"], reason=why)
        return str(run_dir) + (f":{src.step}" if how == "step" else ""), rec  # `last` as before: no step
    try:
        sel = select_in(run_dir, source_cfg)
    except SftlabError as e:
        raise SftlabError(f"stage {stage.name}: from: {src.text} starts from the checkpoint stage {src.stage}'s "
                          f"select: rule picks, but {e}; fix that and rerun (the finished stages are kept), or "
                          f"write from: {src.stage}@last") from None
    rec.update(how="selected", **{k: sel[k] for k in ("step", "rule", "reason")})
    if sel["step"]:
        rec.update(checkpoint=sel["checkpoint"], sha256=sel["sha256"])
        return f"{run_dir}:{sel['step']}", rec
    start = run.start()  # the rule kept the stage's starting model: start where that stage started
    if start is None:
        rec["reason"] += f" Stage {stage.name} therefore starts from the base model, as {src.stage} did."
        return "", rec
    where = os.path.normpath(start.run.dir)  # found through provenance's run_rel: PIPELINE/dpo_a/../sft
    rec.update(checkpoint=None, sha256=start.entry["sha256"], starts_at={"run": where, "step": start.step})
    rec["reason"] += f" Stage {stage.name} therefore starts where {src.stage} started: {where} step {start.step}."
    return f"{where}:{start.step}", rec


def _own_selection(run_dir: Path, cfg) -> dict | None:
    """What a finished stage's select: rule picks (recorded for the reader; None without probes)."""
    if not cfg.probes:
        return None
    try:
        return select_in(run_dir, cfg)
    except SftlabError as e:
        return {"error": str(e)}


def _changed(folder: Path, stage: Stage, stages: dict[str, Stage], done: dict, rec: dict | None) -> SftlabError:
    run_dir = folder / stage.name
    src = stage.source
    if src is not None and src.how == "default" and rec and rec["how"] == "selected" \
            and stage_config(folder, stage, stages).hash() == done.get("config_hash"):
        return SftlabError(f"stage {stage.name}: finished earlier starting from {src.stage}'s last checkpoint; "
                           f"from: {src.stage} now means the checkpoint its select: rule picks (step {rec['step']}). "
                           f"Write from: {src.stage}@last to keep the finished stage, or delete {run_dir} and its "
                           f"entry in {folder / STATE} to train it again from the selected one")
    return SftlabError(f"stage {stage.name}: finished earlier with another config (or its folder is gone); "
                       f"delete {run_dir} and its entry in {folder / STATE}, or give the stage a new name")


def run_pipeline(path: str | Path, overrides: list[str] = (), print_fn=print) -> Path:
    """Run every stage not finished yet, in order; returns the pipeline folder."""
    from .runs import Run
    from .scoring import build_probes, evaluate_run
    from .train.loop import train

    folder, stages, configs = plan(path, overrides)  # every stage validates before anything runs
    mode = generation_mode(read_yaml(Path(path), "pipeline"), path)
    by_name = {s.name: s for s in stages}
    folder.mkdir(parents=True, exist_ok=True)
    state = _read_state(folder)
    for i, stage in enumerate(stages):
        cfg, rec, extra = configs[stage.name], None, {}
        if stage.source is not None:  # its source has finished: which of its checkpoints, and why
            init_from, rec = resolve_start(folder, stage, configs[stage.source.stage])
            cfg = stage_config(folder, stage, by_name, init_from)
            extra = {"pipeline": {"folder": str(folder), "stage": stage.name, "start": rec}}
        done = state.get(stage.name)
        run_dir = folder / stage.name
        if done and done.get("config_hash") == cfg.hash() and (run_dir / "config.yaml").is_file():
            print_fn(f"sftlab: stage {stage.name}: finished earlier ({run_dir}); skipped")
            continue
        if done:
            raise _changed(folder, stage, by_name, done, rec)
        if rec is not None:
            where = f"{rec['from']} step {rec['step']}" if rec["step"] else f"{rec['from']}'s starting model (step 0)"
            print_fn(f"sftlab: stage {stage.name}: starts from {where} ({rec['reason']})")
        # a folder without config.yaml: a stage killed before its first write (e.g. while it computed the DPO
        # reference); resuming it starts over, after the stale-lock check
        resume = run_dir.is_dir() and any(run_dir.iterdir())
        print_fn(f"sftlab: stage {stage.name}: {'resuming' if resume else 'training'} {run_dir}")
        train(cfg, resume=resume, provenance=extra)
        fault("pipeline_stage", i + 1)
        last = Run(run_dir).checkpoints()
        if not last:
            raise SftlabError(f"stage {stage.name}: finished without a checkpoint; set checkpoint.final=true")
        entry = {"config_hash": cfg.hash(), "run": stage.name, "step": last[-1]["step"], "sha256": last[-1]["sha256"]}
        entry.update({k: v for k, v in (("start", rec), ("selected", _own_selection(run_dir, cfg))) if v})
        steps = generation_points(run_dir, mode, entry.get("selected"), i == 0) if build_probes(cfg, "generation") \
            else []
        if steps:  # before the stage is recorded: a kill here scores them again on the rerun
            print_fn(f"sftlab: stage {stage.name}: generation probes at step(s) {', '.join(map(str, steps))}")
            evaluate_run(str(run_dir), steps, "generation", progress=False)
            entry["generation_steps"] = steps
        state[stage.name] = entry
        _write_state(folder, state)
    final, name = state.get(stages[-1].name, {}).get("selected") or {}, stages[-1].name
    if "step" in final:
        what = (f"step {final['step']} (to export it: sftlab rewind {folder / name} -o OUT)" if final["step"]
                else "its starting model (step 0: no checkpoint beat it)")
        print_fn(f"sftlab: the last stage's {final['rule']} picks {name} {what}")
    return folder
