"""Where does Switch overtake dense on real text? The C4 sample study, 3 seeds per point.

Every point compares tiny_switch-shaped models (8 top-1 experts in every other layer unless named otherwise)
with tiny_dense at equal active FLOPs on the C4 sample (`../shared/data/c4_sample.jsonl.gz`), the same fixed 5%
of documents held out as in c4_byte.py (whose byte-level dense and Switch-8 runs this sweep reuses: identical
configs are not retrained). Seeds are `train.seed` (initialisation); the data order is fixed.

Dimensions, in the order they run:
  tokenizer   SentencePiece unigram vocabularies of 8k / 4k / 16k pieces trained on the training split only
              (written to runs/tokenizers/ the first time the sweep is loaded; about 20 s each); 8k also for
              900 steps (about 3.8 bytes a token: 14 M training bytes, 4x the longest byte-level run)
  tokens      d_model 64 / d_ff 256 (a quarter of the parameters per layer) for 900 and 1800 steps: more
              training tokens per parameter, where extra (expert) parameters should start to pay
  placement   MoE in every layer instead of every other one
  depth       8 layers instead of 4 (MoE still in every other one)
  fine-grain  16 experts of half the width with top-2 routing (the same active FLOPs)
  capacity    dropless (every token reaches its expert), capacity factor 2.0, routing groups of 512 tokens
  experts     16 and 32 experts (more parameters at the same active FLOPs)
  lr          3x and 1/3 of the tiny configs' 3e-3, for both models; the schedule: the Switch paper's Adafactor
              with T5's inverse-square-root decay (peak 1e-2) instead of AdamW's warmup + cosine
  losses      load-balancing weight 1e-3 and 1e-1, router z-loss 1e-3, jitter 0.01

Different tokenizers are compared in bits per byte of held-out text (eval CE in nats/token x held-out
tokens / held-out UTF-8 bytes / ln 2, the ratio measured on the held-out documents, EOS included).

    python -m moe_jax.sweep --sweep=experiments/ablations/c4_study.py --workdir=runs/ablations

Expected: see experiments/results/c4_study.md (2-core CPU, 3-8 minutes per 300-step run).
"""

import functools
import math

from experiments.ablations.c4_byte import REAL_TEXT
from moe_jax import sweep
from moe_jax.sweep_results import mean_curves, seed_stats, step_speedup

TOKENIZER_DIR = sweep.REPO / "runs" / "tokenizers"
SEEDS = (0, 1, 2)
RECIPE_SEEDS = (0, 1, 2, 3, 4)
STEPS = 300
COLUMNS = ("eval_ce", "examples_per_sec", "dropped_fraction", "load_cv")
VOCABULARIES = (8000, 4000, 16000)
NARROW = {"model.d_model": 64, "model.d_ff": 256}  # tiny_* at half the width (4 heads of 16)
PAPER = """
Fedus et al. 2022 (§2-3, Table 1, Figure 4) train T5-sized models on all of C4 with a 32k SentencePiece vocabulary
and find Switch ahead of dense at equal FLOPs per token throughout; capacity factor 1.0-1.25 with top-1 routing,
load-balancing weight 1e-2, no z-loss in the base recipe (ST-MoE later adds z-loss 1e-3). Only the sign and the size
of the Switch-minus-dense gap against the seed noise can be compared at this scale.
"""

@functools.cache
def sentencepiece(vocab_size: int) -> tuple[str, int]:
    """(path, pieces) of a SentencePiece model trained on the training split (trained once, then reused)."""
    from moe_jax.data import sources, tokenizers

    path = TOKENIZER_DIR / f"c4_sample_unigram_{vocab_size}.model"
    if not path.exists():
        TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
        tokenizers.train_sentencepiece(sources.load_texts(_real_text_data(), "train"), vocab_size=vocab_size,
                                       output=str(path))
    return str(path), tokenizers.SentencePieceTokenizer(str(path)).vocab_size


def _tokenizer(vocab_size):
    if vocab_size is None:
        return {}
    path, pieces = sentencepiece(vocab_size)
    return {"data.tokenizer": path, "model.vocab_size": pieces}


def _pair(scale, out, label, seeds=SEEDS, experts=8, dense=True, steps=STEPS, **overrides):
    """dense and switch variants named `label`; `dense=False` for Switch-only changes."""
    suffix = f" {label}" if label else ""
    for seed in seeds:
        seeded = {**REAL_TEXT, **overrides, "train.seed": seed}
        if dense:
            out[f"dense{suffix} seed {seed}"] = sweep.base(scale, dense=True, laptop_steps=steps, evals=5).override(
                {k: v for k, v in seeded.items() if not k.startswith("model.moe.")})
        out[f"switch-{experts}{suffix} seed {seed}"] = sweep.base(scale, experts=experts, laptop_steps=steps,
                                                                  evals=5).override(seeded)


def variants(scale):
    out = {}
    _pair(scale, out, "")  # the byte-level baseline pair (c4_byte.py's 300-step runs)
    _pair(scale, out, "sp8k", **_tokenizer(8000))
    _pair(scale, out, "sp8k 900 steps", steps=900, **_tokenizer(8000))  # where sp8k's lead at 300 steps goes
    # more training tokens per parameter: half the width, 3x and 6x the steps
    # the recipe's candidates get two more seeds: their seed std decides the issue's 3-std bar
    _pair(scale, out, "d 64 900 steps", steps=900, seeds=RECIPE_SEEDS, **NARROW)
    _pair(scale, out, "every layer", dense=False, **{"model.moe.every": 1})
    _pair(scale, out, "top-2 d_ff 256", experts=16, dense=False,
          **{"model.moe.k": 2, "model.moe.d_ff": 256})  # fine-grained experts, the same active FLOPs
    _pair(scale, out, "d 64 1800 steps", steps=1800, seeds=RECIPE_SEEDS, **NARROW)
    _pair(scale, out, "8 layers", **{"model.num_layers": 8})  # depth: twice the layers, MoE in every other
    _pair(scale, out, "dropless", dense=False, **{"model.moe.dispatcher": "dropless"})
    _pair(scale, out, "", experts=16, dense=False)
    _pair(scale, out, "lr 9e-3", **{"train.learning_rate": 9e-3})
    _pair(scale, out, "lr 1e-3", **{"train.learning_rate": 1e-3})
    _pair(scale, out, "adafactor rsqrt", **{"train.optimizer": "adafactor", "train.learning_rate": 1e-2})
    _pair(scale, out, "sp4k", **_tokenizer(4000))
    _pair(scale, out, "sp16k", **_tokenizer(16000))
    _pair(scale, out, "cf 2.0", dense=False, **{"model.moe.capacity_factor": 2.0})
    _pair(scale, out, "", experts=32, dense=False)
    _pair(scale, out, "group 512", dense=False, **{"model.moe.group_size": 512})
    _pair(scale, out, "lb 1e-3", dense=False, **{"model.moe.aux_loss_weight": 1e-3})
    _pair(scale, out, "lb 1e-1", dense=False, **{"model.moe.aux_loss_weight": 1e-1})
    _pair(scale, out, "z-loss 1e-3", dense=False, **{"model.moe.z_loss_weight": 1e-3})
    _pair(scale, out, "jitter 0.01", dense=False, **{"model.moe.jitter": 0.01})
    return out


# --------------------------------------------------------------------------------------------- analysis


def _real_text_data(tokenizer: str = "byte"):
    from moe_jax import train

    data = train.default_config().data
    data.update({k.split(".", 1)[1]: v for k, v in REAL_TEXT.items() if k.startswith("data.")})
    data.tokenizer = tokenizer
    return data


@functools.cache
def training_split_bytes() -> int:
    """UTF-8 bytes of the C4 sample's training split: a run's training bytes over this is its epochs."""
    from moe_jax.data import sources

    return sum(len(t.encode("utf-8")) for t in sources.load_texts(_real_text_data(), "train"))


@functools.cache
def held_out_tokens_per_byte(tokenizer: str) -> float:
    """Held-out tokens (EOS included) per held-out UTF-8 byte: nats/token times this is nats/byte."""
    from moe_jax.data import sources, tokenizers

    data = _real_text_data(tokenizer)
    tok = tokenizers.make_tokenizer(data)
    texts = list(sources.load_texts(data, "eval"))
    tokens = sum(len(tok.encode(t)) + 1 for t in texts)
    return tokens / sum(len(t.encode("utf-8")) for t in texts)


def _point(name):
    """'switch-8 sp8k seed 1' -> ('switch-8', 'sp8k')."""
    model, _, label = name.rsplit(" seed ", 1)[0].partition(" ")
    return model, label


def _paired(dense, moe) -> str:
    """'mean ± std. error (ahead in k of n)' of the per-seed Switch-minus-dense gaps; '–' with under 2 pairs."""
    dense_by_seed = {s.name.rsplit(" seed ", 1)[1]: s.final_ce for s in dense}
    gaps = [s.final_ce - dense_by_seed[seed] for s in moe
            if (seed := s.name.rsplit(" seed ", 1)[1]) in dense_by_seed]
    mean, std, n = seed_stats(gaps)
    if n < 2:
        return "–"
    return f"{mean:+.4f} ± {std / math.sqrt(n):.4f} ({sum(g < 0 for g in gaps)} of {n})"


def analysis(results, scale):
    configs = variants(scale)
    means = mean_curves(results)
    by_point = {}
    for name, summary in results.items():
        by_point.setdefault(_point(name), []).append(summary)
    rows = ["| point | dense eval CE, mean ± std (n) | switch | switch − dense | in seed stds | "
            "paired gap ± std. error (ahead in) | bits/byte, dense → switch | step speed-up |",
            "|---|---|---|---|---|---|---|---|"]
    for (model, label), moe in by_point.items():
        if model == "dense":
            continue
        baseline = label if ("dense", label) in by_point else ""
        dense = by_point.get(("dense", baseline), [])
        (dm, ds, dn), (mm, ms, mn) = seed_stats([s.final_ce for s in dense]), seed_stats([s.final_ce for s in moe])
        seed_std = max(ds, ms) if dn > 1 and mn > 1 else float("nan")
        in_stds = (mm - dm) / seed_std if math.isfinite(seed_std) and seed_std > 0 else float("nan")
        tokenizer = configs[moe[0].name].overrides.get("data.tokenizer", "byte")
        bpb = ""
        if math.isfinite(dm) and math.isfinite(mm):
            factor = held_out_tokens_per_byte(tokenizer) / math.log(2)
            bpb = f"{dm * factor:.4f} → {mm * factor:.4f}"
        moe_point = f"{model} {label}".strip()
        dense_curve, moe_curve = means.get(f"dense {baseline}".strip()), means.get(moe_point)
        speedup = step_speedup(dense_curve, moe_curve) if dense_curve and moe_curve else float("nan")
        point = moe_point + f" (vs dense{' ' + baseline if baseline else ''})"
        rows.append(f"| {point} | {sweep.num(dm)} ± {sweep.num(ds)} ({dn}) | {sweep.num(mm)} ± {sweep.num(ms)} "
                    f"({mn}) | {sweep.num(mm - dm, '+.4f')} | {sweep.num(in_stds, '+.1f')} | "
                    f"{_paired(dense, moe)} | {bpb} | "
                    f"{sweep.num(speedup, '.2f')}{'×' if math.isfinite(speedup) else ''} |")
    return "\n".join(rows) + (
        "\n\nEval CE is in nats per token of each run's own tokenizer (per byte for bytes); 'in seed stds' is the "
        "gap over the larger of the two seed standard deviations (|x| > 3 is the issue's bar); 'paired gap' is the "
        "mean of each seed's Switch-minus-dense gap (both runs of a seed see the same data order) with its standard "
        "error and the seeds where Switch is ahead; 'step speed-up' is "
        "dense's steps to its final mean eval CE over the MoE model's steps to the same loss (seed-mean curves, "
        "interpolated between evaluations; – where the MoE model never reaches it).")
