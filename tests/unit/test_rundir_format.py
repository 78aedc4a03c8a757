"""sftlab.rundir_format owns the run directory's line formats: the merge rule on hand-written lines, the format
version (a run written before it was recorded still reads), and a check that no other module parses the lines."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sftlab import rundir_format as rf
from sftlab.errors import SftlabError

SRC = Path(__file__).resolve().parents[2] / "src" / "sftlab"
OWNER = SRC / "rundir_format.py"


def write(path: Path, *lines: str | dict) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def score(value: float, kind: str = "task") -> dict:
    return {"value": value, "kind": kind, "higher_is_better": False, "ci_low": value, "ci_high": value}


# ---- the merge rule -------------------------------------------------------------------------------------------

def test_merge_rule_on_hand_written_lines(tmp_path):
    """Later lines win per key, scores merge by name (a later score of the same name wins), step order;
    bad lines are skipped: torn, not an object, no step, a non-integer (or boolean) step."""
    write(tmp_path / rf.TRAJECTORY,
          {"step": 0, "scores": {"kl": score(0.0, "retention"), "loss": score(3.0)}},
          {"step": 4, "path": "checkpoints/step-000004", "sha256": "a", "time": 1.0},
          {"step": 2, "path": "checkpoints/step-000002", "sha256": "b", "time": 0.5},
          "[1, 2, 3]", "7", '{"no_step": true}', '{"step": "4", "sha256": "bad"}', '{"step": true, "x": 1}',
          '{"step": 4.0, "sha256": "float"}',
          {"step": 4, "scores": {"loss": score(2.0)}},
          {"step": 4, "scores": {"kl": score(0.1, "retention"), "loss": score(1.9)}, "scoring_seconds": 3.0},
          {"step": 2, "scores": None},  # a scores that is not a dict adds none and does not crash the reader
          {"step": 4, "path": "checkpoints/step-000004", "sha256": "c", "time": 2.0})
    with open(tmp_path / rf.TRAJECTORY, "a", encoding="utf-8") as f:
        f.write('{"step": 6, "path": "checkpoints/step-0000')  # torn: a run still writing
    entries = rf.read_trajectory(tmp_path)
    assert [e["step"] for e in entries] == [0, 2, 4]
    four = entries[2]
    assert four["sha256"] == "c" and four["time"] == 2.0 and four["scoring_seconds"] == 3.0
    assert four["scores"] == {"loss": score(1.9), "kl": score(0.1, "retention")}
    assert entries[1]["scores"] == {} and entries[1]["sha256"] == "b"
    assert rf.merge_trajectory(rf.trajectory_lines(tmp_path)) == entries
    assert [e["step"] for e in rf.trajectory_lines(tmp_path)] == [0, 4, 2, 4, 4, 2, 4]  # as written


def test_both_old_readers_now_agree(tmp_path):
    """The divergence the module ends: checkpoint.read_trajectory (used by resume, the arena, frontier) crashed
    on a line without a step or with "scores": null, which report.load's copy skipped; both are this rule."""
    from sftlab.train import checkpoint

    write(tmp_path / rf.TRAJECTORY, {"step": 2, "path": "p", "scores": None}, {"note": "no step"}, "null",
          {"step": 2, "scores": {"a": score(1.0)}})
    assert checkpoint.read_trajectory is rf.read_trajectory
    assert checkpoint.read_trajectory(tmp_path) == [{"step": 2, "path": "p", "scores": {"a": score(1.0)}}]


def test_a_torn_multibyte_character_is_one_bad_line(tmp_path):
    path = tmp_path / rf.METRICS
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "note": "\xe2\x82')
    assert rf.read_metrics(tmp_path) == ([{"step": 1, "loss": 2.0}], [])


def test_metrics_split_train_and_eval_lines(tmp_path):
    write(tmp_path / rf.METRICS, {"step": 1, "loss": 2.0, "tokens_per_s": 10.0},
          {"step": 2, "eval": True, "eval_loss": 2.5}, {"step": 2, "loss": 1.5, "tokens_per_s": 12.0},
          {"step": 2, "loss": 1.4, "tokens_per_s": 13.0}, '{"step": 3, "lo')
    train, evals = rf.read_metrics(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 2] and evals == [{"step": 2, "eval": True, "eval_loss": 2.5}]
    assert [r["tokens_per_s"] for r in rf.step_metrics(tmp_path)] == [10.0, 13.0]  # a step's last line wins


def test_append_closes_a_torn_line_and_truncate_keeps_lines_as_written(tmp_path):
    path = tmp_path / rf.TRAJECTORY
    path.write_text('{"step": 1, "a": 1}\n{"step": 2,  "b":  2}\n{"step": 3, "to', encoding="utf-8")
    rf.append_line(path, {"step": 4, "c": 3})
    assert [e["step"] for e in rf.read_lines(path)] == [1, 2, 4]
    rf.truncate_lines(path, 2)
    assert path.read_text(encoding="utf-8") == '{"step": 1, "a": 1}\n{"step": 2,  "b":  2}\n'
    rf.truncate_lines(tmp_path / "absent.jsonl", 0)  # nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


# ---- the format version ---------------------------------------------------------------------------------------

def old_run(folder: Path) -> Path:
    """A run directory as sftlab wrote it before the format version was recorded (provenance.json without it)."""
    folder.mkdir()
    (folder / rf.CONFIG).write_text("run: {name: old}\nmethod: {name: lora}\n", encoding="utf-8")
    (folder / rf.PROVENANCE).write_text(json.dumps({"created": "2025-01-01T00:00:00", "trainable_params": 8}))
    write(folder / rf.TRAJECTORY,
          {"step": 0, "scores": {"loss": score(3.0), "kl": score(0.0, "retention")}},
          {"step": 2, "path": "checkpoints/step-000002", "sha256": "ab", "time": 1.0},
          {"step": 2, "scores": {"loss": score(2.0), "kl": score(0.1, "retention")}, "scoring_seconds": 1.0})
    write(folder / rf.METRICS, {"step": 1, "loss": 3.0, "tokens_per_s": 5.0}, {"step": 2, "loss": 2.0},
          {"step": 2, "eval": True, "eval_loss": 2.2})
    return folder


def test_a_run_written_before_the_format_version_still_reads(tmp_path):
    from sftlab.report import load
    from sftlab.rewinding import run_points

    run = old_run(tmp_path / "old")
    assert rf.run_format(run) == 1 and rf.FORMAT_KEY not in rf.read_provenance(run)
    assert [e["step"] for e in rf.read_trajectory(run)] == [0, 2]
    points, task, ret = run_points(run)
    assert (task, ret) == ("loss", "kl") and [p.step for p in points] == [0, 2]
    data = load(run)
    assert data.notes == [] and [e["step"] for e in data.runs[0].entries] == [0, 2]
    assert len(data.runs[0].train) == 2 and len(data.runs[0].evals) == 1


def test_a_new_run_records_its_format(tmp_path):
    from types import SimpleNamespace

    from sftlab.train.rundir import write_provenance

    cfg = SimpleNamespace(hash=lambda: "h", data=SimpleNamespace(train=[], eval=[]))
    write_provenance(tmp_path, cfg, SimpleNamespace(identity=lambda: {}), {})
    assert rf.read_provenance(tmp_path)[rf.FORMAT_KEY] == rf.FORMAT_VERSION == rf.run_format(tmp_path)


def test_a_newer_format_is_refused_by_readers_and_noted_by_the_report(tmp_path):
    from sftlab.report import load

    run = old_run(tmp_path / "new")
    (run / rf.PROVENANCE).write_text(json.dumps({rf.FORMAT_KEY: rf.FORMAT_VERSION + 1}))
    with pytest.raises(SftlabError, match="format 2.*Upgrade sftlab"):
        rf.read_trajectory(run)
    with pytest.raises(SftlabError, match="format 2"):
        rf.read_metrics(run)
    data = load(run)
    assert any("format 2" in n for n in data.notes) and [e["step"] for e in data.runs[0].entries] == [0, 2]


def test_an_unreadable_provenance_is_a_clear_error_but_the_lines_still_read(tmp_path):
    run = old_run(tmp_path / "bad")
    (run / rf.PROVENANCE).write_text("{not json")
    with pytest.raises(SftlabError, match="provenance.json: not valid JSON"):
        rf.read_provenance(run)
    assert rf.run_format(run) == 1 and len(rf.read_trajectory(run)) == 2


def test_read_arena(tmp_path):
    with pytest.raises(SftlabError, match="arena.json: no such file"):
        rf.read_arena(tmp_path)
    (tmp_path / rf.ARENA).write_text('{"name": "a"')
    with pytest.raises(SftlabError, match="not valid JSON"):
        rf.read_arena(tmp_path)
    (tmp_path / rf.ARENA).write_text('{"name": "a", "trials": {}}')
    with pytest.raises(SftlabError, match="'trials' list"):
        rf.read_arena(tmp_path)
    (tmp_path / rf.ARENA).write_text('{"name": "a"}')
    assert rf.read_arena(tmp_path) == {"name": "a", "trials": []}


def test_import_is_torch_free():
    code = "import sys, sftlab.rundir_format; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- one owner ------------------------------------------------------------------------------------------------

RUN_LINE_FILES = {"trajectory.jsonl", "metrics.jsonl"}
RUN_LINE_NAMES = {"TRAJECTORY", "METRICS"}
LINE_SOURCES = {"splitlines", "readlines", "open"}  # where JSON Lines parsing gets its lines


def _functions(tree: ast.Module):
    """Each function (and the module's top level) with the nodes of its own body, nested functions apart."""
    scopes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))]
    for scope in scopes:
        own, stack = [], list(ast.iter_child_nodes(scope))
        while stack:
            n = stack.pop()
            own.append(n)
            if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                stack.extend(ast.iter_child_nodes(n))
        yield scope, own


def _is_json_parse(n: ast.AST) -> bool:
    f = n.func if isinstance(n, ast.Call) else n
    return isinstance(f, ast.Attribute) and f.attr in ("loads", "load") and getattr(f.value, "id", "") == "json"


def _line_vars(own: list[ast.AST]) -> set[str]:
    """Names bound to the lines of a text: loop targets over splitlines()/readlines()/a file, and files opened."""
    files = {item.optional_vars.id for n in own if isinstance(n, ast.With) for item in n.items
             if isinstance(item.optional_vars, ast.Name) and _calls(item.context_expr, LINE_SOURCES)}
    out = set()
    for n in own:
        loops = [(n.target, n.iter)] if isinstance(n, (ast.For, ast.AsyncFor)) else (
            [(g.target, g.iter) for g in n.generators] if isinstance(n, (ast.ListComp, ast.SetComp, ast.DictComp,
                                                                         ast.GeneratorExp)) else [])
        for target, it in loops:
            if _calls(it, LINE_SOURCES) or (isinstance(it, ast.Name) and it.id in files):
                out |= {t.id for t in ast.walk(target) if isinstance(t, ast.Name)}
    return out


def _calls(node: ast.AST, names: set[str]) -> bool:
    return any(isinstance(c, ast.Call) and (getattr(c.func, "attr", None) in names or getattr(c.func, "id", None)
                                            in names) for c in ast.walk(node))


def parsers_of_run_lines(path: Path, root: Path = SRC.parent, any_lines: bool = True) -> list[str]:
    """Functions of a module that parse JSON and name trajectory.jsonl/metrics.jsonl (a path literal or the
    owner's constant), or parse JSON Lines at all (json.loads of a line of splitlines()/readlines()/a file, or
    json.loads mapped over lines; not with `any_lines` off: for code that reads training data too)."""
    found = []
    for scope, own in _functions(ast.parse(path.read_text(encoding="utf-8"))):
        parses = [n for n in own if isinstance(n, ast.Call) and _is_json_parse(n)]
        mapped = any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "map" and n.args
                     and _is_json_parse(n.args[0]) for n in own)
        if not parses and not mapped:
            continue
        names_file = any((isinstance(n, ast.Constant) and n.value in RUN_LINE_FILES)
                         or (isinstance(n, ast.Name) and n.id in RUN_LINE_NAMES)
                         or (isinstance(n, ast.Attribute) and n.attr in RUN_LINE_NAMES) for n in own)
        lines = _line_vars(own)
        parses_lines = mapped or any(a.id in lines for c in parses for a in ast.walk(c) if isinstance(a, ast.Name))
        if names_file or (parses_lines and any_lines):
            found.append(f"{path.relative_to(root)}:{getattr(scope, 'lineno', 1)} "
                         f"{getattr(scope, 'name', '<module>')}")
    return found


def test_no_other_module_parses_run_lines():
    """The acceptance of issue 22, item 2: one module owns the run-directory formats; no other module parses
    trajectory or metrics lines. Training data (sftlab.data) is JSON Lines of its own, read by its own readers."""
    offenders = [f for p in sorted(SRC.rglob("*.py")) if p != OWNER and "data" not in p.relative_to(SRC).parts[:1]
                 for f in parsers_of_run_lines(p)]
    # the benchmarks read run directories too (and training data, JSON Lines of its own)
    offenders += [f for p in sorted((SRC.parents[1] / "benchmarks").glob("*.py"))
                  for f in parsers_of_run_lines(p, SRC.parents[1], any_lines=False)]
    assert offenders == [], ("these parse run-directory lines themselves; use sftlab.rundir_format "
                             f"(read_trajectory, read_metrics, read_lines): {offenders}")


def test_the_owner_check_catches_hand_written_readers(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text("import json\n"
                    "def steps(d):\n"
                    "    return [json.loads(x)['step'] for x in (d / 'trajectory.jsonl').read_text().splitlines()]\n"
                    "def peak(p):\n"
                    "    with open(p) as f:\n"
                    "        return max(json.loads(line).get('peak_mem_mb', 0) for line in f)\n"
                    "def config(p):\n"
                    "    return json.loads(p.read_text()), str(p).splitlines()\n"
                    "def rows(p):\n"
                    "    return list(map(json.loads, p.read_text().splitlines()))\n")
    assert sorted(f.split()[-1] for f in parsers_of_run_lines(fake, tmp_path)) == ["peak", "rows", "steps"]
