"""Pod-scale dry run: compile an experiment's own train and eval steps for a TPU topology, on this machine.

    python -m moe_jax.dryrun --config=experiments/switch_base.py:experts=128 --topology=v5p:4x4x4 \
        [--config.mesh.shape='(-1,16,1)' ...] [--workdir=runs/dryrun]

No TPU is needed, only libtpu (`pip install 'jax[tpu]==<the pinned jax>'`, in requirements.txt): the
topology's devices come from `jax.experimental.topologies`, and the very `train.setup(...).train_step` /
`eval_step` that `train.train` runs are traced from abstract shapes (`jax.ShapeDtypeStruct` with their
shardings) and compiled for those devices. Nothing is allocated.

The report (printed, and written to `<workdir>/dryrun.json`):
  * parameters, total and active per token (the model family's `count_params`);
  * per-chip bytes: parameters and optimizer state (from their shardings), and the compiled step's
    arguments, outputs and temporaries and XLA's peak (`memory_analysis()`), against the chip's usable HBM;
  * per-chip FLOPs per step: matmul FLOPs of the traced step (forward, backward, rematerialisation, router and
    capacity padding included; scan bodies times their length), split evenly over the chips, beside the
    model FLOPs of the MFU accounting (6N + attention); the step-time floor is FLOPs / the chip's peak.
    XLA's `cost_analysis()` counts a while-loop body once, not once per layer: it is in the JSON for
    reference only, under a name that says so;
  * the collectives in the compiled HLO: how many and how many bytes per chip of all-to-all, all-reduce,
    all-gather, reduce-scatter and collective-permute, static (ops in the HLO) and per step (ops inside
    the layer loop counted once per iteration);
  * the share of the step (matmuls at peak, all-to-all at the ICI bandwidth) in routing, dispatch + combine,
    the experts, the rest and all-to-all, from the MoE layer's named scopes (program_costs.MOE_SCOPES);
  * under `--load_skew` (load_skew.py): expert goodput per chip (useful / padding / lost), the busiest chip's
    expert rows, step-time floor and all-to-all bytes of real rows, and memory as compiled vs sized to the load;
  * trace, lower and compile times;
  * the mesh's placement on the torus: a mesh axis whose size is no product of whole physical axes makes
    `sharding.make_mesh` split a physical axis (its collectives get less bandwidth); the header line says so.
The chips' figures come from chips.py (the table the trainer's MFU reads too); bytes, FLOPs and collectives
are counted by program_costs.py. The command also writes the compiled HLO of each step
(`<workdir>/train_step.hlo.txt`, `eval_step.hlo.txt`).
A config that does not fit raises `DoesNotFit` with one paragraph (bytes needed vs available and the knobs
that help) instead of XLA's RESOURCE_EXHAUSTED traceback.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
from typing import Optional

# A dry run never runs on an accelerator: keep jax on the CPU (libtpu otherwise tries to find a TPU), and let
# several processes load libtpu at once (it otherwise takes /tmp/libtpu_lockfile, and a second dry run or a
# parallel test worker fails with "Internal error when accessing libtpu multi-process lockfile").
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

from moe_jax import config_validation, load_skew, sharding, train  # noqa: E402
from moe_jax.chips import GiB, Chip  # noqa: E402
from moe_jax.chips import TOPOLOGY_CHIPS as CHIPS  # noqa: E402  (the generations a dry run compiles for)
from moe_jax.program_costs import (COLLECTIVES, hlo_collectives, matmul_flops, matmul_flops_by_scope,  # noqa: E402
                                   state_bytes)


# --------------------------------------------------------------------------------------------- topologies


TOPOLOGY_RE = re.compile(rf"^({'|'.join(CHIPS)}):(\d+x\d+(?:x\d+)?)$")


class DryRunError(ValueError):
    """A bad input (topology, mesh, missing libtpu): the message names the value and what is allowed."""


class DoesNotFit(RuntimeError):
    """The compiled step needs more HBM per chip than the chip has; `str()` is the one-paragraph report."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _install_hint() -> str:
    return f"pip install 'jax[tpu]=={jax.__version__}'"


def _allowed_topologies() -> str:
    return "; ".join(f"{gen}:{{{','.join(chip.shapes)}}}" for gen, chip in CHIPS.items())


def parse_topology(topology: str) -> tuple[Chip, int]:
    """(chip, number of chips) for a topology string such as "v5p:4x4x4", checked without loading libtpu;
    DryRunError naming what is allowed (or how to install libtpu)."""
    allowed = _allowed_topologies()
    match = TOPOLOGY_RE.match(topology or "")
    if match is None:
        raise DryRunError(f"--topology={topology!r} is not a TPU topology of the form GENERATION:SHAPE; allowed "
                          f"generations {tuple(CHIPS)} with shapes {allowed} (e.g. v5p:4x4x4, v5e:16x16)")
    generation, shape = match.groups()
    chip = CHIPS[generation]
    if shape not in chip.shapes:
        raise DryRunError(f"--topology={topology!r}: {shape} is not a {generation} slice shape; allowed for "
                          f"{generation}: {', '.join(chip.shapes)}")
    if not libtpu_available():
        raise DryRunError(f"--topology={topology!r} needs libtpu to compile for TPUs, and it is not installed; "
                          f"install the one matching jax {jax.__version__}: {_install_hint()} "
                          f"(or `pip install -r requirements.txt`)")
    return chip, math.prod(int(n) for n in shape.split("x"))


def topology_devices(topology: str):
    """(chip, devices) for a topology string such as "v5p:4x4x4", or DryRunError naming what is allowed."""
    chip, _ = parse_topology(topology)
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as error:  # libtpu's own check, e.g. a shape the installed libtpu does not know
        raise DryRunError(f"--topology={topology!r} was rejected by libtpu: {error}; allowed: "
                          f"{_allowed_topologies()}") from None
    return chip, list(desc.devices)


# --------------------------------------------------------------------------------------------- compile


_OOM_RE = re.compile(r"RESOURCE_EXHAUSTED[^\n]*")


def _oom_line(error: Exception) -> Optional[str]:
    match = _OOM_RE.search(str(error))
    return match.group(0).strip() if match else None


def _knobs(cfg, mesh_shape: tuple, num_devices: int) -> list[str]:
    data_axis, expert_axis, model_axis = mesh_shape
    knobs = []
    if not cfg.mesh.get("fsdp", False):
        knobs.append(f"FSDP over 'data' (--config.mesh.fsdp=True: parameters and optimizer state split "
                     f"{data_axis} ways more)" if data_axis > 1 else
                     "FSDP over 'data' (--config.mesh.fsdp=True) on a topology with room for data > 1")
    experts, wider = cfg.model.moe.num_experts, expert_axis * 2
    if experts and experts % wider == 0:
        knobs.append(f"more expert parallelism (--config.mesh.shape='(-1,{wider},{model_axis})': "
                     f"{experts // wider} experts per chip instead of {experts // expert_axis}"
                     + (")" if num_devices % wider == 0 else f", on a topology of {wider} or more chips)"))
    if cfg.model.remat != "full":
        knobs.append(f"rematerialisation (--config.model.remat=full; now {cfg.model.remat!r}: activations "
                     f"recomputed in the backward pass instead of stored)")
    if experts and cfg.model.moe.group_size > 256:
        knobs.append(f"a smaller routing group (--config.model.moe.group_size={cfg.model.moe.group_size // 4}: "
                     f"the [G, S, E, C] dispatch and combine tensors shrink in proportion)")
    knobs.append(f"fewer tokens per chip (--config.data.batch_size={cfg.data.batch_size // 2}) or a larger "
                 f"topology")
    return knobs


def _layer_count(model_cfg) -> str:
    if "num_encoder_layers" in model_cfg:
        return f"{model_cfg.num_encoder_layers} + {model_cfg.num_decoder_layers}"
    return str(model_cfg.num_layers)


def _does_not_fit(cfg, topology, chip, mesh_shape, state, error, step_name, config_name) -> DoesNotFit:
    oom = _oom_line(error) or str(error).splitlines()[0]
    needed = re.search(r"required for (.+?) \(([\d.]+\s*[KMGT]i?B?)\) exceeds available HBM \(([\d.]+\s*[KMGT]i?B?)\)",
                       oom)
    state_gib = (state["params_per_chip"] + state["optimizer_per_chip"]) / GiB
    if needed:
        what = f"{needed.group(2)} of {needed.group(1)} per chip against {needed.group(3)} of usable HBM"
    else:
        what = f"more than the {chip.usable_hbm_bytes / GiB:.2f} GiB of usable HBM per chip"
    knobs = _knobs(cfg, mesh_shape, math.prod(mesh_shape))
    message = (
        f"Does not fit: the {step_name} of {config_name or 'this config'} (d_model={cfg.model.d_model}, "
        f"{_layer_count(cfg.model)} layers, {cfg.model.moe.num_experts} experts, batch {cfg.data.batch_size} x "
        f"{cfg.data.seq_len}) on --topology={topology} ({math.prod(mesh_shape)} x {chip.name}, "
        f"{chip.hbm} HBM each) with mesh (data, expert, model) = {tuple(mesh_shape)} needs "
        f"{what}; parameters and optimizer state alone take {state_gib:.2f} GiB per chip. What helps: "
        + "; ".join(knobs) + f". (XLA: {oom})")
    return DoesNotFit(message, dict(fits=False, message=message, xla_message=oom))


STEPS = ("train_step", "eval_step")


def trace_steps(cfg, devices, steps=STEPS) -> tuple[train.TrainSetup, dict]:
    """The trainer's own `train.setup(cfg, devices)` and its jitted steps traced from abstract shapes (the
    train state and a [batch_size, seq_len] batch, as ShapeDtypeStructs with their shardings) under
    `jax.set_mesh`, as `train.train` runs them. Returns (setup, {step name: (jax Traced, seconds)})."""
    run = train.setup(cfg, devices)
    batch = run.abstract_batch(cfg.data.batch_size, cfg.data.seq_len)
    traced = {}
    with jax.set_mesh(run.mesh):  # the mesh under which `sharding.constrain` pins layouts
        for name in steps:
            start = time.perf_counter()
            traced[name] = (getattr(run, name).trace(run.abstract_state, batch), time.perf_counter() - start)
    return run, traced


def _compile(traced, trace_s, mesh):
    times = dict(trace_s=trace_s)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = traced.lower()
    times["lower_s"] = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    times["compile_s"] = time.perf_counter() - start
    return compiled, times


def _memory(compiled, chip: Chip) -> dict:
    ma = compiled.memory_analysis()
    arguments, outputs = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    aliased, temporaries = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
    code = int(ma.generated_code_size_in_bytes)
    total = arguments + outputs - aliased + temporaries + code
    peak = int(getattr(ma, "peak_memory_in_bytes", 0))
    # XLA's peak (live buffers at the worst point of its schedule, plus its reserved space) is what it checks
    # against HBM; the sum of allocations can exceed it, since temporaries that are never live together count
    # once each.
    return dict(arguments=arguments, outputs=outputs, aliased=aliased, temporaries=temporaries,
                generated_code=code, total=total, xla_peak=peak, usable_hbm=int(chip.usable_hbm_bytes),
                fraction_of_usable_hbm=(peak or total) / chip.usable_hbm_bytes)


def _step_report(name, traced, trace_s, mesh, chip, num_chips, model_flops_per_step, cfg, topology, mesh_shape,
                 state, config_name) -> tuple[dict, str]:
    try:
        compiled, times = _compile(traced, trace_s, mesh)
    except Exception as error:  # XLA raises JaxRuntimeError; only RESOURCE_EXHAUSTED becomes DoesNotFit
        if _oom_line(error) is None:
            raise
        raise _does_not_fit(cfg, topology, chip, mesh_shape, state, error, name, config_name) from None
    hlo = compiled.as_text()
    flops_global = matmul_flops(traced.jaxpr)
    flops_per_chip = flops_global / num_chips
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    by_stage = {scope: flops / num_chips for scope, flops in matmul_flops_by_scope(traced.jaxpr).items()}
    collectives = hlo_collectives(hlo)
    report = dict(
        **times,
        memory_per_chip=_memory(compiled, chip),
        flops=dict(
            matmul_per_chip=flops_per_chip,
            matmul_global=flops_global,
            model_per_chip=model_flops_per_step / num_chips if model_flops_per_step else None,
            matmul_per_chip_by_stage=by_stage,
            xla_cost_analysis_per_chip_loop_bodies_once=float(cost.get("flops", 0.0)) if cost else None,
        ),
        step_time_floor_s=flops_per_chip / chip.peak_bf16_flops,
        step_shares=_step_shares(by_stage, collectives["all-to-all"]["bytes_per_step"], chip),
        collectives=collectives,
    )
    return report, hlo


def _step_shares(by_stage: dict, all_to_all_bytes: float, chip: Chip) -> dict:
    """Shares of a step-time estimate (matmuls at peak + all-to-all bytes at the ICI bandwidth, not overlapped)
    spent in routing, dispatch + combine, the experts, the rest of the model, and all-to-all."""
    seconds = {name: by_stage[scope] / chip.peak_bf16_flops for name, scope in
               (("routing", "moe_router"), ("experts", "moe_experts"), ("other", "other"))}
    seconds["dispatch"] = (by_stage["moe_dispatch"] + by_stage["moe_combine"]) / chip.peak_bf16_flops
    seconds["all_to_all"] = all_to_all_bytes / chip.ici_bandwidth if chip.ici_bandwidth else 0.0
    total = sum(seconds.values()) or 1.0
    return {name: value / total for name, value in seconds.items()}


def check_inputs(cfg, topology: str) -> tuple[Chip, int]:
    """The topology, the mesh against its chip count and the trainer's config checks, before anything is loaded
    or written: (chip, number of chips), or DryRunError / ValueError naming the value and what is allowed."""
    chip, num_chips = parse_topology(topology)
    try:
        sharding.mesh_shape(cfg.mesh.shape, num_chips)
    except ValueError as error:
        shape = tuple(cfg.mesh.shape) if isinstance(cfg.mesh.shape, (tuple, list)) else ()
        example = f"(-1,{shape[1]},{shape[2]})" if len(shape) == 3 and -1 not in shape[1:] else "(-1,1,1)"
        raise DryRunError(f"--topology={topology} has {num_chips} chips, and {error}; set mesh.shape so that "
                          f"data x expert x model = {num_chips}, or let one axis take the rest with -1 "
                          f"(e.g. --config.mesh.shape='{example}')") from None
    config_validation.validate(cfg, num_devices=num_chips)  # the trainer's own checks (ValueError)
    return chip, num_chips


def dry_run(cfg, topology: str, *, include_eval: bool = True, hlo_texts: Optional[dict] = None,
            config_name: str = "", load_skew_spec: str = "uniform") -> dict:
    """Compile `cfg`'s train step (and eval step) for `topology`; the report as a dict (see module doc).

    Raises DryRunError for a bad topology / mesh / missing libtpu, ValueError for a bad config (as the trainer
    does), DoesNotFit when the step needs more HBM than the chip has.
    """
    check_inputs(cfg, topology)
    load_skew.parse(load_skew_spec)
    chip, devices = topology_devices(topology)
    num_chips = len(devices)
    run, traced = trace_steps(cfg, devices, STEPS if include_eval else STEPS[:1])
    mesh_shape = tuple(run.mesh.shape[a] for a in ("data", "expert", "model"))
    state = state_bytes(run.abstract_state)
    model = run.abstract_model()
    params = run.family.count_params(model)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    model_flops = run.family.flops_per_token(model, cfg.data.seq_len) * tokens
    moe_shape = load_skew.moe_shape(model)
    load_LE, load_description = load_skew.loads(load_skew_spec, moe_shape) if moe_shape else (None, "")

    common = dict(mesh=run.mesh, chip=chip, num_chips=num_chips, cfg=cfg, topology=topology,
                  mesh_shape=mesh_shape, state=state, config_name=config_name)
    train_report, hlo = _step_report("train step", *traced["train_step"], model_flops_per_step=model_flops,
                                     **common)
    if hlo_texts is not None:
        hlo_texts["train_step"] = hlo
    report = dict(
        fits=True,
        config=config_name,
        topology=topology,
        chip=dict(name=chip.name, count=num_chips, peak_bf16_flops=chip.peak_bf16_flops, hbm=chip.hbm,
                  usable_hbm_bytes=int(chip.usable_hbm_bytes), source=chip.source,
                  usable_hbm_source="XLA's 'available HBM' in its out-of-memory message for this chip"),
        mesh=dict(zip(("data", "expert", "model"), mesh_shape), fsdp=bool(cfg.mesh.get("fsdp", False)),
                  split_physical_axes={name: list(spans) for name, spans in
                                       sharding.split_physical_axes(run.mesh).items()},
                  placement=sharding.placement_note(run.mesh)),
        tokens_per_step=tokens,
        params=dict(total=params["total"], active_per_token=params["active"], expert=params["expert"],
                    embedding=params["embedding"]),
        state_bytes=state,
        train_step=train_report,
    )
    if moe_shape is not None:
        flops, coll = train_report["flops"], train_report["collectives"]
        report["load_skew"] = load_skew.skew_report(
            moe_shape, load_LE, tokens_per_step=tokens, num_chips=num_chips, expert_axis=mesh_shape[1], chip=chip,
            compiled_matmul_per_chip=flops["matmul_per_chip"],
            compiled_expert_matmul_per_chip=flops["matmul_per_chip_by_stage"]["moe_experts"],
            compiled_all_to_all_bytes=coll["all-to-all"]["bytes_per_step"],
            compiled_peak_bytes=train_report["memory_per_chip"]["xla_peak"], description=load_description)
    if include_eval:
        eval_report, hlo = _step_report("eval step", *traced["eval_step"], model_flops_per_step=model_flops / 3,
                                        **common)
        report["eval_step"] = eval_report
        if hlo_texts is not None:
            hlo_texts["eval_step"] = hlo
    return report


# --------------------------------------------------------------------------------------------- text


def _size(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _source(op_name: str) -> str:
    """The einsum (or the last primitive) a compiled op comes from, out of its jax op_name path."""
    parts = op_name.split("/")
    return next((p for p in reversed(parts) if "->" in p), parts[-1] or "?")


def format_report(report: dict) -> str:
    chip, mesh, params, state = report["chip"], report["mesh"], report["params"], report["state_bytes"]
    lines = [
        f"{report['config'] or 'config'} on {report['topology']}: {chip['count']} x {chip['name']}, mesh "
        f"data={mesh['data']} expert={mesh['expert']} model={mesh['model']}{' fsdp' if mesh['fsdp'] else ''}"
        + (f"; physical axes split for {', '.join(mesh['split_physical_axes'])}: less collective bandwidth over "
           f"them" if mesh.get("split_physical_axes") else ""),
        f"chip: {chip['hbm']} HBM ({_size(chip['usable_hbm_bytes'])} usable), "
        f"{chip['peak_bf16_flops'] / 1e12:.0f} TFLOP/s bf16 peak; source: {chip['source']}",
        f"params: {_count(params['total'])} total, {_count(params['active_per_token'])} active per token "
        f"({_count(params['expert'])} in routed experts); {report['tokens_per_step']} tokens per step",
        f"per chip: params {_size(state['params_per_chip'])} (experts {_size(state['expert_params_per_chip'])} "
        f"of {_size(state['expert_params_total'])}), optimizer state {_size(state['optimizer_per_chip'])}",
    ]
    if mesh.get("placement"):
        lines.append(f"placement: {mesh['placement']}")
    for key in ("train_step", "eval_step"):
        step = report.get(key)
        if step is None:
            continue
        mem, flops, coll = step["memory_per_chip"], step["flops"], step["collectives"]
        lines.append(
            f"{key.replace('_', ' ')}: compiled in {step['compile_s']:.1f} s (trace {step['trace_s']:.1f} s, lower "
            f"{step['lower_s']:.1f} s)")
        lines.append(
            f"  memory per chip: peak {_size(mem['xla_peak'])} ({100 * mem['fraction_of_usable_hbm']:.1f}% of usable "
            f"HBM); allocations {_size(mem['total'])} = arguments {_size(mem['arguments'])} + outputs "
            f"{_size(mem['outputs'])} - aliased {_size(mem['aliased'])} + temporaries {_size(mem['temporaries'])}"
            f" + code {_size(mem['generated_code'])}")
        model_flops = flops["model_per_chip"]
        lines.append(
            f"  FLOPs per chip per step: {flops['matmul_per_chip']:.3e} (matmuls as compiled)"
            + (f", {model_flops:.3e} model (6N + attention)" if model_flops else "")
            + f"; step-time floor at peak {step['step_time_floor_s'] * 1e3:.2f} ms")
        parts = [f"{kind} {coll[kind]['per_step']}x ({coll[kind]['ops']} ops) {_size(coll[kind]['bytes_per_step'])}"
                 for kind in COLLECTIVES if coll[kind]["ops"]]
        lines.append("  collectives per step per chip: " + ("; ".join(parts) or "none"))
        for top in coll.get("largest", [])[:1]:
            lines.append(f"  largest: {top['kind']} {top['type'].lstrip('(')} x{top['per_step']} = "
                         f"{_size(top['bytes_per_step'])} from {_source(top['op_name'])}")
        if step.get("step_shares"):
            lines.append("  step shares (matmuls at peak + all-to-all at ICI bandwidth): " + ", ".join(
                f"{name} {share:.1%}" for name, share in step["step_shares"].items()))
    if report.get("load_skew"):
        lines += load_skew.format_lines(report["load_skew"], _size)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- CLI


_FLAGS: dict = {}


def _define_flags() -> None:
    """The command's flags, defined only when run as a command (importing this module defines none)."""
    from absl import flags
    from ml_collections import config_flags

    _FLAGS["config"] = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (with an optional :arg), as for moe_jax.main.", lock_config=True)
    _FLAGS["topology"] = flags.DEFINE_string(
        "topology", None, "TPU topology, GENERATION:SHAPE: " + "; ".join(
            f"{gen}:{{{','.join(chip.shapes)}}}" for gen, chip in CHIPS.items()))
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", "runs/dryrun", "Where dryrun.json (and libtpu's logs) go.")
    _FLAGS["eval"] = flags.DEFINE_bool("eval", True, "Also compile the eval step.")
    _FLAGS["load_skew"] = flags.DEFINE_string(
        "load_skew", "uniform", "Expert load for the per-chip expert work: uniform | worst | observed:RUN (the "
        "most skewed logged step of the run in RUN).")
    flags.mark_flags_as_required(["config", "topology"])


def _config_name() -> str:
    """The --config value and its overrides, as typed."""
    from absl import flags

    flag = flags.FLAGS["config"]
    overrides = " ".join(f"--config.{k}={v}" for k, v in flag.override_values.items())
    return f"{flag.config_filename} {overrides}".strip()


def _first_missing(path: str) -> Optional[str]:
    """The outermost folder of `path` that does not exist yet (what makedirs would create), or None."""
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        path, missing = os.path.dirname(path), path
    return missing


def main(argv) -> int:
    del argv
    cfg, topology, workdir = _FLAGS["config"].value, _FLAGS["topology"].value, _FLAGS["workdir"].value
    check_inputs(cfg, topology)  # a mistake is an `error:` line (cli.run) and leaves no workdir behind
    skew = _FLAGS["load_skew"].value
    kind, skew_run = load_skew.parse(skew)
    if kind == "observed" and not os.path.isfile(os.path.join(skew_run, "metrics.jsonl")):
        raise FileNotFoundError(f"--load_skew={skew}: no {os.path.join(skew_run, 'metrics.jsonl')} (give the "
                                f"workdir of a training run)")
    created = _first_missing(workdir)
    os.makedirs(workdir, exist_ok=True)
    os.environ.setdefault("TPU_LOG_DIR", os.path.join(os.path.abspath(workdir), "tpu_logs"))
    path = os.path.join(workdir, "dryrun.json")
    try:
        hlo_texts = {}
        report = dry_run(cfg, topology, include_eval=_FLAGS["eval"].value, hlo_texts=hlo_texts,
                         config_name=_config_name(), load_skew_spec=skew)
    except DoesNotFit as error:
        with open(path, "w") as f:
            json.dump(dict(error.report, topology=topology), f, indent=2)
        print(str(error), file=sys.stderr)
        print(f"wrote {path}", file=sys.stderr)
        return 3
    except ValueError:  # found only with the devices (libtpu's topology check, a mesh it cannot place)
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    for name, text in hlo_texts.items():
        with open(os.path.join(workdir, f"{name}.hlo.txt"), "w") as f:
            f.write(text)
    print(format_report(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    from moe_jax import cli

    # user errors: one `error:` line, status 2; DoesNotFit: its paragraph, status 3
    cli.run(main, define_flags=_define_flags)
