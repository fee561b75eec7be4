"""Every mistake a user can type into `python -m moe_jax.main` is one `error:` line, a non-zero exit, no
traceback and no run directory (the README's table of mistakes, row by row)."""

import gzip
import json
import pathlib

import pytest

from cli_checks import assert_user_error, run_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_data(tmp_path) -> dict:
    """Files for the data rows: an empty file, a corrupt .gz, jsonl without the text field, a tiny file."""
    (tmp_path / "blank.txt").write_text("\n \n\n")
    good = gzip.compress(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(100)))
    (tmp_path / "cut.jsonl.gz").write_bytes(good[: len(good) // 2])
    (tmp_path / "fields.jsonl").write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(50)))
    (tmp_path / "tiny.txt").write_text("".join(f"d{i}\n" for i in range(40)))
    return {name.split(".")[0]: str(tmp_path / name) for name in ("blank.txt", "cut.jsonl.gz", "fields.jsonl",
                                                                    "tiny.txt")}


CASES = {
    "unknown key": (["--config.model.moe.num_expert=16"],
                    ["unknown config key model.moe.num_expert", "did you mean model.moe.num_experts?"]),
    "wrong type": (["--config.train.steps=abc"], ["--config.train.steps=abc", "expected an integer"]),
    "out of range": (["--config.data.source=text", "--config.data.paths={tiny}", "--config.data.eval_fraction=1.0"],
                     ["data.eval_fraction=1.0 must be in (0, 1)"]),
    "k > experts": (["--config.model.moe.k=9"], ["model.moe.k=9 must be in [1, model.moe.num_experts=8]"]),
    "unknown router": (["--config.model.moe.router=topk"], ["model.moe.router='topk'", "did you mean 'top_k'?"]),
    "unknown tokenizer": (["--config.data.source=text", "--config.data.paths={tiny}",
                           "--config.data.tokenizer=bpe"], ["data.tokenizer='bpe' must be 'byte' or"]),
    "mesh": (["--config.mesh.shape=(2,1,1)"], ["mesh.shape=(2, 1, 1) has 2 devices but there are 1"]),
    "group size": (["--config.model.moe.group_size=100"], ["model.moe.group_size=100", "divides the tokens per device"]),
    "missing glob": (["--config.data.source=jsonl", "--config.data.paths={tmp}/c4/*.jsonl"], ["matches no file"]),
    "empty file": (["--config.data.source=text", "--config.data.paths={blank}"], ["no non-empty documents",
                                                                                      "blank.txt"]),
    "corrupt gz": (["--config.data.source=jsonl", "--config.data.paths={cut}"],
                   ["cut.jsonl.gz is not a readable gzip file"]),
    "missing jsonl field": (["--config.data.source=jsonl", "--config.data.paths={fields}"],
                            ["fields.jsonl:1: no text field 'text'", "body"]),
    "too small": (["--config.data.source=text", "--config.data.paths={tiny}"], ["too small for one batch"]),
    "missing config": (["--config=experiments/nope.py"], ["--config: cannot load the config file", "nope.py"]),
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.replace(" ", "_"))
def test_main_cli_mistake_is_one_error_line_and_leaves_no_run_directory(tmp_path, case):
    files = write_data(tmp_path)
    overrides, needles = CASES[case]
    overrides = [o.format(tmp=tmp_path, **files) for o in overrides]
    config = [o for o in overrides if o.startswith("--config=")] or ["--config=experiments/tiny_switch.py"]
    workdir = tmp_path / "run"
    args = config + [f"--workdir={workdir}"] + [o for o in overrides if not o.startswith("--config=")]
    assert_user_error(run_cli("moe_jax.main", args, ROOT), *needles, not_created=[workdir])


def test_missing_workdir_flag(tmp_path):
    assert_user_error(run_cli("moe_jax.main", ["--config=experiments/tiny_switch.py"], ROOT), "--workdir is required")


def test_workdir_without_config_needs_a_run_to_continue(tmp_path):
    assert_user_error(run_cli("moe_jax.main", [f"--workdir={tmp_path / 'new'}"], ROOT),
                      "--config is required", "holds no run to continue (no config.json)",
                      not_created=[tmp_path / "new"])
