"""The metrics file's schema, pinned: every key of every line, with its type, is listed once (``metrics.SCHEMA``);
a renamed, added or retyped key fails here."""
import ast
import json
from pathlib import Path

from sail_min.config import SAILConfig
from sail_min.lab.sentiment import load_base_model, load_sentiment_task
from sail_min.metrics import SCHEMA
from sail_min.train import Task, train

PACKAGE = Path(__file__).resolve().parents[1] / "sail_min"


def keys(when: str) -> set[str]:
    return {name for name, (_, at) in SCHEMA.items() if at == when}


def test_every_line_of_a_run_has_exactly_the_schema_s_keys_and_types(tmp_path):
    """Mutant: a key of ``step_record`` renamed (e.g. ``judge_truncated_inputs``) or its value retyped."""
    sentiment = load_sentiment_task()
    task = Task(sentiment.preferences()[:8], sentiment.train_prompts[:8], sentiment.eval_prompts, sentiment.judge,
                sentiment.bt_temperature)
    config = SAILConfig.preset("sail-pr", steps=2, pairs_per_step=4, eval_every=2, eval_prompts=2, max_new_tokens=4,
                               output_dir=str(tmp_path))
    history = train(config, *load_base_model(), task, progress=False)
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == json.loads(json.dumps(history))
    plain, evaluation = written
    assert set(plain) == keys("step")
    assert set(evaluation) == keys("step") | keys("eval")
    for line in written:
        for name, value in line.items():
            types = SCHEMA[name][0]
            assert isinstance(value, types) and (bool in (types if isinstance(types, tuple) else (types,))
                                                  or not isinstance(value, bool)), (name, value)


def test_the_skipped_step_keys_are_the_schema_s():
    """``diagnostics.explain_skipped_step``'s keys (read from its source) are the schema's "skip" keys."""
    tree = ast.parse((PACKAGE / "diagnostics.py").read_text())
    literal = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
               and isinstance(node.value, str) and node.value.startswith("skip/")}
    assert literal == keys("skip")
