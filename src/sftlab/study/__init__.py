"""`sftlab study CONFIG`: one command that runs a whole comparison and writes its findings.

A study is arenas (`sftlab.arena`), one per (model, task), under STUDY/<model>-<task>/, plus what the
questions need beyond a leaderboard: generation scores at every checkpoint of a generative task, the path
between the base and each kept trial's final checkpoint scored on an alpha grid (for OFT both ways: the
generator scaled and the dense weight delta), and the geometry of some checkpoints (`sftlab analyze`).
`findings.py` turns the folder into docs/findings.md (tables, SVG plots, one answer per question, each
computed from the runs with its n and a confidence interval across seeds).

Resumable by construction: every stage looks at what is on disk and skips what is done (the arena resumes
its own trials), so rerunning the same command after a stop picks up where it stopped.

- config.py: the `study:` section, built-in tasks, the arena config of each (model, task)
- runner.py: the stages, in order, each skipped when its output is complete
- stats.py: small pure statistics (t intervals over seeds, correlations, crossing a task level)
- findings.py: pure (no torch): the study folder -> answers, tables, plots, markdown
"""

from .config import StudySection, load_study
from .findings import write_findings
from .runner import run_study

__all__ = ["StudySection", "load_study", "run_study", "write_findings"]
