"""Resume across sftlab versions: a field added since a run started takes its default (not a change)."""

from __future__ import annotations

import pytest
import yaml

from sftlab.config import config_from_dict
from sftlab.errors import SftlabError
from sftlab.train.rundir import check_resume_config


def cfg(**train):
    return config_from_dict({"data": {"train": [{"path": "x.jsonl"}]}, "train": {"steps": 4, **train}})


def test_a_field_added_since_the_run_started_is_not_a_change(tmp_path):
    written = cfg().to_dict()
    del written["train"]["max_bad_steps"]  # as an older sftlab wrote it
    del written["scoring"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(written))
    check_resume_config(tmp_path, cfg())
    check_resume_config(tmp_path, cfg(steps=8, max_bad_steps=9))  # allowed to change on resume
    with pytest.raises(SftlabError, match=r"changed config \(train\.lr\)"):
        check_resume_config(tmp_path, cfg(lr=0.5))
    with pytest.raises(SftlabError, match=r"changed config \(train\.max_grad_norm\)"):
        check_resume_config(tmp_path, cfg(max_grad_norm=0.0))
