"""Callbacks observe the loop (they never change it): metrics.jsonl, TensorBoard, MLflow/W&B, progress."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol


class Callback(Protocol):
    """The loop's events, in the order they come (Trainer._loop):

    on_train_start(step): before the first step (step 0, or the step a resumed run goes on from).
    on_step_end(step, metrics): after each optimizer step (metrics: the step's metrics.jsonl fields).
    on_eval(step, metrics): after a held-out loss pass (train.eval_every, and the last step).
    on_checkpoint(step, entry): a trajectory checkpoint is complete (entry: its trajectory.jsonl line).
    on_scored(step, scores): the probes scored the model at this step (step 0: the starting model).
    on_train_end(step, summary): the run reached train.steps (or stopped on bad steps, then raises).
    on_close(failed): always the last event, after on_train_end, or instead of it when the run failed.
    Every event but on_step_end, on_eval, on_checkpoint and on_train_end is optional to implement.
    """

    def on_step_end(self, step: int, metrics: dict) -> None: ...
    def on_eval(self, step: int, metrics: dict) -> None: ...
    def on_checkpoint(self, step: int, entry: dict) -> None: ...
    def on_train_end(self, step: int, summary: dict) -> None: ...
    # Always the last event: after on_train_end, or instead of it when the run failed (an exception, a kill
    # signal turned into one); releases what the callback holds (writers, tracker runs, progress bars).
    def on_close(self, failed: bool) -> None: ...


class Base:
    def on_train_start(self, step): pass
    def on_step_end(self, step, metrics): pass
    def on_eval(self, step, metrics): pass
    def on_checkpoint(self, step, entry): pass
    def on_scored(self, step, scores): pass
    def on_train_end(self, step, summary): pass
    def on_close(self, failed): pass


class JsonlLogger(Base):
    """metrics.jsonl: one line per logged step, and eval lines marked with "eval": true."""

    def __init__(self, run_dir: Path, every: int):
        self.path = run_dir / "metrics.jsonl"
        self.every = every

    def _write(self, row: dict) -> None:
        from .checkpoint import append_jsonl, write_error

        try:
            append_jsonl(self.path, row, durable=False)  # a full disk: one clear line, no torn line left
        except OSError as e:
            raise write_error(self.path.parent, "metrics.jsonl", e, self.path.parent) from e

    def on_step_end(self, step, metrics):
        if step % self.every == 0 or step == 1:
            self._write({"step": step, **metrics})

    def on_eval(self, step, metrics):
        self._write({"step": step, "eval": True, **metrics})


class TensorBoardLogger(Base):
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def on_step_end(self, step, metrics):
        for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
            if k in metrics and metrics[k] is not None and math.isfinite(metrics[k]):
                self.writer.add_scalar(f"train/{k}", metrics[k], step)

    def on_eval(self, step, metrics):
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(f"eval/{k}", v, step)

    def on_train_end(self, step, summary):
        self.writer.close()

    def on_close(self, failed):
        self.writer.close()  # a no-op when already closed


class MlflowLogger(Base):
    def __init__(self, run_name: str, params: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:250] for k, v in params.items()})

    def on_step_end(self, step, metrics):
        self.mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def on_eval(self, step, metrics):
        self.mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def on_train_end(self, step, summary):
        self.mlflow.end_run()

    def on_close(self, failed):
        if failed and self.mlflow.active_run() is not None:
            self.mlflow.end_run(status="FAILED")


class WandbLogger(Base):
    def __init__(self, run_name: str, params: dict):
        import wandb

        self.run = wandb.init(name=run_name, config=params)

    def on_step_end(self, step, metrics):
        self.run.log(metrics, step=step)

    def on_eval(self, step, metrics):
        self.run.log(metrics, step=step)

    def on_train_end(self, step, summary):
        self.run.finish()

    def on_close(self, failed):
        if failed:
            self.run.finish(exit_code=1)


class Progress(Base):
    """A progress bar with loss, tokens/s and ETA."""

    def __init__(self, total: int, start: int):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)

    def on_step_end(self, step, metrics):
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        self.bar.update(1)

    def on_eval(self, step, metrics):
        self.bar.write(f"step {step}: eval_loss {metrics['eval_loss']:.4f}")

    def on_train_end(self, step, summary):
        self.bar.close()

    def on_close(self, failed):
        self.bar.close()


def emit(cbs: list, event: str, *args) -> None:
    """Send an optional event to every callback that implements it."""
    for cb in cbs:
        fn = getattr(cb, event, None)
        if fn is not None:
            fn(*args)


def close_all(cbs: list, failed: bool) -> None:
    """The end event that always runs (Trainer._loop's finally). One callback failing to close does not keep
    the others open; the run's own error, if any, is the one the caller sees."""
    for cb in cbs:
        close = getattr(cb, "on_close", None)
        if close is None:
            continue
        try:
            close(failed)
        except Exception as e:  # noqa: BLE001  (closing must not mask the run's outcome)
            print(f"sftlab: closing {type(cb).__name__} failed: {type(e).__name__}: {e}")


def build_callbacks(cfg, run_dir: Path, total: int, start: int, is_main: bool) -> list:
    if not is_main:
        return []
    cbs: list = [JsonlLogger(run_dir, cfg.train.log_every)]
    if cfg.logging.tensorboard:
        cbs.append(TensorBoardLogger(run_dir))
    params = {"method": cfg.method.name, **{f"train.{k}": v for k, v in vars(cfg.train).items()}}
    for name, cls in (("mlflow", MlflowLogger), ("wandb", WandbLogger)):
        if name in cfg.logging.report_to:
            try:
                cbs.append(cls(cfg.run.name, params))
            except ImportError:
                print(f"logging.report_to: {name} is not installed; skipping it (pip install {name})")
    if cfg.logging.progress:
        cbs.append(Progress(total, start))
    return cbs
