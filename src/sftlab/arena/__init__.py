"""The arena: many methods x budgets x learning rates x seeds on the same data, scored the same way.

`sftlab arena CONFIG.yaml` plans the trials (`plan.py`), runs each as a normal run directory under the
arena folder (`runner.py`) and ranks the methods (`leaderboard.py`, pure functions over trajectories).
"""

from .leaderboard import build_leaderboard, format_leaderboard
from .plan import ArenaSection, Trial, load_arena, plan_trials
from .runner import run_arena

__all__ = ["ArenaSection", "Trial", "build_leaderboard", "format_leaderboard", "load_arena", "plan_trials",
           "run_arena"]
