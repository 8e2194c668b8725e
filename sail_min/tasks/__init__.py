"""Toy tasks for sail_min: a corpus, a tiny base policy trained on it, and a judge.

`sentiment`: continue the start of a short review; the judge (VADER, a third-party
sentiment lexicon) rewards positive text. Built by `data/make_sentiment_task.py`. Importing this
package does not import vaderSentiment: building a `VaderJudge` does. The experiments on the task
are `sail_min.experiments`.
"""
from sail_min.tasks.sentiment import (
    BT_TEMPERATURE,
    SentimentTask,
    VaderJudge,
    bradley_terry_choose_first,
    label_agreement,
    load_base_model,
    load_sentiment_task,
    task_for_method,
    read_jsonl,
    sentiment_task,
)

__all__ = [
    "BT_TEMPERATURE",
    "SentimentTask",
    "VaderJudge",
    "bradley_terry_choose_first",
    "label_agreement",
    "load_base_model",
    "load_sentiment_task",
    "task_for_method",
    "read_jsonl",
    "sentiment_task",
]
