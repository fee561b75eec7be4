"""The config of an existing run directory, for `moe_jax.main --config=moe_jax/convert/run_config.py:RUN`:
fine-tune a converted Hugging Face model (`python -m moe_jax.convert --from_hf=DIR --workdir=RUN`) with the
config it was written with, `--config.*` overrides on top.

    python -m moe_jax.main --config=moe_jax/convert/run_config.py:runs/mixtral --workdir=runs/mixtral \
        --config.train.steps=100 --config.data.source=text --config.data.paths=my.txt
"""

from moe_jax import checkpoint


def get_config(workdir: str = ""):
    if not workdir:
        raise ValueError("run_config.py needs the run directory: --config=moe_jax/convert/run_config.py:RUN")
    return checkpoint.load_run_config(workdir)
