"""The run configuration: grouped, typed dataclasses validated before anything heavy loads.

Every field is documented once here; `sftlab config --show` and `sftlab train --help` print
these docs. A config file is YAML; `key.path=value` arguments override it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .configtools import ConfigError, apply_overrides, check, describe, doc, from_dict, to_dict
from .config_objective import ObjectiveSection
from .config_scale import DistributedSection, QuantizationSection
from .config_vision import VisionSection
from .registry import METHODS, PROBES, REMEDIES, RegistryError


@dataclass
class RunSection:
    name: str = doc("run name: the run directory is output_dir/name", default="run")
    output_dir: str = doc("folder that holds run directories", default="runs")
    seed: int = doc("seed for weights init of adapters, data order and dropout", default=0)

    def __post_init__(self):
        # The run directory is output_dir/name: a name with a separator or '..' would put it (and every
        # file sftlab writes) outside the folder the user named in output_dir.
        plain = bool(self.name) and not any(c in self.name for c in "/\\\0") and self.name not in (".", "..")
        check(plain, "run.name", f"{self.name!r} must be a plain folder name, not a path (no '/', '\\', '..'): "
              "put the parent folder in run.output_dir and a name like 'exp1' in run.name")


@dataclass
class NewToken:
    """`model.new_tokens: [{text: '<tool_call>', init: mean}, ...]`: a token added to the vocabulary (tokens.py)."""

    text: str = doc("the token's text, e.g. '<tool_call>'; it must not be in the vocabulary yet", default="")
    init: Literal["mean", "description", "mean_noise", "description_noise"] = doc(
        "initial embedding: the mean of the existing rows, or the mean of the rows of `description`'s tokens; "
        "*_noise adds seeded Gaussian noise (init_noise x the rows' per-dimension std)", default="mean")
    description: str = doc("words whose embeddings' mean initialises the token (init: description*)", default="")
    special: bool = doc(
        "a special token (like <|im_end|>): dropped by decode(skip_special_tokens=True). Either way an added token "
        "is never split by the tokenizer", default=False)
    output: bool = doc("the model writes it (its output row trains); false: only in inputs (the output row stays "
                       "at its init; for tied embeddings input and output share one row, which trains)", default=True)

    def __post_init__(self):
        check(bool(self.text.strip()), "model.new_tokens[].text", "each new token needs its text")
        check(self.init.startswith("mean") or bool(self.description.strip()), "model.new_tokens[].description",
              f"init {self.init!r} needs a description (a few words saying what {self.text!r} means)")


@dataclass
class ModelSection:
    path: str = doc("'smollm2' (the embedded SmolLM2-135M-Instruct), a local HF folder, a .gguf file, or a hub id",
                    default="smollm2")
    gguf_file: str = doc("GGUF file name inside `path` when `path` is a folder holding one", default="")
    revision: str = doc("hub revision (branch, tag or commit) for hub ids", default="")
    dtype: Literal["float32", "bfloat16", "float16"] = doc("dtype the weights are loaded in", default="float32")
    trust_remote_code: bool = doc("allow model code from the model folder/hub (off: only transformers' code)",
                                  default=False)
    attn_implementation: Literal["sdpa", "eager", "flex_attention"] = doc(
        "attention kernel. flex_attention: packed rows get a block-sparse document mask (FlexAttention "
        "BlockMask built from the restarting position ids), so no (L x L) mask and no work on masked blocks; "
        "it trains on CUDA only (torch has no FlexAttention backward on CPU) and in pure bf16 or fp32, not under "
        "bf16 autocast", default="sdpa")
    init_from: str = doc(
        "start from another run's checkpoint instead of the bare base: RUN or RUN:STEP (default: its last "
        "checkpoint); an adapter is merged into the base, full weights are loaded; the run is only read. The "
        "base (for retention probes) stays that run's base model", default="")
    new_tokens: list[NewToken] = doc("tokens to add (tool-call tags, markers): the embeddings are resized and only "
                                     "the new rows train with an adapter method (any of them; saved with the "
                                     "adapter, in ADAPTER/tokens for all but LoRA); see tokens.py",
                                     default_factory=list)
    new_token_rows: Literal["all", "new"] = doc(
        "full fine-tuning with new_tokens: train every embedding row (all) or only the new rows, the old ones "
        "bitwise frozen (new); adapter methods always train only the new rows", default="all")
    pad_vocab_to: int = doc("with new_tokens, pad the embedding matrices to a multiple of this (0: no padding)",
                            default=64)
    init_noise: float = doc("with new_tokens, noise scale of the *_noise inits", default=0.01)

    def __post_init__(self):
        texts = [t.text for t in self.new_tokens]
        dup = sorted({t for t in texts if texts.count(t) > 1})
        check(not dup, "model.new_tokens", f"{dup[0] if dup else ''!r} is listed twice")
        check(self.pad_vocab_to >= 0, "model.pad_vocab_to", "must be >= 0")
        check(self.init_noise >= 0, "model.init_noise", "must be >= 0")


@dataclass
class DataSource:
    path: str = doc("JSONL/JSON/CSV/Parquet file, or a `datasets` name (hub or local script)", default="")
    format: Literal["auto", "prompt_completion", "chat", "alpaca", "text"] = doc(
        "record format; auto detects it from the fields", default="auto")
    weight: float = doc("mixing weight: the source contributes weight x its size examples per epoch", default=1.0)
    columns: dict[str, str] = doc("rename fields before detection, e.g. {question: prompt, answer: completion}",
                                  default_factory=dict)
    split: str = doc("split name for `datasets` sources", default="train")
    name: str = doc("`datasets` configuration name", default="")

    def __post_init__(self):
        check(bool(self.path), "data.train[].path", "each data source needs a path")
        check(self.weight > 0, "data.train[].weight", f"must be > 0, got {self.weight}")


@dataclass
class DataSection:
    train: list[DataSource] = doc("training data sources (mixed by weight)", default_factory=list)
    eval: list[DataSource] = doc("held-out evaluation sources (optional)", default_factory=list)
    eval_fraction: float = doc("share of train held out for eval when `eval` is empty", default=0.0)
    template: Literal["auto", "chat", "raw"] = doc(
        "chat: render with the tokenizer's chat template; raw: prompt + completion + EOS; auto: chat when the "
        "tokenizer has a template, else chat records in sftlab's plain format (turns as paragraphs, each answer "
        "after 'Answer:', EOS at the end; for base models)", default="auto")
    train_on_prompt: bool = doc("also train on prompt/user/system tokens", default=False)
    assistant_turns: Literal["all", "last"] = doc("multi-turn chats: train every assistant turn or only the last",
                                                  default="all")
    max_length: int = doc("maximum tokens per example (and per packed row)", default=512)
    overlong: Literal["drop", "error"] = doc(
        "an example whose answer does not fit after left-truncating its prompt: drop it or stop", default="drop")
    packing: bool = doc("pack several examples per row with per-example attention (no cross-example attention)",
                        default=False)
    limit: int = doc("use at most this many training examples (0: all)", default=0)
    pad_to_multiple: int = doc(
        "pad each batch's length up to a multiple of this, at most max_length (0: to its longest row). With "
        "train.compile, e.g. 256 leaves a few fixed lengths so the compiled layers are not recompiled per step",
        default=0)

    def __post_init__(self):
        check(0.0 <= self.eval_fraction < 1.0, "data.eval_fraction", "must be in [0, 1)")
        check(self.max_length >= 8, "data.max_length", f"must be >= 8, got {self.max_length}")
        check(self.limit >= 0, "data.limit", "must be >= 0")
        check(self.pad_to_multiple >= 0, "data.pad_to_multiple", "must be >= 0")


@dataclass
class TrainSection:
    steps: int = doc("optimizer steps (0: derive from epochs)", default=0)
    epochs: float = doc("passes over the training data, used when steps is 0", default=1.0)
    batch_size: int = doc("examples (or packed rows) per micro-batch per process", default=4)
    grad_accum: int = doc("micro-batches per optimizer step", default=1)
    lr: float = doc("peak learning rate", default=2e-4)
    schedule: Literal["constant", "linear", "cosine"] = doc("learning-rate schedule after warmup", default="linear")
    warmup: float = doc("warmup: a fraction of steps if < 1, else a step count", default=0.0)
    weight_decay: float = doc("AdamW weight decay", default=0.0)
    betas: list[float] = doc("AdamW betas", default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = doc("clip the gradient norm to this (0: no clipping)", default=1.0)
    precision: Literal["fp32", "bf16"] = doc("fp32, or bf16 autocast for the forward pass", default="fp32")
    gradient_checkpointing: bool = doc("recompute activations in backward to save memory", default=False)
    compile: bool = doc(
        "torch.compile each decoder layer (one graph shared by all layers; the loss and mask building stay "
        "eager); pair it with data.pad_to_multiple so batch lengths repeat. The first steps pay the compile",
        default=False)
    fused_optimizer: bool = doc(
        "AdamW as torch's fused kernel (same update, one kernel launch per group); where torch has no fused "
        "kernel for the device it falls back to the foreach AdamW with a warning", default=False)
    eval_every: int = doc("held-out loss every k steps (0: only at the end)", default=0)
    log_every: int = doc("write metrics.jsonl every k steps", default=1)
    threads: int = doc("CPU threads for torch (0: torch's default)", default=0)
    max_bad_steps: int = doc(
        "a step whose loss or gradient is NaN/inf is skipped (not applied, counted as 'skipped' in "
        "metrics.jsonl); after this many in a row the run stops, keeping its last good checkpoint", default=5)

    def __post_init__(self):
        check(self.steps >= 0, "train.steps", "must be >= 0")
        check(self.steps > 0 or self.epochs > 0, "train.epochs", "set train.steps or train.epochs > 0")
        check(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.warmup >= 0, "train.warmup", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
              "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        check(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0")
        check(self.log_every >= 1, "train.log_every", "must be >= 1")
        check(self.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {self.max_bad_steps}")


@dataclass
class CheckpointSection:
    every: int = doc("write a trajectory checkpoint every k steps (0: only the final one)", default=0)
    resume_every: int = doc("refresh the rolling resume checkpoint every k steps (0: at each checkpoint)",
                            default=0)
    final: bool = doc("always checkpoint the last step", default=True)
    keep: Literal["all", "frontier"] = doc(
        "all: keep every trajectory checkpoint; frontier: delete a checkpoint's weights once the probes show it is "
        "dominated (off the task/retention Pareto frontier of the scored points), never a frontier point, the one "
        "the select: rule picks, or the latest; its scores stay in trajectory.jsonl (marked pruned)",
        default="all")
    disk_budget_mb: float = doc(
        "with keep: frontier, delete dominated checkpoints (oldest first) only while the checkpoints take more than "
        "this many MiB; frontier points stay even over it (0: delete every dominated one)", default=0.0)

    def __post_init__(self):
        check(self.every >= 0, "checkpoint.every", "must be >= 0")
        check(self.resume_every >= 0, "checkpoint.resume_every", "must be >= 0")
        check(self.disk_budget_mb >= 0, "checkpoint.disk_budget_mb", "must be >= 0")


@dataclass
class LoggingSection:
    progress: bool = doc("show a progress bar (loss, tokens/s, ETA)", default=True)
    tensorboard: bool = doc("write TensorBoard logs to RUN/tensorboard", default=True)
    report_to: list[str] = doc("also log to these when installed: mlflow, wandb", default_factory=list)

    def __post_init__(self):
        for r in self.report_to:
            check(r in ("mlflow", "wandb"), "logging.report_to", f"{r!r} unknown; use mlflow and/or wandb")


@dataclass
class ScoringSection:
    during_training: bool = doc("score the cheap (likelihood) probes on the starting model and at every "
                                "trajectory checkpoint while training", default=True)
    batch_size: int = doc("examples per probe batch", default=8)
    precision: Literal["auto", "fp32", "bf16"] = doc(
        "forward passes of the probes: fp32, or bf16 autocast (several times faster on CPUs with AMX and on "
        "GPUs); auto follows train.precision. Cached base outputs are kept per precision", default="auto")
    retention_base: Literal["original", "dequantized"] = doc(
        "what kl_to_base compares a quantized run against: the original full-precision base (what the user "
        "would otherwise have kept; the quantization's own error counts as forgetting, and arenas comparing "
        "4-bit, 8-bit and full-precision bases share one reference), or the dequantized quantized base the "
        "adapter trained on (only the adapter's change). Full-precision runs: the same either way",
        default="original")

    def __post_init__(self):
        check(self.batch_size >= 1, "scoring.batch_size", "must be >= 1")


@dataclass
class SelectSection:
    """`select: {max_kl: 0.1}` or `select: {min_task: 0.8}`: which checkpoint the leaderboard, the report and
    `sftlab rewind` (without --policy) recommend. Neither: the knee among checkpoints whose task score is above
    the base's 95% CI. The base is never a candidate unless no checkpoint beats it (and then that is said)."""

    max_kl: float | None = doc("best task score among checkpoints whose retention fell at most this far below the "
                               "base's, in the retention score's units (kl_to_base: nats/token)", default=None)
    min_task: float | None = doc("least forgetting among checkpoints whose task score reaches this, in the task "
                                 "metric's units (for a loss: at most this)", default=None)

    def __post_init__(self):
        check(self.max_kl is None or self.min_task is None, "select",
              "give max_kl (best task within a retention budget) or min_task (least forgetting above a task "
              "score), not both; remove one")
        check(self.max_kl is None or self.max_kl >= 0, "select.max_kl",
              f"must be >= 0 (how much retention may be lost), got {self.max_kl}")


@dataclass
class ProbeEntry:
    """`probes: [{name: kl_to_base, k: 32}, ...]`: a registered probe and its options."""

    name: str = ""
    options: Any = None


@dataclass
class RemedyEntry:
    """`remedies: [{name: kl, weight: 0.1}, ...]`: a registered forgetting remedy and its options."""

    name: str = ""
    options: Any = None


@dataclass
class MethodSection:
    """`method: {name: lora, r: 16, ...}`: the name picks a registered method, the rest are its options."""

    name: str = "lora"
    options: Any = None  # the method's own options dataclass, built in RunConfig.from_dict


@dataclass
class RunConfig:
    run: RunSection = doc("where the run goes", default_factory=RunSection)
    model: ModelSection = doc("the base model", default_factory=ModelSection)
    quantization: QuantizationSection = doc("a 4/8-bit base (bitsandbytes) under an adapter method",
                                            default_factory=QuantizationSection)
    method: MethodSection = doc("the fine-tuning method and its options", default_factory=MethodSection)
    data: DataSection = doc("training and eval data", default_factory=DataSection)
    vision: VisionSection = doc("vision-language models: what trains, image limits (docs/multimodal.md)",
                                default_factory=VisionSection)
    train: TrainSection = doc("optimisation", default_factory=TrainSection)
    objective: ObjectiveSection = doc("training objective (sft, or dpo with its variant)",
                                      default_factory=ObjectiveSection)
    checkpoint: CheckpointSection = doc("trajectory and resume checkpoints", default_factory=CheckpointSection)
    logging: LoggingSection = doc("logging", default_factory=LoggingSection)
    scoring: ScoringSection = doc("when probes score checkpoints", default_factory=ScoringSection)
    probes: list[ProbeEntry] = doc("task and retention probes (see `sftlab config --show`, probes)",
                                   default_factory=list)
    remedies: list[RemedyEntry] = doc("forgetting remedies (replay, kl, l2sp, dft, ema, wise; docs/remedies.md)",
                                      default_factory=list)
    select: SelectSection = doc("the rule that picks the recommended checkpoint (leaderboard, report, rewind)",
                                default_factory=SelectSection)
    distributed: DistributedSection = doc("several processes: ddp, or sharded (fsdp, deepspeed configs)",
                                          default_factory=DistributedSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict:
        d = to_dict(self)
        d["method"] = {"name": self.method.name, **to_dict(self.method.options)}
        d["probes"] = [{"name": p.name, **to_dict(p.options)} for p in self.probes]
        d["remedies"] = [{"name": r.name, **to_dict(r.options)} for r in self.remedies]
        return d

    def hash(self) -> str:
        """What trained: every section but `select`, which only reads the finished path."""
        d = {k: v for k, v in self.to_dict().items() if k != "select"}
        if not d["remedies"]:  # configs written before remedies existed keep their hash
            del d["remedies"]
        if self.vision.is_default():  # and those written before the vision section existed
            del d["vision"]
        for k in ("keep", "disk_budget_mb"):  # what is kept on disk, not what trained
            d["checkpoint"].pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_method(data: Any):
    if data is None:
        data = {}
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict):
        raise ConfigError(f"method: expected a section like {{name: lora, r: 8}}, got {data!r}")
    data = dict(data)
    name = data.pop("name", "lora")
    try:
        spec = METHODS.get(name)
    except RegistryError as e:
        raise ConfigError(f"method.name: {e}") from None
    return MethodSection(name=name, options=from_dict(spec.options, data, "method"))


def _registered_entries(data: Any, key: str, registry, example: str, one: str) -> list[tuple[str, Any]]:
    """A list of registered things with options (`probes:`, `remedies:`): [(name, validated options)]. An entry
    is a name or a section {name, options...}; its options are checked by the registered options class."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError(f"{key}: expected a list like [{example}]")
    out = []
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"{key}[{i}]: expected a section with a name, e.g. {one}")
        entry = dict(entry)
        name = entry.pop("name")
        try:
            spec = registry.get(name)
        except RegistryError as e:
            raise ConfigError(f"{key}[{i}].name: {e}") from None
        out.append((name, from_dict(spec.options, entry, f"{key}[{i}]")))
    return out


def parse_probes(data: Any) -> list[ProbeEntry]:
    out = [ProbeEntry(n, o) for n, o in _registered_entries(
        data, "probes", PROBES, "{name: heldout_loss, path: eval.jsonl}, {name: kl_to_base}", "{name: kl_to_base}")]
    names = [getattr(p.options, "score_name", "") or p.name for p in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"probes: two probes would both write the score {dup[0]!r}; give one a score_name")
    return out


def parse_remedies(data: Any) -> list[RemedyEntry]:
    """`remedies:` a list of {name, options...} (or names), each validated by its registered options."""
    out = [RemedyEntry(n, o) for n, o in _registered_entries(
        data, "remedies", REMEDIES, "{name: kl, weight: 0.1}, {name: ema}", "{name: l2sp, weight: 0.01}")]
    names = [r.name for r in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"remedies: {dup[0]!r} is listed twice; give it once")
    return out


def config_from_dict(data: dict) -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError("config: the file must hold a mapping of sections (run, model, method, data, train, ...)")
    data = dict(data)
    method = parse_method(data.pop("method", None))
    probes = parse_probes(data.pop("probes", None))
    remedies = parse_remedies(data.pop("remedies", None))
    cfg = from_dict(RunConfig, data)
    cfg.method = method
    cfg.probes = probes
    cfg.remedies = remedies
    validate_combinations(cfg)
    return cfg


def validate_combinations(cfg: RunConfig) -> None:
    """Checks across sections (single fields validate themselves)."""
    spec = METHODS.get(cfg.method.name)
    if cfg.quantization.enabled and not spec.peft:
        raise ConfigError(f"quantization.bits: method {spec.name!r} trains the base weights themselves, which a "
                          "quantized base stores as frozen integers; use an adapter method (lora, oft, ...) or "
                          "quantization.bits=none")
    if cfg.quantization.enabled and cfg.distributed.strategy in ("fsdp", "deepspeed"):
        raise ConfigError(f"distributed.strategy: {cfg.distributed.strategy} does not shard a quantized base in "
                          "sftlab; use ddp (each GPU holds the 4/8-bit base, which is what makes it fit) or "
                          "quantization.bits=none")
    if cfg.data.packing and not spec.packing:
        raise ConfigError(f"data.packing: method {spec.name!r} prepends virtual tokens to every row, so examples "
                          "cannot be packed with per-example attention; set data.packing=false (rows are padded)")
    if cfg.data.eval and cfg.data.eval_fraction:
        raise ConfigError("data.eval_fraction: set either data.eval sources or data.eval_fraction, not both")
    if cfg.model.new_tokens and spec.peft and not spec.token_rows:
        raise ConfigError(f"model.new_tokens: method {spec.name!r} does not say it can train embedding rows "
                          "(Method.token_rows); use a built-in method (lora, oft, boft, ia3, prefix, prompt, full)")
    if cfg.model.new_token_rows == "new" and spec.peft:
        raise ConfigError("model.new_token_rows: 'new' is for full fine-tuning; adapter methods always train "
                          "only the new rows")
    for i, r in enumerate(cfg.remedies):
        rspec = REMEDIES.get(r.name)
        if cfg.objective.name not in rspec.objectives:
            raise ConfigError(f"remedies[{i}]: {r.name!r} works with objective {' or '.join(rspec.objectives)}, "
                              f"not {cfg.objective.name!r}; remove it")
        if rspec.needs_probes and not cfg.probes:
            raise ConfigError(f"remedies[{i}]: {r.name!r} scores checkpoints of its own; add probes (e.g. "
                              "[{name: kl_to_base}])")
        if rspec.needs_merge and spec.merge is None:
            raise ConfigError(f"remedies[{i}]: {r.name!r} moves weights along the path to the base; method "
                              f"{spec.name!r} adds virtual tokens and has no weights to move; remove it")
    if cfg.checkpoint.keep == "frontier" and not cfg.probes:
        raise ConfigError("checkpoint.keep: frontier needs probes to tell which checkpoints are dominated; add "
                          "probes or set checkpoint.keep=all")
    if cfg.objective.name == "dpo":
        if cfg.data.packing:
            raise ConfigError("data.packing: dpo scores each chosen and rejected answer as a row of its own; set "
                              "data.packing=false")
        if cfg.objective.reference == "disable_adapter" and not spec.peft:
            raise ConfigError(f"objective.reference: disable_adapter needs an adapter method, {spec.name!r} trains "
                              "the weights themselves; use objective.reference=cached")


def read_yaml(path: str | Path, what: str = "config") -> object:
    """A YAML file's content, or a one-line ConfigError naming the file (and line) and the fix."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p}: a folder; give the {what} file (YAML) itself")
    if not p.is_file():
        raise ConfigError(f"{p}: {what} file not found")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the {what} ({e.strerror or e}); check its permissions") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text; save the {what} as UTF-8") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    data = read_yaml(path) if path is not None else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (run, model, method, data, train, ...)")
    apply_overrides(data, list(overrides))
    return config_from_dict(data)


def describe_config() -> str:
    lines = ["sftlab run configuration (YAML; override any key with key.path=value)", ""]
    lines += describe(RunConfig)
    lines = [ln for ln in lines if not ln.strip().startswith(("method.name", "method.options", "probes[].",
                                                              "remedies[]."))]
    lines += ["", "method.name picks a method; its options sit beside it in the method section:"]
    for name in METHODS.names():
        spec = METHODS.get(name)
        lines.append(f"  {name}: {spec.description}")
        lines += ["  " + ln for ln in describe(spec.options, "method.", 1)]
    lines += ["", "probes: a list; each entry names a probe and sets its options beside the name:"]
    for name in PROBES.names():
        spec = PROBES.get(name)
        lines.append(f"  {name} ({'every checkpoint' if spec.cheap else 'generation: base, final, frontier'}): "
                     f"{spec.description}")
        lines += ["  " + ln for ln in describe(spec.options, "probes[].", 1)]
    lines += ["", "remedies: a list; each entry names a forgetting remedy and sets its options beside the name:"]
    for name in REMEDIES.names():
        spec = REMEDIES.get(name)
        lines.append(f"  {name}: {spec.description}")
        lines += ["  " + ln for ln in describe(spec.options, "remedies[].", 1)]
    return "\n".join(lines)
