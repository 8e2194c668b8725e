"""Verdict words are computed, not typed: a lint over every notebook's markdown and the README.

A sentence that compares measured numbers prints or quotes ``sail_min.lab.findings`` (difference, SE, n and the
verdict "above" / "below" / "level within noise (±x)", decided at one threshold). This test finds the sentences of
the markdown cells of ``notebooks/*.ipynb`` and of README.md that use a verdict word, and fails on each one that

* does not quote the helper (a quote carries its "(SE, n=...)" or "level within noise"), and
* is not in ``ALLOWED``: sentences whose word is not about a measured number (an exact identity, a definition,
  a derivation), each with its reason. Positions in the file ("printed above", "the table below") are not
  verdicts and are removed first (``POSITIONAL``).

Every offending (file, sentence) is reported at once, so that they can be fixed in one pass. README.md is linted in
its sections (``## ...``), and its generated bandit block (between the ``bandit-findings`` markers) on its own.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VERDICT_WORDS = ("above", "below", "within noise", "better", "worse", "outperform", "beats", "beat ", "significant",
                 "ahead", "behind", "superior", "inferior", "wins over")
"""Words that state a comparison's verdict."""
WORD = re.compile(r"\b(" + "|".join(re.escape(w.strip()) for w in VERDICT_WORDS) + r")", re.IGNORECASE)
QUOTE = re.compile(r"\(SE, n=\d+\)|level within noise \(±")
"""The helper's own output (``str(findings.Paired)`` and its verdict)."""

POSITIONAL = re.compile(r"\b(?:printed|shown|plotted|measured|listed|cell|cells|line|lines|table|tables|checker|printout|"
                        r"figure|plot|section|sections|list|row|rows|text|column)\s+(?:above|below)\b|^Below,\s|"
                        r"\((?:printed |see )?(?:above|below)\)|significant (?:digits|figures)|\b(?:above|below)\s+(?:it|them|this)\b|"
                        r"\b(?:above|below)\s*[:.]|\b(?:above|below)\s+(?:zero|0|-?\d|\$|the (?:figure|table|plot|cell|"
                        r"bandit|reduction))|\bthe (?:[\w`'-]+ ){1,3}(?:above|below)\b|\b(?:above|below),|"
                        r"\b(?:comes?|come|is|are|print(?:s|ed)?|says?|follows?|written|drawn) (?:\w+ ){0,2}(?:above|below)\b",
                        re.IGNORECASE)
"""Where a thing is in the file ("printed above", "the table below", "Below, ...") or "significant digits": not a
verdict; removed first."""

ALLOWED = {
    # notebook 02: definitions and exact (enumerated, not sampled) quantities
    ("02_bandit_dynamics.ipynb", "lands on responses whose true reward is **below $\\pi^*$'s mean reward**"):
        "defines where mass goes (an exact fixed point's property, not a comparison of runs)",
    ("02_bandit_dynamics.ipynb", "both reach $\\pi^*$ (KL below $10^{-3}$"):
        "exact flows (no sampling) against a stated threshold, asserted",
    ("02_bandit_dynamics.ipynb", "compute the share of the mass it gains over $\\pi^*$ that lands on"):
        "the exercise's definition of the share",
    ("02_bandit_dynamics.ipynb", "mass on responses clearly *worse* than the good ones it already samples"):
        "worse = lower true reward r*, a known constant of the problem (no sampling)",
    ("02_bandit_dynamics.ipynb", "a pair is always won by its better response, so DPO can always fit it better"):
        "the deterministic judge's rule, and the DPO logit's limit (a derivation)",
    ("02_bandit_dynamics.ipynb", "The clip removes the weight mass above the clip"):
        "defines what the clip does (exact)",
    ("02_bandit_dynamics.ipynb", "A point is marked when the clip moves the exact term by more than"):
        "the marking rule (a stated threshold)",
    ("02_bandit_dynamics.ipynb", "for SAIL-PR, mass on clearly worse responses"):
        "worse = lower true reward r*, a known constant of the problem (exact fixed points)",
    # notebook 01: the derivation's own words (what a term does to a pair, exactly), and the header's question
    ("01_sail_objective.ipynb", "* **without a baseline** ($b=0$) it lowers the likelihood of **every** sampled pair"):
        "what the response term does to a pair with f above or below its baseline: a derivation, not a measurement",
    ("01_sail_objective.ipynb", "* self-labelled pairs carry no DPO signal in expectation"):
        "the summary of derived facts (worse-fitted = larger f), not a comparison of runs",
    ("01_sail_objective.ipynb", "[exercises/01_sail_objective.ipynb](exercises/01_sail_objective.ipynb)"):
        "the header's question for notebook 02 ('a better policy?')",
    # positions in the file the positional pattern does not catch
    ("03_logprobs_and_sampling.ipynb", "Below the same two sequences are scored padded left"): "a position",
    ("05_training_loop.ipynb", "* **4. loss** (`pair_loss`)"): "a position ('walked through below')",
    ("05_training_loop.ipynb", "What the live numbers say, one comparison at a time"): "a position ('each comparison below')",
    ("05_training_loop.ipynb", "Iterative DPO labels one round of 16 pairs every 4 steps"): "a position ('no verdict below')",
    ("07_real_model_gpu.ipynb", "* `smoke`: the same cells on the tiny toy models"): "a position ('below (section 1)')",
    ("README.md", "On the tiny CPU model, SAIL/DPO step time was 1.03x"): "a position (a section 'above')",
    # definitions of the verdict words themselves, and of thresholds
    ("05_training_loop.ipynb", "Runs with the same seed see the same prompts in the same order"):
        "defines the verdict words of findings.paired",
    ("README.md", "It prints a table (per method: judge reward, win rate, KL to the base"):
        "says what the printout's verdicts are",
    ("05_training_loop.ipynb", "A matched KL below a run's first evaluation is still on its trajectory"):
        "defines which runs reach a matched KL (a threshold), not a verdict",
    ("04_preference_labels.ipynb", "A copy of the policy is fine-tuned for 30 steps on the chosen responses"):
        "a ranking of chosen over rejected pairs, whose share is printed and asserted; not a comparison of methods",
}
"""(file, the start of a sentence) -> why its verdict word is not about a measured number."""


def sentences(text: str) -> list[str]:
    """Markdown text -> sentences (code blocks, HTML comments and table rules dropped; newlines joined)."""
    text = re.sub(r"```.*?```", " ", text, flags=re.DOTALL)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.DOTALL)
    text = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?:])\s+(?=[A-Z*(\[$])", text) if s.strip()]


def markdown_of(path: Path) -> list[tuple[str, str]]:
    """(part name, markdown text) of a notebook (one part) or of README.md (its sections, the bandit block apart)."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        return [(path.name, "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown"))]
    text = path.read_text()
    block = re.search(r"<!-- bandit-findings: begin.*?-->(.*?)<!-- bandit-findings: end -->", text, flags=re.DOTALL)
    parts = []
    if block:
        parts.append(("README.md (bandit findings)", block.group(1)))
        text = text.replace(block.group(0), "")
    for section in re.split(r"\n(?=## )", text):
        title = section.splitlines()[0].lstrip("# ").strip() if section.strip() else ""
        parts.append((f"README.md ({title})", section))
    return parts


def offenders(part: str, text: str) -> list[str]:
    file = part.split(" ")[0]
    bad = []
    for sentence in sentences(text):
        if not WORD.search(POSITIONAL.sub(" ", sentence)) or QUOTE.search(sentence):
            continue
        if any(f == file and start in sentence for f, start in ALLOWED):
            continue
        bad.append(sentence)
    return bad


PARTS = [part for path in sorted((ROOT / "notebooks").glob("*.ipynb")) + [ROOT / "README.md"]
         for part in markdown_of(path)]


@pytest.mark.parametrize("part,text", PARTS, ids=[p for p, _ in PARTS])
def test_no_hand_written_verdict_about_a_measured_number(part, text):
    bad = offenders(part, text)
    assert not bad, f"{part}: {len(bad)} sentence(s) state a verdict by hand (print or quote findings.paired):\n" + \
        "\n".join(f"  - {s}" for s in bad)


def test_every_allowed_sentence_still_exists():
    """An allow-list entry whose sentence is gone is removed, so the list cannot grow stale."""
    texts = {}
    for part, text in PARTS:
        texts.setdefault(part.split(" ")[0], []).append(" ".join(sentences(text)))
    missing = [(f, start) for f, start in ALLOWED if not any(start in t for t in texts.get(f, []))]
    assert not missing, missing


def test_the_lint_catches_a_hand_typed_verdict_and_passes_a_quoted_one():
    assert offenders("x.ipynb", "SAIL-PR is better than its control at 1024 labels.")
    assert offenders("x.ipynb", "The two are within noise of each other.")
    assert not offenders("x.ipynb", "SAIL-PR minus its control: +0.054 ± 0.015 (SE, n=100): above.")
    assert not offenders("x.ipynb", "The response term follows the gradient of the log-likelihood.")
    assert not offenders("x.ipynb", "Both reach pi* (printed above); the table below has the rest.")
    assert offenders("x.ipynb", "SAIL-PR ends above its control (printed above).")
