"""Tokens per second of the whole input pipeline (one process), written into benchmarks/RESULTS.md.

    python benchmarks/data.py [--c4=/path/to/c4_sample.jsonl.gz] [--seconds=10]

Cases: synthetic; the C4 sample through `jsonl` with the byte tokenizer and with a SentencePiece model
trained here on the same sample (8k pieces). Tokens counted are packed batch slots (batch x seq_len).
"""

import argparse
import datetime
import os
import pathlib
import platform
import re
import subprocess
import tempfile
import time

from moe_jax import data
from moe_jax.data import sources, tokenizers

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_C4 = ROOT.parent / "shared" / "data" / "c4_sample.jsonl.gz"


def tokens_per_second(cfg, seconds: float) -> tuple[float, float]:
    """(tokens/s after the first batch, seconds to the first batch)."""
    start = time.perf_counter()
    it = data.make_train_iterator(cfg, process_index=0, process_count=1)
    next(it)
    first = time.perf_counter() - start
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        batches += 1
    return batches * cfg.batch_size * cfg.seq_len / (time.perf_counter() - start), first


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--c4", default=str(DEFAULT_C4))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--num_threads", type=int, default=2)
    args = parser.parse_args()

    def config(**kw):
        cfg = data.default_config()
        cfg.update(seq_len=args.seq_len, batch_size=args.batch_size, num_threads=args.num_threads)
        cfg.update(**kw)
        return cfg

    cases = [("synthetic (default knobs)", config())]
    if pathlib.Path(args.c4).exists():
        c4 = config(source="jsonl", paths=args.c4)
        cases.append(("C4 sample, jsonl.gz, byte", c4))
        spm_dir = tempfile.mkdtemp()
        t = time.perf_counter()
        model = tokenizers.train_sentencepiece(sources.load_texts(c4, max_documents=20000), vocab_size=8000,
                                               output=os.path.join(spm_dir, "c4_8k"))
        print(f"trained SentencePiece 8k on the C4 sample in {time.perf_counter() - t:.1f} s")
        cases.append(("C4 sample, jsonl.gz, SentencePiece 8k", config(source="jsonl", paths=args.c4,
                                                                       tokenizer=model)))
    else:
        print(f"{args.c4} not found: only the synthetic case runs")

    rows = []
    for name, cfg in cases:
        rate, first = tokens_per_second(cfg, args.seconds)
        rows.append(f"| {name} | {rate:,.0f} | {first:.1f} |")
        print(rows[-1], flush=True)

    command = "python benchmarks/data.py " + " ".join(
        f"--{k}={v}" for k, v in vars(args).items() if k != "c4")
    section = "\n".join([
        "## Data pipeline", "",
        f"`{command}` (C4 = `{pathlib.Path(args.c4).name}`, 1 process, {args.num_threads} grain read threads, "
        f"batch {args.batch_size} x seq_len {args.seq_len}; first-batch time includes reading and indexing "
        "the file).", "",
        f"Machine: {os.cpu_count()} cores (`nproc` {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()}), "
        f"{cpu_model()}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.", "",
        "| pipeline | tokens/s | s to first batch |", "|---|---|---|", *rows, "",
        "Target (issue 3): >= 20x the tokens/s the tiny Switch model trains at on the same machine. That "
        "number comes from the trainer (`train/tokens_per_sec` in metrics.jsonl) and is filled in by the "
        "trainer issue.", ""])
    results = ROOT / "benchmarks" / "RESULTS.md"
    text = results.read_text() if results.exists() else "# Benchmark results\n\n"
    pattern = re.compile(r"## Data pipeline\n.*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _: section.rstrip("\n") + "\n", text) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + section
    results.write_text(text)
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
