"""The tiny training runs several tests start from: experiments/tiny_dense.py made small (2 layers of width 32,
batches of 4 x 32 tokens), with `num_experts` experts routed by the index dispatcher."""

TINY = dict(d_model=32, d_ff=64, num_layers=2, num_heads=2)


def tiny(num_experts=0, steps=3, **moe):
    from experiments import tiny_dense

    cfg = tiny_dense.get_config()
    cfg.model.update(**TINY)
    cfg.model.moe.update(**{"num_experts": num_experts, "group_size": 128, "dispatcher": "index", **moe})
    cfg.data.update(seq_len=32, batch_size=4)
    cfg.train.update(steps=steps, eval_steps=1, log_every=1, warmup_steps=1, eval_every=steps,
                     checkpoint_every=steps, peak_flops_per_device=1e9)
    return cfg


def tiny_encdec(num_experts=4, steps=2):
    """experiments/t5_tiny_switch.py (span corruption on the synthetic corpus, MoE in both stacks) made small:
    2 + 2 layers of width 32, batches of 4 x 32 encoder tokens."""
    from experiments import t5_tiny_switch

    cfg = t5_tiny_switch.get_config()
    cfg.model.update(d_model=32, d_ff=64, num_heads=2, num_encoder_layers=2, num_decoder_layers=2)
    cfg.model.moe.update(num_experts=num_experts, dispatcher="index", group_size=32)
    cfg.data.update(seq_len=32, batch_size=4)
    cfg.train.update(steps=steps, eval_steps=1, log_every=1, warmup_steps=1, eval_every=steps,
                     checkpoint_every=steps, peak_flops_per_device=1e9)
    return cfg
