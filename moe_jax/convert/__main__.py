"""Convert between Hugging Face MoE checkpoints and moe_jax run directories.

    python -m moe_jax.convert --from_hf=DIR --workdir=RUN [--config.data.* --config.train.*]   # HF -> run
    python -m moe_jax.convert --to_hf=DIR --workdir=RUN [--step=N] [--architecture=MixtralForCausalLM]

`--from_hf` writes config.json + checkpoint step 0; `--config.data.*`, `--config.train.*` and `--config.mesh.*`
set the run's data (then evaluate and sample use its tokenizer), fine-tuning and mesh; the model is the
checkpoint's. A `tokenizer.model` (SentencePiece) in DIR becomes `data.tokenizer` unless one is given.
The run fine-tunes with `python -m moe_jax.main --config=moe_jax/convert/run_config.py:RUN --workdir=RUN ...`;
`moe_jax.evaluate`, `sample` and `analyze` read it. A mistake is one `error:` line, exit status 2.
"""

from __future__ import annotations

_FLAGS: dict = {}


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    from moe_jax.convert import runs

    _FLAGS["config"] = config_flags.DEFINE_config_dict(
        "config", runs.default_run_config(), "--from_hf: the run's data.*, train.* and mesh.* (the model is the "
        "checkpoint's).")

    _FLAGS["from_hf"] = flags.DEFINE_string("from_hf", None, "Import: a Hugging Face model directory.")
    _FLAGS["to_hf"] = flags.DEFINE_string("to_hf", None, "Export: the Hugging Face directory to write.")
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "The run directory (written by --from_hf).")
    _FLAGS["step"] = flags.DEFINE_integer("step", None, "Export: checkpoint step (default: the latest).")
    _FLAGS["architecture"] = flags.DEFINE_string("architecture", None,
                                                 "Export: the HF class (default: the one the model matches).")
    flags.mark_flags_as_required(["workdir"])


def main(argv) -> int:
    del argv
    import logging

    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from absl import flags

    from moe_jax.convert import runs

    from_hf, to_hf, workdir = _FLAGS["from_hf"].value, _FLAGS["to_hf"].value, _FLAGS["workdir"].value
    if (from_hf is None) == (to_hf is None):
        raise ValueError("give exactly one of --from_hf=DIR (import into --workdir) or --to_hf=DIR (export "
                         "--workdir)")
    if from_hf is None:
        if flags.FLAGS["config"].override_values:
            raise ValueError("--config.* sets the run written by --from_hf; --to_hf exports the run as it is")
        out = runs.export_run(workdir, to_hf, step=_FLAGS["step"].value, architecture=_FLAGS["architecture"].value)
        print(f"wrote {out}: config.json and safetensors")
        return 0
    if _FLAGS["step"].value is not None or _FLAGS["architecture"].value is not None:
        raise ValueError("--step and --architecture are for --to_hf")
    cfg = runs.save_run(from_hf, workdir, overrides=dict(flags.FLAGS["config"].override_values))
    print(f"wrote {workdir}: config.json and checkpoint step 0 ({cfg.model.num_layers} layers, "
          f"{cfg.model.moe.num_experts} experts, top-{cfg.model.moe.k}); fine-tune with\n"
          f"  python -m moe_jax.main --config=moe_jax/convert/run_config.py:{workdir} --workdir={workdir}")
    return 0


if __name__ == "__main__":
    from moe_jax import cli

    cli.run(main, define_flags=_define_flags, user_errors=(FileExistsError,))
