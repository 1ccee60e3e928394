"""Engine settings and per-request keys: parsing, defaults and error messages."""

from __future__ import annotations

import pytest
import torch

from vllm_recontrol.config import (UNCONTROLLED, EngineSettings, RowControl, check_request_args,
                                   looks_like_request_key, resolve_request)
from vllm_recontrol.errors import ConfigError, RequestParamsError


def settings(**section):
    return EngineSettings.from_additional_config({"recontrol": {"value_head": "/h", **section}})


def test_defaults_are_the_papers():
    s = settings()
    assert (s.alpha, s.steps, s.default_on, s.max_norm) == (0.5, 30, True, None)


def test_request_overrides_engine_defaults():
    s = settings(alpha=0.5, steps=10)
    assert resolve_request({}, s) == RowControl(0.5, 10)
    assert resolve_request(None, s) == RowControl(0.5, 10)
    assert resolve_request({"recontrol_alpha": 2}, s) == RowControl(2.0, 10)
    assert resolve_request({"recontrol_steps": 3.0}, s) == RowControl(0.5, 3)
    assert resolve_request({"recontrol": 0, "recontrol_steps": 3}, s) == UNCONTROLLED
    assert resolve_request({"recontrol": "false"}, s) == UNCONTROLLED


def test_default_off_engine_controls_only_requests_that_ask():
    s = settings(default_on=False, steps=7)
    assert resolve_request({}, s) == UNCONTROLLED
    assert resolve_request({"recontrol": 1}, s) == RowControl(0.5, 7)
    assert resolve_request({"recontrol_alpha": 1.0}, s) == RowControl(1.0, 7)
    s = settings(default_on=False, steps=7, value_heads={"mc": "/heads/mc"})
    assert resolve_request({"recontrol_head": "mc"}, s) == RowControl(0.5, 7, head="mc")
    assert resolve_request({"recontrol_head": "mc", "recontrol": 0}, s) == UNCONTROLLED


def test_unrelated_extra_args_are_ignored():
    check_request_args({"my_other_plugin": {"x": 1}, "alpha": 2.0, "steps": 3,
                        "control": 1, "max_norm": 1.0}, max_steps=10)
    # another steering plugin's names, close to ours but not misspellings of them
    check_request_args({"control_alpha": 2.0, "control_steps": 3, "control_head": "x",
                        "control_max_norm": 1.0}, max_steps=10)


@pytest.mark.parametrize("key, meant", [
    ("recontol_alpha", "recontrol_alpha"), ("re_control_steps", "recontrol_steps"),
    ("re-control", "recontrol"), ("recontrl", "recontrol"),
    ("Re-Control-Max-Norm", "recontrol_max_norm"), ("recntrol_head", "recontrol_head"),
])
def test_near_misses_of_request_keys_are_refused_not_ignored(key, meant):
    """A misspelt key would run the request on the engine's defaults without a word."""
    with pytest.raises(RequestParamsError, match=rf"'{key}' \(did you mean '{meant}'\?\)"):
        check_request_args({key: 1}, max_steps=10)


@pytest.mark.parametrize("args, message", [
    ({"recontrol_alpha": "big"}, "recontrol_alpha must be a number"),
    ({"recontrol_alpha": float("nan")}, "finite"),
    ({"recontrol_alpha": True}, "must be a number"),
    ({"recontrol_steps": -1}, "integer >= 0"),
    ({"recontrol_steps": 11}, "exceeds this engine's max_steps = 10"),
    ({"recontrol": 2}, "must be 0 or 1"),
    ({"recontrol_norm": 1.0}, "unknown RE-Control request key"),
    ({"Recontrol_Alpha": 1.0}, r"unknown RE-Control request key\(s\) \['Recontrol_Alpha'\]"),
    ({"RECONTROL_STEPS": 3}, "unknown RE-Control request key"),
    ({"recontrol_max_norm": 0}, "recontrol_max_norm must be a finite number > 0"),
    ({"recontrol_max_norm": -1.0}, "recontrol_max_norm must be a finite number > 0 "),  # not >= 0
    ({" recontrol_alpha": 1.0}, r"unknown RE-Control request key\(s\) \[' recontrol_alpha'\]"),
    ({"recontrol_max_norm": float("inf")}, "finite"),
    ({"recontrol_max_norm": 1e-46}, "recontrol_max_norm must be > 0 in float32"),  # rounds to 0
    ({"recontrol_max_norm": "1"}, "recontrol_max_norm must be a number"),
    ({"recontrol_alpha": 10 ** 400}, "recontrol_alpha must be a finite number >= 0, got an "
                                     "integer of 401 digits"),
    ({"recontrol_alpha": 1e39}, "at most 3.403e\\+38"),  # inf in the float32 ascent
    ({"recontrol_max_norm": 10 ** 400}, "recontrol_max_norm must be a finite number"),
])
def test_bad_request_values(args, message):
    with pytest.raises(RequestParamsError, match=message):
        check_request_args(args, max_steps=10)


def test_request_head_must_be_one_of_the_engine_heads():
    check_request_args({"recontrol_head": "safe"}, max_steps=10, heads=("default", "safe"))
    check_request_args({"recontrol_head": "default"}, max_steps=10)
    for bad in ("unsafe", 3, ["safe"]):
        with pytest.raises(RequestParamsError,
                           match=r"recontrol_head = .* is not one of this engine's value heads "
                                 r"\['default', 'safe'\]"):
            check_request_args({"recontrol_head": bad}, max_steps=10, heads=("default", "safe"))


def test_value_heads_and_the_request_head():
    s = settings(value_heads={"safe": "/heads/safe", "kind-2": "/heads/k"})
    assert s.head_paths == {"default": "/h", "kind-2": "/heads/k", "safe": "/heads/safe"}
    assert s.head_names == ("default", "kind-2", "safe")
    assert resolve_request({"recontrol_head": "safe"}, s) == RowControl(0.5, 30, head="safe")
    assert resolve_request({}, s) == RowControl(0.5, 30, head="default")
    assert resolve_request({"recontrol": 0, "recontrol_head": "safe"}, s) == UNCONTROLLED
    with pytest.raises(RequestParamsError, match="not one of"):
        resolve_request({"recontrol_head": "nope"}, s)
    assert settings().head_names == ("default",)


def test_a_further_head_may_bring_its_own_alpha_and_steps():
    s = settings(alpha=0.5, steps=30, max_steps=100,
                 value_heads={"td": {"path": "/heads/td", "alpha": 2.0, "steps": 50},
                              "mc": {"path": "/heads/mc", "steps": 0}, "plain": "/heads/p"})
    assert s.head_paths == {"default": "/h", "mc": "/heads/mc", "plain": "/heads/p",
                            "td": "/heads/td"}
    assert resolve_request({"recontrol_head": "td"}, s) == RowControl(2.0, 50, head="td")
    assert resolve_request({"recontrol_head": "td", "recontrol_alpha": 1.0},
                           s) == RowControl(1.0, 50, head="td")
    assert resolve_request({"recontrol_head": "mc"}, s) == RowControl(0.5, 0, head="mc")
    assert resolve_request({"recontrol_head": "plain"}, s) == RowControl(0.5, 30, head="plain")
    assert resolve_request({}, s) == RowControl(0.5, 30)
    assert s.warm_up_counts == (30, 50)  # every head's default steps (0 is no ascent)
    assert [s.warm_up_counts_for(h) for h in s.head_names] == [(30,), (), (30,), (50,)]
    assert settings(warmup_steps=[7], value_heads={"td": {"path": "/t", "steps": 9}}
                    ).warm_up_counts == (7,)


def test_a_request_max_norm_tightens_its_heads_radius_and_never_loosens_it():
    s = settings(max_norm=2.0, default_on=False,
                 value_heads={"td": {"path": "/t", "max_norm": 0.5}, "free": "/f"})
    free = settings(value_heads={"td": "/t"})
    assert resolve_request({"recontrol_max_norm": 1.0}, s) == RowControl(0.5, 30, max_norm=1.0)
    assert resolve_request({"recontrol_max_norm": 3.0}, s).max_norm == 2.0
    assert resolve_request({"recontrol_max_norm": 3, "recontrol_head": "td"}, s).max_norm == 0.5
    assert resolve_request({"recontrol_max_norm": 0.1, "recontrol_head": "td"},
                           s).max_norm == 0.1
    assert resolve_request({"recontrol": 1, "recontrol_head": "td"}, s).max_norm == 0.5
    assert resolve_request({"recontrol": 1}, free).max_norm is None
    assert resolve_request({"recontrol_max_norm": 7}, free).max_norm == 7.0
    assert resolve_request({}, s) == UNCONTROLLED  # default_on false and no key of its own
    assert resolve_request({"recontrol": 0, "recontrol_max_norm": 1.0}, s) == UNCONTROLLED


def test_a_further_head_may_bring_its_own_max_norm():
    s = settings(max_norm=2.0, value_heads={"td": {"path": "/t", "max_norm": 0.5},
                                            "mc": "/heads/mc"})
    assert [s.max_norm_for(h) for h in s.head_names] == [2.0, 2.0, 0.5]
    assert settings(value_heads={"td": {"path": "/t", "max_norm": 1}}).max_norm_for("td") == 1.0
    assert settings(value_heads={"td": "/t"}).max_norm_for("td") is None


@pytest.mark.parametrize("value, message", [
    ({"td": {"path": "/t", "steps": 500}}, r"\['td'\]\[\"steps\"\] = 500 exceeds max_steps"),
    ({"td": {"path": "/t", "alpha": "big"}}, r"\['td'\]\[\"alpha\"\] must be a number"),
    ({"td": {"path": "/t", "beta": 1}}, r"unknown key\(s\) \['beta'\]"),
    ({"td": {"path": "/t", "max_norm": 0}}, r"\['td'\]\[\"max_norm\"\] must be a finite number > 0"),
    ({"td": {"path": "/t", "max_norm": "inf"}}, r"\['td'\]\[\"max_norm\"\] must be a number"),
    ({"td": {"path": "/t", "max_norm": 1e-46}}, r"max_norm\"\] must be > 0 in float32"),
    ({"td": {"alpha": 1.0}}, "must be the folder of a value head"),
    (["/heads/a"], "must be a JSON object"),
    ({"default": "/heads/a"}, "'default' is the engine's value_head"),
    ({"has space": "/heads/a"}, "head name 'has space'"),
    ({"-x": "/heads/a"}, "head name '-x'"),
    ({"x" * 65: "/heads/a"}, "1-64 letters"),
    ({"safe": ""}, r"\['safe'\] must be the folder of a value head"),
    ({"safe": 3}, "must be the folder"),
])
def test_bad_value_heads(value, message):
    with pytest.raises(ConfigError, match=message):
        settings(value_heads=value)


def test_request_errors_are_value_errors():
    """vLLM turns a ValueError from validate_params into an HTTP 400."""
    assert issubclass(RequestParamsError, ValueError)
    assert issubclass(ConfigError, ValueError)


def test_precision_and_cuda_graph_keys():
    s = settings()
    assert (s.precision, s.cuda_graphs) == ("auto", True)
    s = settings(precision="fp32", cuda_graphs="false")
    assert (s.precision, s.cuda_graphs) == ("fp32", False)
    assert settings(backend="triton", precision="bf16").precision == "bf16"


def test_ascent_form_key():
    assert settings().ascent_form == "auto"
    assert settings(ascent_form="gram").ascent_form == "gram"
    assert settings(backend="triton", ascent_form="direct").ascent_form == "direct"


def test_warmup_steps_default_to_the_engine_steps():
    assert settings().warm_up_counts == (30,)
    assert settings(steps=12).warm_up_counts == (12,)
    assert settings(steps=0).warm_up_counts == ()
    assert settings(warmup_steps=[50, 30, 50]).warm_up_counts == (30, 50)
    assert settings(warmup_steps=[]).warm_up_counts == ()  # warm-up off


def test_warmup_projected_key():
    assert settings().warmup_projected is False
    assert settings(warmup_projected=True).warmup_projected is True
    with pytest.raises(ConfigError, match=r'\["warmup_projected"\] must be 0 or 1'):
        settings(warmup_projected="yes")


def test_batch_invariant_key():
    assert settings().batch_invariant is None  # auto: vLLM's VLLM_BATCH_INVARIANT decides
    assert settings(batch_invariant="auto").batch_invariant is None
    assert settings(batch_invariant=True).batch_invariant is True
    assert settings(batch_invariant="0").batch_invariant is False
    with pytest.raises(ConfigError, match=r'\["batch_invariant"\] must be "auto", 0 or 1'):
        settings(batch_invariant="sometimes")


@pytest.mark.parametrize("value, message", [
    (30, "must be a list of step counts"),
    ("30", "must be a list of step counts"),
    ([0], r'\["warmup_steps"\]\[0\] must be an integer >= 1'),
    ([30, True], r'\["warmup_steps"\]\[1\] must be an integer'),
    ([30, 2.5], r'\["warmup_steps"\]\[1\] must be an integer'),
    ([300], "above max_steps = 200"),
])
def test_bad_warmup_steps(value, message):
    with pytest.raises(ConfigError, match=message):
        settings(warmup_steps=value)


@pytest.mark.parametrize("section, message", [
    ({"precision": "fp8"}, r'\["precision"\] must be one of'),
    ({"precision": 16}, r'\["precision"\] must be one of'),
    ({"backend": "torch", "precision": "bf16"}, "needs the triton backend"),
    ({"backend": "torch", "precision": "tf32"}, "needs the triton backend"),
    ({"cuda_graphs": "sometimes"}, "cuda_graphs"),
    ({"ascent_form": "gramian"}, r'\["ascent_form"\] must be one of'),
    ({"ascent_form": 1}, r'\["ascent_form"\] must be one of'),
])
def test_bad_precision_settings(section, message):
    with pytest.raises(ConfigError, match=message):
        settings(**section)


def test_engine_alpha_past_float32_and_a_non_object_additional_config_are_refused():
    with pytest.raises(ConfigError, match=r'\["alpha"\] must be a finite number'):
        settings(alpha=10 ** 400)
    with pytest.raises(ConfigError, match="additional_config must be a JSON object, got list"):
        EngineSettings.from_additional_config([("recontrol", {})])


def test_max_steps_below_the_default_steps_says_steps_was_the_default():
    with pytest.raises(ConfigError, match=r'\["steps"\] = 30 \(the default; set steps too\) '
                                          r"exceeds max_steps = 10"):
        settings(max_steps=10)
    with pytest.raises(ConfigError, match=r'\["steps"\] = 12 exceeds max_steps = 10; raise '
                                          r"max_steps \(up to 1000000\) or lower steps"):
        settings(max_steps=10, steps=12)


@pytest.mark.parametrize("section, message", [
    ({"max_steps": 10 ** 30}, r'\["max_steps"\] must be at most 1000000 \(STEPS_LIMIT\), '
                              r"got 10{30}"),
    ({"max_steps": 1_000_001}, r"at most 1000000 .* got 1000001"),
    ({"max_steps": 10 ** 5000}, r"at most 1000000 .* got an integer of 16610 bits"),
    ({"steps": 10 ** 20}, r'\["steps"\] = 10{20} exceeds max_steps = 200'),
    ({"value_heads": {"td": {"path": "/t", "steps": 10 ** 20}}}, r"exceeds max_steps = 200"),
])
def test_step_counts_are_bounded_by_the_steps_limit(section, message):
    """An unbounded max_steps let recontrol_steps = 10**20 through admission, and the
    engine then failed inside its forward pass packing it into an int64 tensor."""
    with pytest.raises(ConfigError, match=message):
        settings(**section)


def test_the_largest_max_steps_admits_requests_up_to_it():
    from vllm_recontrol.config import STEPS_LIMIT
    from vllm_recontrol.controller import RowControls

    s = settings(max_steps=STEPS_LIMIT)
    with pytest.raises(RequestParamsError, match="exceeds this engine's max_steps = 1000000"):
        resolve_request({"recontrol_steps": 10 ** 20}, s)
    control = resolve_request({"recontrol_steps": STEPS_LIMIT}, s)
    rows = RowControls()
    rows.reset(torch.device("cpu"))
    rows.set(0, control)
    rows.resize(1)
    rows.arm()
    assert rows.take(1)[0].max_steps == STEPS_LIMIT


@pytest.mark.parametrize("section, message", [
    (None, r'additional_config\["recontrol"\] is null; it must be a JSON object'),
    ({1: 2, "zz": 3}, r"unknown key\(s\) \['zz', 1\]"),
    ({"value_head": "h", "value_heads": {"a": {1: 2, "path": "p"}}},
     r"\['a'\] has unknown key\(s\) \[1\]"),
])
def test_odd_sections_get_a_message_not_a_crash(section, message):
    """A null section was answered 'did you mean recontrol for recontrol?'; a Python dict
    with a non-string key next to string keys crashed sorting them."""
    with pytest.raises(ConfigError, match=message):
        EngineSettings.from_additional_config({"recontrol": section})


def test_values_vllm_cannot_send_to_its_engine_process_are_refused_at_admission():
    """vLLM's engine process gets requests through msgpack, which refuses NumPy scalars,
    Fractions, tensors: it failed after registering the request, whose output never came,
    and the next generate call hung (a reviewer's reproduction). Admission refuses them,
    naming the type and the conversion."""
    from fractions import Fraction

    import torch

    numpy = pytest.importorskip("numpy")
    for key, value, kind, expected, convert in (
            ("recontrol_alpha", numpy.float64(0.5), "numpy.float64", "int or float", "float"),
            ("recontrol_steps", numpy.int64(3), "numpy.int64", "int", "int"),
            ("recontrol_max_norm", Fraction(1, 2), "fractions.Fraction", "int or float",
             "float"),
            ("recontrol", numpy.bool_(True), "numpy.bool", "bool, int or str", "bool"),
            ("recontrol_head", numpy.str_("default"), "numpy.str_", "str", "str"),
            ("recontrol_alpha", torch.tensor(0.5), "torch.Tensor", "int or float", "float")):
        with pytest.raises(RequestParamsError, match=rf"^{key} must be a plain Python "
                           rf"{expected}, got {kind}.*: vLLM cannot send it to its engine "
                           rf"process; convert it first with {convert}\(x\)$"):
            check_request_args({key: value}, max_steps=10)
    check_request_args({"recontrol_alpha": 0.5, "recontrol_steps": 3, "recontrol": True,
                        "recontrol_max_norm": 2, "recontrol_head": "default",
                        "other_plugin": numpy.float32(1.0)}, max_steps=10)  # not ours
    with pytest.raises(RequestParamsError, match="extra_args must be a JSON object of keys, "
                                                 "got list"):
        check_request_args([("recontrol_alpha", 1.0)], max_steps=10)


@pytest.mark.parametrize("key, meant", [("\u200brecontrol_steps", "recontrol_steps"),
                                        ("\ufeffrecontrol_alpha", "recontrol_alpha"),
                                        ("\uff52econtrol_steps", "recontrol_steps"),
                                        ("recontrol_\u00admax_norm", "recontrol_max_norm")])
def test_a_key_pasted_with_invisible_or_fullwidth_characters_is_refused(key, meant):
    """A zero-width space or byte-order mark before the key, or a fullwidth letter, came
    through copy and paste and made the key another plugin's: the request ran on the
    engine's defaults without a word (a reviewer's finding)."""
    assert looks_like_request_key(key)
    with pytest.raises(RequestParamsError, match=rf"did you mean '{meant}'\?"):
        check_request_args({key: 3}, max_steps=10)


def test_a_huge_whole_float_step_count_is_refused_in_a_short_message():
    with pytest.raises(RequestParamsError) as refused:
        check_request_args({"recontrol_steps": 1e308}, max_steps=10)
    assert "recontrol_steps = 1e+308 exceeds this engine's max_steps = 10" in str(refused.value)
    with pytest.raises(RequestParamsError, match=r"recontrol_steps = an integer of 1024 bits "
                       r"exceeds"):
        check_request_args({"recontrol_steps": 2 ** 1023}, max_steps=10)
    with pytest.raises(RequestParamsError, match=r"recontrol_steps must be an integer >= 0, "
                       r"got -1e\+300$"):
        check_request_args({"recontrol_steps": -1e300}, max_steps=10)


@pytest.mark.parametrize("key, meant", [("RECONTROL_ALPHA", "recontrol_alpha"),
                                        (" recontrol_steps", "recontrol_steps"),
                                        ("Recontrol-Max-Norm", "recontrol_max_norm")])
def test_our_keys_in_another_case_are_refused_naming_the_key_meant(key, meant):
    with pytest.raises(RequestParamsError, match=rf"\['{key}'\] \('{key}': did you mean "
                                                 rf"'{meant}'\?\)"):
        check_request_args({key: 1}, max_steps=10)
