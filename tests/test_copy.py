"""Copying is a use case: objective.py, logprobs.py and sampling.py each work as a lone file in another
project, and the folder sail_min/ without its lab (sail_min/lab/) runs a 2-step train()."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "tiny"


def run_alone(folder: Path, script: str) -> str:
    """Run ``script`` in ``folder`` with nothing of this checkout importable (no PYTHONPATH, a fresh cwd)."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONNOUSERSITE": "1"}
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(folder)!r})\n"
                             + textwrap.dedent(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def no_sail_min(script: str) -> str:
    """Fail loudly if the installed sail_min (not the copy) gets imported."""
    return textwrap.dedent(script) + "\nassert 'sail_min' not in sys.modules, 'the copy imported the installed package'\n"


def test_objective_py_alone(tmp_path):
    shutil.copy(ROOT / "sail_min" / "objective.py", tmp_path)
    out = run_alone(tmp_path, no_sail_min("""
        import torch, objective
        l = torch.tensor([-3.0, -2.0], requires_grad=True)
        loss = objective.sail_loss(l[:1], l[1:], torch.tensor([-2.5]), torch.tensor([-2.5]), beta=0.1,
                                   response_coef=torch.tensor([0.3]), label_coef=torch.tensor([0.0]))
        loss.loss.backward()
        print("loss", float(loss.loss), "finite grad", bool(torch.isfinite(l.grad).all()))
    """))
    assert "finite grad True" in out


def test_logprobs_py_alone(tmp_path):
    shutil.copy(ROOT / "sail_min" / "logprobs.py", tmp_path)
    out = run_alone(tmp_path, no_sail_min(f"""
        import torch, logprobs
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(TINY / 'policy')!r})
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        mask = torch.ones_like(ids)
        response = torch.tensor([[0, 0, 1, 1, 1]])
        lean = logprobs.sequence_logprobs(model, ids, mask, response)
        naive = model(ids).logits.log_softmax(-1)[0, 1:4].gather(-1, ids[0, 2:5, None]).sum()
        assert torch.allclose(lean, naive.reshape(1), atol=1e-5), (lean, naive)
        ref = logprobs.ReferenceModel(model)
        print("ok", float(lean), float(ref.logprobs(ids, mask, response)))
    """))
    assert out.startswith("ok")


def test_sampling_py_alone(tmp_path):
    shutil.copy(ROOT / "sail_min" / "sampling.py", tmp_path)
    out = run_alone(tmp_path, no_sail_min(f"""
        import sampling
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(TINY / 'policy')!r})
        tokenizer = AutoTokenizer.from_pretrained({str(TINY / 'policy')!r})
        samples = sampling.sample_responses(model, tokenizer, ["Tell me about the market."], k=2, max_new_tokens=6,
                                            seed=0)
        encoded = sampling.encode_responses(tokenizer, ["Tell me about the market."], ["Lovely."], max_tokens=8)
        sampler = sampling.Sampler(tokenizer, max_new_tokens=6, temperature=1.0, prompt_format="chat", cache="dynamic",
                                   compile="off", isolate=True)
        again = sampler(model, ["Tell me about the market."], k=2, seed=0)
        assert again.texts == samples.texts                       # the sampler is sample_responses with its settings
        print("ok", len(samples), samples.model_inputs()["input_ids"].shape[0], len(encoded))
    """))
    assert out.startswith("ok 2 2 1")


def test_the_folder_without_its_lab_runs_two_steps(tmp_path):
    package = tmp_path / "mysail"
    shutil.copytree(ROOT / "sail_min", package, ignore=shutil.ignore_patterns("lab", "__pycache__"))
    out = run_alone(tmp_path, no_sail_min(f"""
        import json
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from mysail.config import SAILConfig
        from mysail.train import Task, train
        rows = [json.loads(line) for line in open({str(TINY / 'preferences.jsonl')!r})]
        task = Task(preferences=rows, train_prompts=[r["prompt"] for r in rows], eval_prompts=[r["prompt"] for r in rows[:4]],
                    judge=lambda prompts, responses: [float(len(r)) for r in responses])
        model = AutoModelForCausalLM.from_pretrained({str(TINY / 'policy')!r})
        tokenizer = AutoTokenizer.from_pretrained({str(TINY / 'policy')!r})
        config = SAILConfig.preset("sail-pr", steps=2, pairs_per_step=4, eval_prompts=4, max_new_tokens=6,
                                   output_dir={str(tmp_path / 'run')!r})
        history = train(config, model, tokenizer, task, progress=False)
        print("steps", [h["step"] for h in history])
    """))
    assert "steps [0, 1]" in out
    assert not (package / "lab").exists()
