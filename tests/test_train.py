"""The training loop on the tiny sentiment model: config validation, resume, faults, processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sail_min.config import SAILConfig
from sail_min.objective import PRESETS
from sail_min.tasks.sentiment import load_base_model, load_sentiment_task
from sail_min.train import Task, train, truncate_prompts_left

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(steps=4, pairs_per_step=6, eval_every=2, eval_prompts=8, checkpoint_every=2)


@pytest.fixture(scope="module")
def sentiment():
    return load_sentiment_task()


def make_task(sentiment, judge=None):
    return Task(sentiment.preferences()[:64], sentiment.train_prompts[:64], sentiment.eval_prompts,
                judge or sentiment.judge, sentiment.bt_temperature)


def strip_timing(history):
    drop = ("time/", "tokens_per_second")
    return [{k: v for k, v in h.items() if not k.startswith(drop)} for h in history]


def test_config_presets_and_errors():
    for name, recipe in PRESETS.items():
        assert SAILConfig.preset(name).recipe == recipe
    assert SAILConfig.preset("sail-pp", steps=7).steps == 7
    with pytest.raises(ValueError, match="unknown preset"):
        SAILConfig.preset("sail-xx")
    with pytest.raises(ValueError, match=r"unknown SAILConfig field\(s\) \['stpes'\]"):
        SAILConfig.preset("sail-pr", stpes=3)
    for field, value in [("beta", 0), ("lr", -1e-3), ("steps", 0), ("samples_per_prompt", 1),
                         ("baseline", "mean"), ("optimizer", "sgd"), ("route_pr", 0.5),
                         ("response_mode", "hook"), ("temperature", float("nan")), ("max_grad_norm", float("nan")),
                         ("weight_decay", -1.0), ("steps", True), ("seed", -1)]:
        with pytest.raises(ValueError, match=field):
            SAILConfig(**{field: value})


def test_tempered_sampling_with_the_exact_response_term_warns():
    with pytest.warns(UserWarning, match="temperature 1"):
        SAILConfig.preset("sail-pr", temperature=0.7)


def test_every_field_has_a_docstring():
    import ast
    import inspect
    import sail_min.config as config_module
    import sail_min.objective as objective_module
    documented = set()
    for module in (config_module, objective_module):
        tree = ast.parse(inspect.getsource(module))
        for cls in [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("SAILConfig", "Recipe")]:
            body = cls.body
            for a, b in zip(body, body[1:]):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    documented.add(a.target.id)
    import dataclasses
    assert {f.name for f in dataclasses.fields(SAILConfig)} <= documented


def test_truncation_keeps_the_end_of_long_prompts(sentiment):
    _, tokenizer = load_base_model()
    prompt = sentiment.train_prompts[0]
    n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    out, cut = truncate_prompts_left(tokenizer, [prompt, prompt], n - 2)
    assert cut == 2 and prompt.endswith(out[0]) and len(tokenizer(out[0], add_special_tokens=False).input_ids) == n - 2
    assert truncate_prompts_left(tokenizer, [prompt], n) == ([prompt], 0)


def test_conversations_are_truncated_from_the_left_with_the_template_kept():
    from transformers import AutoTokenizer
    from sail_min.sampling import render_prompts
    tokenizer = AutoTokenizer.from_pretrained(Path(ROOT) / "data" / "tiny" / "policy")   # has a chat template
    length = lambda m: len(tokenizer(render_prompts(tokenizer, [m])[0], add_special_tokens=False).input_ids)
    question = "tell me about the market and the sea " * 10 + "and end here please"
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                    {"role": "assistant", "content": "hi"}, {"role": "user", "content": question}]
    limit = length(conversation[:1] + conversation[3:]) - 20
    (cut,), count = truncate_prompts_left(tokenizer, [conversation], limit)
    assert count == 1 and length(cut) <= limit
    assert [m["role"] for m in cut] == ["system", "user"]                    # oldest turns dropped first
    assert cut[1]["content"].endswith("and end here please") and len(cut[1]["content"]) < len(question)
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        truncate_prompts_left(tokenizer, [conversation], 3)


def test_training_is_deterministic_logs_every_term_and_resumes_exactly(sentiment, tmp_path):
    task = make_task(sentiment)
    config = SAILConfig.preset("sail-pp", **SMALL, route_dpo=0.4, route_dp=0.2, route_pp=0.2, route_pr=0.2,
                               dp_label_coef=0.2, pr_response_coef=0.3, max_prompt_tokens=4,
                               output_dir=str(tmp_path / "full"))
    full = train(config, *load_base_model(), task, progress=False)
    assert [h["step"] for h in full] == [0, 1, 2, 3]
    last = full[-1]
    for key in ("loss/dpo", "loss/response", "loss/label", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "eval/kl", "eval/judge_reward", "eval/win_rate", "online/response_length",
                "online/contains_eos", "time/generate", "time/label", "time/train", "tokens_per_second"):
        assert key in last, key
    assert last["truncated_prompts"] > 0                  # max_prompt_tokens=4 cuts the prompts
    assert last["judge_queries"] == 2 * sum(h["pairs/pr"] for h in full)
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2, 3]

    resumed = killed_then_resumed(config.replace(output_dir=str(tmp_path / "resumed")), load_base_model, task)
    assert strip_timing(resumed) == strip_timing(full)
    # a checkpoint refuses to resume a run with other settings, naming them
    with pytest.raises(ValueError, match=r"other settings: \['beta'\]"):
        train(config.replace(beta=0.2), *load_base_model(), task, resume=True, progress=False)


def killed_then_resumed(config, load_policy, task):
    """Run ``config`` (4 steps, checkpoints every 2), kill it during step 3's evaluation (after the
    checkpoint of step 1 and the metrics of step 2), resume it, and return the resumed metrics."""
    import sail_min.train as train_module
    real_evaluate, calls = train_module.evaluate, {"n": 0}

    def evaluate_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_evaluate(*args, **kwargs)

    train_module.evaluate = evaluate_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            train(config, *load_policy(), task, progress=False)
    finally:
        train_module.evaluate = real_evaluate
    out = Path(config.output_dir)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["next_step"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3      # steps 0-2 logged
    return train(config, *load_policy(), task, resume=True, progress=False)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_lora_run_checkpoints_only_the_adapters_and_resumes_exactly(sentiment, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tiny = Path(ROOT) / "data" / "tiny" / "policy"

    def load_lora_policy():
        torch.manual_seed(0)
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        return peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), lora), AutoTokenizer.from_pretrained(tiny)

    task = make_task(sentiment)
    config = SAILConfig.preset("sail-pr", **SMALL, max_new_tokens=8, output_dir=str(tmp_path / "full"))
    full = train(config, *load_lora_policy(), task, progress=False)
    saved = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    assert saved and all("lora_" in name for name in saved)                 # adapters only, no base copy
    resumed = killed_then_resumed(config.replace(output_dir=str(tmp_path / "resumed")), load_lora_policy, task)
    assert strip_timing(resumed) == strip_timing(full)


def test_non_finite_loss_skips_the_step_and_keeps_the_weights(sentiment, tmp_path, monkeypatch):
    import sail_min.train as train_module
    real = train_module.sail_loss

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_module, "sail_loss", broken)
    policy, tokenizer = load_base_model()
    before = [p.detach().clone() for p in policy.parameters()]
    config = SAILConfig.preset("offline-dpo", **SMALL, output_dir=str(tmp_path))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        history = train(config, policy, tokenizer, make_task(sentiment), progress=False)
    assert history[-1]["skipped_steps"] == 4
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


def test_missing_data_for_a_route_is_a_clear_error(sentiment, tmp_path):
    task = Task([], sentiment.train_prompts, sentiment.eval_prompts, sentiment.judge)
    with pytest.raises(ValueError, match="task.preferences is empty"):
        train(SAILConfig.preset("sail-pr", output_dir=str(tmp_path)), *load_base_model(), task)


def test_two_processes_on_cpu_stay_in_sync(tmp_path):
    """`accelerate launch` with 2 CPU processes: gradients averaged, weights identical at the end."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sail_min", "train",
           "--preset", "sail-pr", "--steps", "2", "--set", "pairs_per_step=4", "--set", "eval_prompts=8",
           "--set", "eval_every=2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2: judge reward" in proc.stdout
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_empty_responses_train_without_errors(sentiment, tmp_path):
    """A policy that ends every response at once: responses are a lone EOS, texts are empty."""
    policy, tokenizer = load_base_model()
    eos = tokenizer.eos_token_id

    def eos_first(module, inputs, logits):
        return logits.index_add(-1, torch.tensor([eos]), torch.full((*logits.shape[:-1], 1), 100.0))

    policy.get_output_embeddings().register_forward_hook(eos_first)
    config = SAILConfig.preset("sail-pp", **SMALL, route_dpo=0.0, route_pp=0.5, route_pr=0.5,
                               pr_response_coef=0.3, output_dir=str(tmp_path))
    history = train(config, policy, tokenizer, make_task(sentiment), progress=False)
    assert all(h["online/response_length"] == 1.0 and h["online/contains_eos"] == 1.0 for h in history)
    assert history[-1]["eval/response_length"] == 1.0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history) and history[-1]["skipped_steps"] == 0


@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_mixed_precision_and_gradient_checkpointing_paths_run(sentiment, tmp_path, precision):
    """The GPU settings of the final notebook (autocast, gradient checkpointing) on the CPU."""
    config = SAILConfig.preset("sail-pr", **{**SMALL, "steps": 2}, mixed_precision=precision,
                               gradient_checkpointing=True, output_dir=str(tmp_path))
    history = train(config, *load_base_model(), make_task(sentiment), progress=False)
    assert history[-1]["skipped_steps"] == 0 and torch.isfinite(torch.tensor(history[-1]["loss"]))


def test_static_generation_cache_gives_the_same_run_as_the_dynamic_one_for_a_fixed_batch(sentiment, tmp_path):
    """online DPO samples 4 prompts x 2 = 8 rows every step: no padding rows, so the same samples;
    the static path left-pads prompts further, which moves log-probs by float round-off only."""
    runs = {}
    for cache in ("dynamic", "static"):
        config = SAILConfig.preset("online-dpo", **{**SMALL, "steps": 2, "pairs_per_step": 4},
                                   generation_cache=cache, output_dir=str(tmp_path / cache))
        runs[cache] = strip_timing(train(config, *load_base_model(), make_task(sentiment), progress=False))
    for static, dynamic in zip(runs["static"], runs["dynamic"]):
        assert static.keys() == dynamic.keys()
        for key, value in dynamic.items():
            if isinstance(value, float):
                assert static[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
            else:
                assert static[key] == value, key


def test_non_finite_log_probs_skip_the_step_instead_of_raising(sentiment, tmp_path, monkeypatch):
    """e.g. an fp16 overflow in the policy's forward pass."""
    import sail_min.train as train_module
    real = train_module._logps
    monkeypatch.setattr(train_module, "_logps", lambda *a, **k: tuple(t * float("inf") for t in real(*a, **k)))
    config = SAILConfig.preset("online-dpo", **{**SMALL, "steps": 2}, output_dir=str(tmp_path))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        history = train(config, *load_base_model(), make_task(sentiment), progress=False)
    assert history[-1]["skipped_steps"] == 2
