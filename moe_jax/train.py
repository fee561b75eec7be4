"""Training: the train state, pure train/eval steps compiled once with explicit shardings, and the loop.

Read top to bottom: `default_config` (every knob a run has), `make_optimizer`, `TrainSetup` (model,
optimizer, mesh, shardings and the two jitted steps — the very functions `dryrun.py` compiles for a pod), and
`train` (set up, resume, loop: step, log, evaluate, checkpoint). A new experiment is a config file, not a flag.
The model is reached only through its family's interface (`moe_jax.models.get(config)`: create, loss_fn,
abstract_batch, count_params, flops_per_token), so every family trains with this loop.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath
from flax import nnx

from moe_jax import checkpoint as checkpoint_lib
from moe_jax import chips, config_validation, data, distill, goodput, metric_writer, models, moe as moe_lib, sharding

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- config


def default_config() -> ml_collections.ConfigDict:
    """A whole run: `model`, `data`, `train`, `mesh`, `distributed`. Experiment files start from this."""
    c = ml_collections.ConfigDict()
    c.model = models.get(models.DEFAULT).default_config()
    c.data = data.default_config()

    c.train = ml_collections.ConfigDict()
    c.train.steps = 300
    c.train.seed = 0
    c.train.optimizer = "adamw"  # adamw (with cosine decay) | adafactor (T5 inverse square root, Switch)
    c.train.learning_rate = 3e-3
    c.train.warmup_steps = 30
    c.train.weight_decay = 0.1
    c.train.grad_clip = 1.0  # global-norm clipping; 0 turns it off
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_steps = 4  # batches per evaluation (a fixed held-out set)
    c.train.checkpoint_every = 100
    c.train.keep_checkpoints = 3
    c.train.peak_flops_per_device = 0.0  # for MFU; 0 = look up the device kind, or measure a matmul on CPU

    c.distill = distill.default_config()  # off unless distill.teacher_workdir is set (moe_jax/distill.py)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, expert, model); one -1 takes the remaining devices
    c.mesh.fsdp = False

    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False  # call jax.distributed.initialize() before anything else
    c.distributed.coordinator_address = ""  # "" = let jax detect the cluster (TPU pods, SLURM, ...)
    c.distributed.num_processes = 0
    c.distributed.process_id = -1
    c.distributed.initialization_timeout = 300
    return c


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay, or Adafactor with T5's inverse-square-root schedule."""
    steps, warmup, peak = train_cfg.steps, max(train_cfg.warmup_steps, 0), train_cfg.learning_rate
    if train_cfg.optimizer == "adamw":
        schedule = optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 1), max(steps, warmup + 1),
                                                      end_value=peak * 0.1)
        tx = optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=train_cfg.weight_decay)
    elif train_cfg.optimizer == "adafactor":
        def schedule(step):  # T5: constant `peak` for the warmup steps, then peak * sqrt(warmup / step)
            step = jnp.maximum(step.astype(jnp.float32), 1.0)
            return peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, max(warmup, 1)))
        tx = optax.adafactor(schedule, multiply_by_parameter_scale=False, clipping_threshold=None)
    else:
        raise ValueError(f"train.optimizer must be one of ['adafactor', 'adamw'], got {train_cfg.optimizer!r}")
    if train_cfg.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(train_cfg.grad_clip), tx)
    return tx


# --------------------------------------------------------------------------------------------- steps


def _loss_weights(cfg):
    moe = cfg.model.moe
    return dict(aux_loss_weight=float(moe.aux_loss_weight), z_loss_weight=float(moe.z_loss_weight))


def make_train_step(cfg, loss: Optional[Callable] = None, before_gradient: Optional[Callable] = None) -> Callable:
    """(graphdef, state, batch, *extra) -> (state, metrics): one optimizer step, pure. `loss(model, batch, *extra)
    -> (loss, metrics)` replaces the family's training loss; `before_gradient(batch, *extra) -> extra` runs first,
    outside the gradient (distillation: the teacher's state in, its probabilities out)."""
    loss_weights = _loss_weights(cfg)
    loss_fn = models.get(cfg).loss_fn
    if loss is None:
        def loss(model, batch):
            return loss_fn(model, batch, deterministic=False, **loss_weights)

    def train_step(graphdef, state, batch, *extra):
        if before_gradient is not None:
            extra = before_gradient(batch, *extra)
        model, optimizer = nnx.merge(graphdef, state)
        model.train()
        (_, metrics), grads = nnx.value_and_grad(lambda m: loss(m, batch, *extra), has_aux=True)(model)
        optimizer.update(model, grads)
        moe_lib.after_step(model, metrics)  # routers' own updates outside the gradient (bias_balanced)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return nnx.state((model, optimizer)), metrics

    return train_step


def make_eval_step(cfg) -> Callable:
    """(graphdef, state, batch) -> metrics, with the eval capacity factor and no noise."""
    loss_weights = _loss_weights(cfg)
    loss_fn = models.get(cfg).loss_fn

    def eval_step(graphdef, state, batch):
        model, _ = nnx.merge(graphdef, state)
        model.eval()
        _, metrics = loss_fn(model, batch, deterministic=True, **loss_weights)
        return metrics

    return eval_step


@dataclasses.dataclass
class TrainSetup:
    """Everything a run (or a dry run) compiles: graph, state shardings and the two jitted steps."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    graphdef: Any
    abstract_state: Any  # nnx.State of ShapeDtypeStructs carrying their NamedShardings
    state_shardings: Any
    batch_sharding: jax.sharding.NamedSharding
    train_step: Callable  # jitted (state, batch) -> (state, metrics), state donated
    eval_step: Callable  # jitted (state, batch) -> metrics
    family: models.ModelFamily  # the model's interface (config.model.name)

    def init_state(self):
        """Real parameters and optimizer state, created directly in their shardings."""
        create = jax.jit(lambda: nnx.state(_create(self.config)), out_shardings=self.state_shardings)
        with jax.set_mesh(self.mesh):
            return create()

    def abstract_batch(self, batch_size: int, seq_len: int) -> dict:
        """The batch the steps take, as ShapeDtypeStructs in the batch sharding (the family's format)."""
        return self.family.abstract_batch(batch_size, seq_len, self.batch_sharding, data_config=self.config.data)

    def abstract_model(self):
        """The model with ShapeDtypeStruct leaves (for parameter and FLOP counts; nothing allocated)."""
        model, _ = nnx.merge(self.graphdef, self.abstract_state)
        return model


def _create(cfg):
    rngs = nnx.Rngs(params=cfg.train.seed, dropout=cfg.train.seed + 1)
    model = models.get(cfg).create(cfg.model, rngs)
    optimizer = nnx.Optimizer(model, make_optimizer(cfg.train), wrt=nnx.Param)
    return model, optimizer


def setup(cfg, devices=None) -> TrainSetup:
    """Validate the config, build the mesh, the abstract state with its shardings, and jit the steps (nothing
    is allocated). `TrainSetup.config` is the config as run (`config_validation.resolve`)."""
    devices = list(jax.devices() if devices is None else devices)
    cfg = config_validation.resolve(cfg, num_devices=len(devices))
    mesh = sharding.make_mesh(cfg, devices)
    rules = sharding.rules_from_config(cfg)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: _create(cfg)))
    state_shardings = state_shardings_for(abstract_state, mesh, rules)
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, state_shardings)
    batch_sharding = sharding.batch_sharding(mesh)
    metrics_sharding = None  # replicated scalars and small per-layer arrays: let XLA choose
    train_step = jax.jit(functools.partial(make_train_step(cfg), graphdef),
                         in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, metrics_sharding), donate_argnums=0)
    eval_step = jax.jit(functools.partial(make_eval_step(cfg), graphdef),
                        in_shardings=(state_shardings, batch_sharding), out_shardings=metrics_sharding)
    return TrainSetup(cfg, mesh, graphdef, abstract_state, state_shardings, batch_sharding, train_step, eval_step,
                      models.get(cfg))


def state_shardings_for(abstract_state, mesh, rules):
    """NamedShardings for model + optimizer state.

    Optimizer slots carry their parameter's logical names. A slot of the parameter's rank takes the
    parameter's layout; Adafactor's factored second moments drop the reduced axis (`v_row` [..., d] the last
    one, `v_col` [..., f] the second to last); anything else (scalars, placeholders) is replicated.
    """

    def names_for(path, variable):
        names = tuple(variable.get_metadata().get("out_sharding") or ())
        keys = {str(getattr(k, "key", k)) for k in path}
        if keys & {"v_row", "v_col"} and variable.shape == (1,):
            return ()  # Adafactor's placeholder for a parameter it does not factor (1-D, or small dims)
        if len(names) == variable.ndim:
            return names
        if len(names) == variable.ndim + 1 and "v_row" in keys:
            return names[:-1]
        if len(names) == variable.ndim + 1 and "v_col" in keys:
            return names[:-2] + names[-1:]
        return ()

    relabelled = jax.tree_util.tree_map_with_path(
        lambda path, v: v.replace(v.get_value(), out_sharding=names_for(path, v)),
        abstract_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    # Metadata is part of a Variable's pytree structure: hand the shardings back in the original structure.
    shardings = jax.tree.leaves(sharding.param_shardings(relabelled, mesh, rules))
    return jax.tree.unflatten(jax.tree.structure(abstract_state), shardings)


# --------------------------------------------------------------------------------------------- the loop


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf."""


def train(cfg: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict:
    """Train (or resume) the run in `workdir`; returns the last logged train and eval metrics.

    Everything that can be wrong with the config or the data is checked before anything is written: a
    ValueError (or FileNotFoundError / KeyError for data files) leaves no run directory behind.
    """
    workdir = epath.Path(workdir)
    run = setup(cfg, devices)  # validates the config
    cfg = run.config
    teacher = distill.load_teacher(run) if distill.enabled(cfg) else None  # checks the teacher run too
    block = dict(process_index=process_batch_block(run.batch_sharding, cfg.data.batch_size),
                 process_count=jax.process_count(), batch_format=run.family.batch_format)
    train_iter = data.make_train_iterator(cfg.data, **block)
    eval_batches = [sharding.shard_batch(b, run.mesh)
                    for b in data.make_eval_batches(cfg.data, cfg.train.eval_steps, **block)]
    span_corruption = run.family.batch_format == "span_corruption"
    floor = None if span_corruption else data.entropy_floor(cfg.data)  # the floor is the LM stream's

    finished = _finished_step(workdir / "checkpoints", cfg.train.steps)
    if finished is not None:
        if jax.process_index() == 0:
            print(f"already finished at step {finished} (train.steps={cfg.train.steps}) in {workdir}; raise "
                  f"--config.train.steps to train further", flush=True)
        return {"step": finished, "interrupted": False, "already_finished": True}

    writer = metric_writer.MetricWriter(workdir, total_steps=cfg.train.steps)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(cfg.to_json_best_effort(indent=2))
    checkpointer = checkpoint_lib.Checkpointer(workdir / "checkpoints", max_to_keep=cfg.train.keep_checkpoints)
    restored = checkpointer.restore_latest(run.abstract_state, train_iter)
    if restored is None:
        start_step, state = 0, run.init_state()
    else:
        start_step, state = restored
        log.info("resumed from step %d in %s", start_step, checkpointer.directory)
    train_step = run.train_step
    if teacher is not None:
        train_step, state = distill.attach(run, teacher, state, fresh=restored is None)
    writer.header(startup_header(cfg, run, workdir, start_step))

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_step = run.family.flops_per_token(run.abstract_model(), cfg.data.seq_len) * tokens_per_step
    peak_flops = peak_flops_per_device(cfg) * run.mesh.size
    stop = _StopRequest()
    pending_losses: list[tuple[int, jax.Array]] = []  # checked for NaN/Inf before logging or saving
    last = {}
    window_start, window_steps = time.time(), 0

    def check_finite():
        for step_done, loss in pending_losses:
            value = float(loss)
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"train/loss is {value} at step {step_done}; stopped without saving. The latest checkpoint "
                    f"(step {checkpointer.latest_step()}) predates it: lower train.learning_rate or check the data.")
        pending_losses.clear()

    def evaluate(step):
        totals, weight = {}, 0.0
        for batch in eval_batches:
            metrics = jax.device_get(run.eval_step(state, batch))
            tokens = float(metrics["num_tokens"])
            weight += tokens
            for key in ("loss", "ce", "accuracy"):
                totals[key] = totals.get(key, 0.0) + float(metrics[key]) * tokens
        result = {f"eval/{k}": v / max(weight, 1.0) for k, v in totals.items()}
        result["eval/perplexity"] = math.exp(min(result["eval/ce"], 50.0))
        if span_corruption:  # the Switch paper's metric (Tables 1-3, Fig. 4): -CE per target token, in nats
            result["eval/neg_log_perplexity"] = -result["eval/ce"]
        if floor is not None:
            result["eval/entropy_floor"] = floor
            result["eval/gap_to_floor"] = result["eval/ce"] - floor
        writer.write(step, result)
        return result

    with stop.installed(), jax.set_mesh(run.mesh):  # the mesh under which `sharding.constrain` pins layouts
        step = start_step
        while step < cfg.train.steps:
            batch = sharding.shard_batch(next(train_iter), run.mesh)
            if step == start_step:
                writer.header(f"compiling the train step (the first step; ~30 s on a laptop CPU) ...")
                compile_start = time.time()
            state, metrics = train_step(state, batch)
            if step == start_step:
                jax.block_until_ready(metrics["loss"])
                writer.header(f"compiled and ran step {step + 1} in {time.time() - compile_start:.1f} s")
                if step + 1 < cfg.train.steps and (step + 1) % cfg.train.log_every:
                    window_start, window_steps = time.time(), -1  # compilation is not training time
            step += 1
            window_steps += 1
            pending_losses.append((step, metrics["loss"]))

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                check_finite()
                elapsed = time.time() - window_start
                values = {f"train/{k}": v for k, v in metric_writer.flatten(
                    {k: v for k, v in jax.device_get(metrics).items() if k != "moe"}).items()}
                values["train/perplexity"] = math.exp(min(values["train/ce"], 50.0))
                if span_corruption:
                    values["train/neg_log_perplexity"] = -values["train/ce"]
                values["train/tokens_per_sec"] = tokens_per_step * window_steps / elapsed
                values["train/mfu"] = flops_per_step * window_steps / elapsed / peak_flops
                values.update(metric_writer.flatten({"moe": jax.device_get(metrics["moe"])}))
                values.update({f"train/{k}": v for k, v in goodput.step_split(jax.device_get(metrics["moe"])).items()})
                writer.write(step, values)
                writer.progress(step, values, elapsed / window_steps)
                last.update(values)
                window_start, window_steps = time.time(), 0
            if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                eval_metrics = evaluate(step)
                last.update(eval_metrics)
                writer.eval_line(step, eval_metrics)
                window_start = time.time()  # evaluation time is not training time
            if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps or stop.requested:
                check_finite()
                checkpointer.save(step, state, train_iter, force=True)
                window_start = time.time()  # nor is starting a checkpoint save
            if stop.requested:
                log.warning("received %s: saved step %d, exiting", stop.signal_name, step)
                break

    checkpointer.close()
    writer.close()
    last["step"] = step
    last["interrupted"] = stop.requested
    return last


def startup_header(cfg, run: TrainSetup, workdir, start_step: int) -> str:
    """What a run is about to do, in a few lines: devices, mesh, parameters, tokens, where things go."""
    counts = run.family.count_params(run.abstract_model())
    mesh = ", ".join(f"{name}={size}" for name, size in run.mesh.shape.items())
    devices = run.mesh.devices.flat[0]
    lines = [
        f"devices: {run.mesh.size} x {devices.device_kind} ({devices.platform}), {jax.process_count()} process(es);"
        f" mesh {mesh}",
        f"model: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active per token"
        + run.family.describe(cfg.model),
        f"data: {cfg.data.source}, {cfg.data.batch_size} x {cfg.data.seq_len} = "
        f"{cfg.data.batch_size * cfg.data.seq_len} tokens per step, {cfg.train.steps} steps",
        f"metrics: {epath.Path(workdir) / 'metrics.jsonl'} (TensorBoard: {epath.Path(workdir) / 'tensorboard'}); "
        f"checkpoints: {epath.Path(workdir) / 'checkpoints'} every {cfg.train.checkpoint_every} steps",
    ]
    if start_step:
        lines.append(f"resuming from the step-{start_step} checkpoint")
    return "\n".join(lines)


def _finished_step(checkpoint_dir: epath.Path, steps: int) -> Optional[int]:
    """The latest checkpoint step if it is >= `steps` (the run is done), else None. Reads, creates nothing."""
    if not checkpoint_dir.exists():
        return None
    done = [int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit() and int(p.name) >= steps]
    return max(done) if done else None


def process_batch_block(batch_sharding: jax.sharding.NamedSharding, batch_size: int) -> int:
    """Which block of batch_size / process_count consecutive global rows this process's devices hold.

    `jax.make_array_from_process_local_data` takes each process's rows as one contiguous block of the global
    batch; the data pipeline builds block i for `process_index=i`. On the usual meshes block i is process i,
    but the mesh decides, so ask the sharding.
    """
    rows = set()
    for index in batch_sharding.addressable_devices_indices_map((batch_size, 1)).values():
        rows.update(range(*index[0].indices(batch_size)))
    per_process = batch_size // jax.process_count()
    first = min(rows)
    if len(rows) != per_process or first % per_process or max(rows) != first + per_process - 1:
        raise ValueError(f"this process's devices hold global batch rows {sorted(rows)[:4]}...{sorted(rows)[-2:]}"
                         f", not one block of {per_process} consecutive rows: order mesh devices by process")
    return first // per_process


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the end of the current step and exits."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def installed(self):
        import contextlib
        import threading

        @contextlib.contextmanager
        def context():
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

        return context()


def peak_flops_per_device(cfg) -> float:
    """`train.peak_flops_per_device` if set, else the device kind's published bf16 peak (chips.py), else a CPU
    measurement (a float32 matmul on all cores, divided over the jax CPU devices)."""
    if cfg.train.peak_flops_per_device > 0:
        return float(cfg.train.peak_flops_per_device)
    chip = chips.for_device_kind(jax.devices()[0].device_kind)
    if chip is not None:
        return chip.peak_bf16_flops
    return chips.measured_matmul_flops() / jax.local_device_count()
