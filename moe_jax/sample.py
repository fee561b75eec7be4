"""Sample text from a trained run.

    python -m moe_jax.sample --workdir=runs/tiny_switch --prompt="The router" [--max_new_tokens=64 \
        --temperature=0.8 --top_p=0.95 --top_k=50 --seed=0 --num_samples=4 --step=N --trace=trace.jsonl]

Restores the run's model and tokenizer (`checkpoint.restore_model`), encodes the prompt, generates with the KV
cache (`moe_jax.generate`), stops at the tokenizer's EOS, and prints each sample decoded by the run's tokenizer.
`--temperature=0` (the default) is greedy. A synthetic-corpus run has no text tokenizer: its prompt is
space-separated token ids, and so is its output. `--trace` writes every token's routing in every MoE layer
(`moe_jax.traces`), which `traces.read` + `model(tokens, replay=...)` replays.
"""

from __future__ import annotations

import sys

_FLAGS: dict = {}


def _define_flags() -> None:
    from absl import flags

    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "The run directory (moe_jax.main's --workdir).")
    _FLAGS["prompt"] = flags.DEFINE_string("prompt", None, "The text to continue.")
    _FLAGS["max_new_tokens"] = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per sample.")
    _FLAGS["temperature"] = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    _FLAGS["top_k"] = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens.")
    _FLAGS["top_p"] = flags.DEFINE_float("top_p", None, "Keep the smallest set with this probability.")
    _FLAGS["seed"] = flags.DEFINE_integer("seed", 0, "Sampling seed.")
    _FLAGS["num_samples"] = flags.DEFINE_integer("num_samples", 1, "Samples of the same prompt.")
    _FLAGS["step"] = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    _FLAGS["trace"] = flags.DEFINE_string("trace", None, "Write each token's expert routing here (JSON lines).")
    flags.mark_flags_as_required(["workdir", "prompt"])


def encode_prompt(config, text: str) -> tuple[list[int], object]:
    """(ids, tokenizer or None): the run's tokenizer's ids, or space-separated ids for the synthetic corpus."""
    from moe_jax.data import tokenizers

    if config.data.source == "synthetic":
        try:
            return [int(t) for t in text.split()], None
        except ValueError:
            raise ValueError(f"--prompt={text!r}: a synthetic-corpus run reads its prompt as space-separated token "
                             f"ids (0..{config.model.vocab_size - 1})") from None
    tokenizer = tokenizers.make_tokenizer(config.data)
    return tokenizer.encode(text), tokenizer


def main(argv) -> int:
    del argv
    import jax

    from moe_jax import checkpoint, generate, models

    if _FLAGS["num_samples"].value < 1:
        raise ValueError(f"--num_samples={_FLAGS['num_samples'].value} must be >= 1")
    models.require_language_model(checkpoint.load_run_config(_FLAGS["workdir"].value), "moe_jax.sample")
    model, config = checkpoint.restore_model(_FLAGS["workdir"].value, _FLAGS["step"].value,
                                             devices=jax.devices()[:1])
    ids, tokenizer = encode_prompt(config, _FLAGS["prompt"].value)
    eos = tokenizer.eos_id if tokenizer is not None else None
    pad = tokenizer.pad_id if tokenizer is not None else 0
    n = _FLAGS["num_samples"].value
    temperature = _FLAGS["temperature"].value
    trace_path = _FLAGS["trace"].value
    tokens = generate.generate(model, config, [ids] * n, max_new_tokens=_FLAGS["max_new_tokens"].value,
                               temperature=temperature, top_k=_FLAGS["top_k"].value, top_p=_FLAGS["top_p"].value,
                               rng=jax.random.key(_FLAGS["seed"].value) if temperature > 0 else None,
                               eos_id=eos, pad_id=pad, trace=bool(trace_path))
    if trace_path:
        from moe_jax import traces

        tokens, trace = tokens
        written = traces.write(trace_path, tokens, trace, tokenizer)
    for i, row in enumerate(tokens):
        continuation = [int(t) for t in row[len(ids):]]
        if eos is not None and eos in continuation:
            continuation = continuation[:continuation.index(eos)]
        text = tokenizer.decode(continuation) if tokenizer is not None else " ".join(map(str, continuation))
        header = f"--- sample {i + 1}/{n}" if n > 1 else None
        if header:
            print(header)
        print(_FLAGS["prompt"].value + (" " if tokenizer is None else "") + text, flush=True)
    if trace_path:
        print(f"wrote {trace_path}: the routing of {written} tokens", flush=True)
    return 0


if __name__ == "__main__":
    from moe_jax import cli

    cli.run(main, define_flags=_define_flags)
