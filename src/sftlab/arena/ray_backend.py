"""Trials as Ray tasks: one task per trial with its CPU/GPU request (pip install 'sftlab[ray]').

Trials are independent run directories, so nothing but the arena folder (a shared filesystem on a
cluster) and the cache root connects them. `ray.init()` joins the cluster named by RAY_ADDRESS, or
starts a local instance. On a cluster, sftlab must be importable on every node (an image or a Ray
runtime_env); the arena folder and the cache root must be on storage every node sees.
"""

from __future__ import annotations

import os

from ..errors import SftlabError


def _trial_task(trial, state: str, cpus: float) -> dict:
    import torch

    from .runner import run_trial

    if not trial.cfg.train.threads:
        torch.set_num_threads(max(1, int(cpus)))  # Ray sets no thread limit; stay within the request
    return run_trial(trial, state)


def run_on_ray(trials: list, states: dict, arena) -> dict:
    """{trial name: record} once every task has finished; a task that dies is a failed trial."""
    try:
        import ray
    except ImportError:
        raise SftlabError("arena.backend=ray: Ray is not installed; pip install 'sftlab[ray]' "
                          "(or set arena.backend=local)") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 logging_level="warning", log_to_driver=True)
    try:
        task = ray.remote(num_cpus=arena.cpus_per_trial, num_gpus=arena.gpus_per_trial, max_retries=0)(_trial_task)
        refs = {t.name: task.remote(t, states[t.name], arena.cpus_per_trial) for t in trials}
        print(f"arena: {len(refs)} trial(s) submitted to Ray ({arena.cpus_per_trial:g} CPU, "
              f"{arena.gpus_per_trial:g} GPU each)", flush=True)
        out = {}
        for name, ref in refs.items():
            try:
                out[name] = ray.get(ref)
            except Exception as e:  # the worker died (out of memory, killed): the trial failed, not the arena
                out[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
        return out
    finally:
        if started:
            ray.shutdown()
