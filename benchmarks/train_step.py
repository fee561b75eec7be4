"""Whole train steps: tiny_switch vs tiny_dense throughput, compile time against depth, and MFU.

    python benchmarks/train_step.py            # ~2 min on 2 cores
    python benchmarks/train_step.py --write    # also replace the "## Train step" section of benchmarks/RESULTS.md

1. tokens/s of `experiments/tiny_switch.py` / `experiments/tiny_dense.py` (read from the experiment files, so
   a retuned config is measured as it is): both jitted train steps are compiled, then timed in alternation,
   `--steps` steps each per round for `--rounds` rounds, on the same pre-built batches (the input pipeline is
   measured in the "Data pipeline" section). Target >= 0.8; the Switch paper measured 0.63 at CF 1.0 on TPU.
2. compile time (lower + XLA compile of the train step) of tiny_switch with 16 layers / with 4 layers,
   alternating, `--compiles` times each, median. Target <= 1.3 (blocks are nnx.scan'ned).
3. MFU: model FLOPs per step (`model.flops_per_token`, PaLM accounting) / step time / the measured peak of a
   large float32 matmul on this CPU (`chips.measured_matmul_flops`). (XLA's `cost_analysis()` of the compiled
   step is no substitute: it counts the body of the scanned layers' while loop once, not once per block.)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark; quiet if libtpu is installed
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # experiments/ (a config imports its sibling), layer.py

import jax  # noqa: E402
from layer import fastest_dense_form, provenance, replace_section, time_pair  # noqa: E402  (benchmarks/layer.py)

from moe_jax import chips, data, sharding, train  # noqa: E402
from moe_jax.models import layers  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
TARGET_RATIO, TARGET_COMPILE = 0.8, 1.3


def load_config(name: str):
    """`get_config()` of experiments/<name>.py, loaded from the file as it is now."""
    spec = importlib.util.spec_from_file_location(f"experiments.{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


class Stepper:
    """One config's compiled train step on real batches; calling it runs `steps` steps (state donated).
    `matmul_form`: the models' dense projections as `layers.linear` writes them ("2d", the default, or
    "einsum"), fixed when the step is compiled (here, at construction)."""

    def __init__(self, cfg, steps: int, num_batches: int = 4, matmul_form: str = "2d"):
        cfg.mesh.shape = (1, 1, 1)
        self.cfg, self.steps = cfg, steps
        self.run = train.setup(cfg, jax.devices()[:1])
        self.state = self.run.init_state()
        it = data.make_train_iterator(cfg.data, process_index=0, process_count=1)
        self.batches = [sharding.shard_batch(next(it), self.run.mesh) for _ in range(num_batches)]
        self.calls = 0
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        self.model_flops = (self.run.family.flops_per_token(self.run.abstract_model(), cfg.data.seq_len)
                            * self.tokens_per_step)
        default, layers.MATMUL_FORM = layers.MATMUL_FORM, matmul_form
        try:
            jax.block_until_ready(self())  # compiled with this form
        finally:
            layers.MATMUL_FORM = default

    def __call__(self):
        with jax.set_mesh(self.run.mesh):
            for _ in range(self.steps):
                self.state, metrics = self.run.train_step(self.state, self.batches[self.calls % len(self.batches)])
                self.calls += 1
        return metrics["loss"]


def compile_seconds(cfg) -> float:
    """Wall time to set up, lower and compile the train step (a fresh jit, so nothing is cached)."""
    start = time.perf_counter()
    run = train.setup(cfg, jax.devices()[:1])
    with jax.set_mesh(run.mesh):
        run.train_step.lower(run.abstract_state, run.abstract_batch(cfg.data.batch_size, cfg.data.seq_len)).compile()
    return time.perf_counter() - start


def padding_note(cfg) -> str:
    moe = cfg.model.moe
    if moe.dispatcher == "dropless":
        return ""
    return (f" At capacity factor {moe.capacity_factor} the {moe.dispatcher} dispatcher runs the expert FFNs on "
            f"{moe.capacity_factor}x the rows of a dense FFN (empty slots included): work model FLOPs do not count.")


def compile_times(repeats: int) -> tuple[float, float]:
    """Median compile seconds of tiny_switch with 4 and with 16 layers, alternating."""
    times = {4: [], 16: []}
    for _ in range(repeats):
        for layers in (4, 16):
            cfg = load_config("tiny_switch")
            cfg.model.num_layers = layers
            cfg.mesh.shape = (1, 1, 1)
            times[layers].append(compile_seconds(cfg))
    return statistics.median(times[4]), statistics.median(times[16])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="train steps per timed call")
    parser.add_argument("--compiles", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)

    peaks = [chips.measured_matmul_flops.__wrapped__()]  # again mid-run and at the end: the best of three
    dense, switch = Stepper(load_config("tiny_dense"), args.steps), Stepper(load_config("tiny_switch"), args.steps)
    einsum_steppers = [Stepper(load_config(name), args.steps, matmul_form="einsum")
                       for name in ("tiny_dense", "tiny_switch")]
    dense_t, switch_t, *einsum_t = time_pair([(dense, ()), (switch, ()), *((s, ()) for s in einsum_steppers)],
                                             args.rounds)
    form_speedups = [statistics.median(e) / statistics.median(t) for e, t in zip(einsum_t, (dense_t, switch_t))]
    dense_s, switch_s = statistics.median(dense_t) / args.steps, statistics.median(switch_t) / args.steps
    round_ratios = sorted(d / s for d, s in zip(dense_t, switch_t))
    peaks.append(chips.measured_matmul_flops.__wrapped__())
    compile_4, compile_16 = compile_times(args.compiles)
    peaks.append(chips.measured_matmul_flops.__wrapped__())
    peak = max(peaks)  # the least disturbed measurement on a shared machine
    # The model's own MLP shape written each way.
    m, d = dense.cfg.model, dense.cfg.data
    mlp_form, mlp_ms = fastest_dense_form(d.batch_size * d.seq_len, args.rounds, group=d.seq_len,
                                          d_model=m.d_model, d_ff=m.d_ff)
    rows = []
    for name, stepper, step_s in (("tiny_dense", dense, dense_s), ("tiny_switch", switch, switch_s)):
        rows.append(f"| {name} | {1e3 * step_s:.0f} | {stepper.tokens_per_step / step_s:,.0f} | "
                    f"{stepper.model_flops / 1e9:.2f} | {stepper.model_flops / step_s / peak:.1%} |")
    ratio = dense_s / switch_s  # tokens/s of switch / tokens/s of dense: same tokens per step

    header = "| config | ms / step | tokens/s | model GFLOP / step | MFU |"
    lines = [header, "|---|---|---|---|---|", *rows, "",
             f"tokens/s tiny_switch / tiny_dense: **{ratio:.2f}** (target >= {TARGET_RATIO}: "
             f"{'met' if ratio >= TARGET_RATIO else 'missed'}; Switch paper, TPU, CF 1.0: 0.63); ratio of the "
             f"rounds {round_ratios[0]:.2f} to {round_ratios[-1]:.2f}. "
             f"Model FLOPs switch / dense {switch.model_flops / dense.model_flops:.2f}.",
             f"Compile (setup + lower + compile) of tiny_switch's train step: 4 layers {compile_4:.1f} s, 16 layers "
             f"{compile_16:.1f} s, ratio **{compile_16 / compile_4:.2f}** (target <= {TARGET_COMPILE}: "
             f"{'met' if compile_16 / compile_4 <= TARGET_COMPILE else 'missed'}).",
             f"Peak: {peak / 1e9:.1f} GFLOP/s (2048^3 float32 matmul, median of 5 calls; best of measurements "
             f"before, during and after: {', '.join(f'{p / 1e9:.1f}' for p in peaks)})." + padding_note(switch.cfg),
             f"The dense MLP alone at the model's shape (B {d.batch_size}, L {d.seq_len}, d {m.d_model}, f {m.d_ff}, "
             f"relu, fwd + bwd, {args.rounds} alternated runs each): "
             + ", ".join(f"{name} {ms:.1f} ms" for name, ms in mlp_ms.items())
             + f"; fastest {mlp_form}, 3d_einsum / {mlp_form} = {mlp_ms['3d_einsum'] / mlp_ms[mlp_form]:.2f}.",
             f"The models' projections (attention q/k/v/o, MLPs, output head) as 2D matmuls (`layers.MATMUL_FORM="
             f"\"2d\"`, the default) against the same steps compiled as einsums, timed in the same rounds: train step "
             f"einsum / 2d = **{form_speedups[0]:.2f}** for tiny_dense, **{form_speedups[1]:.2f}** for tiny_switch."]
    print("\n".join(lines), flush=True)
    if args.write:
        write_results(lines, args, dense.cfg, switch.cfg)


def write_results(lines, args, dense_cfg, switch_cfg):
    command = f"python benchmarks/train_step.py --rounds {args.rounds} --steps {args.steps} --compiles {args.compiles}"
    m, d = switch_cfg.model, dense_cfg.data
    section = "\n".join([
        "## Train step", "", provenance(command),
        f"Configs as in experiments/ at that time: d_model {m.d_model}, d_ff {m.d_ff}, {m.num_layers} layers, "
        f"batch {d.batch_size} x {d.seq_len}; Switch: {m.moe.num_experts} experts every {m.moe.every} layers, "
        f"CF {m.moe.capacity_factor}, group {m.moe.group_size}, dispatcher {m.moe.dispatcher}. One device; "
        f"median over {args.rounds} alternating rounds of {args.steps} steps.", "", *lines, ""])
    replace_section("## Train step", section)


if __name__ == "__main__":
    sys.exit(main())
