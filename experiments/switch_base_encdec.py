"""Switch-Base as in the paper: T5-Base (t5_base_encdec.py) with 128 top-1 experts in every other FFN of both
the encoder and the decoder, trained with span corruption on C4 (Fedus et al. 2022, Table 9: 7.4B parameters).

Switch recipe: top-1 routing, capacity factor 1.25 in training and 2.0 in evaluation, load-balancing weight
1e-2, 0.1x init, float32 router in a bfloat16 model, router input jitter 1e-2 (our choice of epsilon: the paper
does not state it), Adafactor, 2^20 tokens per batch. The argument sets the expert count (Figure 4 sweeps it;
experts=0 is T5-Base):

    python -m moe_jax.main --config=experiments/switch_base_encdec.py:experts=128 --workdir=gs://BUCKET/run \
        --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.tokenizer=PATH/TO/t5_spm.model

Each stack routes its own tokens in groups of at most 4096 (the decoder's rows are the 114 targets: groups of
whole rows that fit). Expert axis of the mesh: min(E, 8) by default; change `mesh.shape` for your pod.

Expected: not run by us (needs a pod and C4); `python -m moe_jax.dryrun` reports its memory and FLOPs
(experiments/results/pod_dryrun.md).
"""

from experiments import switch_base, t5_base_encdec


def get_config(arg: str = ""):
    experts = switch_base.parse_arg(arg).get("experts", 128)
    c = t5_base_encdec.get_config()
    decoder_moe = switch_base.get_config(f"experts={max(experts, 1)}").model.moe
    for key in ("k", "every", "router", "dispatcher", "capacity_factor", "eval_capacity_factor", "group_size",
                "aux_loss_weight", "z_loss_weight", "jitter", "router_dtype"):
        c.model.moe[key] = decoder_moe[key]
    c.model.moe.num_experts = experts
    c.mesh.shape = (-1, max(1, min(experts, 8)), 1)
    return c
