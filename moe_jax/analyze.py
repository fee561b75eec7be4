"""Expert analysis of a run: plots and a markdown summary.

    python -m moe_jax.analyze --workdir=runs/tiny_switch --output=runs/tiny_switch/analysis \
        [--step=N] [--compare_step=M] [--num_batches=8] [--config.data.source=jsonl --config.data.paths=...]

Reads `--num_batches` held-out batches of the run's data (or of the `--config.data.*` given), and writes to
`--output`: `summary.md` (per MoE layer: load CV, dead experts, dropped fraction at the train and eval
capacity factors, router entropy; each expert's preferred tokens by lift; on the synthetic corpus the mutual
information between domain and expert; with `--compare_step`, the router drift between the two checkpoints),
`expert_load.png` and, on the synthetic corpus, `domain_expert.png`. The functions are in moe_jax/analysis.py.
"""

from __future__ import annotations


import numpy as np

_FLAGS: dict = {}


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_dict, config_flags

    from moe_jax import data

    _FLAGS["config"] = config_flags.DEFINE_config_dict(
        "config", config_dict.ConfigDict({"data": data.default_config()}),
        "Only --config.data.* (the data to analyse); the model comes from --workdir.")
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "The run directory.")
    _FLAGS["output"] = flags.DEFINE_string("output", None, "Where summary.md and the plots go.")
    _FLAGS["step"] = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    _FLAGS["compare_step"] = flags.DEFINE_integer("compare_step", None, "Router drift against this checkpoint.")
    _FLAGS["num_batches"] = flags.DEFINE_integer("num_batches", 8, "Held-out batches to analyse.")
    flags.mark_flags_as_required(["workdir", "output"])


def token_text(tokenizer, token: int) -> str:
    if tokenizer is None:
        return str(token)
    text = tokenizer.decode([token])
    return repr(text)[1:-1] or f"<{token}>"


def summarize(model, config, batches, *, other_model=None, steps=(None, None)) -> tuple[str, dict]:
    """(markdown, figures data) of one model on `batches`; see the module docstring."""
    from moe_jax import analysis
    from moe_jax.data import tokenizers

    routed = analysis.collect(model, batches)
    moe = config.model.moe
    load = analysis.expert_load(routed)
    dead = analysis.dead_experts(routed)
    dropped_train = analysis.dropped_fraction(routed, moe.capacity_factor)
    dropped_eval = analysis.dropped_fraction(routed, moe.eval_capacity_factor)
    tokenizer = None if config.data.source == "synthetic" else tokenizers.make_tokenizer(config.data)
    lines = [f"# Expert analysis of {steps[0] if steps[0] is not None else 'the latest'} checkpoint", "",
             f"{len(routed.token_ids)} real tokens of {len(batches)} held-out batches ({config.data.source}); "
             f"{routed.num_experts} experts, top-{routed.expert_index.shape[-1]}, routing groups of "
             f"{routed.group_size} tokens.", "",
             "| MoE layer | load CV | dead experts (<10% of fair share) | dropped at train CF "
             f"{moe.capacity_factor} | dropped at eval CF {moe.eval_capacity_factor} | router entropy (nats) | "
             "tokens at their id's usual expert | I(id; expert) / H(expert) |",
             "|---|---|---|---|---|---|---|---|"]
    majority, information = analysis.token_determinism(routed)
    for layer in range(routed.num_layers):
        cv = load[layer].std() / load[layer].mean()
        lines.append(f"| {layer} | {cv:.3f} | {dead[layer] or 'none'} | {100 * dropped_train[layer]:.1f}% | "
                     f"{100 * dropped_eval[layer]:.1f}% | {routed.router_entropy[layer]:.3f} | "
                     f"{100 * majority[layer]:.1f}% | {information[layer]:.2f} |")
    lines += ["", "## Tokens each expert prefers (by lift over the token's frequency; last MoE layer)", "",
              "| expert | share of tokens | top tokens (count, lift) |", "|---|---|---|"]
    prefs = analysis.token_preferences(routed, top=6)[-1]
    for e, tokens in enumerate(prefs):
        shown = ", ".join(f"`{token_text(tokenizer, t)}` ({n}, {lift:.1f}x)" for t, n, lift in tokens) or "–"
        lines.append(f"| {e} | {100 * load[-1][e]:.1f}% | {shown} |")
    figures = {"load": load}
    if routed.domains is not None:
        counts, information = analysis.domain_expert_counts(routed, config.data.synthetic.num_domains)
        figures["domain_counts"] = counts
        lines += ["", "## Domain and expert (synthetic corpus)", "",
                  "Mutual information I(domain; top-1 expert) per MoE layer: "
                  + ", ".join(f"{v:.2f}" for v in information)
                  + f" bits (at most log2 E = {np.log2(routed.num_experts):.2f}); see domain_expert.png."]
    if other_model is not None:
        drift = analysis.router_drift(other_model, model, batches)
        lines += ["", f"## Router drift from step {steps[1]} to step {steps[0]}", "",
                  "Share of tokens whose top-1 expert changed, per MoE layer: "
                  + ", ".join(f"{100 * d:.1f}%" for d in drift)]
    return "\n".join(lines) + "\n", figures


def write_plots(figures: dict, output) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    load = figures["load"]
    fig, axes = plt.subplots(1, len(load), figsize=(4 * len(load), 3), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        ax.bar(range(load.shape[1]), load[layer])
        ax.axhline(1 / load.shape[1], color="k", linestyle=":")
        ax.set(title=f"MoE layer {layer}", xlabel="expert", ylabel="share of choices")
    fig.tight_layout()
    fig.savefig(output / "expert_load.png", dpi=100)
    plt.close(fig)
    written.append("expert_load.png")
    if "domain_counts" in figures:
        counts = figures["domain_counts"]
        fig, axes = plt.subplots(1, len(counts), figsize=(5 * len(counts), 5), squeeze=False)
        for layer, ax in enumerate(axes[0]):
            ax.imshow(counts[layer] / np.maximum(counts[layer].sum(1, keepdims=True), 1), aspect="auto", vmin=0,
                      vmax=1)
            ax.set(title=f"MoE layer {layer}: P(expert | domain)", xlabel="expert", ylabel="domain")
        fig.tight_layout()
        fig.savefig(output / "domain_expert.png", dpi=100)
        plt.close(fig)
        written.append("domain_expert.png")
    return written


def main(argv) -> int:
    del argv
    import jax
    from absl import flags
    from etils import epath

    from moe_jax import checkpoint, data, evaluate, models

    if _FLAGS["num_batches"].value < 1:
        raise ValueError(f"--num_batches={_FLAGS['num_batches'].value} must be >= 1")
    models.require_language_model(checkpoint.load_run_config(_FLAGS["workdir"].value), "moe_jax.analyze")
    devices = jax.devices()[:1]
    model, config = checkpoint.restore_model(_FLAGS["workdir"].value, _FLAGS["step"].value, devices=devices)
    other = None
    if _FLAGS["compare_step"].value is not None:
        other, _ = checkpoint.restore_model(_FLAGS["workdir"].value, _FLAGS["compare_step"].value, devices=devices)
    data_config = evaluate.evaluation_data_config(config.data, dict(flags.FLAGS["config"].override_values))
    batches = data.make_eval_batches(data_config, _FLAGS["num_batches"].value)
    text, figures = summarize(model, config.copy_and_resolve_references(), batches, other_model=other,
                              steps=(_FLAGS["step"].value, _FLAGS["compare_step"].value))
    output = epath.Path(_FLAGS["output"].value)
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.md").write_text(text)
    written = write_plots(figures, output)
    print(text)
    print(f"wrote {output / 'summary.md'}, " + ", ".join(str(output / w) for w in written))
    return 0


if __name__ == "__main__":
    from moe_jax import cli

    cli.run(main, define_flags=_define_flags)
