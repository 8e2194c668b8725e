"""SAILConfig: one default per knob, presets as plain overrides, routes, JSON round trip, errors."""
import ast
import dataclasses
import inspect
import json

import pytest
import torch

import sail_min.config as config_module
from sail_min.config import PRESETS, ROUTES, SAILConfig


def test_presets_are_overrides_of_the_defaults_with_the_public_codes_values():
    for name, overrides in PRESETS.items():
        config = SAILConfig.preset(name)
        defaults = SAILConfig()
        changed = {f.name for f in dataclasses.fields(SAILConfig) if getattr(config, f.name) != getattr(defaults, f.name)}
        assert changed == {k for k, v in overrides.items() if getattr(defaults, k) != v}, name
    # the public code's defaults (configs/tasks.yaml)
    assert (SAILConfig.preset("sail-pr").route_pr, SAILConfig.preset("sail-pr").pr_response_coef) == (0.3, 0.3)
    assert (SAILConfig.preset("sail-pp").route_pp, SAILConfig.preset("sail-pp").pp_coef) == (0.3, 0.2)
    assert (SAILConfig.preset("sail-dp").route_dp, SAILConfig.preset("sail-dp").dp_label_coef) == (0.4, 0.2)
    assert SAILConfig.preset("sail-pp", steps=7).steps == 7


def test_routes_map_to_per_pair_coefficients():
    c = SAILConfig(route_dpo=0.1, route_dp=0.2, route_pp=0.3, route_pr=0.4, dp_label_coef=1, pp_coef=2,
                   pr_response_coef=3)
    response, label = c.coefficients(torch.tensor([0, 1, 2, 3]), torch.float64)
    assert ROUTES == ("dpo", "dp", "pp", "pr")
    assert response.tolist() == [0, 0, 2, 3] and label.tolist() == [0, 1, 2, 0]


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="unknown preset"):
        SAILConfig.preset("sail-xx")
    with pytest.raises(ValueError, match=r"unknown SAILConfig field\(s\) \['stpes'\]"):
        SAILConfig.preset("sail-pr", stpes=3)
    with pytest.raises(ValueError, match="must be 1"):
        SAILConfig(route_dpo=0.5)
    for field, value in [("beta", 0), ("lr", -1e-3), ("steps", 0), ("pp_coef", -0.2),
                         ("baseline", "mean"), ("optimizer", "sgd"), ("route_pr", 0.5),
                         ("response_mode", "hook"), ("temperature", float("nan")), ("max_grad_norm", float("nan")),
                         ("weight_decay", -1.0), ("steps", True), ("seed", -1), ("generation_shapes", "any"),
                         ("generation_compile", "max"), ("cudagraph_isolation", "yes"), ("output_dir", "")]:
        with pytest.raises(ValueError, match=field):
            SAILConfig(**{field: value})


def test_tempered_sampling_with_the_exact_response_term_warns():
    with pytest.warns(UserWarning, match="temperature 1"):
        SAILConfig.preset("sail-pr", temperature=0.7)


def test_config_json_round_trip_and_errors_name_the_file(tmp_path):
    config = SAILConfig.preset("sail-pp", steps=3, lr=1e-4)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert SAILConfig.from_json(path) == config
    path.write_text('{"steps": 3, "nope": 1}')
    with pytest.raises(ValueError, match=r"config.json: unknown SAILConfig field\(s\) \['nope'\]"):
        SAILConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object"):
        SAILConfig.from_json(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="config.json: not a readable JSON config"):
        SAILConfig.from_json(path)


def test_every_field_has_a_docstring():
    tree = ast.parse(inspect.getsource(config_module))
    documented = set()
    for cls in [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SAILConfig"]:
        for a, b in zip(cls.body, cls.body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                documented.add(a.target.id)
    assert {f.name for f in dataclasses.fields(SAILConfig)} <= documented


def test_prompt_format_is_read_under_its_deprecated_name():
    """``text_prompts`` (read like a boolean) is now ``prompt_format``; an older config.json or --set still works."""
    import warnings as w

    from sail_min.cli import parse_set

    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        assert SAILConfig.from_dict({"text_prompts": "text"}).prompt_format == "text"
        assert parse_set(["text_prompts=text"], SAILConfig().to_dict()) == {"prompt_format": "text"}
    assert sum("prompt_format" in str(c.message) for c in caught) == 2
    with pytest.raises(ValueError, match="both 'text_prompts'"):
        SAILConfig.from_dict({"text_prompts": "text", "prompt_format": "chat"})
    assert SAILConfig.choices()["prompt_format"] == ("chat", "text")
def test_the_config_s_choice_lists_are_the_sampler_s():
    """A value SAILConfig accepts is one the sampler accepts, and the other way round: the generation settings'
    choices (``SAILConfig.choices()``) equal what ``sail_min.sampling`` defines and checks."""
    from sail_min import sampling

    choices = SAILConfig.choices()
    assert choices["generation_cache"] == sampling.CACHES
    assert choices["generation_compile"] == tuple(sampling.COMPILE_MODES)
    assert choices["prompt_format"] == sampling.PROMPT_FORMATS
