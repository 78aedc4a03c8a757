"""`sftlab pipeline CONFIG.yaml`: stages (SFT, then DPO) run one after another, each a run directory.

    output_dir: runs/pipe            # the pipeline folder (default: runs/<config file name>)
    stages:
      - name: sft
        config: {model: {path: smollm2}, data: {...}, train: {...}}     # a run config, or a path to one
      - name: dpo
        from: sft                    # start from that stage's last checkpoint (sft:STEP for another one)
        config: {objective: {name: dpo}, data: {...}, ...}

Each stage is `PIPELINE/<name>`, trained by the ordinary trainer; a stage that names `from` gets
`model.init_from` set to that stage's run (and its model.path), so it reads it and never writes into it.
PIPELINE/pipeline.json records each finished stage with its config hash and last checkpoint: a rerun
skips finished stages, resumes a started one with the trainer's --resume, and starts the rest.
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
from .faults import fault

STATE = "pipeline.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class Stage:
    name: str
    config: dict  # the raw run config, before the pipeline sets run.* and model.init_from
    source: str | None  # `from`: an earlier stage, optionally 'name:step'


def read_pipeline(path: str | Path, overrides: list[str] = ()) -> tuple[Path, list[Stage]]:
    """(pipeline folder, stages) from the YAML file; `overrides` are STAGE.key.path=value."""
    p = Path(path)
    data = read_yaml(p, "pipeline")
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list) or not data["stages"]:
        raise ConfigError(f"{p}: expected 'stages: [{{name: sft, config: {{...}}}}, {{name: dpo, from: sft, "
                          "config: {...}}]'")
    unknown = set(data) - {"stages", "output_dir"}
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {sorted(unknown)}; a pipeline has 'output_dir' and 'stages'")
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
    return Stage(str(s["name"]), copy.deepcopy(cfg), None if src is None else str(src))


def _check_names(stages: list[Stage]) -> None:
    seen: list[str] = []
    for i, s in enumerate(stages):
        if not NAME.match(s.name):
            raise ConfigError(f"stages[{i}].name: {s.name!r} must be a plain folder name (letters, digits, _.-)")
        if s.name in seen:
            raise ConfigError(f"stages[{i}].name: {s.name!r} is used twice")
        if s.source is not None and s.source.partition(":")[0] not in seen:
            raise ConfigError(f"stages[{i}].from: {s.source!r} must name an earlier stage ({', '.join(seen) or 'none'})")
        seen.append(s.name)


def stage_config(folder: Path, stage: Stage, stages: dict[str, Stage]):
    """The stage's RunConfig: its run directory is PIPELINE/<name>; `from` becomes model.init_from."""
    from .config import config_from_dict

    d = copy.deepcopy(stage.config)
    run = d.setdefault("run", {})
    if not isinstance(run, dict):
        raise ConfigError(f"stage {stage.name}: run: expected a section")
    run["name"], run["output_dir"] = stage.name, str(folder)
    if stage.source is not None:
        src_name, _, step = stage.source.partition(":")
        model = d.setdefault("model", {})
        model["init_from"] = str(folder / src_name) + (f":{step}" if step else "")
        model.setdefault("path", stages[src_name].config.get("model", {}).get("path", "smollm2"))
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"stage {stage.name}: {e}") from None


def _read_state(folder: Path) -> dict:
    try:
        return json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_state(folder: Path, state: dict) -> None:
    tmp = folder / f".{STATE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
    os.replace(tmp, folder / STATE)


def run_pipeline(path: str | Path, overrides: list[str] = (), print_fn=print) -> Path:
    """Run every stage not finished yet, in order; returns the pipeline folder."""
    from .errors import SftlabError
    from .runs import Run
    from .train.loop import train

    folder, stages = read_pipeline(path, overrides)
    by_name = {s.name: s for s in stages}
    configs = [stage_config(folder, s, by_name) for s in stages]  # every stage validates before anything runs
    folder.mkdir(parents=True, exist_ok=True)
    state = _read_state(folder)
    for i, stage in enumerate(stages):
        cfg = configs[i]
        done = state.get(stage.name)
        run_dir = folder / stage.name
        if done and done.get("config_hash") == cfg.hash() and (run_dir / "config.yaml").is_file():
            print_fn(f"sftlab: stage {stage.name}: finished earlier ({run_dir}); skipped")
            continue
        if done:
            raise SftlabError(f"stage {stage.name}: finished earlier with another config (or its folder is gone); "
                              f"delete {run_dir} and its entry in {folder / STATE}, or give the stage a new name")
        # a folder without config.yaml: a stage killed before its first write (e.g. while it computed the DPO
        # reference); resuming it starts over, after the stale-lock check
        resume = run_dir.is_dir() and any(run_dir.iterdir())
        print_fn(f"sftlab: stage {stage.name}: {'resuming' if resume else 'training'} {run_dir}")
        train(cfg, resume=resume)
        fault("pipeline_stage", i + 1)
        last = Run(run_dir).checkpoints()
        if not last:
            raise SftlabError(f"stage {stage.name}: finished without a checkpoint; set checkpoint.final=true")
        state[stage.name] = {"config_hash": cfg.hash(), "run": stage.name, "step": last[-1]["step"],
                             "sha256": last[-1]["sha256"]}
        _write_state(folder, state)
    return folder
