"""Forward + backward time of `MoeLayer` against a dense FFN of the same d_ff (equal active FLOPs, top-1).

    python benchmarks/layer.py            # T in {4096, 16384}, E in {8, 32}, every dispatcher (~10 min, 2 cores)
    python benchmarks/layer.py --quick    # T = 4096, E = 8 only
    python benchmarks/layer.py --write    # also replace the "## MoE layer" section of benchmarks/RESULTS.md

d = 512, f = 2048, top-1, capacity factor 1.25, group size 1024, float32. Each case is jitted once,
warmed up, then timed `--runs` times (medians reported); dense FFN and MoE calls alternate in the same
process, and the ratio is median MoE / median dense. Both differentiate a scalar loss with
respect to all parameters and the input.
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


def dense_step(num_tokens):
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    params = dict(wi=jax.random.normal(k1, (D_MODEL, D_FF)) * 0.02, wo=jax.random.normal(k2, (D_FF, D_MODEL)) * 0.02)
    x = jax.random.normal(k3, (num_tokens // GROUP, GROUP, D_MODEL))

    def loss(params, x):
        y = jnp.einsum("BLf,fd->BLd", jax.nn.relu(jnp.einsum("BLd,df->BLf", x, params["wi"])), params["wo"])
        return jnp.sum(y * x)

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T=4096, E=8 only")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dispatchers", default=",".join(dispatch.DISPATCHERS))
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    token_counts = [4096] if args.quick else [4096, 16384]
    expert_counts = [8] if args.quick else [8, 32]
    dispatchers = args.dispatchers.split(",")

    rows = []
    header = "| tokens | E | dispatcher | MoE ms | dense ms | MoE / dense | target | met |"
    print(header + "\n|---|---|---|---|---|---|---|---|", flush=True)
    for num_tokens in token_counts:
        for num_experts in expert_counts:
            for name in dispatchers:
                # Dense and MoE calls alternate, so drift in the machine's load hits both sides of the ratio.
                dense_s, moe_s = time_pair([dense_step(num_tokens), moe_step(num_tokens, num_experts, name)],
                                           args.runs)
                dense_ms, moe_ms = 1e3 * statistics.median(dense_s), 1e3 * statistics.median(moe_s)
                ratio = moe_ms / dense_ms
                row = (f"| {num_tokens} | {num_experts} | {name} | {moe_ms:.0f} | {dense_ms:.0f} | {ratio:.2f} | "
                       f"<= {TARGETS[name]} | {'yes' if ratio <= TARGETS[name] else 'no'} |")
                rows.append(row)
                print(row, flush=True)
    if args.write:
        write_results(header, rows, args)


def write_results(header, rows, args):
    command = "python benchmarks/layer.py" + (" --quick" if args.quick else "") + f" --runs {args.runs}"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join([
        "## MoE layer", "",
        f"`{command}` — {date}; {machine()}; jax {jax.__version__}.",
        f"Forward + backward, d={D_MODEL}, f={D_FF}, top-1, CF 1.25, group size {GROUP}, float32; median of "
        f"{args.runs} runs after warm-up; dense = one FFN with the same d_ff (equal active FLOPs).", "",
        header, "|---|---|---|---|---|---|---|---|", *rows, ""])
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n\n"
    pattern = re.compile(r"## MoE layer\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _: section.rstrip("\n") + "\n", text) if pattern.search(text) else (
        text.rstrip("\n") + "\n\n" + section)
    with open(RESULTS, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
