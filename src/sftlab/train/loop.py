"""The training loop: one explicit function you can read top to bottom.

setup (model, method, data, optimizer) -> for each step: gather grad_accum micro-batches, weight the
loss by the step's trained tokens, backward, clip, AdamW -> log, eval, checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from .. import tokens
from ..config import RunConfig
from ..data.collate import BatchPlan, pad_batch
from ..data.prepare import Prepared, prepare_data
from ..errors import DataError, ModelError, SftlabError
from ..faults import fault
from ..methods import METHODS
from ..models import load_model, load_tokenizer, resolve_model
from ..objectives import OBJECTIVES, eval_loss
from ..remedies import build_remedies
from ..resources import peak_rss_mb
from . import checkpoint as ckpt
from . import dpo, sharding, speed, vision
from . import step as step_fn
from .callbacks import build_callbacks, close_all, emit
from .hooks import Hooks
from .optim import build_optimizer, lr_lambda
from .rundir import RunLock, check_fresh, check_resume_config, write_config, write_error, write_provenance


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Works under `accelerate launch` and `torchrun` (both set RANK/WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise SftlabError(f"process {local} of {world} has no GPU ({torch.cuda.device_count()} visible); start "
                              "at most one process per GPU, or set CUDA_VISIBLE_DEVICES= to train on CPU")
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(int(os.environ.get("RANK", "0")), world, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def trainable_report(model) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total, "trainable_share": trainable / max(total, 1)}


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()  # VmHWM: resettable, so an arena trial's figure is its own (see sftlab.resources)


class Trainer:
    """Holds the state of one run; `run()` is the loop. Every attribute is declared here; setup() fills those
    that need the model and data (None before it)."""

    def __init__(self, cfg: RunConfig, resume: bool = False, hooks: Hooks | dict | None = None,
                 provenance: dict | None = None):
        self.cfg, self.resume, self.hooks = cfg, resume, Hooks.of(hooks)
        self.provenance = dict(provenance or {})  # extra provenance.json keys from the caller (a pipeline's choice)
        self.run_dir: Path = cfg.run_dir
        self.dist: Dist = init_distributed()
        self.method = METHODS.get(cfg.method.name)
        self.objective = OBJECTIVES.get(cfg.objective.name)
        self.dpo: bool = cfg.objective.name == "dpo"
        # the step's loss: one term per objective, plus extra terms (remedies' penalties) added to it
        self.term = dpo.DpoTerm(cfg.objective) if self.dpo else step_fn.SftTerm()
        self.extra_terms: list[step_fn.ExtraTerm] = []
        self.last_forward = None  # (hidden, head) of the objective's forward on the current micro-batch
        # forgetting remedies (remedies/): each a Hooks object called at fixed points of the loop
        self.remedies = build_remedies(cfg.remedies)
        for _, r in self.remedies:
            if r.objective is not None:
                self.objective = r.objective  # a loss-side remedy replaces the SFT objective (config checks sft)
        self.start = None  # runs.StartPoint when model.init_from names a run to start from
        # filled by setup()
        self.ref = None  # models.ModelRef of the base (retention is measured against it)
        self.start_id: str | None = None  # the starting point's identity (caches of its outputs are keyed by it)
        self.sharding = None  # sharding.Sharding
        self.tokenizer = None
        self.processor = None  # a vision-language model's processor (train/vision.py), else None
        self.vision_batch = None  # its batches' image tensors maker (collate's `vision`)
        self.data: Prepared | dpo.PreparedPairs | None = None
        self.token_plan = None  # tokens.TokenPlan when model.new_tokens is set
        self.model: torch.nn.Module | None = None
        self.params: dict = {}  # trainable_report
        self.plan = None  # BatchPlan | dpo.PairPlan: the data order, a function of (seed, epoch)
        self.total_steps: int = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.eval_batches: list[dict] = []
        self.scorer = None  # scoring.ScoreCallback when probes score during training
        # the position in the run (resume state): finished steps, epoch, micro-batch, skipped steps
        self.pos: dict = {"step": 0, "epoch": 0, "micro": 0, "skipped": 0, "bad_in_row": 0}

    # ---- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.sharding = sharding.resolve(cfg.distributed, cfg.train, self.dist.world, self.dist.device)
        sharding.check_run(cfg, self.sharding, self.method)
        try:  # bad input (data, model, tokenizer): the run directory holds nothing but the error
            self._resolve_start()
            self.processor = vision.load(cfg, self.ref, self.method)  # None for a text model
            self.tokenizer = (self.processor.tokenizer if self.processor is not None else
                              load_tokenizer(self.ref, cfg.model.trust_remote_code, cfg.model.revision))
            tokens.add_tokens(self.tokenizer, cfg.model.new_tokens)  # before the data is tokenized
            prepare = dpo.prepare_pairs if self.dpo else partial(prepare_data, progress=self.dist.main,
                                                                  processor=self.processor)
            self.data = prepare(cfg, self.tokenizer)
            for _, r in self.remedies:  # replay mixes general text into the training examples
                self.data = r.prepare(self, self.data)
            seed_everything(cfg.run.seed)  # adapter init is seeded
            if self.start is not None:  # an earlier run's checkpoint (merged), e.g. DPO after SFT
                model = self.start.load(cfg.model.dtype)
            else:
                model = load_model(self.ref, cfg.model.dtype, cfg.model.trust_remote_code,
                                   cfg.model.attn_implementation, cfg.model.revision,
                                   quant=cfg.quantization, device=self.dist.device)
        except (DataError, ModelError) as e:
            if self.dist.main and not self.resume:
                write_error(self.run_dir, str(e))
            raise
        # new tokens: resize and initialise before anything scores the starting model (the DPO reference too)
        self.token_plan = tokens.init_new_rows(model, self.tokenizer, cfg.model, cfg.run.seed)
        if cfg.quantization.enabled:
            from ..quantize import prepare_for_training

            model = prepare_for_training(model)  # frozen base, float32 norms and embeddings
        if cfg.train.gradient_checkpointing or self.sharding.activation_checkpointing:
            kw = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
            model.enable_input_require_grads()
        if self.dpo and cfg.objective.reference == "cached":
            dpo.attach_reference(self, model)  # the reference is the starting model: score it before the method
        kw = tokens.method_kwargs(self.token_plan) if self.token_plan and self.method.peft else {}
        model = vision.apply_method(self.method, model, cfg, self.processor, **kw)  # a VLM: on vision.train's parts
        self.vision_batch = vision.batch_maker(self.processor, cfg)
        if self.token_plan is not None:
            tokens.freeze_rows(model, self.token_plan, cfg.model, self.method.peft)
        if not cfg.quantization.enabled:  # bitsandbytes placed a quantized base on the device when loading
            model.to(self.dist.device)
        model.train()
        self.params = trainable_report(model)
        speed.check_attention(cfg.model.attn_implementation, self.dist.device, cfg.train.precision)
        if cfg.train.compile:  # per decoder layer, before any DDP/FSDP wrapper (as torchtitan does)
            # bucketed lengths: one static graph per bucket; otherwise let dynamo go dynamic after a length change
            speed.compile_layers(model, dynamic=False if cfg.data.pad_to_multiple else None)
        if self.dist.world > 1:
            model = sharding.wrap(model, self.sharding)  # DDP, or FSDP2 behind DDP's interface
        self.model = model
        for _, r in self.remedies:  # penalties keep what they pull towards (the starting weights, the base)
            r.setup(self)
            if r.term is not None:
                self.extra_terms.append(r.term)
        plan = dpo.PairPlan if self.dpo else BatchPlan  # pairs: the same plan, collated as chosen + rejected rows
        self.plan = plan(self.data.train, cfg.train.batch_size, cfg.data.packing, cfg.data.max_length,
                         cfg.run.seed, self.dist.rank, self.dist.world, cfg.data.pad_to_multiple,
                         **({"vision": self.vision_batch} if self.vision_batch else {}))
        per_epoch = len(self.plan.epoch(0)) // cfg.train.grad_accum
        self.total_steps = cfg.train.steps or max(1, int(math.ceil(cfg.train.epochs * per_epoch)))
        self.optimizer = build_optimizer(model, cfg)
        warmup = int(cfg.train.warmup * self.total_steps) if cfg.train.warmup < 1 else int(cfg.train.warmup)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.train.schedule, warmup, self.total_steps))
        self.eval_batches = self._eval_batches()
        self.pos = {"step": 0, "epoch": 0, "micro": 0, "skipped": 0, "bad_in_row": 0}
        self._hook("after_setup", self)

    def _hook(self, name: str, *args) -> None:
        fn = getattr(self.hooks, name)
        if fn is not None:
            fn(*args)

    def _resolve_start(self) -> None:
        """The base model (for provenance, the tokenizer and retention probes) and the starting point."""
        cfg = self.cfg
        if cfg.model.init_from:
            from ..runs import StartPoint

            self.start = StartPoint.parse(cfg.model.init_from)
            self.ref = self.start.base_ref()  # retention stays measured against the original pretrained base
            self.start_id = self.start.identity()
        else:
            self.ref = resolve_model(cfg.model.path, cfg.model.gguf_file)
            self.start_id = f"base:{self.ref.sha256 or self.ref.location}"

    def _eval_batches(self) -> list[dict]:
        if self.dpo:
            return dpo.eval_batches(self)
        ex = sorted(self.data.eval, key=lambda e: len(e.input_ids))  # similar lengths pad less
        bs, pad = self.cfg.train.batch_size, self.tokenizer.pad_token_id
        return [pad_batch(ex[i:i + bs], pad, vision=self.vision_batch) for i in range(0, len(ex), bs)]

    def _write_start(self) -> None:
        found = ckpt.find_resume(self.run_dir) if self.resume else None
        if found is not None:
            self.pos = {**self.pos, **ckpt.load_resume(found, self.model, self.optimizer, self.scheduler)}
        if not self.dist.main:
            return
        if found is None:  # a fresh run, or a resume before any resume state was saved: start over
            if self.resume:
                print(f"sftlab: {self.run_dir} has no resume state yet; starting from step 0")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "error.txt").unlink(missing_ok=True)
            write_config(self.run_dir, self.cfg)
            if self.cfg.model.new_tokens:
                tokens.save_tokenizer(self.run_dir, self.tokenizer)
            extra = {**self.provenance, **({"start": self.start.info(self.run_dir)} if self.start is not None else {})}
            if self.remedies:
                extra["remedies"] = {name: r.provenance() for name, r in self.remedies}
            if self.processor is not None:  # what trains in the VLM, per part
                extra.update(vision.provenance(self.model, self.cfg, self.processor))
            write_provenance(self.run_dir, self.cfg, self.ref, self.data.stats_dict(), {**self.params, **extra})
        else:
            print(f"sftlab: resuming {self.run_dir} at step {self.pos['step']}")
        if self.resume:  # steps after the resume point are trained again: drop their old lines and folders
            ckpt.truncate_jsonl(self.run_dir / "metrics.jsonl", self.pos["step"])
            removed = ckpt.clean_incomplete(self.run_dir, self.pos["step"])
            if removed:
                print(f"sftlab: removed what a crash left behind or the resumed steps replace: {', '.join(removed)}")

    # ---- the loop ---------------------------------------------------------------------------
    def next_micro_batches(self) -> list[dict]:
        out = []
        for _ in range(self.cfg.train.grad_accum):
            batches = self.plan.epoch(self.pos["epoch"])
            if self.pos["micro"] >= len(batches):
                self.pos["epoch"] += 1
                self.pos["micro"] = 0
                batches = self.plan.epoch(self.pos["epoch"])
            out.append(self.plan.collate(batches[self.pos["micro"]], self.tokenizer.pad_token_id))
            self.pos["micro"] += 1
        return out

    def train_step(self, micro: list[dict]) -> dict:
        """One optimizer step over grad_accum micro-batches; the loss is a mean over the step's trained tokens
        (sft) or pairs (dpo)."""
        loss_sum, denom, info = step_fn.accumulate(self, micro, self.term, self.extra_terms)
        self._hook("after_backward", self)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.cfg.train.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))  # the norm before clipping
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves on below)
        loss_sum, bad = self._global_loss_and_verdict(loss_sum, grad_norm)
        if bad:
            self._skip_step()
        else:
            self._hook("before_optimizer_step", self)
            self.optimizer.step()
            self.scheduler.step()
            for _, r in self.remedies:
                r.after_update(self)
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_sum / max(denom, 1.0), "grad_norm": grad_norm, "lr": lr, **info, "skipped": bad}

    def _global_loss_and_verdict(self, loss_sum: float, grad_norm: float) -> tuple[float, bool]:
        """The step's loss summed over processes, and whether the step is bad (non-finite loss or gradient).

        Under DDP every process must take the same decision, or their weights drift apart: the verdict
        travels in the same all_reduce as the loss, so a NaN on any rank makes every rank skip."""
        bad = not (math.isfinite(loss_sum) and math.isfinite(grad_norm))
        if self.dist.world > 1:
            t = torch.tensor([loss_sum, float(bad)], device=self.dist.device)
            dist.all_reduce(t)
            loss_sum, bad = float(t[0]), bool(t[1] > 0) or not math.isfinite(float(t[0]))
        return loss_sum, bad

    def _skip_step(self) -> None:
        """A non-finite step is not applied: weights and optimizer moments stay as they were. Its micro-
        batches are consumed and the scheduler still moves on, so data order, RNG draws and the
        learning rate stay functions of the step number, exactly as in a run resumed from any point."""
        import warnings

        with warnings.catch_warnings():
            # torch warns when the scheduler steps before the first optimizer step: here that is on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()

    def run(self) -> Path:
        try:
            if self.dist.main:
                check_fresh(self.run_dir, self.resume)
                if self.resume:
                    check_resume_config(self.run_dir, self.cfg)
            with RunLock(self.run_dir) if self.dist.main else _null():
                self.setup()
                self._write_start()
                return self._loop()
        finally:
            if self.dist.world > 1 and dist.is_initialized():
                dist.destroy_process_group()

    def _loop(self) -> Path:
        cfg, d = self.cfg, self.dist
        cbs = build_callbacks(cfg, self.run_dir, self.total_steps, self.pos["step"], d.main)
        if d.main and cfg.probes and cfg.scoring.during_training:
            from ..scoring import ScoreCallback

            self.scorer = ScoreCallback(self)
            cbs.insert(0, self.scorer)
        if cfg.quantization.enabled:  # after the scoring passes: gradients still reach the adapter (quantize.py)
            from ..quantize import GradientGuard

            cbs.append(GradientGuard(self.model))
        failed = True
        try:
            emit(cbs, "on_train_start", self.pos["step"])
            self._announce_scores(cbs)
            if d.main:
                p = self.params
                print(f"sftlab: {cfg.method.name}: {p['trainable_params']:,} trainable of {p['total_params']:,} "
                      f"parameters ({100 * p['trainable_share']:.3f}%); data: {self.data.train_stats.summary()}")
                if cfg.quantization.enabled or self.sharding.kind == "fsdp":
                    from ..quantize import describe

                    quant = f"{describe(cfg.quantization)} base" if cfg.quantization.enabled else "full-precision base"
                    print(f"sftlab: {quant}; {d.world} process(es), {self.sharding.describe()}")
            self._train_steps(cbs)
            for cb in cbs:
                cb.on_train_end(self.pos["step"], {"skipped_steps": self.pos["skipped"]})
            if d.main:
                for _, r in self.remedies:  # after the final checkpoint and its scores (WiSE-FT reads them)
                    r.on_train_end(self)
            if d.main and self.pos["skipped"]:
                print(f"sftlab: {self.pos['skipped']} of {self.pos['step']} steps had a non-finite loss or gradient "
                      "and were skipped (see 'skipped' in metrics.jsonl)")
            if d.world > 1:
                dist.barrier()
            failed = False
            return self.run_dir
        finally:  # the end event always runs: writers, trackers and progress bars are released
            close_all(cbs, failed)

    def _train_steps(self, cbs) -> None:
        """Step until train.steps: update, log, evaluate, checkpoint (the callbacks see each event)."""
        cfg, d = self.cfg, self.dist
        t_start = time.time()
        while self.pos["step"] < self.total_steps:
            t0 = time.time()
            metrics = self.train_step(self.next_micro_batches())
            self.pos["step"] += 1
            step = self.pos["step"]
            fault("after_update", step)
            self._count_bad(metrics)
            dt = time.time() - t0
            metrics.update(step_time=dt, tokens_per_s=metrics["tokens"] / dt,
                           peak_mem_mb=peak_memory_mb(d.device), elapsed=time.time() - t_start,
                           epoch=self.pos["epoch"], skipped_steps=self.pos["skipped"])
            for cb in cbs:
                cb.on_step_end(step, metrics)
            if self.pos["bad_in_row"] >= cfg.train.max_bad_steps:
                self._stop_on_bad_steps(cbs)
            last = step == self.total_steps
            if self.eval_batches and ((cfg.train.eval_every and step % cfg.train.eval_every == 0) or last):
                em = dpo.evaluate(self) if self.dpo else eval_loss(self.model, self.eval_batches, d.device)
                for cb in cbs:
                    cb.on_eval(step, em)
            self._maybe_checkpoint(step, last, cbs)
            self._hook("after_step", self, step, metrics)

    def _announce_scores(self, cbs) -> None:
        """on_scored, after the event whose scoring pass produced the scores has reached every callback."""
        while self.scorer is not None and self.scorer.scored:
            emit(cbs, "on_scored", *self.scorer.scored.pop(0))

    def _count_bad(self, metrics: dict) -> None:
        """Skipped steps in total and in a row; both live in the position, so a resumed run counts on."""
        self.pos.setdefault("skipped", 0)
        self.pos.setdefault("bad_in_row", 0)
        if metrics["skipped"]:
            self.pos["skipped"] += 1
            self.pos["bad_in_row"] += 1
        else:
            self.pos["bad_in_row"] = 0

    def _stop_on_bad_steps(self, cbs) -> None:
        """Stop cleanly: no checkpoint of this step; the trajectory and resume state keep the last good ones."""
        for cb in cbs:
            cb.on_train_end(self.pos["step"], {"skipped_steps": self.pos["skipped"]})
        n, step = self.pos["bad_in_row"], self.pos["step"]
        last = ckpt.read_trajectory(self.run_dir)
        kept = f"the last checkpoint is {last[-1]['path']}" if last else "no checkpoint was written yet"
        raise SftlabError(f"{self.run_dir}: stopped at step {step}: {n} steps in a row (steps {step - n + 1}-"
                          f"{step}) had a non-finite loss or gradient and were skipped (train.max_bad_steps="
                          f"{self.cfg.train.max_bad_steps}); the weights are those of step {step - n}, the last "
                          f"applied step, and {kept}. Lower train.lr, keep train.max_grad_norm > 0 or use "
                          "train.precision=fp32 in a new run, or raise train.max_bad_steps and --resume")

    def _maybe_checkpoint(self, step: int, last: bool, cbs) -> None:
        c = self.cfg.checkpoint
        traj = (c.every and step % c.every == 0) or (last and c.final)
        resume_due = (c.resume_every and step % c.resume_every == 0) or (not c.resume_every and traj)
        # Sharded: every process takes part in gathering full tensors; process 0 writes them.
        full = sharding.gathered_states(self.model, self.optimizer, self.method.peft, bool(traj),
                                        bool(resume_due or last))
        if not self.dist.main:
            return
        if traj:
            entry = ckpt.write_checkpoint(self.run_dir, step, self.model, self.method.peft,
                                          before_rename=self.hooks.before_rename, state=full.get("weights"))
            for cb in cbs:
                cb.on_checkpoint(step, entry)
            self._announce_scores(cbs)
            for _, r in self.remedies:  # EMA writes and scores its own checkpoint of the average
                r.on_checkpoint(self, step)
            if self.cfg.checkpoint.keep == "frontier":  # delete what the scores show is dominated
                from .prune import prune

                prune(self.run_dir, dataclasses.asdict(self.cfg.select), self.cfg.checkpoint.disk_budget_mb)
        if resume_due or last:
            ckpt.save_resume(self.run_dir, self.model, self.optimizer, self.scheduler, dict(self.pos),
                             full.get("trainable"), full.get("optimizer"))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def train(cfg: RunConfig, resume: bool = False, hooks: Hooks | dict | None = None,
          provenance: dict | None = None) -> Path:
    return Trainer(cfg, resume, hooks, provenance).run()
