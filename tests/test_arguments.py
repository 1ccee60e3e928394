"""Flag values that start with a dash reach the command's own checks."""

import argparse
import json

from vllm_recontrol.arguments import join_dash_values
from vllm_recontrol.cli import main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid")
    parser.add_argument("--count", type=int)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("files", nargs="*")
    return parser


def test_a_dash_value_is_joined_to_its_flag_and_flags_are_left_alone():
    parser = _parser()
    argv = ["--grid", "-1:10", "--count", "-3", "--quiet", "--grid", "--quiet", "a"]
    assert join_dash_values(parser, argv) == ["--grid=-1:10", "--count=-3", "--quiet",
                                              "--grid", "--quiet", "a"]
    assert vars(parser.parse_args(join_dash_values(parser, ["--grid", "-1:10", "--count",
                                                            "-3"]))) == {
        "grid": "-1:10", "count": -3, "quiet": False, "progress": True, "files": []}
    # a switch takes no value, "--" ends the flags, and a flag=value after a flag is a flag
    assert join_dash_values(parser, ["--quiet", "-x"]) == ["--quiet", "-x"]
    assert join_dash_values(parser, ["--", "--grid", "-1"]) == ["--", "--grid", "-1"]
    assert join_dash_values(parser, ["--grid", "--count=2"]) == ["--grid", "--count=2"]


def test_eval_names_a_negative_alpha_instead_of_a_missing_argument(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n")
    code = main(["eval", "--model", "m", "--value-head", "h", "--prompts", str(prompts),
                 "--reward-fn", "vllm_recontrol.toy_world:positive_share",
                 "--grid", "-1:10"])
    error = capsys.readouterr().err
    assert code != 0
    assert "grid entry '-1:10'" in error and "alpha >= 0" in error
    assert "expected one argument" not in error
