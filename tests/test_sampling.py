"""sample_responses: layout, EOS handling (also with pad == eos), seeding, modes, KV cache."""
import copy
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sail_min.logprobs import sequence_logprobs
from sail_min.sampling import encode_responses, manual_seed, render_prompts, sample_responses, truncate_prompts_left

POLICY_DIR = Path(__file__).resolve().parents[1] / "data" / "tiny" / "policy"
PROMPTS = ["Tell me about the market.",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something about a blue kite."}],
           "Hi"]


@pytest.fixture(scope="module")
def policy():
    return AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(POLICY_DIR)


@pytest.fixture(scope="module")
def samples(policy, tokenizer):
    return sample_responses(policy, tokenizer, PROMPTS, k=3, max_new_tokens=12, seed=0)


def test_layout_prompts_left_padded_responses_right_padded(samples, tokenizer):
    assert len(samples) == 3 * len(PROMPTS)
    assert samples.prompts == [p for p in PROMPTS for _ in range(3)]        # row i*k + j
    for mask in samples.prompt_mask:          # 0...0 1...1
        assert torch.equal(mask, mask.sort().values)
    for mask in samples.response_mask:        # 1...1 0...0
        assert torch.equal(mask, mask.sort(descending=True).values)
    assert torch.equal(samples.lengths, samples.response_mask.sum(1))
    assert torch.all(samples.response_ids[samples.response_mask == 0] == tokenizer.pad_token_id)
    rendered = render_prompts(tokenizer, PROMPTS)
    for row in range(len(samples)):
        prompt_ids = samples.prompt_ids[row][samples.prompt_mask[row].bool()]
        assert tokenizer.decode(prompt_ids) == rendered[row // 3]


def test_response_ends_at_first_eos_which_is_kept(samples, tokenizer):
    eos = tokenizer.eos_token_id
    assert samples.contains_eos.any() and not samples.contains_eos.all(), "fixture should give both cases"
    for ids, length, has_eos in zip(samples.response_ids, samples.lengths, samples.contains_eos):
        kept = ids[:length].tolist()
        assert (eos in kept) == bool(has_eos)
        if has_eos:
            assert kept.index(eos) == length - 1     # exactly one EOS, and it is the last kept token
        else:
            assert length == samples.response_ids.shape[1]   # ran until max_new_tokens


def test_texts_are_the_decoded_responses(samples, tokenizer):
    for ids, length, text in zip(samples.response_ids, samples.lengths, samples.texts):
        assert text == tokenizer.decode(ids[:length], skip_special_tokens=True)


def test_pad_equal_to_eos_keeps_the_eos(policy, tokenizer):
    pad_is_eos = copy.deepcopy(tokenizer)
    pad_is_eos.pad_token = pad_is_eos.eos_token
    samples = sample_responses(policy, pad_is_eos, PROMPTS, k=3, max_new_tokens=12, seed=0)
    reference = sample_responses(policy, tokenizer, PROMPTS, k=3, max_new_tokens=12, seed=0)
    assert torch.equal(samples.lengths, reference.lengths)
    assert torch.equal(samples.contains_eos, reference.contains_eos)
    naive_lengths = (samples.response_ids != pad_is_eos.pad_token_id).sum(1)   # the trap
    assert torch.equal(naive_lengths, samples.lengths - samples.contains_eos.long())


def test_same_seed_same_samples_and_global_rng_untouched(policy, tokenizer, samples):
    rng_state = torch.random.get_rng_state()
    again = sample_responses(policy, tokenizer, PROMPTS, k=3, max_new_tokens=12, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    assert torch.equal(again.response_ids, samples.response_ids) and again.texts == samples.texts
    other = sample_responses(policy, tokenizer, PROMPTS, k=3, max_new_tokens=12, seed=1)
    assert other.texts != samples.texts


def test_logprobs_of_samples_match_each_sequence_alone(policy, samples):
    """The prompt-left / response-right layout scores each row as if it were alone."""
    with torch.no_grad():
        batched = sequence_logprobs(policy, **samples.model_inputs())
        for row in range(len(samples)):
            prompt = samples.prompt_ids[row][samples.prompt_mask[row].bool()]
            response = samples.response_ids[row][: samples.lengths[row]]
            ids = torch.cat([prompt, response])[None]
            logprobs = policy(input_ids=ids).logits[0, :-1].log_softmax(-1)
            alone = logprobs.gather(-1, ids[0, 1:, None])[len(prompt) - 1:].sum()
            torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=0)


def test_eval_mode_during_sampling_and_kv_cache_with_gradient_checkpointing(tokenizer):
    model = AutoModelForCausalLM.from_pretrained(POLICY_DIR)
    # transformers >= 5.2x renamed gradient_checkpointing_* to activation_checkpointing_*
    enable_checkpointing = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable_checkpointing()
    model.config.use_cache = False                 # as training setups with checkpointing do
    model.train()
    seen = []                                      # (training?, number of new positions) per forward
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: seen.append((model.training, inputs[0].shape[1])))
    try:
        sample_responses(model, tokenizer, ["Tell me about the market."], k=2, max_new_tokens=6, seed=0)
    finally:
        hook.remove()
    assert len(seen) > 1 and not any(training for training, _ in seen)
    assert all(new_positions == 1 for _, new_positions in seen[1:])   # KV cache: one token per step
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    assert checkpointing if checkpointing is not None else model.is_gradient_checkpointing
    assert model.training and model.config.use_cache is False


def test_sampling_switches_modes_without_transformers_train_and_restores_each_module(tokenizer, monkeypatch):
    """PreTrainedModel.train re-kernelises a model at every change of mode (the `kernels` package): sampling sets
    the training flags itself (``logprobs.eval_mode``), and each module gets its own mode back."""
    model = AutoModelForCausalLM.from_pretrained(POLICY_DIR).train()
    frozen = model.model.layers[0]
    frozen.eval()                                  # a module the caller keeps in eval mode
    calls = []
    monkeypatch.setattr(type(model), "train", lambda self, mode=True: calls.append(mode) or torch.nn.Module.train(self, mode))
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: seen.append(any(m.training for m in model.modules())))
    try:
        sample_responses(model, tokenizer, ["Tell me about the market."], k=2, max_new_tokens=4, seed=0)
    finally:
        hook.remove()
    assert seen and not any(seen)                  # every module in eval mode while sampling
    assert calls == []                             # ... without model.train() / model.eval()
    assert model.training and not frozen.training and model.model.layers[1].training


def test_manual_seed_on_a_cpu_draws_what_torch_manual_seed_draws():
    manual_seed(7, torch.device("cpu"))
    ours = torch.rand(5)
    torch.manual_seed(7)
    assert torch.equal(ours, torch.rand(5))


def test_encode_responses_closes_with_eos(policy, tokenizer):
    encoded = encode_responses(tokenizer, ["Tell me about the market."], ["The market is lovely."])
    text_ids = tokenizer("The market is lovely.", add_special_tokens=False).input_ids
    assert encoded.response_ids[0].tolist() == text_ids + [tokenizer.eos_token_id]
    assert encoded.lengths.tolist() == [len(text_ids) + 1] and encoded.contains_eos.all()


def test_plain_prompts_without_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    assert render_prompts(plain, ["Tell me"]) == ["Tell me"]
    with pytest.raises(ValueError, match=r"prompts\[1\].*no chat template"):
        render_prompts(plain, PROMPTS)


def test_errors_name_the_argument(policy, tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="pad token"):
        sample_responses(policy, no_pad, ["Hi"], max_new_tokens=4)
    with pytest.raises(ValueError, match="k "):
        sample_responses(policy, tokenizer, ["Hi"], k=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="non-empty list"):
        sample_responses(policy, tokenizer, "Hi", max_new_tokens=4)


def test_samples_come_from_the_policy_whatever_its_generation_config(tokenizer):
    """generate() fills unset options from generation_config.json; truncation there must not leak in."""
    model = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
    model.generation_config.top_k = 2
    model.generation_config.repetition_penalty = 2.0
    model.generation_config.min_p = 0.3
    n = 2000
    first = sample_responses(model, tokenizer, ["Tell me about the harbor."], k=n, max_new_tokens=1, seed=0)
    frequency = torch.bincount(first.response_ids[:, 0], minlength=len(tokenizer)).float() / n
    with torch.no_grad():
        probability = model(input_ids=first.prompt_ids[:1]).logits[0, -1].softmax(-1)
    total_variation = 0.5 * (frequency - probability).abs().sum()
    noise = 0.5 * (probability * (1 - probability) / n).sqrt().sum()      # E[TV] is at most about this
    assert total_variation < 2 * noise


def test_a_minimum_length_in_the_generation_config_is_neutralised_and_otherwise_costs_nothing(tokenizer, monkeypatch):
    """min_new_tokens / min_length from generation_config.json must not keep EOS out of the samples; and when
    the model's config sets neither, no length processor runs at every token (a no-op one costs ~4%)."""
    from transformers.generation import logits_process
    calls = []
    def counted(call):
        def __call__(self, input_ids, scores):          # transformers checks a processor's signature
            calls.append(self)
            return call(self, input_ids, scores)
        return __call__
    for name in ("MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor"):
        processor = getattr(logits_process, name)
        monkeypatch.setattr(processor, "__call__", counted(processor.__call__))
    model = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
    sample = lambda: sample_responses(model, tokenizer, ["Hi"], k=200, max_new_tokens=3, seed=0,  # noqa: E731
                                      prompt_format="text")
    free = sample()
    assert calls == [] and free.contains_eos.any()                 # some samples stop within 3 tokens
    model.generation_config.min_new_tokens, model.generation_config.min_length = 3, 40
    constrained = sample()
    assert torch.equal(constrained.response_ids, free.response_ids)  # the same samples: EOS never masked
    assert calls                                                     # (here a processor runs, set to 0)


def test_encode_responses_accepts_conversational_rows(tokenizer):
    prompt = [{"role": "user", "content": "Tell me about the market."}]
    as_messages = encode_responses(tokenizer, [prompt], [[{"role": "assistant", "content": "Lovely."}]])
    as_text = encode_responses(tokenizer, ["Tell me about the market."], ["Lovely."])
    assert torch.equal(as_messages.model_inputs()["input_ids"], as_text.model_inputs()["input_ids"])
    with pytest.raises(ValueError, match=r"responses\[0\]"):
        encode_responses(tokenizer, [prompt], [[{"role": "user", "content": "Lovely."}]])


# --------------------------------------------------------------------------------------
# greedy decoding and the static KV cache (cache="static")
# --------------------------------------------------------------------------------------
BASE_DIR = Path(__file__).resolve().parents[1] / "data" / "sentiment" / "base"   # Llama, no chat template


def _cache_types(model, **sample_kwargs):
    """Responses, and the type of KV cache each forward call of `generate` received."""
    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(type(kwargs.get("cache", kwargs.get("past_key_values"))).__name__),
        with_kwargs=True)
    try:
        return sample_responses(model, **sample_kwargs), set(seen)
    finally:
        hook.remove()


@pytest.mark.parametrize("model_dir", [POLICY_DIR, BASE_DIR], ids=["qwen2", "llama"])
def test_static_cache_gives_the_same_tokens_as_the_dynamic_one(model_dir):
    """Greedy: the same tokens (on CPU, transformers does not compile, so the same kernels),
    also for 6 rows, which the static path pads to 8 (and prompts to 64 tokens; the all-padding columns
    are dropped from what it returns). Seeded
    sampling: the same samples too for a batch that needs no padding rows (4), on CPU; on CUDA
    the compiled kernels may round differently and a near-tie can then go the other way."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    prompts = ["Tell me about the market.", "Hi", "Say something about a blue kite and the sea."]
    for options, n_prompts in ((dict(greedy=True), 3), (dict(seed=0), 2)):
        kwargs = dict(tokenizer=tokenizer, prompts=prompts[:n_prompts], k=2, max_new_tokens=16, **options)
        dynamic, dynamic_caches = _cache_types(model, **kwargs)
        static, static_caches = _cache_types(model, **kwargs, cache="static")
        assert dynamic_caches == {"DynamicCache"} and static_caches == {"StaticCache"}
        assert torch.equal(static.response_ids, dynamic.response_ids), options
        assert torch.equal(static.response_mask, dynamic.response_mask) and static.texts == dynamic.texts
        assert len(static) == 2 * n_prompts and static.prompt_ids.shape == dynamic.prompt_ids.shape  # padding columns dropped


def test_greedy_takes_the_argmax_and_repeats_it_k_times(policy, tokenizer):
    greedy = sample_responses(policy, tokenizer, ["Tell me about the market."], k=3, max_new_tokens=8, greedy=True)
    assert torch.equal(greedy.response_ids[0], greedy.response_ids[1]) and greedy.texts[0] == greedy.texts[2]
    with torch.no_grad():
        first_logits = policy(input_ids=greedy.prompt_ids[:1], attention_mask=greedy.prompt_mask[:1]).logits[0, -1]
    assert greedy.response_ids[0, 0] == first_logits.argmax()


def test_static_cache_failure_warns_once_and_falls_back_to_dynamic(tokenizer, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(POLICY_DIR).eval()
    generate = model.generate
    calls = []

    def generate_without_static(*args, generation_config, **kwargs):
        calls.append(generation_config.cache_implementation)
        if generation_config.cache_implementation == "static":
            raise RuntimeError("static cache not supported here")
        return generate(*args, generation_config=generation_config, **kwargs)

    monkeypatch.setattr(model, "generate", generate_without_static)
    kwargs = dict(prompts=["Hi"], k=2, max_new_tokens=6, seed=0)
    with pytest.warns(RuntimeWarning, match="static-cache generation failed.*not supported here"):
        fallback = sample_responses(model, tokenizer, cache="static", **kwargs)
    assert calls == ["static", None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # no second warning, no second static attempt
        again = sample_responses(model, tokenizer, cache="static", **kwargs)
    assert calls == ["static", None, None]
    dynamic = sample_responses(model, tokenizer, **kwargs)
    assert torch.equal(fallback.response_ids, dynamic.response_ids)
    assert torch.equal(again.response_ids, dynamic.response_ids)


def test_unknown_cache_is_refused(policy, tokenizer):
    with pytest.raises(ValueError, match="cache must be one of"):
        sample_responses(policy, tokenizer, ["Hi"], cache="paged", max_new_tokens=4)


def test_plain_text_prompts_meet_a_chat_template_as_a_user_message_or_as_text():
    """prompt_format="chat" (default) wraps a string in the template; "text" leaves it as TRL does,
    with the tokenizer's own special tokens; message lists use the template either way."""
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)                      # has a chat template
    prompt, messages = "Tell me about the sea.", [{"role": "user", "content": "Tell me about the sea."}]
    assert render_prompts(tokenizer, [prompt]) == render_prompts(tokenizer, [messages])
    assert render_prompts(tokenizer, [prompt], prompt_format="text") == [prompt]
    assert render_prompts(tokenizer, [messages], prompt_format="text") == render_prompts(tokenizer, [messages])
    as_text = encode_responses(tokenizer, [prompt], ["Calm."], prompt_format="text")
    assert as_text.prompt_ids[0].tolist() == tokenizer(prompt).input_ids
    with pytest.raises(ValueError, match="prompt_format"):
        render_prompts(tokenizer, [prompt], prompt_format="raw")


def test_a_response_that_already_ends_with_eos_gets_no_second_one():
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)
    eos = tokenizer.eos_token
    both = encode_responses(tokenizer, ["Hi", "Hi"], ["Hello.", "Hello." + eos])
    assert both.lengths[0] == both.lengths[1]
    assert both.response_ids[1, : both.lengths[1]].tolist().count(tokenizer.eos_token_id) == 1


def test_encode_responses_cuts_long_responses_to_max_tokens_without_eos(tokenizer):
    """max_tokens (SAILConfig.max_completion_tokens): a long response keeps its first max_tokens tokens and
    loses its EOS, like a sample cut at max_new_tokens; short ones are untouched, EOS kept."""
    prompts = ["Tell me about the market.", "And the weather?"]
    responses = ["lovely " * 50, "Sunny."]
    whole = encode_responses(tokenizer, prompts, responses)
    cut = encode_responses(tokenizer, prompts, responses, max_tokens=8)
    long_ids = tokenizer(responses[0], add_special_tokens=False).input_ids
    assert len(long_ids) + 1 > 8 and whole.lengths[0] == len(long_ids) + 1          # +1: the EOS
    assert cut.lengths.tolist() == [8, int(whole.lengths[1])]
    assert cut.response_ids[0, :8].tolist() == long_ids[:8]                          # the first tokens, no EOS
    assert cut.contains_eos.tolist() == [False, True] and whole.contains_eos.tolist() == [True, True]
    assert cut.texts[0] == tokenizer.decode(long_ids[:8]) and cut.texts[1] == "Sunny."
    assert torch.equal(cut.response_ids[1], whole.response_ids[1, :cut.response_ids.shape[1]])
    assert int(cut.response_mask[0].sum()) == 8
    # a response of exactly max_tokens tokens with its EOS is not cut
    exact = encode_responses(tokenizer, prompts[:1], responses[:1], max_tokens=len(long_ids) + 1)
    assert exact.contains_eos.all() and torch.equal(exact.response_ids, whole.response_ids[:1])


def _recording_generate(monkeypatch, delegate: bool):
    """Replace sampling._generate with one that records (input shape, generation config) of every call:
    delegating to the real one, or (fast) returning each row's prompt followed by EOS tokens."""
    import sail_min.sampling as sampling
    real, calls = sampling._generate, []

    def generate(model, input_ids, attention_mask, config, seed, synced_gpus, inference_mode=False):
        calls.append({"shape": tuple(input_ids.shape), "mask": tuple(attention_mask.shape),
                      "cache": config.cache_implementation, "max_cache_len": getattr(config, "max_cache_len", None),
                      "compile_config": getattr(config, "compile_config", None)})
        if delegate:
            return real(model, input_ids, attention_mask, config, seed, synced_gpus, inference_mode)
        eos = torch.full((input_ids.shape[0], 3), config.eos_token_id[0], dtype=input_ids.dtype)
        return torch.cat([input_ids, eos], dim=1)

    monkeypatch.setattr(sampling, "_generate", generate)
    return calls


def test_fixed_shapes_pad_every_call_to_one_shape_and_compile_one_static_graph_per_shape(policy, tokenizer,
                                                                                          monkeypatch):
    """Sampler(rows, prompt_length): 1, 3 or 4 prompts of any length, one generate shape [rows, prompt_length],
    a cache of prompt_length + max_new_tokens positions and dynamic=False (no automatic-dynamic recompilation
    when a second call site, evaluation, brings its own shape); the copies of the last row are dropped."""
    from sail_min.sampling import Sampler
    calls = _recording_generate(monkeypatch, delegate=False)
    sampler = Sampler(tokenizer=tokenizer, max_new_tokens=5, temperature=1.0, prompt_format="chat", cache="static",
                      compile="eager-backend", isolate=True, rows=8, prompt_length=48)
    prompts = ["Hi", "Tell me about the market. " * 3, PROMPTS[1], "Say something about a blue kite."]
    for n in (1, 3, 4, 2):
        samples = sampler(policy, prompts[:n], k=2, seed=n)
        assert len(samples) == 2 * n and samples.prompts == [p for p in prompts[:n] for _ in range(2)]
        assert samples.prompt_mask[:, 0].any()                          # all-padding prompt columns dropped
    assert [c["shape"] for c in calls] == [(8, 48)] * 4 and {c["mask"] for c in calls} == {(8, 48)}
    assert {c["cache"] for c in calls} == {"static"} and {c["max_cache_len"] for c in calls} == {48 + 5}
    assert all(c["compile_config"].dynamic is False for c in calls)
    # without fixed shapes (bucketed), transformers' automatic-dynamic default is kept
    bucketed = Sampler(tokenizer=tokenizer, max_new_tokens=5, temperature=1.0, prompt_format="chat", cache="static",
                       compile="eager-backend", isolate=True)
    bucketed(policy, prompts[:3], k=2, seed=0)
    assert calls[-1]["shape"][0] == 8 and calls[-1]["shape"][1] % 64 == 0 and calls[-1]["compile_config"].dynamic is None


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_the_training_loop_samples_at_one_shape_whatever_the_number_of_online_prompts(tokenizer, monkeypatch,
                                                                                        tmp_path):
    """train() with the static cache (issue 25): SAIL-PR routes 0 to 4 of a step's 4 pairs online, on prompts of
    very different lengths, yet every training sample is generated at [2 x pairs_per_step, max_prompt_tokens]
    and every evaluation at [eval_prompts, max_prompt_tokens], so dynamo (its eager backend: the same tracing
    and guards as on a GPU) builds 2 graphs per run at most; the reference's samples use the dynamic cache."""
    import json
    from sail_min.config import SAILConfig
    from sail_min.train import Task, train
    data = Path(__file__).resolve().parents[1] / "data" / "tiny"
    rows = [json.loads(line) for line in (data / "preferences.jsonl").read_text().splitlines() if line.strip()]
    prompts = [("the " * (3 * i % 40)) + row["prompt"] for i, row in enumerate(rows)]     # 7 to ~60 tokens
    task = Task(rows, prompts, prompts[:6], judge=lambda ps, texts: [float(len(t) % 7) for t in texts])
    calls = _recording_generate(monkeypatch, delegate=True)
    config = SAILConfig.preset("sail-pr", steps=6, pairs_per_step=4, eval_every=3, eval_prompts=6, max_new_tokens=6,
                               max_prompt_tokens=72, generation_cache="static", generation_compile="eager-backend",
                               checkpoint_every=0, output_dir=str(tmp_path))
    torch.compiler.reset()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ignoring extra kwargs.*")   # the eager backend has no modes
            history = train(config, AutoModelForCausalLM.from_pretrained(POLICY_DIR), tokenizer, task, progress=False)
    finally:
        torch.compiler.reset()
    online = [h["pairs/pr"] for h in history]
    assert len(set(online)) > 1, f"the routing should vary the online prompts per step: {online}"
    static = [c for c in calls if c["cache"] == "static"]
    assert {c["shape"] for c in static} == {(2 * 4, 72), (6, 72)}
    assert sum(c["shape"] == (8, 72) for c in static) == sum(n > 0 for n in online)    # one call per online step
    assert {c["max_cache_len"] for c in static} == {72 + 6} and all(c["compile_config"].dynamic is False for c in static)
    assert [c["cache"] for c in calls if c["cache"] != "static"] == [None]              # pi_ref's samples, once
    assert 1 <= history[-1]["compile/graphs"] <= 2


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")   # inside peft
def test_static_generation_runs_without_the_input_grad_hook_of_gradient_checkpointing(tokenizer, monkeypatch):
    """Gradient checkpointing on a LoRA policy hooks the input embeddings (output.requires_grad_(True)); torch 2.11's
    dynamo cannot trace that call, so each compiled shape became two graphs on an H200 (4 per run instead of 2).
    The static path generates without the hook and puts it back: training still gets it."""
    peft = pytest.importorskip("peft")
    import sail_min.sampling as sampling
    from sail_min.runtime import enable_gradient_checkpointing
    torch.manual_seed(0)
    policy = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(POLICY_DIR),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    enable_gradient_checkpointing(policy)
    embeddings = policy.get_input_embeddings()
    hooked = lambda: sorted(getattr(h, "__name__", "") for h in embeddings._forward_hooks.values())  # noqa: E731
    assert "make_inputs_require_grads" in hooked()
    seen, real = [], sampling._generate

    def generate(*args, **kwargs):
        seen.append((args[3].cache_implementation, hooked()))
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "_generate", generate)
    for cache in ("static", "dynamic"):
        sample_responses(policy, tokenizer, ["Hi", "Tell me about the market."], k=2, max_new_tokens=4, seed=0,
                         cache=cache, compile="off", batch_rows=4, prompt_length=32)
    assert seen[0] == ("static", []) and "make_inputs_require_grads" in seen[1][1]
    assert hooked().count("make_inputs_require_grads") == 1                       # back, once
    inputs = policy.get_input_embeddings()(torch.tensor([[5, 6, 7]]))
    assert inputs.requires_grad                                                    # the hook works again


def test_static_path_generates_without_autocast_when_autocast_is_not_the_weights_dtype(policy, tokenizer, monkeypatch):
    """fp32 weights under fp16 autocast (a T4's path): with transformers 5.17 the static cache got fp32 keys from the
    prefill and fp16 ones from the decoding steps (index_copy_ dtype error, then the slow dynamic fallback), so the
    static path turns autocast off there; with autocast in the weights' dtype, and on the dynamic path, it stays."""
    import sail_min.sampling as sampling
    seen, real = [], sampling._generate

    def generate(*args, **kwargs):
        seen.append((args[3].cache_implementation, torch.is_autocast_enabled("cpu")))
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "_generate", generate)
    bf16_policy = copy.deepcopy(policy).to(torch.bfloat16)
    for model, dtype, cache in ((policy, torch.float16, "static"), (policy, torch.float16, "dynamic"),
                                (bf16_policy, torch.bfloat16, "static")):
        with torch.autocast("cpu", dtype=dtype):
            sample_responses(model, tokenizer, ["Hi"], k=2, max_new_tokens=3, seed=0, cache=cache, compile="off",
                             batch_rows=2, prompt_length=32)
    assert seen == [("static", False), (None, True), ("static", True)]
    assert not torch.is_autocast_enabled("cpu")
# ---- prompts cut to max_prompt_tokens from the left ----------------------------------------
def test_truncation_keeps_the_end_of_long_prompts():
    from sail_min.lab.sentiment import load_base_model, load_sentiment_task
    _, tokenizer = load_base_model()
    prompt = load_sentiment_task().train_prompts[0]
    n = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    out, cut = truncate_prompts_left(tokenizer, [prompt, prompt], n - 2)     # n - 2 tokens, <bos> included
    assert cut == 2 and prompt.endswith(out[0]) and len(tokenizer(out[0]).input_ids) == n - 2
    assert truncate_prompts_left(tokenizer, [prompt], n + 1) == ([prompt], 0)    # n words + <bos> fit


def test_conversations_are_truncated_from_the_left_with_the_template_kept():
    tokenizer = AutoTokenizer.from_pretrained(POLICY_DIR)   # has a chat template
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


def test_remembered_prompt_ids_follow_the_tokenizer(tokenizer):
    """Prompt ids are remembered per (tokenizer, vocabulary size, chat template, prompt): a changed template or
    an added token gives fresh ids, equal to a direct encoding; a prompt the memory cannot key (content that is
    a list) is encoded directly."""
    from sail_min.sampling import _prompt_ids
    local = copy.deepcopy(tokenizer)
    prompt = [{"role": "user", "content": "Tell me about the market."}]
    direct = lambda: local(local.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),  # noqa: E731
                           add_special_tokens=False).input_ids
    assert _prompt_ids(local, prompt) == direct()
    local.chat_template = local.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert _prompt_ids(local, prompt) == direct() and _prompt_ids(local, "market") == _prompt_ids(local, "market")
    local.add_tokens(["market."])
    assert _prompt_ids(local, prompt) == direct() and local.convert_tokens_to_ids("market.") in direct()
    prompt = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]          # unhashable content
    assert _prompt_ids(local, prompt) == direct()
