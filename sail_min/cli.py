"""`python -m sail_min train`: build a run from the command line and call ``sail_min.train.train``.

The same loop as the notebooks, with the pieces named on the command line:

    config   SAILConfig defaults < --config FILE.json < --preset < --set FIELD=VALUE < --steps/--seed/--out
    policy   --model: a causal LM folder or hub name (pad token = EOS when it has none), LoRA with --lora-rank;
             without --model, the toy task's tiny base policy
    data     --data: preference pairs (``sail_min.data``); online prompts are their prompts; held-out
             prompts from --eval-data, else the last ``eval_prompts`` rows of --data (at most a fifth of it)
    judge    --judge: ``vader``, ``module:function`` (any callable (prompts, responses) -> scores), or a
             reward-model folder / hub name read with its own tokenizer (``RewardModelScorer``)
    logging  --report-to tensorboard|wandb: accelerate's trackers (``train`` logs every step's numbers)

Mistakes in what the user passed raise ``UserError`` (one line naming the argument or file);
``__main__`` prints it as ``error: ...`` and exits 2. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import warnings
from pathlib import Path

import torch

VARIANT_FIELDS = ("route_dpo", "route_dp", "route_pp", "route_pr", "dp_label_coef", "pp_coef", "pr_response_coef")
"""The SAILConfig fields a preset decides: --preset over --config replaces all of them."""


class UserError(Exception):
    """A mistake in the command line or in a file it names: printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------
# the config
# --------------------------------------------------------------------------------------
def parse_set(items, fields: dict) -> dict:
    """--set FIELD=VALUE items as SAILConfig fields of the right type (a clear message otherwise)."""
    from .config import RENAMED_FIELDS, SAILConfig

    overrides = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if key in RENAMED_FIELDS:                     # a deprecated name: still read, with a note
            warnings.warn(f"--set {key}: the field is now {RENAMED_FIELDS[key]}", FutureWarning, stacklevel=2)
            key = RENAMED_FIELDS[key]
        if key not in fields or not value:
            raise UserError(f"--set {item!r}: expected FIELD=VALUE with a SAILConfig field "
                            f"({', '.join(sorted(fields))})")
        kind, choices = type(fields[key]), SAILConfig.choices().get(key)
        if choices and value not in choices:
            raise UserError(f"--set {item!r}: {key} takes one of {', '.join(choices)}")
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise UserError(f"--set {item!r}: {key} takes true or false")
            overrides[key] = value.lower() in ("true", "1")
        else:
            try:
                overrides[key] = value if kind is str else kind(value)
            except ValueError:
                raise UserError(f"--set {item!r}: {key} takes a {kind.__name__}") from None
    return overrides


def build_config(args):
    """SAILConfig defaults < --config < --preset < --set < --steps, --seed, --out."""
    from .config import PRESETS, SAILConfig

    defaults = SAILConfig().to_dict()
    values = {}
    if args.config:
        try:
            values = SAILConfig.from_json(args.config).to_dict()
        except ValueError as error:                   # names the file and what is wrong with it
            raise UserError(f"--config {error}") from None
    preset = args.preset                              # none: SAILConfig's defaults (offline DPO) or --config's
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"--preset {preset!r}: unknown; choose from {', '.join(PRESETS)}")
        values.update({name: defaults[name] for name in VARIANT_FIELDS}, **PRESETS[preset])
    values.update(parse_set(args.set, defaults))
    values.update({k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None})
    values["output_dir"] = output_folder(args, values.get("output_dir"), defaults["output_dir"])
    try:
        return SAILConfig.from_dict(values)
    except ValueError as error:                       # a bad value: the message names the field
        raise UserError(f"invalid configuration: {error}") from None


def output_folder(args, from_config: str | None, default: str) -> str:
    """--out; else, resuming, the --config's output_dir (the run it continues); else the default. A new run
    never takes a --config's output_dir (the folder of the run the config came from): it needs --out."""
    if args.out is not None:
        if not args.out.strip():
            raise UserError("--out '': an empty output folder (an unset shell variable?); name a folder")
        return args.out
    if from_config and getattr(args, "resume", False):
        return from_config
    if from_config and from_config != default:
        raise UserError(f"--config {args.config}: its output_dir {from_config!r} is the folder of the run it came "
                        f"from; a new run needs --out (or --resume to continue that run)")
    return default


# --------------------------------------------------------------------------------------
# model, data, judge
# --------------------------------------------------------------------------------------
def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def damaged(error: Exception) -> str:
    """What went wrong loading a model folder, in one line: the error's type (e.g. a SafetensorError of a
    truncated weights file, a JSONDecodeError of a damaged config.json) and its first 300 characters."""
    text = _one_line(error)
    kind = type(error).__name__
    return (text if kind in ("OSError", "ValueError") else f"{kind}: {text}")[:300]


def _check_source(option: str, name: str) -> None:
    """A name that can only be a local path must exist (else transformers tries it as a hub id)."""
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{option} {name}: is a file; expected a model folder (with config.json) or a hub name")
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not path.exists():
        raise UserError(f"{option} {name}: no such folder; give a local model folder or a hub name (owner/name)")


def pad_with_eos_if_missing(tokenizer, what: str, say) -> None:
    """A tokenizer without a pad token pads with its EOS token (and says so); one with neither is refused."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{what}: the tokenizer has neither a pad nor an EOS token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
        say(f"note: {what}: the tokenizer has no pad token; using its EOS token {tokenizer.eos_token!r}")


def load_policy(name: str, lora_rank: int | None, dtype, seed: int, say):
    """AutoModelForCausalLM + AutoTokenizer (pad token = EOS if missing), wrapped in LoRA if asked.
    LoRA's random initialisation is seeded: every process (and a re-run) starts from the same adapters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    _check_source("--model", name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model, loading = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, output_loading_info=True)
    except Exception as error:                        # not found, offline, not a causal LM, damaged files
        raise UserError(f"--model {name}: cannot load a causal language model ({damaged(error)})") from None
    check_causal_lm(name, model, loading)
    pad_with_eos_if_missing(tokenizer, f"--model {name}", say)
    if lora_rank:
        import peft
        lora = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                               target_modules="all-linear", task_type="CAUSAL_LM")
        torch.manual_seed(seed)
        model = peft.get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"policy: {name}, {total / 1e6:.2f} M parameters, {trainable / 1e6:.3f} M trainable"
        + (f" (LoRA rank {lora_rank})" if lora_rank else ""))
    return model, tokenizer


def check_causal_lm(name: str, model, loading: dict) -> None:
    """Refuse a checkpoint that is not a trained causal LM: transformers loads a sequence classifier
    as AutoModelForCausalLM with a newly initialised lm_head and only prints a table about it."""
    architectures = getattr(model.config, "architectures", None) or []
    heads = [a for a in architectures if not a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))]
    if heads and len(heads) == len(architectures):
        raise UserError(f"--model {name}: is a {', '.join(heads)} checkpoint, not a causal language model "
                        f"(its lm_head would be random); give a causal LM, e.g. an instruct model")
    missing = [key for key in loading.get("missing_keys", ()) if key.endswith(("lm_head.weight", "lm_head.bias"))]
    if missing:
        raise UserError(f"--model {name}: the checkpoint has no {', '.join(sorted(missing))}: the lm_head would be "
                        f"newly initialised (random); give a trained causal language model")


class NamedJudge:
    """The user's judge, unchanged, named as on the command line (``--judge SPEC``) in every message
    (``labels.CheckedJudge`` holds it to the contract); attributes (e.g. a reward model's ``truncated``) pass through."""

    def __init__(self, spec: str, judge):
        self.spec, self.judge = spec, judge
        self.__name__ = spec

    def __call__(self, prompts, responses):
        return self.judge(prompts, responses)

    def __getattr__(self, name):
        return getattr(self.__dict__["judge"], name)

    def __repr__(self) -> str:
        return repr(self.judge)


def load_judge(spec: str, device, dtype, say, named_judges: dict | None = None):
    """A name of ``named_judges`` (the command line adds ``vader``, the toy task's judge), ``module:function``
    or a reward model (folder or hub name) -> judge(prompts, responses)."""
    if spec in (named_judges or {}):
        judge = named_judges[spec]()
        say(f"judge: {spec}, {(type(judge).__doc__ or '').splitlines()[0].rstrip('.')}")
        return judge
    if ":" in spec and not Path(spec).exists():
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise UserError(f"--judge {spec}: expected module:function, e.g. my_judges:length_judge")
        try:
            judge = importlib.import_module(module_name)
        except ImportError as error:
            raise UserError(f"--judge {spec}: cannot import module {module_name!r} ({error}); is its folder "
                            f"on PYTHONPATH?") from None
        except SyntaxError as error:
            raise UserError(f"--judge {spec}: module {module_name!r} has a syntax error ({error.msg}, "
                            f"{error.filename} line {error.lineno})") from None
        except Exception as error:                    # the module's own code raised while importing
            raise UserError(f"--judge {spec}: importing module {module_name!r} raised {_one_line(error)!s} "
                            f"({type(error).__name__})") from None
        for part in attribute.split("."):
            if not hasattr(judge, part):
                raise UserError(f"--judge {spec}: module {module_name!r} ({getattr(judge, '__file__', '?')}) "
                                f"has no attribute {attribute!r}")
            judge = getattr(judge, part)
        if not callable(judge):
            raise UserError(f"--judge {spec}: {module_name}.{attribute} is a {type(judge).__name__}, not a "
                            f"callable judge(prompts, responses) -> scores")
        say(f"judge: {module_name}.{attribute}")
        return judge
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .labels import RewardModelScorer
    hf_logging.disable_progress_bar()
    _check_source("--judge", spec)
    try:
        labels = AutoConfig.from_pretrained(spec).num_labels
        if labels != 1:
            raise UserError(f"--judge {spec}: a reward model outputs one score (num_labels=1), this one has "
                            f"num_labels={labels}; is it a sequence-classification reward model?")
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForSequenceClassification.from_pretrained(spec, dtype=dtype)
    except UserError:
        raise
    except Exception as error:                        # not found, offline, damaged files
        raise UserError(f"--judge {spec}: cannot load a reward model ({damaged(error)}); give a reward-model "
                        f"folder or hub name, 'vader', or module:function") from None
    pad_with_eos_if_missing(tokenizer, f"--judge {spec}", say)
    say(f"judge: reward model {spec} (its own tokenizer)")
    return RewardModelScorer(model.to(device), tokenizer)


def _key(prompt) -> str:
    return json.dumps(prompt, sort_keys=True)          # text or a message list, comparable


def load_data(args, config, say) -> tuple[list[dict], list]:
    """(training pairs, held-out prompts): --data, and --eval-data or the last eval_prompts rows of --data
    (at most a fifth of its rows, so a small file still trains)."""
    from .data import DataError, load_preference_data, load_prompt_data

    def read(option, load, source, split):
        try:
            return list(load(source, split=split))
        except DataError as error:                    # names the file, row and field
            raise UserError(f"{option} {_one_line(error)}") from None

    pairs = [dict(row) for row in read("--data", load_preference_data, args.data, args.split)]
    if args.eval_data:
        given = [row["prompt"] for row in read("--eval-data", load_prompt_data, args.eval_data, args.eval_split)]
        train_keys = {_key(row["prompt"]) for row in pairs}
        eval_prompts = [p for p in given if _key(p) not in train_keys]
        if not eval_prompts:
            raise UserError(f"--eval-data {args.eval_data}: every prompt also appears in --data; evaluation "
                            f"needs held-out prompts")
        dropped = len(given) - len(eval_prompts)
        say(f"held out: {len(eval_prompts)} prompts of --eval-data {args.eval_data}"
            + (f" ({dropped} that also appear in --data left out)" if dropped else "")
            + f"; evaluation uses the first {min(len(eval_prompts), config.eval_prompts)}")
        return pairs, eval_prompts
    n = min(config.eval_prompts, len(pairs) // 5)         # a small file: a fifth of it, never all of it
    if n < 1:
        raise UserError(f"--data {args.data}: {len(pairs)} rows are too few to hold out evaluation prompts "
                        f"(a fifth of them); pass --eval-data")
    held = pairs[-n:]
    held_keys = {_key(row["prompt"]) for row in held}
    kept = [row for row in pairs[:-n] if _key(row["prompt"]) not in held_keys]
    if not kept:
        raise UserError(f"--data {args.data}: every pair shares a prompt with the last {n} rows held out "
                        f"for evaluation; pass --eval-data")
    same = len(pairs) - n - len(kept)
    say(f"held out: the last {n} of {len(pairs)} rows of --data {args.data} are the evaluation prompts "
        f"(no --eval-data); {len(kept)} pairs train" + (f" ({same} more left out: same prompt)" if same else ""))
    return kept, [row["prompt"] for row in held]


def _try_judge(judge, pair: dict, timeout_s: float) -> None:
    """Score the first pair before training: a judge that breaks its contract fails now, by name."""
    from .labels import CheckedJudge, JudgeError

    text = [r if isinstance(r, str) else r[-1]["content"] for r in (pair["chosen"], pair["rejected"])]
    try:
        CheckedJudge(judge, timeout_s, where="on the first pair of --data")([pair["prompt"]] * 2, text)
    except JudgeError as error:
        raise UserError(_one_line(error)) from None


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
def make_accelerator(report_to: str, output_dir: str):
    """An Accelerator; with trackers (logging to output_dir) for --report-to tensorboard / wandb."""
    from accelerate import Accelerator

    cpu = not torch.cuda.is_available()
    if report_to in (None, "none"):
        return Accelerator(cpu=cpu)
    if importlib.util.find_spec(report_to) is None:
        raise UserError(f"--report-to {report_to}: the package {report_to!r} is not installed; "
                        f"pip install {report_to}, or use --report-to none")
    return Accelerator(cpu=cpu, log_with=report_to, project_dir=output_dir)


def check_resume(config, say) -> None:
    """--resume: the checkpoint must not be past --steps (checked before anything is written)."""
    from .checkpoint import load_checkpoint

    path = Path(config.output_dir) / "checkpoint.pt"
    if not path.exists():
        say(f"--resume: no checkpoint {path} yet; starting at step 0")
        return
    done = load_checkpoint(path, map_location="cpu")["next_step"]
    if done > config.steps:
        raise UserError(f"--steps {config.steps}: {path} has already done {done} steps; resume with "
                        f"--steps {done} or more, or start a new run in another --out")
    say(f"--resume: continuing {path} at step {done} of {config.steps}")


def resume_hint(config, argv) -> str:
    """Where the run's last checkpoint is and the command that goes on from it."""
    import shlex

    from .checkpoint import CheckpointError, load_checkpoint

    path = Path(config.output_dir) / "checkpoint.pt"
    if not path.exists():
        return f"no checkpoint was written yet (every {config.checkpoint_every} steps): start the run again"
    try:
        done = load_checkpoint(path)["next_step"]
    except CheckpointError as error:
        return f"the checkpoint cannot be read back: {_one_line(error)}"
    command = [arg for arg in argv if arg != "--overwrite"]
    command += [] if "--resume" in command else ["--resume"]
    return (f"the checkpoint {path} of the first {done} step(s) is kept; go on from it with: python -m sail_min "
            f"{shlex.join(command)}" + (" (under the same launcher)" if torch.distributed.is_initialized() else ""))


def steps_done(config) -> int:
    """The steps a run completed: the last line of its metrics.jsonl (process 0 writes one per step)."""
    import warnings

    from .metrics import MetricsError, read_metrics

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                  # a half-written last line: not a step done
            return 1 + max((record["step"] for record in read_metrics(Path(config.output_dir) / "metrics.jsonl",
                                                                      config.steps)), default=-1)
    except MetricsError:
        return 0


class RunEnded(UserError):
    """The run ended early on every process (judge, Ctrl-C, another process failing): ``own`` when this
    process's error started it. Under several processes, process 0 prints last (``report``)."""

    def __init__(self, message: str, own: bool = True):
        super().__init__(message)
        self.own = own


def run_train(args, toy_run=None, named_judges: dict | None = None) -> int:
    """``python -m sail_min train``. ``toy_run() -> (policy, tokenizer, task)`` is what runs without --model and
    ``named_judges`` {name: factory} the judges known by name; the command line passes the lab's toy task
    (``sail_min.lab.sentiment``) for both, so this module needs nothing from the lab.
    Build config, accelerator, policy, task; train; print the last evaluation. What ends a run early ends it in
    one line (``UserError``): a checkpoint or metrics file that does not fit or is damaged, a disk that refuses a
    write (the path and the system's reason), the judge (its name, the step, the problem), Ctrl-C (the steps
    done, the last checkpoint and the command that goes on from it)."""

    from .checkpoint import CheckpointError
    from .metrics import MetricsError

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # in peft
    show_notices(warnings)
    try:
        return _run_train(args, toy_run, named_judges)
    except CheckpointError as error:                  # names the file and says what to do
        raise UserError(f"--resume: {_one_line(error)}" if args.resume else _one_line(error)) from None
    except MetricsError as error:
        raise UserError(_one_line(error)) from None
    except OSError as error:                          # a full disk, a read-only folder, --out a file, a run there
        where = f"{error.filename}: " if getattr(error, "filename", None) else ""
        reason = error.strerror if error.strerror and where else _one_line(error)
        raise UserError(f"{where}{reason}") from None


def show_notices(warnings) -> None:
    """The run's own warnings (a dropped metrics line, lost metrics, a removed temporary file, a skipped step) as
    one line each on stderr, every time: ``warning: ...``. Other packages' warnings keep Python's format."""
    import sys

    package = str(Path(__file__).resolve().parent)
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category is RuntimeWarning and str(Path(filename).resolve()).startswith(package):
            print(f"warning: {message}", file=file or sys.stderr, flush=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", RuntimeWarning)


def _run_train(args, toy_run, named_judges) -> int:
    from .runtime import ProcessFailed
    from .labels import JudgeError
    from .sampling import check_positions
    from .train import train

    real = args.model is not None
    if real and not (args.data and args.judge):
        raise UserError("--model needs --data (preference pairs) and --judge (who scores responses)")
    if not real:
        given = [f"--{name.replace('_', '-')}" for name in ("data", "eval_data", "judge", "lora_rank")
                 if getattr(args, name) is not None]
        if given:
            raise UserError(f"{', '.join(given)} need(s) --model; without --model the toy task runs with "
                            f"its own model, data and judge")
    if args.resume and getattr(args, "overwrite", False):
        raise UserError("--resume and --overwrite contradict each other: --resume continues the run in --out, "
                        "--overwrite replaces it")
    torch.set_num_threads(args.threads)
    config = build_config(args)
    check_output_folder(config, args)
    accelerator = make_accelerator(args.report_to, config.output_dir)
    say = accelerator.print                                      # the main process prints
    if args.resume:
        check_resume(config, say)
    if real:                                                     # cheap and most likely wrong first
        from .train import Task
        pairs, eval_prompts = load_data(args, config, say)
        dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float32
        judge = NamedJudge(args.judge, load_judge(args.judge, accelerator.device, dtype, say, named_judges))
        _try_judge(judge, pairs[0], config.judge_timeout_s)
        policy, tokenizer = load_policy(args.model, args.lora_rank, dtype, config.seed, say)
        task = Task(preferences=pairs, train_prompts=[row["prompt"] for row in pairs], eval_prompts=eval_prompts,
                    judge=judge)
    else:
        if toy_run is None:
            raise UserError("no --model given and no toy task available: pass --model, --data and --judge")
        policy, tokenizer, task = toy_run()
    try:
        check_positions(policy, config.max_prompt_tokens, config.max_new_tokens)
    except ValueError as error:
        raise UserError(f"--model {args.model or 'toy'}: {error}") from None
    if accelerator.log_with:                                     # --report-to: train() logs every step
        accelerator.init_trackers("sail_min", config=dataclasses.asdict(config),
                                  init_kwargs={"wandb": {"name": Path(config.output_dir).name}})
        say(f"logging to {args.report_to} (project sail_min"
            + (f", {Path(config.output_dir) / 'sail_min'})" if args.report_to == "tensorboard" else ")"))
    argv = getattr(args, "argv", None) or ["train"]
    try:
        history = train(config, policy, tokenizer, task, resume=args.resume, accelerator=accelerator,
                        overwrite=getattr(args, "overwrite", False))
    except NotImplementedError as error:                         # a setup sail_min refuses (e.g. DeepSpeed)
        raise UserError(_one_line(error)) from None
    except JudgeError as error:                                  # mid-run: the last checkpoint stays as it was
        raise RunEnded(f"{_one_line(error)}; {resume_hint(config, argv)}") from None
    except ProcessFailed as error:                               # another process's error, e.g. its judge
        raise RunEnded(f"{_one_line(error)}; {resume_hint(config, argv)}", own=False) from None
    except KeyboardInterrupt:                                    # Ctrl-C: how far it got, from the files
        raise RunEnded(f"interrupted (Ctrl-C) after {steps_done(config)} step(s); {resume_hint(config, argv)}") from None
    distributed = torch.distributed.is_initialized()
    if distributed:                          # end_training less its destroy_process_group: leave_process_group
        for tracker in accelerator.trackers:     # ends the group, and the process without the finalisation that
            tracker.finish()                     # can abort it
    else:
        accelerator.end_training()
    if accelerator.is_main_process:
        print(f"trained on {accelerator.num_processes} process(es), {config.pairs_per_step} pairs per step each")
    if history:
        last = [h for h in history if "eval/judge_reward" in h][-1]
        print(f"step {last['step'] + 1}: judge reward {last['eval/judge_reward']:.3f}, "
              f"win rate {last['eval/win_rate']:.3f}, KL {last['eval/kl']:.2f}")
    if distributed:
        leave_process_group(accelerator)
    return 0


def check_output_folder(config, args) -> None:
    """Before anything loads: --out must be a folder, and a folder that holds a run needs --resume or --overwrite
    (``train.check_output``, whose message names the folder)."""
    from .train import check_output

    try:
        check_output(Path(config.output_dir), args.resume, getattr(args, "overwrite", False))
    except OSError as error:
        raise UserError(f"--out {_one_line(error)}") from None


def report(error: UserError) -> int:
    """Print a user error as one line on stderr; exit status 2. Several processes, a run that ended on all of
    them (``RunEnded``): a process whose own error it was prints it, then process 0 prints last."""
    import sys

    distributed = "torch" in sys.modules and torch.distributed.is_available() and torch.distributed.is_initialized()
    if not (distributed and isinstance(error, RunEnded)):
        print(f"error: {error}", file=sys.stderr)
        return 2
    rank = torch.distributed.get_rank()
    if rank != 0 and error.own:
        print(f"error: (process {rank}) {error}", file=sys.stderr, flush=True)
    torch.distributed.barrier()
    if rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    leave_process_group(None, status=2)


def leave_process_group(accelerator, status: int = 0) -> None:
    """End a multi-process run without the interpreter's finalisation. The process group's gloo threads
    (gloo_tcp_loop, pt_gloo_runloop in /proc/self/task) can outlive ``destroy_process_group`` (DTensor's caches
    hold the device mesh, and through its _pg_registry the group), and
    a thread torn down while still running aborts the process at exit ("terminate called without an active
    exception", SIGABRT: seen on a loaded 2-core machine, issue 16). Everything is written and every process
    is past the barrier, so the process leaves with ``status`` at once."""
    import os
    import sys

    if accelerator is not None:
        accelerator.wait_for_everyone()
    else:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
