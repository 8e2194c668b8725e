"""The lab: the code that VERIFIES and DEMONSTRATES sail_min, not the code that trains.

``sail_min/`` (the folder above) is what ``train()`` needs and what you copy into a project; nothing
there imports this package. Here:

    bandit.py             the exactly solvable contextual bandit: closed-form optimum, exact objectives,
                          sampled training through the same route -> loss function as the LM loop
    fixed_points.py       each variant's exact fixed point, coefficient sweeps, the decomposition of a gap
    bandit_comparison.py  every method at equal label budgets on the bandit: table, plots, JSON
    check.py              ``python -m sail_min check``: the derivation verified numerically
    findings.py           paired differences, their standard errors and the verdict words computed from them
    sentiment.py          the toy task: a tiny policy, prompts, pairs and a third-party judge (VADER)
    compare.py            several methods x seeds on a task: table, plots, results.json
    experiments.py        the main job (``python -m sail_min``) and its full sweep on the toy task
"""
