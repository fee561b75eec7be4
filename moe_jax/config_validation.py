"""Run-level config checks, before anything is built or compiled: each error names the key, its value and
what is allowed. Model-only checks live in the model family's `validate_config` (moe_jax.models); this adds
what needs the mesh, the batch or the device count."""

from __future__ import annotations

from etils import epath

from moe_jax import data as data_lib, distill, models, sharding
from moe_jax.models import layers


def validate(cfg, *, num_devices: int) -> None:
    """Raise ValueError for the first setting that cannot work with this many devices."""
    family = models.get(cfg)  # ValueError naming model.name for an unknown family
    cfg = models.with_family_defaults(cfg)
    data_lib.check_batch_format(cfg.data, family.batch_format)  # first: a family the pipeline cannot feed
    family.validate_config(cfg.model)
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
    layers.choice("train.optimizer", cfg.train.optimizer, ("adamw", "adafactor"))
    _check_data(cfg.data)
    _check_vocabulary(cfg)
    distill.validate(cfg)

    moe = cfg.model.moe
    if not layers.is_moe(cfg.model):
        return
    for key in ("capacity_factor", "eval_capacity_factor"):
        if not moe[key] > 0:
            raise ValueError(f"model.moe.{key}={moe[key]} must be > 0")
    if moe.num_experts % expert_axis:
        raise ValueError(f"model.moe.num_experts={moe.num_experts} must be divisible by the expert mesh axis "
                         f"({expert_axis}, mesh.shape={tuple(cfg.mesh.shape)}): each device holds E / expert experts")
    tokens_per_device = cfg.data.batch_size // batch_shards * cfg.data.seq_len
    group = routing_group_size(cfg, num_devices=num_devices)
    if not isinstance(moe.group_size, int) or moe.group_size < 1 or tokens_per_device % group:
        raise ValueError(f"model.moe.group_size={moe.group_size!r} must be a positive integer that divides the "
                         f"tokens per device, {tokens_per_device} = data.batch_size {cfg.data.batch_size} / "
                         f"{batch_shards} shards x data.seq_len {cfg.data.seq_len} (a larger value is capped at "
                         f"{tokens_per_device}); e.g. {_divisors_note(tokens_per_device, cfg.data.seq_len)}")


def routing_group_size(cfg, *, num_devices: int) -> int:
    """The tokens per routing group a run uses: `model.moe.group_size`, capped at the tokens each device holds.

    A routing group never spans devices (routing is per group and needs no communication), so on N devices
    the same config routes in groups of min(group_size, tokens per device): tiny_switch's 4096 is one group
    of the whole batch on one device and groups of 512 on 8. Capacity is per group, so a smaller group drops
    more tokens at the same capacity factor; the start-up header prints the group size in use.
    """
    data_axis, expert_axis, _ = sharding.mesh_shape(cfg.mesh.shape, num_devices)
    tokens_per_device = cfg.data.batch_size // (data_axis * expert_axis) * cfg.data.seq_len
    group_size = cfg.model.moe.group_size
    return min(group_size, tokens_per_device) if isinstance(group_size, int) and group_size > 0 else group_size


def resolve(cfg, *, num_devices: int):
    """`validate`, then a copy of the config with derived values filled in (`model.moe.group_size` as used)."""
    validate(cfg, num_devices=num_devices)
    resolved = models.with_family_defaults(cfg)
    if layers.is_moe(cfg.model):
        resolved.model.moe.group_size = routing_group_size(cfg, num_devices=num_devices)
        if models.get(cfg).batch_format == "span_corruption":
            resolved.model.moe.decoder_group_size = decoder_group_size(resolved, num_devices=num_devices)
    return resolved


def decoder_group_size(cfg, *, num_devices: int) -> int:
    """The encoder-decoder's decoder stack routes its own, shorter rows (the span-corruption targets): groups of
    min(group_size, its tokens per device) when that holds whole rows or pieces of one, else the largest number
    of whole rows per device that fits in group_size (or the largest piece of a row, when one row is larger)."""
    from moe_jax.data import span_corruption

    data_axis, expert_axis, _ = sharding.mesh_shape(cfg.mesh.shape, num_devices)
    rows = cfg.data.batch_size // (data_axis * expert_axis)
    _, _, length = span_corruption.lengths(cfg.data)
    limit = cfg.model.moe.get("decoder_group_size") or cfg.model.moe.group_size
    if limit >= length:
        return length * max(k for k in range(1, rows + 1) if rows % k == 0 and k * length <= limit)
    return max(n for n in range(1, limit + 1) if length % n == 0)


def _divisors_note(tokens_per_device: int, seq_len: int) -> str:
    sizes = [n for n in range(seq_len, tokens_per_device + 1, seq_len) if tokens_per_device % n == 0]
    sizes += [n for n in range(1, seq_len) if seq_len % n == 0 and n >= 8]
    return "one of " + ", ".join(str(n) for n in sorted(set(sizes))[-6:])


def _check_data(data_cfg) -> None:
    """The `data` keys that can be checked without reading any data (files are opened by the pipeline)."""
    from moe_jax.data import sources

    layers.choice("data.source", data_cfg.source, sources.SOURCES)
    if data_cfg.source in ("jsonl", "text"):
        if not str(data_cfg.paths).strip(","):
            raise ValueError(f"data.paths is empty: data.source={data_cfg.source!r} needs one or more files or "
                             f"globs (comma-separated, .gz allowed)")
        if data_cfg.eval_paths:
            sources.expand_paths(data_cfg.eval_paths, "data.eval_paths")  # names a missing file or glob now
        elif not 0 < data_cfg.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction={data_cfg.eval_fraction} must be in (0, 1): the share of "
                             f"documents held out for evaluation")
    if data_cfg.source == "text":
        layers.choice("data.text_document", data_cfg.text_document, ("line", "paragraph"))
    tokenizer = str(data_cfg.tokenizer)
    if data_cfg.source != "synthetic" and tokenizer != "byte":
        if not tokenizer.endswith(".model"):
            raise ValueError(f"data.tokenizer={tokenizer!r} must be 'byte' or the path of a SentencePiece "
                             f"'.model' file")
        if "://" not in tokenizer and not epath.Path(tokenizer).exists():
            raise FileNotFoundError(f"data.tokenizer={tokenizer!r}: no such SentencePiece model file")
    for key in ("num_threads", "prefetch", "num_workers", "num_shards"):
        if not (isinstance(data_cfg[key], int) and data_cfg[key] >= 0):
            raise ValueError(f"data.{key}={data_cfg[key]!r} must be an integer >= 0")


def _check_vocabulary(cfg) -> None:
    """model.vocab_size must cover the tokenizer's ids (an id past the embedding table gives a NaN loss at
    step 1), and for span corruption the sentinel ids after them. Checked where the size is known without
    reading a remote file: the synthetic corpus, byte ids and a local SentencePiece model. One in a bucket the
    dry-run laptop cannot read is not checked (T5's C4 vocabulary has 32100 ids; the paper configs use 32128)."""
    remote = cfg.data.source != "synthetic" and cfg.data.tokenizer != "byte" and "://" in str(cfg.data.tokenizer)
    ids = None if remote else data_lib.make_tokenizer(cfg.data).vocab_size
    if models.get(cfg).batch_format == "span_corruption":
        from moe_jax.data import span_corruption

        span_corruption.validate(cfg.data, ids, cfg.model.vocab_size)
        return
    if cfg.data.source != "synthetic" and cfg.data.tokenizer != "byte":
        return
    if cfg.model.vocab_size < ids:
        source = "data.synthetic.vocab_size" if cfg.data.source == "synthetic" else "data.tokenizer='byte'"
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {ids} token ids of "
                         f"{source}: set model.vocab_size >= {ids}")
