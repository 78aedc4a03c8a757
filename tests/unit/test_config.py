"""Configs: every example config loads; mistakes give one line that names the key and the fix, fast
(before torch is imported); the CLI documents every field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from sftlab.config import RunConfig, config_from_dict, load_config
from sftlab.configtools import ConfigError
from sftlab.methods import METHODS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SFTLAB = [sys.executable, "-m", "sftlab.cli"]


def test_example_configs_exist():
    assert CONFIGS, f"no example configs in {ROOT / 'configs'}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_loads(path):
    import yaml

    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if "stages" in raw:  # a pipeline: every stage's run config validates
        from sftlab.pipeline import plan

        folder, stages, configs = plan(path)  # every stage, and each `from` against its source's probes
        assert all(c.method.name in METHODS for c in configs.values())
    elif "study" in raw:  # a study: each (model, task) arena config validates
        from sftlab.study.config import load_study, plan

        study, base = load_study(path)
        assert len(plan(study, base)) == len(study.models) * len(study.tasks)
    elif "arena" in raw:
        from sftlab.arena import load_arena

        arena, _ = load_arena(path)  # validates the shared run sections too
        assert all(m in METHODS or m == "dora" for m in arena.methods)
    else:
        cfg = load_config(path)
        assert cfg.method.name in METHODS
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#") and "sftlab " in first, f"{path.name}: start with the command that runs it"


def minimal(**sections) -> dict:
    d = {"data": {"train": [{"path": "train.jsonl"}]}}
    d.update(sections)
    return d


def one_line_error(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_unknown_key_names_it_and_suggests():
    msg = one_line_error(minimal(train={"warmpu": 10}))
    assert msg.startswith("train.warmpu: unknown key") and "did you mean 'warmup'" in msg
    msg = one_line_error(minimal(trian={"lr": 1e-4}))
    assert msg.startswith("trian: unknown key") and "did you mean 'train'" in msg
    msg = one_line_error(minimal(method={"name": "lora", "alpah": 8}))
    assert msg.startswith("method.alpah: unknown key") and "did you mean 'alpha'" in msg


@pytest.mark.parametrize("section,value,expected", [
    ({"train": {"steps": "ten"}}, None, "train.steps: expected an integer"),
    ({"train": {"lr": "fast"}}, None, "train.lr: expected a number"),
    ({"train": {"precision": "fp8"}}, None, "train.precision: 'fp8' is not allowed"),
    ({"logging": {"progress": "yes please"}}, None, "logging.progress:"),
    ({"method": {"name": "lora", "target_modules": 3}}, None, "method.target_modules: expected"),
])
def test_wrong_type(section, value, expected):
    assert one_line_error(minimal(**section)).startswith(expected)


@pytest.mark.parametrize("section,expected", [
    ({"train": {"lr": -1.0}}, "train.lr: must be > 0"),
    ({"train": {"batch_size": 0}}, "train.batch_size: must be >= 1"),
    ({"train": {"betas": [0.9, 1.5]}}, "train.betas:"),
    ({"data": {"train": [{"path": "x.jsonl"}], "max_length": 2}}, "data.max_length: must be >= 8"),
    ({"method": {"name": "lora", "r": 0}}, "method.r: must be >= 1"),
    ({"method": {"name": "lora", "dropout": 1.0}}, "method.dropout: must be in [0, 1)"),
    ({"method": {"name": "oft", "block_size": 1}}, "method.block_size: must be >= 2"),
])
def test_out_of_range(section, expected):
    assert one_line_error(minimal(**section)).startswith(expected)


def test_unknown_method_suggests_a_registered_one():
    msg = one_line_error(minimal(method={"name": "lroa"}))
    assert msg.startswith("method.name:") and "did you mean 'lora'" in msg
    for name in METHODS.names():
        assert name in msg  # and lists what exists


@pytest.mark.parametrize("name", [n for n in METHODS.names() if not METHODS.get(n).packing])
def test_packing_conflicts_with_virtual_tokens(name):
    msg = one_line_error(minimal(method={"name": name}, data={"train": [{"path": "x.jsonl"}], "packing": True}))
    assert msg.startswith("data.packing:") and "packing=false" in msg


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: {name: lora, r: 4}\ndata: {train: [{path: a.jsonl}]}\ntrain: {lr: 0.1}\n")
    cfg = load_config(path, ["train.lr=1e-4", "method.r=16", "method.use_dora=true", "data.train.0.path=b.jsonl",
                             "train.betas=[0.8, 0.9]", "run.name=exp1"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.method.options.r == 16 and cfg.method.options.use_dora is True
    assert cfg.data.train[0].path == "b.jsonl" and cfg.train.betas == [0.8, 0.9] and cfg.run.name == "exp1"
    cfg = load_config(path, ["method=oft"])  # a whole section from one override
    assert cfg.method.name == "oft" and cfg.method.options.block_size == 32
    with pytest.raises(ConfigError, match=r"^train\.lrr: unknown key; did you mean 'lr'"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(path, ["train.lr"])


def test_config_round_trips_through_yaml(tmp_path):
    import yaml

    cfg = config_from_dict(minimal(method={"name": "oft", "block_size": 16}, train={"lr": 3e-4}))
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict() and again.hash() == cfg.hash()


# ---- the CLI ---------------------------------------------------------------------------------------

def test_bad_config_fails_fast_without_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: [{path: a.jsonl}]}\ntrain: {lr_rate: 0.1}\n")
    sftlab = Path(sys.executable).parent / "sftlab"
    cmd = [str(sftlab)] if sftlab.exists() else SFTLAB
    proc = subprocess.run([*cmd, "train", str(bad)], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.lr_rate: unknown key"), proc.stderr
    # "fast" is shown by what the process did, not by a wall-clock bar (which fails on a loaded or slow
    # machine): nothing heavy was imported before the error
    probe = ("import sys; from sftlab.cli import main; rc = main(['train', sys.argv[1]]); "
             "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]; "
             "print(rc, heavy)")
    proc = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr


def _described_keys() -> list[str]:
    """Every config key, generated from the dataclasses (so a new field is checked without editing this)."""
    keys = []
    hints = typing.get_type_hints(RunConfig)
    for section in dataclasses.fields(RunConfig):
        if section.name in ("method", "probes", "remedies"):  # registry-driven: checked by their own blocks below
            continue
        cls = hints[section.name]
        sub_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys.append(f"{section.name}.{f.name}")
            inner = typing.get_args(sub_hints[f.name])
            if inner and dataclasses.is_dataclass(inner[0]):
                keys += [f"{section.name}.{f.name}[].{g.name}" for g in dataclasses.fields(inner[0])]
    return keys


def test_config_show_lists_every_field_and_method_option():
    out = subprocess.run([*SFTLAB, "config", "--show"], capture_output=True, text=True, timeout=600).stdout
    for key in _described_keys():
        assert f"{key} (" in out, key
    # the method section: each registered method, then its options, each with its help text
    blocks = out.split("method.name picks a method")[1]
    for name in METHODS.names():
        spec = METHODS.get(name)
        assert f"  {name}: {spec.description}" in blocks
        block = blocks.split(f"  {name}: {spec.description}")[1]
        for f in dataclasses.fields(spec.options):
            line = next((ln for ln in block.splitlines() if ln.strip().startswith(f"method.{f.name} (")), None)
            assert line is not None, f"{name}: method.{f.name} not listed"
            assert f.metadata.get("help", "") in line, f"{name}: method.{f.name} lacks its help text"


def test_config_show_lists_every_probe_and_its_options():
    from sftlab.probes import PROBES

    out = subprocess.run([*SFTLAB, "config", "--show"], capture_output=True, text=True, timeout=600).stdout
    block = out.split("probes: a list")[1]
    for name in PROBES.names():
        spec = PROBES.get(name)
        assert f"  {name} (" in block and spec.description in block
        for f in dataclasses.fields(spec.options):
            assert f"probes[].{f.name} (" in block, f"{name}: {f.name} not listed"


def test_config_show_lists_every_remedy_and_its_options():
    from sftlab.remedies import REMEDIES

    out = subprocess.run([*SFTLAB, "config", "--show"], capture_output=True, text=True, timeout=600).stdout
    block = out.split("remedies: a list")[1]
    for name in REMEDIES.names():
        spec = REMEDIES.get(name)
        assert f"  {name}: {spec.description}" in block
        for f in dataclasses.fields(spec.options):
            assert f"remedies[].{f.name} (" in block, f"{name}: {f.name} not listed"


def test_train_help_includes_field_docs():
    out = subprocess.run([*SFTLAB, "train", "--help"], capture_output=True, text=True, timeout=600).stdout
    assert "--resume" in out
    from sftlab.config import TrainSection

    for f in dataclasses.fields(TrainSection):
        assert f"train.{f.name} (" in out and f.metadata["help"] in out, f.name
    assert "method.r (" in out  # method options too
