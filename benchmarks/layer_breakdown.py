"""Where an MoE layer's time goes: each dispatcher's stages timed alone, forward and forward + backward.

    python benchmarks/layer_breakdown.py                 # the four layer.py cases, every dispatcher (~15 min)
    python benchmarks/layer_breakdown.py --quick         # T = 4096, E = 8 only
    python benchmarks/layer_breakdown.py --write         # also replace its section of benchmarks/RESULTS.md
    python benchmarks/layer_breakdown.py --baseline_dispatch=OLD.py   # whole layer, this dispatch.py vs OLD.py

Stages (the same code the layer runs: `MoeLayer._route` and `dispatch.<name>_stages`):
  route    router logits, softmax, top-1, slot assignment, load-balancing and z losses
  send     the dispatch into the expert buffer (one-hot einsum, or the row bookkeeping and a gather)
  experts  the expert matmuls on the buffer (batched, or dense part + overflow blocks for dropless)
  combine  back to token order, weighted (one-hot einsum, or a gather and a weighted sum)
Each stage is jitted on its own with the routing fixed, and timed fwd only and fwd + bwd (loss sum(out * c),
c a fixed random cotangent), all of a case's functions alternating call by call, median of `--runs`. The
backward time is (fwd + bwd) - fwd. Beside the times: matmul GFLOP of the stage's fwd + bwd jaxpr
(program_costs.matmul_flops) and the GB XLA's cost analysis says the compiled fwd + bwd touches. Stages
jitted alone cannot fuse with their neighbours, so their sum need not equal the whole layer (also shown).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import pathlib
import statistics
import sys
import unittest.mock

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from layer import (D_FF, D_MODEL, GROUP, dense_step, moe_step, provenance, replace_section,  # noqa: E402
                   time_pair)

from moe_jax import dispatch, moe, program_costs, routing  # noqa: E402

STAGES = ("route", "send", "experts", "combine")


def _layer(num_experts, dispatcher):
    return moe.MoeLayer(d_model=D_MODEL, d_ff=D_FF, num_experts=num_experts, k=1, dispatcher=dispatcher,
                        capacity_factor=1.25, group_size=GROUP, rngs=nnx.Rngs(0))


def _stages_for(name, shape, route, experts):
    if name == "einsum":
        return dispatch.einsum_stages(shape, route, experts)
    if name == "index":
        return dispatch.index_stages(shape, route, experts)
    return dispatch.dropless_stages(shape, route, experts, dispatch.default_grouped_matmul(), None)  # as the layer


def _with_cotangent(fn, num_args, out_shape, seed):
    """fwd: fn(*args); fwd + bwd: value and grad of sum(fn(*args) * c) for a fixed random c of fn's output
    shape. The value matters: that loss is linear in the output, so its gradient alone never needs the output
    and XLA drops the stage's last forward op (for the experts, one of the six matmuls), as inside the layer
    it cannot."""
    cotangent = jax.random.normal(jax.random.PRNGKey(seed), out_shape)

    def loss(*args):
        return jnp.sum(fn(*args).astype(jnp.float32) * cotangent)

    return fn, jax.value_and_grad(loss, argnums=tuple(range(num_args)))


def stage_functions(num_tokens, num_experts, name):
    """{stage: (fwd fn, fwd+bwd fn, args)} for one case; the routing is computed once and held fixed."""
    layer = _layer(num_experts, name)
    graphdef, router, rest = nnx.split(layer, nnx.PathContains("router_kernel"), ...)
    params = nnx.state(layer, nnx.Param)
    x_GSd = jax.random.normal(jax.random.PRNGKey(3), (num_tokens // GROUP, GROUP, D_MODEL))
    capacity = None if dispatch.is_dropless(name) else routing.expert_capacity(GROUP, num_experts, 1.25)

    def route(router, x_GSd):
        route, _, losses = nnx.merge(graphdef, router, rest)._route(x_GSd, None, None, capacity, False)
        return route, losses

    kernel = router
    fixed_route, _ = jax.jit(route)(kernel, x_GSd)
    experts = dispatch.ExpertFFN(wi=params["wi"][...], wo=params["wo"][...])
    stages = _stages_for(name, x_GSd.shape, fixed_route, experts)
    buffer = jax.jit(stages.send)(x_GSd)

    def route_out(kernel, x_GSd):
        r, losses = route(kernel, x_GSd)
        return r.weight[..., 0] + 0.01 * losses["load_balancing_loss"] + 1e-3 * losses["router_z_loss"]

    # The routing is an argument (not differentiated), not a constant the stages close over, as inside the
    # layer: nothing derived from it can be folded at compile time. (At (4096, 8) this measured the same as
    # closing over it; it rules the question out rather than fixing a measured error.)
    def send(x_GSd, route):
        return _stages_for(name, x_GSd.shape, route, experts).send(x_GSd)

    def compute(wi, wo, x_buffer, route):
        ffn = dataclasses.replace(experts, wi=wi, wo=wo)
        return _stages_for(name, x_GSd.shape, route, ffn).compute(x_buffer)

    def combine(y_buffer, weight, route):
        r = dataclasses.replace(route, weight=weight)
        return _stages_for(name, x_GSd.shape, r, experts).combine(y_buffer, x_GSd.dtype)

    out = {}
    for stage, fn, args, shape in (
            ("route", route_out, (kernel, x_GSd), fixed_route.weight.shape[:2]),
            ("send", send, (x_GSd,), buffer.shape),
            ("experts", compute, (experts.wi, experts.wo, buffer), buffer.shape),
            ("combine", combine, (buffer, fixed_route.weight), x_GSd.shape)):
        fwd, fwd_bwd = _with_cotangent(fn, len(args), shape, seed=len(out))  # grads of these args only
        out[stage] = (jax.jit(fwd), jax.jit(fwd_bwd), args if stage == "route" else (*args, fixed_route))
    return out


def costs(fn, args):
    """(matmul GFLOP of the jaxpr, GB accessed by XLA's cost analysis of the compiled program)."""
    traced = fn.trace(*args)
    cost = traced.lower().compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return program_costs.matmul_flops(traced.jaxpr) / 1e9, float(cost.get("bytes accessed", 0.0)) / 1e9


HEADER = ("| tokens | E | dispatcher | stage | fwd ms | bwd ms | fwd+bwd ms | share | matmul GFLOP fwd+bwd "
          "| GB accessed fwd+bwd |")
SEPARATOR = "|---" * (HEADER.count("|") - 1) + "|"


def breakdown(num_tokens, num_experts, name, runs, dense_form):
    functions = stage_functions(num_tokens, num_experts, name)
    cases = [(f, a) for fwd, fwd_bwd, a in functions.values() for f in (fwd, fwd_bwd)]
    cases += [moe_step(num_tokens, num_experts, name), dense_step(num_tokens, dense_form)]
    medians = [1e3 * statistics.median(t) for t in time_pair(cases, runs)]
    whole_ms, dense_ms = medians[-2:]
    rows, total = [], 0.0
    for i, (stage, (_, fwd_bwd, args)) in enumerate(functions.items()):
        fwd_ms, both_ms = medians[2 * i], medians[2 * i + 1]
        total += both_ms
        gflop, gbytes = costs(fwd_bwd, args)
        rows.append([stage, fwd_ms, both_ms - fwd_ms, both_ms, gflop, gbytes])
    lines = [f"| {num_tokens} | {num_experts} | {name} | {stage} | {f:.0f} | {b:.0f} | {fb:.0f} | {fb / total:.0%} "
             f"| {gf:.1f} | {gb:.2f} |" for stage, f, b, fb, gf, gb in rows]
    whole_gflop, whole_gb = costs(*moe_step(num_tokens, num_experts, name))
    dense_gflop, dense_gb = costs(*dense_step(num_tokens, dense_form))
    lines.append(f"| {num_tokens} | {num_experts} | {name} | **sum of stages** | | | {total:.0f} | | "
                 f"{sum(r[4] for r in rows):.1f} | {sum(r[5] for r in rows):.2f} |")
    lines.append(f"| {num_tokens} | {num_experts} | {name} | **whole layer** | | | {whole_ms:.0f} | "
                 f"{whole_ms / dense_ms:.2f}x dense | {whole_gflop:.1f} | {whole_gb:.2f} |")
    lines.append(f"| {num_tokens} | {num_experts} | dense ({dense_form}) | FFN | | | {dense_ms:.0f} | 1.00x | "
                 f"{dense_gflop:.1f} | {dense_gb:.2f} |")
    return lines


def load_dispatch_file(path):
    spec = importlib.util.spec_from_file_location("baseline_dispatch", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def compiled_moe_step(num_tokens, num_experts, name, dispatch_module):
    """The layer's fwd + bwd compiled with `dispatch_module` in place of moe_jax.dispatch."""
    fn, args = moe_step(num_tokens, num_experts, name)
    with unittest.mock.patch.object(moe, "dispatch", dispatch_module):
        return fn.lower(*args).compile(), args


def compare_dispatch(path, token_counts, expert_counts, dispatchers, runs):
    """Whole layer fwd + bwd: this dispatch.py against the one at `path`, alternated; lines of a table."""
    old = load_dispatch_file(path)
    lines = ["| tokens | E | dispatcher | this ms | baseline ms | this / baseline |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for num_tokens in token_counts:
        for num_experts in expert_counts:
            for name in dispatchers:
                new_ms, old_ms = (1e3 * statistics.median(t) for t in time_pair(
                    [compiled_moe_step(num_tokens, num_experts, name, dispatch),
                     compiled_moe_step(num_tokens, num_experts, name, old)], runs))
                lines.append(f"| {num_tokens} | {num_experts} | {name} | {new_ms:.0f} | {old_ms:.0f} | "
                             f"{new_ms / old_ms:.2f} |")
                print(lines[-1], flush=True)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T=4096, E=8 only")
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--experts", default="8,32")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dispatchers", default=",".join(dispatch.DISPATCHERS))
    parser.add_argument("--dense_form", default="2d_matmul", help="a name in layer.DENSE_FORMS")
    parser.add_argument("--baseline_dispatch", default=None,
                        help="a dispatch.py file: time the whole layer with it and with today's, alternated")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    token_counts = [4096] if args.quick else [int(t) for t in args.tokens.split(",")]
    expert_counts = [8] if args.quick else [int(e) for e in args.experts.split(",")]
    dispatchers = args.dispatchers.split(",")
    if args.baseline_dispatch:
        compare_dispatch(args.baseline_dispatch, token_counts, expert_counts, dispatchers, args.runs)
        return 0
    lines = [HEADER, SEPARATOR]
    print("\n".join(lines), flush=True)
    for num_tokens in token_counts:
        for num_experts in expert_counts:
            for name in dispatchers:
                new = breakdown(num_tokens, num_experts, name, args.runs, args.dense_form)
                print("\n".join(new), flush=True)
                lines += new
    if args.write:
        write_results(lines, args)
    return 0


def write_results(lines, args):
    command = ("python benchmarks/layer_breakdown.py" + (" --quick" if args.quick else
                                                         f" --tokens {args.tokens} --experts {args.experts}")
               + f" --runs {args.runs}")
    section = "\n".join([
        "## MoE layer: where the time goes", "", provenance(command),
        "Each stage jitted alone with the routing fixed (benchmarks/layer_breakdown.py says how); fwd and "
        "fwd + bwd timed in alternation with the whole layer and the dense FFN, median of "
        f"{args.runs}; bwd = (fwd + bwd) - fwd; share = of the sum of stages. GFLOP: matmuls of the fwd + bwd "
        "jaxpr; GB: XLA's cost analysis of the compiled fwd + bwd.", "", *lines, ""])
    replace_section("## MoE layer: where the time goes", section)


if __name__ == "__main__":
    sys.exit(main())
