"""The training loop on the tiny sentiment model: config validation, resume, faults, processes."""
import dataclasses
import json
import os
import subprocess
import warnings
import sys
from pathlib import Path

import pytest
import torch

from sail_min.config import SAILConfig
from sail_min.lab.sentiment import load_base_model, load_sentiment_task
from sail_min.checkpoint import load_checkpoint
from sail_min.sampling import truncate_prompts_left
from sail_min.train import replay_skipped_step
from sail_min.train import Task, train

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


def test_truncation_keeps_the_end_of_long_prompts(sentiment):
    _, tokenizer = load_base_model()
    prompt = sentiment.train_prompts[0]
    n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    out, cut = truncate_prompts_left(tokenizer, [prompt, prompt], n - 2)     # n - 2 tokens, <bos> included
    assert cut == 2 and prompt.endswith(out[0]) and len(tokenizer(out[0]).input_ids) == n - 2
    assert truncate_prompts_left(tokenizer, [prompt], n + 1) == ([prompt], 0)    # n words + <bos> fit


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
    checkpoint of step 1 and the metrics of step 2), resume it, and return the resumed metrics.
    The kill comes through the judge: its third call with the evaluation's prompts (reference
    samples, step 1's evaluation, step 3's evaluation) raises."""
    calls = {"n": 0}

    def judge_killed_at_the_second_evaluation(prompts, responses):
        if len(prompts) == config.eval_prompts:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("killed")
        return task.judge(prompts, responses)

    with pytest.raises(KeyboardInterrupt):
        train(config, *load_policy(), dataclasses.replace(task, judge=judge_killed_at_the_second_evaluation),
              progress=False)
    out = Path(config.output_dir)
    assert load_checkpoint(out / "checkpoint.pt")["next_step"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3      # steps 0-2 logged
    return train(config, *load_policy(), task, resume=True, progress=False)


def lora_policy():
    """The tiny policy with LoRA adapters (as notebook 07 trains): its reference is the adapter-disabled base."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    policy, tokenizer = load_base_model()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    return peft.get_peft_model(policy, lora), tokenizer


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_lora_run_checkpoints_only_the_adapters_and_resumes_exactly(sentiment, tmp_path):
    task = make_task(sentiment)
    config = SAILConfig.preset("sail-pr", **SMALL, max_new_tokens=8, output_dir=str(tmp_path / "full"))
    full = train(config, *lora_policy(), task, progress=False)
    saved = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    assert saved and all("lora_" in name for name in saved)                 # adapters only, no base copy
    resumed = killed_then_resumed(config.replace(output_dir=str(tmp_path / "resumed")), lora_policy, task)
    assert strip_timing(resumed) == strip_timing(full)


def test_a_skipped_step_says_what_was_non_finite_and_replays(sentiment, tmp_path):
    """A NaN in the policy's hidden states (with gradient, i.e. in training passes only): the step is
    skipped, its metrics name the non-finite log-prob rows, its inputs are saved, and the replay of
    the saved step on a healthy policy is finite."""
    policy, tokenizer = load_base_model()
    decoder = policy.get_decoder()

    def nan_in_training(module, inputs, output):
        if torch.is_grad_enabled():
            hidden = output.last_hidden_state.clone()
            hidden[0] = float("nan")                                  # every position of row 0 (pair 0's y1)
            output.last_hidden_state = hidden
        return output

    handle = decoder.register_forward_hook(nan_in_training)
    before = [p.detach().clone() for p in policy.parameters()]
    config = SAILConfig.preset("offline-dpo", **{**SMALL, "steps": 2}, output_dir=str(tmp_path))
    with pytest.warns(RuntimeWarning, match="non-finite"):
        history = train(config, policy, tokenizer, make_task(sentiment), progress=False)
    assert history[-1]["skipped_steps"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    first = history[0]
    assert "loss" in first["skip/what"] and first["skip/nonfinite_logp_rows"]["policy_first"] == [0]
    saved = Path(first["skip/inputs"])
    assert saved == tmp_path / "skipped" / "step_000000.pt" and saved.exists()
    assert replay_skipped_step(saved, policy)["nonfinite_logp_rows"]["policy_first"] == [0]   # hook still on
    handle.remove()
    replay = replay_skipped_step(saved, policy)
    assert torch.isfinite(torch.tensor(replay["loss"])) and replay["nonfinite_grads"] == []
    assert not any(replay["nonfinite_logp_rows"].values())
    kernels = []                                             # one suspect at a time: the run's settings overridden
    handle = policy.model.layers[0].self_attn.register_forward_hook(
        lambda module, inputs, output: kernels.append(torch.backends.cuda.cudnn_sdp_enabled()))
    replay_skipped_step(saved, policy)
    as_run, kernels[:] = set(kernels), []
    replay_skipped_step(saved, policy, cudnn_attention=True)
    handle.remove()
    assert as_run == {False} and set(kernels) == {True}
    with pytest.raises(ValueError, match="mixed_precision"):
        replay_skipped_step(saved, policy, mixed_precision="fp8")


def test_missing_data_for_a_route_is_a_clear_error(sentiment, tmp_path):
    task = Task([], sentiment.train_prompts, sentiment.eval_prompts, sentiment.judge)
    with pytest.raises(ValueError, match="task.preferences is empty"):
        train(SAILConfig.preset("sail-pr", output_dir=str(tmp_path)), *load_base_model(), task)


def launch(processes: int, *args, script=("-m", "sail_min", "train")):
    """`torchrun --standalone` with `processes` CPU processes (gloo), each running `script args`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           *script, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})


def test_two_processes_average_gradients_like_one_process_with_the_combined_batch(tmp_path):
    """2 CPU processes x 4 pairs end with the weights of 1 process x 8 pairs (the pairs of a step are
    drawn for all processes at once; gradients are averaged) and log the same gradient norms.
    Tolerance 1e-5: float round-off of averaging two means instead of one mean over 8 pairs, through
    3 AdamW steps."""
    common = ["--preset", "offline-dpo", "--steps", "3", "--set", "eval_prompts=4", "--set", "eval_every=3"]
    two = launch(2, *common, "--set", "pairs_per_step=4", "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "trained on 2 process(es)" in two.stdout
    one = launch(1, *common, "--set", "pairs_per_step=8", "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert "trained on 1 process(es)" in one.stdout
    weights = [load_checkpoint(tmp_path / run / "checkpoint.pt")["model"] for run in ("two", "one")]
    base = load_base_model()[0].state_dict()
    assert any(not torch.equal(weights[1][name], base[name]) for name in weights[1])         # it trained
    for name, value in weights[1].items():
        assert torch.allclose(weights[0][name], value, rtol=0, atol=1e-5), name
    # AdamW ignores a uniform gradient scale, so the weights hardly see a sum instead of a mean over the
    # processes (only through clipping): the logged gradient norm (before clipping) does, by a factor 2.
    # Tolerance 1e-5 relative: float32 round-off, as for the weights (measured: 1.4e-7 at most).
    norms = [[json.loads(line)["grad_norm"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("two", "one")]
    assert len(norms[0]) == len(norms[1]) == 3 and all(norm > 0 for norm in norms[1])
    for two_norm, one_norm in zip(*norms):
        assert two_norm == pytest.approx(one_norm, rel=1e-5, abs=0)


def test_processes_that_drift_apart_are_detected(tmp_path):
    """Rank 1 starts from slightly different weights: averaged gradients cannot bring them together,
    and the end-of-run check names the mismatch."""
    proc = launch(2, str(tmp_path), script=(os.path.join(ROOT, "tests", "desync_run.py"),))
    assert proc.returncode != 0 and "processes ended with different weights" in proc.stderr, proc.stderr[-3000:]


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


@pytest.mark.parametrize("compile", ["off", "eager-backend"])
def test_static_generation_cache_gives_the_same_run_as_the_dynamic_one_for_a_fixed_batch(sentiment, tmp_path, compile):
    """online DPO samples 4 prompts x 2 = 8 rows every step: no padding rows, so the same samples;
    the static path left-pads prompts further, which moves log-probs by float round-off only. Also with the
    static path traced by torch.compile (dynamo's eager backend: its graphs, no kernels)."""
    runs = {}
    torch.compiler.reset()
    for cache in ("dynamic", "static"):
        config = SAILConfig.preset("online-dpo", **{**SMALL, "steps": 2, "pairs_per_step": 4},
                                   generation_cache=cache, generation_compile=compile, output_dir=str(tmp_path / cache))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ignoring extra kwargs.*")   # the eager backend has no modes
            runs[cache] = strip_timing(train(config, *load_base_model(), make_task(sentiment), progress=False))
    torch.compiler.reset()
    assert runs["static"][-1]["compile/graphs"] == (1 if compile == "eager-backend" else 0)   # 8 rows, eval too
    for static, dynamic in zip(runs["static"], runs["dynamic"]):
        assert static.keys() == dynamic.keys()
        for key, value in dynamic.items():
            if key.startswith("compile/"):
                continue
            if isinstance(value, float):
                assert static[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
            else:
                assert static[key] == value, key


def test_offline_pairs_are_read_in_shuffled_passes(sentiment):
    """Every dataset row once per pass (offline DPO), a new order each pass."""
    from sail_min.engine import Runtime
    from sail_min.train import draw_pairs
    policy, tokenizer = load_base_model()
    rows = sentiment.preferences()[:10]
    task = Task(rows, sentiment.train_prompts[:4], sentiment.eval_prompts[:4], sentiment.judge)
    config = SAILConfig.preset("offline-dpo", pairs_per_step=5)
    sampler = Runtime(config).sampler(tokenizer, rows=2 * config.pairs_per_step)
    passes = [[t for step in (2 * p, 2 * p + 1) for t in draw_pairs(policy, sampler, task, config, step).first.texts]
              for p in range(2)]
    assert all(sorted(p) == sorted(r["chosen"] for r in rows) for p in passes)   # each row exactly once
    assert passes[0] != passes[1]                                                  # reshuffled


def test_reuse_steps_trains_on_each_labelled_round_several_times_and_resumes_exactly(sentiment, tmp_path):
    task = make_task(sentiment)
    config = SAILConfig.preset("iterative-dpo", **{**SMALL, "steps": 4, "checkpoint_every": 2}, reuse_steps=2,
                               output_dir=str(tmp_path / "full"))
    full = train(config, *load_base_model(), task, progress=False)
    assert [h["judge_queries"] for h in full] == [12, 12, 24, 24]          # 6 pairs x 2 calls, once per round
    assert full[0]["rewards/margins"] != full[1]["rewards/margins"]         # same pairs, new log-probs
    resumed = killed_then_resumed(config.replace(output_dir=str(tmp_path / "resumed")), load_base_model, task)
    assert strip_timing(resumed) == strip_timing(full)
    with pytest.raises(ValueError, match="multiple of reuse_steps"):
        SAILConfig(reuse_steps=3, checkpoint_every=20)


def test_expected_self_labels_and_per_term_gradient_norms_are_logged(sentiment, tmp_path):
    config = SAILConfig.preset("sail-pp", **{**SMALL, "steps": 2}, route_dpo=0.4, route_dp=0.3, route_pp=0.3,
                               dp_label_coef=0.2, self_labels="expected", output_dir=str(tmp_path))
    history = train(config, *load_base_model(), make_task(sentiment), progress=False)
    last = history[-1]
    assert last["skipped_steps"] == 0 and torch.isfinite(torch.tensor(last["loss"]))
    assert {"grad_norm/dpo", "grad_norm/response", "grad_norm/label"} <= set(last)     # at evaluation steps
    assert last["grad_norm/label"] > 0 and last["grad_norm"] > 0 and isinstance(last["clipped"], bool)
    assert "grad_norm/dpo" not in history[0]                                            # step 0: no evaluation


@pytest.mark.parametrize("allowed", [False, True])
def test_the_training_step_runs_attention_without_cudnn_in_forward_backward_and_recompute(sentiment, tmp_path, allowed):
    """cuDNN's attention backward returns NaN query gradients on H100/H200 for seq_len % 128 == 64 with
    a mask (pytorch#196678): the GPU skips of issue 8. The kernel cannot run on a CPU, so this checks the
    guard itself: every attention call of a training pass (forward, the checkpointed recompute during
    backward, the per-term gradients) and every attention gradient sees the flag off; with
    ``cudnn_attention=True`` it stays on, and the process-wide flag is restored after the run."""
    policy, tokenizer = load_base_model()
    seen = {"forward": [], "backward": []}

    def record(module, inputs, output):
        if torch.is_grad_enabled():                  # training passes only (sampling and scoring run without grad)
            seen["forward"].append(torch.backends.cuda.cudnn_sdp_enabled())
            output[0].register_hook(lambda grad: seen["backward"].append(torch.backends.cuda.cudnn_sdp_enabled()))

    handles = [layer.self_attn.register_forward_hook(record) for layer in policy.model.layers]
    config = SAILConfig.preset("sail-pr", **{**SMALL, "steps": 2, "eval_every": 1}, gradient_checkpointing=True,
                               cudnn_attention=allowed, output_dir=str(tmp_path))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    history = train(config, policy, tokenizer, make_task(sentiment), progress=False)
    for handle in handles:
        handle.remove()
    assert torch.backends.cuda.cudnn_sdp_enabled()                              # restored
    assert history[-1]["skipped_steps"] == 0 and "grad_norm/response" in history[-1]
    layers = len(policy.model.layers)
    assert len(seen["forward"]) >= 2 * 2 * layers          # 2 steps x (forward + recompute) per layer, at least
    assert len(seen["backward"]) >= 2 * layers
    assert set(seen["forward"]) == set(seen["backward"]) == {allowed}



def compilations(sentiment, tmp_path, shapes: str) -> list[int]:
    """compile/graphs after each step of a 6-step LoRA SAIL-PR run on training prompts of 20-200 tokens (as
    notebook 07's), static cache compiled by dynamo's eager backend: the same tracing and guards as on a GPU,
    so the same compilations, on the CPU (CUDA graphs' re-recordings are not counted)."""
    long_prompts = [("the " * (10 + (37 * i) % 180)) + prompt for i, prompt in enumerate(sentiment.train_prompts[:64])]
    task = Task(sentiment.preferences()[:64], long_prompts, sentiment.eval_prompts, sentiment.judge,
                sentiment.bt_temperature)
    torch.compiler.reset()                                   # graphs of earlier tests would be reused
    config = SAILConfig.preset("sail-pr", **{**SMALL, "steps": 6, "eval_every": 3}, max_prompt_tokens=256,
                               generation_cache="static", generation_compile="eager-backend",
                               generation_shapes=shapes, output_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ignoring extra kwargs.*")   # the eager backend has no modes
        history = train(config, *lora_policy(), task, progress=False)
    torch.compiler.reset()
    assert history[-1]["skipped_steps"] == 0
    return [h["compile/graphs"] for h in history]


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_fixed_generation_shapes_compile_at_most_twice_per_run_whatever_the_routing(sentiment, tmp_path):
    """Issue 8's bound: SAIL-PR's online prompts vary in number and length from step to step; fixed shapes pad
    every training sample to one shape and every evaluation to another, and nothing else may recompile (a guard
    on the model's mode, dtype or adapters would). Measured on the CPU, "bucketed" shapes also stopped at 2 here:
    dynamo's second graph takes dynamic sizes; on a GPU each new size of such a graph records new CUDA graphs."""
    graphs = compilations(sentiment, tmp_path, "fixed")
    assert 1 <= graphs[-1] <= 2 and graphs == sorted(graphs)
