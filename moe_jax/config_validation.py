"""Run-level config checks, before anything is built or compiled: each error names the key, its value and
what is allowed. Model-only checks live in `model.validate_config`; this adds what needs the mesh, the
batch or the device count."""

from __future__ import annotations

from moe_jax import data as data_lib, model as model_lib, sharding


def validate(cfg, *, num_devices: int) -> None:
    """Raise ValueError for the first setting that cannot work with this many devices."""
    model_lib.validate_config(cfg.model)
    data_axis, expert_axis, _ = sharding.mesh_shape(cfg.mesh.shape, num_devices)
    batch_shards = data_axis * expert_axis
    for key in ("batch_size", "seq_len"):
        if not (isinstance(cfg.data[key], int) and cfg.data[key] > 0):
            raise ValueError(f"data.{key}={cfg.data[key]!r} must be a positive integer")
    if cfg.data.batch_size % batch_shards:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be a multiple of data x expert = "
                         f"{batch_shards} (mesh.shape={tuple(cfg.mesh.shape)}): the batch is split over both")
    for key in ("steps", "log_every", "eval_every", "eval_steps", "checkpoint_every", "keep_checkpoints"):
        if not (isinstance(cfg.train[key], int) and cfg.train[key] > 0):
            raise ValueError(f"train.{key}={cfg.train[key]!r} must be a positive integer")
    if not cfg.train.learning_rate > 0:
        raise ValueError(f"train.learning_rate={cfg.train.learning_rate} must be > 0")
    _check_vocabulary(cfg)

    moe = cfg.model.moe
    if not model_lib.is_moe(cfg.model):
        return
    for key in ("capacity_factor", "eval_capacity_factor"):
        if not moe[key] > 0:
            raise ValueError(f"model.moe.{key}={moe[key]} must be > 0")
    if moe.num_experts % expert_axis:
        raise ValueError(f"model.moe.num_experts={moe.num_experts} must be divisible by the expert mesh axis "
                         f"({expert_axis}, mesh.shape={tuple(cfg.mesh.shape)}): each device holds E / expert experts")
    tokens_per_device = cfg.data.batch_size // batch_shards * cfg.data.seq_len
    if moe.group_size < 1 or tokens_per_device % moe.group_size:
        raise ValueError(f"model.moe.group_size={moe.group_size} must divide the tokens per device, "
                         f"{tokens_per_device} = data.batch_size {cfg.data.batch_size} / {batch_shards} shards x "
                         f"data.seq_len {cfg.data.seq_len}")


def _check_vocabulary(cfg) -> None:
    """model.vocab_size must cover the tokenizer's ids (an id past the embedding table gives a NaN loss at
    step 1). Checked where the size is known without reading a file: the synthetic corpus and byte ids. A
    SentencePiece model may sit in a bucket the dry-run laptop cannot read, so its size is not checked here
    (T5's C4 vocabulary has 32100 ids; the paper-sized configs use 32128)."""
    if cfg.data.source != "synthetic" and cfg.data.tokenizer != "byte":
        return
    ids = data_lib.make_tokenizer(cfg.data).vocab_size
    if cfg.model.vocab_size < ids:
        source = "data.synthetic.vocab_size" if cfg.data.source == "synthetic" else "data.tokenizer='byte'"
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {ids} token ids of "
                         f"{source}: set model.vocab_size >= {ids}")
