"""The layer benchmark's cases compiled for one TPU v5p chip (no TPU needed, libtpu only): XLA's FLOPs and HBM
bytes of the MoE layer's fwd + bwd beside the dense FFN's, and the time floor max(FLOPs / peak, bytes / HBM
bandwidth) of each, as an estimate of the MoE / dense ratio on the chip the einsum path is written for.

    python benchmarks/layer_tpu.py [--dtype=bfloat16] [--write]

Same cases as benchmarks/layer.py (d 512, f 2048, top-1, CF 1.25, group 1024). The layer is compiled with the
TPU's own choices: dropless through jax.lax.ragged_dot. XLA's cost analysis is per chip and counts every op
of these programs (they have no loops).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import sys
import tempfile
import unittest.mock

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_LOG_DIR", tempfile.mkdtemp(prefix="moe_jax_tpu_logs_"))
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from layer import (D_FF, D_MODEL, DENSE_FORMS, GROUP, commit, dense_params_and_input,  # noqa: E402
                   replace_section)

from moe_jax import dispatch, dryrun  # noqa: E402
from moe_jax.moe import MoeLayer  # noqa: E402


def _abstract(tree, device):
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _cost(fn, args, device):
    compiled = jax.jit(fn).lower(*_abstract(args, device)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]), float(cost["bytes accessed"])


def dense_cost(num_tokens, form, dtype, device):
    params, x = dense_params_and_input(num_tokens)
    params, x = jax.tree.map(lambda a: a.astype(dtype), (params, x))
    ffn = DENSE_FORMS[form]

    def loss(params, x):
        return jnp.sum((ffn(x, params["wi"], params["wo"]) * x).astype(jnp.float32))

    return _cost(jax.grad(loss, argnums=(0, 1)), (params, x), device)


def moe_cost(num_tokens, num_experts, name, dtype, device):
    layer = MoeLayer(d_model=D_MODEL, d_ff=D_FF, num_experts=num_experts, k=1, dispatcher=name,
                     capacity_factor=1.25, group_size=GROUP, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = jnp.zeros((num_tokens // GROUP, GROUP, D_MODEL), dtype)

    def loss(params, x):
        y, aux = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum((y * x).astype(jnp.float32)) + 0.01 * aux["load_balancing_loss"]

    # The trace runs on this CPU process; compile the path a TPU process would take.
    with unittest.mock.patch.object(dispatch, "default_grouped_matmul", lambda: "ragged"):
        return _cost(jax.grad(loss, argnums=(0, 1)), (params, x), device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    chip, devices = dryrun.topology_devices("v5p:2x2x1")
    device = devices[0]

    def floor(flops, nbytes):
        return max(flops / chip.peak_bf16_flops, nbytes / chip.hbm_bandwidth)

    header = ("| tokens | E | program | GFLOP | GB accessed | floor us (bound) | / dense 2D | / dense 3D |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    print("\n".join(lines), flush=True)
    for num_tokens in (4096, 16384):
        dense = {form: dense_cost(num_tokens, form, dtype, device) for form in ("2d_matmul", "3d_einsum")}
        dense_floor = {form: floor(*cost) for form, cost in dense.items()}
        rows = [(f"dense FFN ({form})", None, cost) for form, cost in dense.items()]
        rows += [(name, experts, moe_cost(num_tokens, experts, name, dtype, device))
                 for experts in (8, 32) for name in dispatch.DISPATCHERS]
        for program, experts, (flops, nbytes) in rows:
            t = floor(flops, nbytes)
            bound = "FLOPs" if flops / chip.peak_bf16_flops >= nbytes / chip.hbm_bandwidth else "HBM"
            lines.append(f"| {num_tokens} | {experts or '-'} | {program} | {flops / 1e9:.1f} | {nbytes / 1e9:.3f} | "
                         f"{t * 1e6:.0f} ({bound}) | {t / dense_floor['2d_matmul']:.2f} | "
                         f"{t / dense_floor['3d_einsum']:.2f} |")
            print(lines[-1], flush=True)
    if args.write:
        write_results(lines, args, chip)


def write_results(lines, args, chip):
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = "\n".join([
        "## MoE layer on TPU v5p (compiled, not run)", "",
        f"`python benchmarks/layer_tpu.py --dtype={args.dtype}` — {date}; compiled on this CPU machine for one "
        f"chip of v5p:2x2x1 through libtpu; jax {jax.__version__}; commit {commit()}.",
        f"Fwd + bwd of the layer.py cases in {args.dtype}; FLOPs and bytes from XLA's cost analysis of the compiled "
        f"program; floor = max(FLOPs / {chip.peak_bf16_flops / 1e12:.0f} TFLOP/s, bytes / "
        f"{chip.hbm_bandwidth / 1e9:.0f} GB/s), an estimate, not a measurement.", "", *lines, ""])
    replace_section("## MoE layer on TPU v5p (compiled, not run)", section)


if __name__ == "__main__":
    sys.exit(main())
