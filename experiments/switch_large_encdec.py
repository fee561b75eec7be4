"""Switch-Large as in the paper: T5-Large with 128 top-1 experts in every other FFN of both stacks, span
corruption on C4 (Fedus et al. 2022, Table 9: 26.3B parameters; T5-Large 739M).

T5-Large sizes: 24 + 24 layers, d_model 1024, 16 heads of 64, ReLU FFN with d_ff 4096 (T5-Large's own), tied
embedding, 32128 ids; the Switch recipe of switch_base_encdec.py; FSDP (float32 parameters and Adafactor state split over
'data' too). The argument sets the expert count; experts=0 is T5-Large:

    python -m moe_jax.main --config=experiments/switch_large_encdec.py:experts=128 --workdir=gs://BUCKET/run \
        --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.tokenizer=PATH/TO/t5_spm.model

Table 9 lists GEGLU with d_ff 2816 for Switch-Large; that gives 750M / 27.1B parameters by our count, against
the paper's 739M / 26.3B, which ReLU with d_ff 4096 (T5-Large's own FFN) matches; set
`model.activation=geglu`, `model.d_ff=2816` for the other reading.

Expected: not run by us (needs a pod and C4); `python -m moe_jax.dryrun` reports its memory and FLOPs
(experiments/results/pod_dryrun.md).
"""

from experiments import switch_base_encdec


def get_config(arg: str = ""):
    c = switch_base_encdec.get_config(arg)
    c.model.update(activation="relu", d_model=1024, d_ff=4096, num_heads=16, head_dim=64, num_encoder_layers=24, num_decoder_layers=24)
    c.mesh.fsdp = True
    return c
