"""The malformed-input corpus (tests/data/malformed/): each bad data file, config, model folder and
tokenizer makes `sftlab train` exit 2 with one line that names the place (file:line or config key), what is
wrong and what to do; no traceback unless --debug; nothing half-written in the output folder (at most the
run directory's error.txt). Runs in-process (`sftlab.cli.main`), so the whole corpus takes seconds.

Hostile files: custom model code is not run unless model.trust_remote_code is set, pickled weights are never
unpickled, and a 1 GB JSONL line is refused without reading it into memory.
"""

from __future__ import annotations

import json
import pickle
import resource
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from conftest import memorisable_chats, write_jsonl
from sftlab.cli import main
from sftlab.errors import DataError

CORPUS = Path(__file__).resolve().parents[1] / "data" / "malformed"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())
DATA_CASES = sorted(CASES["data"].items())
CONFIG_CASES = sorted(CASES["configs"].items())


class Pwn:
    """Unpickling this creates a marker file: proof that the weights were unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_model_dir) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    out = {"markers": {}}
    no_template = shutil.copytree(tiny_model_dir, root / "no-template")
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    out["model_without_template"] = no_template

    remote = shutil.copytree(tiny_model_dir, root / "remote-code")
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="evil", architectures=["EvilModel"],
               auto_map={"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (remote / "config.json").write_text(json.dumps(cfg))
    out["markers"]["remote"] = root / "REMOTE_CODE_RAN"
    (remote / "modeling_evil.py").write_text(
        f"open({str(out['markers']['remote'])!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    out["model_with_remote_code"] = remote

    pickled = shutil.copytree(tiny_model_dir, root / "pickle-weights")
    (pickled / "model.safetensors").unlink()
    out["markers"]["pickle"] = root / "PICKLE_LOADED"
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(Pwn(out["markers"]["pickle"])))
    out["model_with_pickle"] = pickled
    return out


@pytest.fixture(scope="module")
def good_chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("good") / "chats.jsonl", memorisable_chats(8))


@pytest.fixture(autouse=True)
def third_party_logs_to_the_terminal():
    """transformers and huggingface_hub bind their log handlers to whatever sys.stderr was when they were first
    imported, which may be an earlier test's capture, closed since; point those at the real stderr so that
    captured stderr is sftlab's alone (and a third-party warning does not turn into a logging error)."""
    import logging

    import transformers  # noqa: F401  (configures its loggers)

    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    for logger in loggers + [logging.getLogger("transformers"), logging.getLogger("huggingface_hub")]:
        for h in getattr(logger, "handlers", []):
            if type(h) is logging.StreamHandler and (h.stream is not sys.__stderr__ or h.stream.closed):
                h.stream = sys.__stderr__  # not setStream: it flushes the old stream, which may be closed
                h.__dict__.pop("flush", None)  # transformers pins flush to the stderr of its import time


def run_and_check(cfg_path: Path, out: Path, place: str, advice: list[str], capsys) -> str:
    capsys.readouterr()
    rc = main(["train", str(cfg_path)])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, (rc, err, captured.out)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in err + captured.out
    msg = err.removeprefix("error: ")
    assert place in msg, f"place {place!r} not in: {msg}"
    for words in advice:
        assert words in msg, f"{words!r} not in: {msg}"
    # nothing half-written: no output at all, or a run directory that holds only the error
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []
    assert written in ([], ["run/error.txt"]), written
    if written:
        assert (out / "run" / "error.txt").read_text().strip() == msg
    return msg


def test_the_corpus_is_complete_and_large_enough():
    on_disk = {p.name for p in (CORPUS / "data").iterdir()}, {p.name for p in (CORPUS / "configs").iterdir()}
    assert on_disk == (set(CASES["data"]), set(CASES["configs"])), "every corpus file needs a cases.yaml entry"
    assert len(DATA_CASES) + len(CONFIG_CASES) + 1 >= 30  # + the 1 GB line generated at test time


@pytest.mark.parametrize("name,case", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(name, case, tmp_path, tiny_model_dir, capsys):
    data = CORPUS / "data" / name
    out = tmp_path / "out"
    cfg = {"run": {"name": "run", "output_dir": str(out)}, "model": {"path": str(tiny_model_dir)},
           "data": {"train": [{"path": str(data)}], "max_length": 64}, "train": {"steps": 1},
           "logging": {"progress": False, "tensorboard": False}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_and_check(path, out, case["place"].format(file=data), case["advice"], capsys)


@pytest.mark.parametrize("name,case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_model_or_tokenizer(name, case, tmp_path, tiny_model_dir, hostile, good_chats, capsys):
    out = tmp_path / "out"
    fill = {"out": out, "model": tiny_model_dir, "data": good_chats, "chat_data": good_chats,
            **{k: v for k, v in hostile.items() if k != "markers"}}
    raw = (CORPUS / "configs" / name).read_bytes()
    path = tmp_path / name
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        path.write_bytes(raw)  # the case is the encoding itself
    else:
        for key, value in fill.items():
            text = text.replace("{" + key + "}", str(value))
        path.write_text(text)
    place = case["place"].format(config=path, **fill)
    run_and_check(path, out, place, case["advice"], capsys)
    for marker in hostile["markers"].values():
        assert not marker.exists(), f"{marker.name}: hostile model code or pickle was executed"


def test_debug_shows_the_traceback(tmp_path, tiny_model_dir):
    data = CORPUS / "data" / "broken_json.jsonl"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"run": {"output_dir": str(tmp_path / "out")},
                                    "model": {"path": str(tiny_model_dir)}, "data": {"train": [{"path": str(data)}]}}))
    with pytest.raises(DataError, match=rf"{data}:2: not valid JSON"):
        main(["--debug", "train", str(path)])


def test_a_1gb_line_is_refused_fast_without_reading_it(tmp_path, tiny_model_dir, capsys):
    """A sparse 1 GiB file holding one JSONL line: refused at the line cap, in little memory (never read whole)."""
    data = tmp_path / "huge.jsonl"
    with open(data, "wb") as f:
        f.write(b'{"prompt": "p", "completion": "c"}\n{"prompt": "')
        f.seek(1 << 30)  # a hole: the file takes no disk, but reading it yields 1 GiB of bytes
        f.write(b'", "completion": "c"}\n')
    assert data.stat().st_size > 1 << 30
    out = tmp_path / "out"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "run", "output_dir": str(out)},
                                    "model": {"path": str(tiny_model_dir)}, "data": {"train": [{"path": str(data)}]},
                                    "logging": {"progress": False, "tensorboard": False}}))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
    # No time bar (machines differ 2x and more): the memory bar below is what shows the line was not read whole.
    run_and_check(path, out, f"{data}:2", ["line longer than 16 MiB", "split the line into records or remove it"],
                  capsys)
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grew_mib < 200, f"peak memory grew by {grew_mib:.0f} MiB: the line was read whole"


def test_a_tampered_resume_state_is_never_unpickled(tmp_path, tiny_model_dir, good_chats, capsys):
    """resume/state.pt is read with torch.load(weights_only=True): a pickle that would run code is refused."""
    out = tmp_path / "out"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "run", "output_dir": str(out)},
                                    "model": {"path": str(tiny_model_dir)},
                                    "data": {"train": [{"path": str(good_chats)}]},
                                    "train": {"steps": 1, "batch_size": 4, "threads": 1},
                                    "logging": {"progress": False, "tensorboard": False}}))
    assert main(["train", str(path)]) == 0
    marker = tmp_path / "STATE_UNPICKLED"
    (out / "run" / "resume" / "state.pt").write_bytes(pickle.dumps({"optimizer": Pwn(marker)}))
    capsys.readouterr()
    assert main(["train", str(path), "train.steps=2", "--resume"]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    mine = [ln for ln in err.splitlines() if ln.startswith("error:")]  # (transformers' loading bar is on stderr too)
    assert len(mine) == 1 and "state.pt: refused to load the resume state" in mine[0] and "Traceback" not in err
    assert not marker.exists()
