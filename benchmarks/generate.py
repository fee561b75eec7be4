"""Decode speed of the tiny configs: KV-cache generation against recomputing the sequence every step.

    python benchmarks/generate.py [--new_tokens 64 --prompt 64 --batches 1,32 --rounds 3] [--write]

Models: `experiments/tiny_dense.py` and `tiny_switch.py` at their initialisation (speed does not depend on
the weights). Cached: `generate.generate` (prefill, then one compiled step per token). Recomputed: the
fastest no-cache baseline we could write: one compiled full forward pass over a fixed-length [B, T] buffer
(T = prompt + new tokens, one compilation for all steps, the next token read at its position) per new token,
with MoE layers in the same decode routing. Reported: generated tokens per second (batch x new tokens /
time after a warm-up call that compiles), median of `--rounds` alternated rounds, and the ratio.
`--write` replaces the "## Generation" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import pathlib
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

from experiments import tiny_dense, tiny_switch  # noqa: E402
from moe_jax import generate, models  # noqa: E402


@functools.partial(jax.jit, static_argnums=(0,))
def _full_forward(graphdef, state, tokens_BT):
    model = nnx.merge(graphdef, state)
    B, T = tokens_BT.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = generate.decode_mask(jnp.ones((B, T), bool), positions)
    logits, _, _ = model.decode(tokens_BT, positions_BL=positions, mask_B1LT=mask,
                                padding_mask_BL=jnp.ones((B, T), bool), cache=model.init_cache(B, T),
                                index=jnp.zeros((), jnp.int32))
    return logits


def recompute(model, prompt_BP, new_tokens):
    """Greedy decoding without a cache: the whole (fixed-length) buffer through the model per new token."""
    graphdef, state = nnx.split(model)
    B, P = prompt_BP.shape
    buffer = np.zeros((B, P + new_tokens), np.int32)
    buffer[:, :P] = prompt_BP
    for i in range(new_tokens):
        logits = _full_forward(graphdef, state, jnp.asarray(buffer))
        buffer[:, P + i] = np.asarray(jnp.argmax(logits[:, P + i - 1], axis=-1))
    return buffer


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    rows = []
    for name, module in (("tiny_dense", tiny_dense), ("tiny_switch", tiny_switch)):
        cfg = module.get_config("")
        model = models.get(cfg).create(cfg.model, nnx.Rngs(params=0, dropout=1))
        for batch in map(int, args.batches.split(",")):
            prompt = np.random.default_rng(0).integers(3, cfg.model.vocab_size, (batch, args.prompt)).astype(np.int32)
            cached = lambda: generate.generate(model, cfg, prompt, max_new_tokens=args.new_tokens)
            full = lambda: recompute(model, prompt, args.new_tokens)
            assert (cached()[:, args.prompt:] == full()[:, args.prompt:]).all()  # warm-up, and the same tokens
            times = {"cached": [], "recomputed": []}
            for _ in range(args.rounds):
                times["cached"].append(timed(cached))
                times["recomputed"].append(timed(full))
            tokens = batch * args.new_tokens
            c, r = statistics.median(times["cached"]), statistics.median(times["recomputed"])
            rows.append(f"| {name} | {batch} | {tokens / c:,.0f} | {tokens / r:,.0f} | {r / c:.1f}x |")
            print(rows[-1], flush=True)
    header = ["| config | batch | cached tokens/s | recomputed tokens/s | speed-up |", "|---|---|---|---|---|"]
    table = "\n".join(header + rows)
    if args.write:
        command = (f"python benchmarks/generate.py --new_tokens {args.new_tokens} --prompt {args.prompt} "
                   f"--batches {args.batches} --rounds {args.rounds}")
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = "\n".join([
            "## Generation", "",
            f"`{command}` — {date}; {os.cpu_count()} cores ({platform.machine()}), backend "
            f"{jax.default_backend()}; jax {jax.__version__}; load average {os.getloadavg()[0]:.1f} at the end "
            f"(shared machine: the ratio, measured alternately in one process, is the number to quote).",
            f"Greedy decoding of {args.new_tokens} new tokens after a {args.prompt}-token prompt, tiny configs at "
            f"initialisation; both produce the same tokens (checked). Median of {args.rounds} alternated rounds.",
            "", table, ""])
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
        pattern = re.compile(r"## Generation\n.*?(?=\n## |\Z)", re.S)
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n", text) if pattern.search(text) else (
            text.rstrip("\n") + "\n\n" + section)
        RESULTS.write_text(text)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
