"""sail_min.checkpoint: exact round trips (plain and LoRA), and files that are refused."""
import pickle
from dataclasses import asdict

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sail_min.checkpoint import (
    FORMAT, RESUMABLE_CHANGES, CheckpointError, load_checkpoint, restore, save_checkpoint,
)
from sail_min.config import SAILConfig

CONFIG = asdict(SAILConfig.preset("sail-pr", steps=10, output_dir="outputs/a"))
COUNTERS = {"skipped_steps": 1, "truncated_prompts": 3, "judge_queries": 12}


def tiny_qwen(seed=0):
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=1, pad_token_id=0)
    return Qwen2ForCausalLM(config)


def tiny_lora(seed=0):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(tiny_qwen(0), lora)          # the same base weights every time
    torch.manual_seed(seed)                                    # ...and seed-dependent adapters
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data.normal_(std=0.1)
    return model


def adam(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


def take_step(model, optimizer, seed=1):
    ids = torch.randint(2, 64, (2, 6), generator=torch.Generator().manual_seed(seed))
    optimizer.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_optimizer_state(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for key in a["state"][i]:
            assert torch.equal(a["state"][i][key], b["state"][i][key]), (i, key)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
@pytest.mark.parametrize("make", [tiny_qwen, tiny_lora], ids=["full", "lora"])
def test_round_trip_is_exact_and_the_next_step_matches(tmp_path, make):
    model = make(0)
    optimizer = adam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    take_step(model, optimizer)
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, model=model, optimizer=optimizer, next_step=7, counters=COUNTERS,
                    config=CONFIG, scaler=scaler)
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]   # no temporary file left

    state = load_checkpoint(path, map_location="cpu")
    assert state["format"] == FORMAT
    if make is tiny_lora:
        assert state["model"] and all("lora_" in name for name in state["model"])  # adapters only

    other = make(1)                                   # other trainable weights, fresh optimizer
    other_optimizer, other_scaler = adam(other), torch.amp.GradScaler("cpu", init_scale=8.0)
    assert any(not torch.equal(a, b) for a, b in zip(trainable(model).values(), trainable(other).values()))
    next_step, counters = restore(state, other, other_optimizer, other_scaler,
                                  config={**CONFIG, "steps": 20, "output_dir": "outputs/b"})  # resumable changes
    assert (next_step, counters) == (7, COUNTERS)
    for (name, a), (other_name, b) in zip(trainable(model).items(), trainable(other).items()):
        assert name == other_name and torch.equal(a, b), name
    assert_same_optimizer_state(optimizer.state_dict(), other_optimizer.state_dict())
    assert other_scaler.state_dict() == scaler.state_dict()
    if make is tiny_lora:                             # the frozen base is untouched, and the same
        for (name, a), (_, b) in zip(model.named_parameters(), other.named_parameters()):
            assert torch.equal(a, b), name

    take_step(model, optimizer, seed=2)               # one more step: identical on both
    take_step(other, other_optimizer, seed=2)
    for (name, a), (_, b) in zip(trainable(model).items(), trainable(other).items()):
        assert torch.equal(a, b), name


def test_saving_again_replaces_the_file_and_refuses_non_plain_config(tmp_path):
    model = tiny_qwen()
    optimizer = adam(model)
    path = tmp_path / "checkpoint.pt"
    for step in (2, 4):
        save_checkpoint(path, model=model, optimizer=optimizer, next_step=step, counters={}, config=CONFIG)
    assert load_checkpoint(path)["next_step"] == 4
    with pytest.raises(TypeError, match=r"config\['output_dir'\] is a PosixPath"):
        save_checkpoint(path, model=model, optimizer=optimizer, next_step=5, counters={},
                        config={**CONFIG, "output_dir": tmp_path})
    assert load_checkpoint(path)["next_step"] == 4                      # the old one is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


class CreatesAFile:
    """Unpickling this object calls open(target, "w"): it creates a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("writer", ["torch.save", "pickle protocol 2", "pickle protocol 5"])
def test_a_malicious_pickle_is_refused_without_running_it(tmp_path, writer):
    target = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    payload = {"format": FORMAT, "model": CreatesAFile(target)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=int(writer[-1]))

    with pytest.raises(CheckpointError, match="refused") as error:
        load_checkpoint(path)
    assert not target.exists()                    # nothing from the file ran
    message = str(error.value)
    assert str(path) in message and "weights_only=False" in message and "trust" in message
    if writer != "pickle protocol 5":             # (there the safe loader stops at an opcode first)
        assert "Unsupported global: GLOBAL io.open" in message
    assert isinstance(error.value, ValueError)

    if writer == "torch.save":                    # the payload is real: an unsafe load runs it
        torch.load(path, weights_only=False)["model"].close()
        assert target.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "json"])
def test_a_damaged_file_is_refused_naming_it(tmp_path, damage):
    path = tmp_path / "checkpoint.pt"
    model = tiny_qwen()
    save_checkpoint(path, model=model, optimizer=adam(model), next_step=1, counters={}, config=CONFIG)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\x01 not a torch file",
                      "empty": b"", "json": b'{"format": "sail_min.checkpoint/1"}'}[damage])
    with pytest.raises(CheckpointError, match="not a readable torch file") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_other_torch_files_are_not_sail_min_checkpoints(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(CheckpointError, match=r"not a sail_min checkpoint.*\['a'\]") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a sail_min checkpoint.*Tensor"):
        load_checkpoint(path)
    torch.save({"format": "sail_min.checkpoint/99"}, path)
    with pytest.raises(CheckpointError, match="format 'sail_min.checkpoint/99'"):
        load_checkpoint(path)
    torch.save({"format": FORMAT, "model": {}}, path)
    with pytest.raises(CheckpointError, match="without .*'optimizer'"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nothing.pt")


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # inside peft
def test_changed_settings_and_other_models_are_refused_before_loading(tmp_path):
    path = tmp_path / "checkpoint.pt"
    model = tiny_qwen()
    optimizer = adam(model)
    take_step(model, optimizer)
    save_checkpoint(path, model=model, optimizer=optimizer, next_step=3, counters=COUNTERS, config=CONFIG)
    state = load_checkpoint(path)
    assert set(RESUMABLE_CHANGES) == {"steps", "output_dir", "eval_every", "checkpoint_every", "judge_timeout_s"}

    fresh = tiny_qwen(1)
    before = trainable(fresh)
    with pytest.raises(CheckpointError, match=r"other settings: \['beta', 'lr'\]") as error:
        restore(state, fresh, adam(fresh), config={**CONFIG, "beta": 0.2, "lr": 1.0, "steps": 99}, path=path)
    assert str(path) in str(error.value) and "0.1 -> 0.2" in str(error.value)
    with pytest.raises(CheckpointError, match=r"other settings: \['new_field'\]"):
        restore(state, fresh, adam(fresh), config={**CONFIG, "new_field": 1})
    with pytest.raises(CheckpointError, match=r"other settings: \['steps'\]"):     # a narrower allow-list
        restore(state, fresh, adam(fresh), config={**CONFIG, "steps": 99}, resumable_changes=())

    lora = tiny_lora()                               # adapters expected, full weights saved
    with pytest.raises(CheckpointError, match=r"does not fit this model: unexpected weights \[") as error:
        restore(state, lora, adam(lora), config=CONFIG)
    assert "'lm_head.weight'" in str(error.value) and "missing weights ['base_model.model." in str(error.value)
    assert "lora_A" in str(error.value)
    bigger = Qwen2ForCausalLM(Qwen2Config(**{**fresh.config.to_dict(), "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"weights of other shapes \['model.layers.0.mlp"):
        restore(state, bigger, adam(bigger), config=CONFIG)
    for name, p in trainable(fresh).items():          # nothing was loaded by the refusals
        assert torch.equal(p, before[name]), name

    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        restore(state, fresh, torch.optim.AdamW(list(fresh.parameters())[:2]), config=CONFIG)


# --------------------------------------------------------------------------------------
# every file the package loads, loaded safely
# --------------------------------------------------------------------------------------
def test_every_torch_load_in_the_package_is_weights_only_and_nothing_unpickles():
    """Mutant: a ``torch.load`` without ``weights_only=True`` anywhere in sail_min (the skipped-step replay
    included), or a plain ``pickle.load``: a crafted file would run code. Read from the source (the AST)."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "sail_min"
    loads, unsafe = [], []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            where = f"{path.relative_to(package.parent)}:{node.lineno} {name}"
            if name.endswith(("pickle.load", "pickle.loads", "Unpickler", "numpy.load", "np.load", "dill.load")):
                unsafe.append(where)
            if name == "torch.load" or name.endswith(".torch.load"):
                loads.append(where)
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    unsafe.append(where)
    assert not unsafe, unsafe
    assert {where.split(":")[0] for where in loads} == {"sail_min/checkpoint.py", "sail_min/train.py"}


def test_the_skipped_step_replay_refuses_a_crafted_file_without_running_it(tmp_path):
    from sail_min.train import replay_skipped_step

    target, path = tmp_path / "pwned", tmp_path / "step_000001.pt"
    torch.save({"step": 1, "config": CONFIG, "routes": CreatesAFile(target)}, path)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
        replay_skipped_step(path, tiny_qwen())
    assert not target.exists()
