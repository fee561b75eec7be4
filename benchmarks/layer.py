"""Forward + backward time of `MoeLayer` against a dense FFN of the same d_ff (equal active FLOPs, top-1).

    python benchmarks/layer.py            # T in {4096, 16384}, E in {8, 32}, every dispatcher (~10 min, 2 cores)
    python benchmarks/layer.py --quick    # T = 4096, E = 8 only
    python benchmarks/layer.py --write    # also replace the "## MoE layer" section of benchmarks/RESULTS.md

d = 512, f = 2048, top-1, capacity factor 1.25, group size 1024, float32, loss sum(y * x). Dense baselines: the
same FFN written four ways (2D matmul over [T, d], 3D einsum over [G, S, d], 3D dot_general, 2D with kernels
stored transposed); per token count the fastest, picked by alternated runs, is the baseline of the targets,
and the 3D einsum (the old baseline) is reported beside it. Each case is jitted once, warmed up, then timed
`--runs` times; both dense forms and every dispatcher alternate call by call in one process, and each ratio
is median MoE / median dense.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import dispatch
from moe_jax.moe import MoeLayer

D_MODEL, D_FF, GROUP = 512, 2048, 1024
TARGETS = {"dropless": 1.15, "index": 1.35, "einsum": 1.6}
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def time_fn(fn, args, runs):
    """Median seconds of `runs` calls after compilation and one warm-up call."""
    return statistics.median(time_pair([(fn, args)], runs)[0])


def time_pair(cases, runs):
    """Per case, `runs` timings, the cases interleaved call by call so that drift in the load of a shared
    machine hits all of them alike."""
    for fn, args in cases:
        jax.block_until_ready(fn(*args))  # compile
        jax.block_until_ready(fn(*args))  # warm-up
    times = [[] for _ in cases]
    for _ in range(runs):
        for (fn, args), out in zip(cases, times):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out.append(time.perf_counter() - start)
    return times


def dense_params_and_input(num_tokens, group=GROUP, d_model=D_MODEL, d_ff=D_FF):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = dict(wi=jax.random.normal(k1, (d_model, d_ff)) * 0.02, wo=jax.random.normal(k2, (d_ff, d_model)) * 0.02)
    return params, jax.random.normal(k3, (num_tokens // group, group, d_model))


def _ffn_2d_matmul(x_GSd, wi, wo):
    x_Td = x_GSd.reshape(-1, x_GSd.shape[-1])
    return (jax.nn.relu(x_Td @ wi) @ wo).reshape(x_GSd.shape)


def _ffn_3d_einsum(x_GSd, wi, wo):
    return jnp.einsum("GSf,fd->GSd", jax.nn.relu(jnp.einsum("GSd,df->GSf", x_GSd, wi)), wo)


def _ffn_3d_dot_general(x_GSd, wi, wo):
    contract_last = (((2,), (0,)), ((), ()))
    h = jax.lax.dot_general(x_GSd, wi, contract_last)
    return jax.lax.dot_general(jax.nn.relu(h), wo, contract_last)


def _ffn_2d_transposed_kernels(x_GSd, wi_fd, wo_df):
    # Kernels stored the other way round ([f, d], [d, f]: torch Linear's layout), contracted on their last axis.
    x_Td = x_GSd.reshape(-1, x_GSd.shape[-1])
    contract_both_last = (((1,), (1,)), ((), ()))
    h_Tf = jax.nn.relu(jax.lax.dot_general(x_Td, wi_fd, contract_both_last))
    return jax.lax.dot_general(h_Tf, wo_df, contract_both_last).reshape(x_GSd.shape)


# The same dense FFN written the ways one can write it; the benchmark keeps the fastest per case.
DENSE_FORMS = {"2d_matmul": _ffn_2d_matmul, "3d_einsum": _ffn_3d_einsum, "3d_dot_general": _ffn_3d_dot_general,
               "2d_transposed": _ffn_2d_transposed_kernels}


def dense_step(num_tokens, form="3d_einsum", **shape):
    """fwd + bwd of one dense FFN of width D_FF written as DENSE_FORMS[form]; loss sum(y * x), whose cotangent
    is x (sum(y) would hand XLA an all-ones cotangent and let it fold two of the six matmuls into reductions).
    `shape`: group, d_model, d_ff other than the layer benchmark's."""
    params, x = dense_params_and_input(num_tokens, **shape)
    ffn = DENSE_FORMS[form]
    if form == "2d_transposed":
        params = dict(wi=params["wi"].T.copy(), wo=params["wo"].T.copy())  # the same kernels, stored transposed

    def loss(params, x):
        return jnp.sum(ffn(x, params["wi"], params["wo"]) * x)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def moe_step(num_tokens, num_experts, dispatcher):
    moe = MoeLayer(d_model=D_MODEL, d_ff=D_FF, num_experts=num_experts, k=1, dispatcher=dispatcher,
                   capacity_factor=1.25, group_size=GROUP, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
    x = jax.random.normal(jax.random.PRNGKey(3), (num_tokens // GROUP, GROUP, D_MODEL))

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(y * x) + 0.01 * aux["load_balancing_loss"]

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def machine():
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1)
    except (OSError, AttributeError):
        pass
    return f"{os.cpu_count()} cores (nproc {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()}), {cpu}, backend {jax.default_backend()}"


def commit() -> str:
    """HEAD's short hash, and whether moe_jax/ or benchmarks/ differ from it (what was measured)."""
    root = os.path.dirname(os.path.dirname(RESULTS))
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "moe_jax", "benchmarks"], capture_output=True,
                           text=True, cwd=root).stdout.strip()
    return (result.stdout.strip() or "unknown") + (" + uncommitted changes" if dirty else "")


def fastest_dense_form(num_tokens, runs, **shape):
    """(name, {name: median ms}) of the DENSE_FORMS at this token count, timed in alternation."""
    names = list(DENSE_FORMS)
    times = time_pair([dense_step(num_tokens, name, **shape) for name in names], runs)
    medians = {name: 1e3 * statistics.median(t) for name, t in zip(names, times)}
    return min(medians, key=medians.get), medians


HEADER = ("| tokens | E | dispatcher | MoE ms | fastest dense ms (form) | 3D-einsum dense ms | MoE / fastest dense "
          "| MoE / 3D einsum | target | met |")
SEPARATOR = "|---" * (HEADER.count("|") - 1) + "|"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T=4096, E=8 only")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--form_runs", type=int, default=5, help="runs per dense form when picking the fastest")
    parser.add_argument("--dispatchers", default=",".join(dispatch.DISPATCHERS))
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    token_counts = [4096] if args.quick else [4096, 16384]
    expert_counts = [8] if args.quick else [8, 32]
    dispatchers = args.dispatchers.split(",")

    rows, form_lines = [], []
    print(HEADER, flush=True)
    for num_tokens in token_counts:
        form, form_ms = fastest_dense_form(num_tokens, args.form_runs)
        form_lines.append(f"T = {num_tokens}: " + ", ".join(f"{n} {ms:.0f} ms" for n, ms in form_ms.items())
                          + f" -> {form}")
        print(form_lines[-1], flush=True)
        for num_experts in expert_counts:
            # Both dense forms and every dispatcher alternate call by call, so drift in the machine's load hits
            # every side of the ratios alike.
            cases = [dense_step(num_tokens, form), dense_step(num_tokens, "3d_einsum")]
            cases += [moe_step(num_tokens, num_experts, name) for name in dispatchers]
            fast_ms, einsum_ms, *moe_ms = (1e3 * statistics.median(t) for t in time_pair(cases, args.runs))
            for name, ms in zip(dispatchers, moe_ms):
                ratio = ms / fast_ms
                row = (f"| {num_tokens} | {num_experts} | {name} | {ms:.0f} | {fast_ms:.0f} ({form}) | {einsum_ms:.0f} "
                       f"| {ratio:.2f} | {ms / einsum_ms:.2f} | <= {TARGETS[name]} | "
                       f"{'yes' if ratio <= TARGETS[name] else f'no (by {ratio - TARGETS[name]:.2f})'} |")
                rows.append(row)
                print(row, flush=True)
    if args.write:
        write_results(rows, form_lines, args)


def write_results(rows, form_lines, args):
    command = "python benchmarks/layer.py" + (" --quick" if args.quick else "") + f" --runs {args.runs}"
    section = "\n".join([
        "## MoE layer", "", provenance(command),
        f"Forward + backward, d={D_MODEL}, f={D_FF}, top-1, CF 1.25, group size {GROUP}, float32, loss sum(y * x); "
        f"median of {args.runs} runs after warm-up, both dense forms and all dispatchers alternating call by call; "
        f"dense = one FFN with the same d_ff (equal active FLOPs). The fastest dense form is picked per token "
        f"count from {len(DENSE_FORMS)} ways of writing it ({args.form_runs} alternated runs each):", "",
        *[f"- {line}" for line in form_lines], "",
        HEADER, SEPARATOR, *rows, ""])
    replace_section("## MoE layer", section)


def provenance(command: str) -> str:
    """The line under a RESULTS.md heading: command, date, machine, jax, commit and the load at the end."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"`{command}` — {date}; {machine()}; jax {jax.__version__}; commit {commit()}; load average "
            f"{os.getloadavg()[0]:.1f} at the end (a shared machine: absolute times move, alternated ratios much less).")


def replace_section(heading: str, section: str) -> None:
    """Put `section` (starting with the line `heading`) in benchmarks/RESULTS.md in place of the section under
    that heading (up to the next "## "), or at the end."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n\n"
    pattern = re.compile(re.escape(heading) + r"\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _: section.rstrip("\n") + "\n", text) if pattern.search(text) else (
        text.rstrip("\n") + "\n\n" + section)
    with open(RESULTS, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
