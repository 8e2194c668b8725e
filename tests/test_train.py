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
import torch.nn.functional as F

import sail_min.train as train_module
from sail_min.checkpoint import load_checkpoint
from sail_min.config import ROUTES, SAILConfig
from sail_min.labels import PairLabels
from sail_min.lab.sentiment import load_base_model, load_sentiment_task
from sail_min.train import PairLogps, Task, pair_loss, replay_skipped_step, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DP, PP, PR = (ROUTES.index(name) for name in ("dp", "pp", "pr"))
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


def test_training_is_deterministic_logs_every_term_and_resumes_exactly(sentiment, tmp_path):
    task = make_task(sentiment)
    config = SAILConfig.preset("sail-pp", **SMALL, route_dpo=0.4, route_dp=0.2, route_pp=0.2, route_pr=0.2,
                               dp_label_coef=0.2, pr_response_coef=0.3, max_prompt_tokens=4,
                               output_dir=str(tmp_path / "full"))
    full = train(config, *load_base_model(), task, progress=False)
    assert [h["step"] for h in full] == [0, 1, 2, 3]
    last = full[-1]
    for key in ("loss/dpo", "loss/response", "loss/label", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "eval/kl", "eval/kl_std", "eval/judge_reward", "eval/judge_reward_std",
                "eval/reference_judge_reward_std", "eval/win_rate", "online/response_length",
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
    from sail_min.runtime import Runtime
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
    a mask (pytorch#196678): the skipped steps seen on H100/H200 GPUs. The kernel cannot run on a CPU, so this checks the
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
    """The compilation bound: SAIL-PR's online prompts vary in number and length from step to step; fixed shapes pad
    every training sample to one shape and every evaluation to another, and nothing else may recompile (a guard
    on the model's mode, dtype or adapters would). Measured on the CPU, "bucketed" shapes also stopped at 2 here:
    dynamo's second graph takes dynamic sizes; on a GPU each new size of such a graph records new CUDA graphs."""
    graphs = compilations(sentiment, tmp_path, "fixed")
    assert 1 <= graphs[-1] <= 2 and graphs == sorted(graphs)


def test_under_reuse_steps_every_dataset_row_is_seen_once_per_pass(sentiment):
    """Mutant: under ``reuse_steps > 1`` the dataset slots advance every STEP instead of every round, so a pass
    skips rows. Rounds of 2 steps draw at steps 0, 2, 4, ...; 10 rows in rounds of 5 pairs: each pair of rounds
    is one pass, every row once."""
    from sail_min.runtime import Runtime
    from sail_min.train import draw_pairs
    policy, tokenizer = load_base_model()
    rows = sentiment.preferences()[:10]
    task = Task(rows, sentiment.train_prompts[:4], sentiment.eval_prompts[:4], sentiment.judge)
    config = SAILConfig.preset("offline-dpo", pairs_per_step=5, reuse_steps=2, checkpoint_every=2)
    sampler = Runtime(config).sampler(tokenizer, rows=2 * config.pairs_per_step)
    for first_round in (0, 4):                             # two passes: rounds at steps 0, 2 and 4, 6
        seen = [t for step in (first_round, first_round + 2)
                for t in draw_pairs(policy, sampler, task, config, step).first.texts]
        assert sorted(seen) == sorted(r["chosen"] for r in rows)


# ---- a finite step moves the weights, a non-finite one is skipped (through the public loop) ------
@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def poison(policy, fault):
    """Make the policy's training forward passes non-finite: its loss ("loss") or only its
    gradient ("gradient"). Forward passes without gradient (sampling, evaluation) and the
    reference model (a copy, another module) are left alone."""
    decoder = policy.get_decoder()

    def hook(module, inputs, output):
        if module is not decoder or not torch.is_grad_enabled():
            return None
        hidden = output.last_hidden_state
        if fault == "loss":
            output.last_hidden_state = hidden * float("nan")
        else:
            hidden.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return output

    decoder.register_forward_hook(hook)


@pytest.mark.parametrize("fault", [None, "loss", "gradient"])
def test_a_finite_step_moves_the_weights_and_a_non_finite_one_does_not(sentiment, tmp_path, one_thread, fault):
    """Mutant: the loop's skip check inverted (never steps on a finite step) or ignored.

    A NaN loss never reaches backward, so only the "gradient" fault (finite loss, NaN gradient)
    catches a loop that steps regardless: its NaN weights then fail the run or the assertion."""
    policy, tokenizer = load_base_model()
    task = Task(sentiment.preferences()[:8], sentiment.train_prompts[:8], sentiment.eval_prompts,
                sentiment.judge, sentiment.bt_temperature)
    config = SAILConfig.preset("offline-dpo", steps=1, pairs_per_step=2, eval_prompts=2, eval_every=1,
                               max_new_tokens=4, lr=1e-2, output_dir=str(tmp_path))
    if fault:
        poison(policy, fault)
    before = [p.detach().clone() for p in policy.parameters()]
    if fault:
        with pytest.warns(RuntimeWarning, match="non-finite"):
            history = train(config, policy, tokenizer, task, progress=False)
    else:
        history = train(config, policy, tokenizer, task, progress=False)
    after = [p.detach() for p in policy.parameters()]

    if fault is None:
        assert history[-1]["skipped_steps"] == 0
        assert all(torch.isfinite(p).all() for p in after)
        assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > len(before) // 2
    else:
        assert history[-1]["skipped_steps"] == 1
        assert all(torch.equal(a, b) for a, b in zip(before, after))      # bitwise: no step at all
        if fault == "gradient":                                            # the loss itself was fine
            assert torch.isfinite(torch.tensor(history[-1]["loss"]))


# ---- iterative rounds: the judge asked once per round ----------------------------------------
def test_a_reuse_round_asks_the_judge_only_at_its_first_step(sentiment, tmp_path, monkeypatch):
    """Mutant: ``label_pairs`` runs at every step of a reuse round (labels re-drawn), while the
    ``judge_queries`` counter still counts once per round. The judge's own calls on training pairs,
    counted when each step's metrics are recorded, must equal ``judge_queries``: 2 responses per pair
    at the first step of each round, none at the others."""
    eval_prompts = set(sentiment.eval_prompts)
    judged = {"responses": 0}

    def counting_judge(prompts, responses):
        on_eval = [p in eval_prompts for p in prompts]
        assert all(on_eval) or not any(on_eval)              # evaluation and labelling never mix
        if not any(on_eval):
            judged["responses"] += len(responses)
        return sentiment.judge(prompts, responses)

    at_record = []
    step_record = train_module.step_record

    def recording_step_record(*args, **kwargs):
        at_record.append(judged["responses"])
        return step_record(*args, **kwargs)

    monkeypatch.setattr(train_module, "step_record", recording_step_record)
    task = Task([], sentiment.train_prompts[:16], sentiment.eval_prompts, counting_judge, sentiment.bt_temperature)
    config = SAILConfig.preset("iterative-dpo", steps=4, pairs_per_step=3, reuse_steps=2, eval_every=4,
                               eval_prompts=2, max_new_tokens=4, output_dir=str(tmp_path))
    history = train(config, *load_base_model(), task, progress=False)
    assert [h["judge_queries"] for h in history] == [6, 6, 12, 12]          # 3 pairs x 2 responses per round
    assert at_record == [h["judge_queries"] for h in history]


# ---- the loss: expected self-labels by who labels; the baseline per route --------------------
def test_expected_self_labels_go_to_pairs_the_policy_labels_not_to_pairs_it_wrote():
    """Mutant: ``pair_loss`` picks the expected-label pairs by RESPONSES_FROM (dp no, pp yes, pr yes)
    instead of LABELS_FROM (dp yes, pp yes, pr no). On routes [dp, pp, pr] with ``self_labels="expected"``
    the dp and pp pairs get the binary entropy H(sig(z)) (z in their own order y1 vs y2) as DPO and
    label terms; the pr pair gets -log sig(z) under the judge's label (here: y2 chosen)."""
    config = SAILConfig(route_dpo=0.0, route_dp=0.4, route_pp=0.3, route_pr=0.3, dp_label_coef=0.2, pp_coef=0.2,
                        pr_response_coef=0.3, self_labels="expected")
    logps = PairLogps(policy_first=torch.tensor([-5.0, -7.0, -3.0]), policy_second=torch.tensor([-9.0, -4.0, -8.0]),
                      ref_first=torch.tensor([-6.0, -4.0, -5.0]), ref_second=torch.tensor([-2.0, -9.0, -4.0]))
    routes = torch.tensor([DP, PP, PR])
    labels = PairLabels(torch.tensor([True, True, False]))      # dp, pp: pair order kept (expected); pr: judge says y2
    loss = pair_loss(logps, labels, routes, config)

    z_pair_order = config.beta * ((logps.policy_first - logps.ref_first) - (logps.policy_second - logps.ref_second))
    z_pr = -z_pair_order[2]                                      # chosen = y2
    entropy = binary_entropy(z_pair_order[:2])
    torch.testing.assert_close(loss.dpo, torch.cat([entropy, -F.logsigmoid(z_pr)[None]]))
    torch.testing.assert_close(loss.label, torch.cat([entropy, -0.5 * F.logsigmoid(z_pr)[None] ** 2]))
    # the two rules differ by far more than round-off on every pair here
    assert (entropy + F.logsigmoid(z_pair_order[:2])).abs().min() > 0.1
    assert (binary_entropy(z_pr) + F.logsigmoid(z_pr)).abs() > 0.1


def test_the_response_baseline_is_the_leave_one_out_mean_within_each_route():
    """Mutant: ``pair_loss`` passes no ``groups`` to ``sail_loss``, so the leave-one-out baseline is
    the mean over the whole step. Routes [pp, pr, pp, pr, pp] (both with a response term), sampled
    labels: pair i's response term is (f_i - b_i)(l_w + l_l) with f = -log sig(z) and b_i the mean of
    f over the OTHER pairs of pair i's route."""
    config = SAILConfig(route_dpo=0.0, route_pp=0.5, route_pr=0.5, pp_coef=0.2, pr_response_coef=0.3)
    logps = PairLogps(policy_first=torch.tensor([-5.0, -7.0, -3.0, -6.0, -2.0]),
                      policy_second=torch.tensor([-9.0, -4.0, -8.0, -6.5, -7.0]),
                      ref_first=torch.tensor([-6.0, -4.0, -5.0, -9.0, -3.0]),
                      ref_second=torch.tensor([-2.0, -9.0, -4.0, -5.0, -8.0]))
    routes = torch.tensor([PP, PR, PP, PR, PP])
    loss = pair_loss(logps, PairLabels(torch.ones(5, dtype=torch.bool)), routes, config)

    f = (-F.logsigmoid(loss.z)).tolist()
    by_route = {PP: [0, 2, 4], PR: [1, 3]}
    b = [sum(f[j] for j in by_route[int(routes[i])] if j != i) / (len(by_route[int(routes[i])]) - 1)
         for i in range(5)]
    b_whole_step = [(sum(f) - f[i]) / 4 for i in range(5)]
    both = (logps.policy_first + logps.policy_second).tolist()
    expected = torch.tensor([(f[i] - b[i]) * both[i] for i in range(5)])
    torch.testing.assert_close(loss.response, expected)
    assert max(abs(x - y) for x, y in zip(b, b_whole_step)) > 0.1           # the grouping matters here


def binary_entropy(z: torch.Tensor) -> torch.Tensor:
    """H(sig(z)) = -sig(z) log sig(z) - sig(-z) log sig(-z), by hand."""
    return -(torch.sigmoid(z) * F.logsigmoid(z) + torch.sigmoid(-z) * F.logsigmoid(-z))
