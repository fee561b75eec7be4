"""T5-Base, the encoder-decoder the Switch paper starts from, pre-trained with span corruption on C4.

Sizes (Fedus et al. 2022, Table 9; Raffel et al. 2020): 12 + 12 layers, d_model 768, 12 heads of 64, GEGLU FFN
with d_ff 2048, T5's 32k SentencePiece vocabulary with 100 sentinels (32128 ids), embedding tied to the output
head, relative position bias 32 buckets / 128: 223M parameters (the paper's §4.1 count). Span corruption as T5: 15% noise, mean span 3,
inputs 512 -> targets 114. 2^20 tokens per batch (2048 rows of 512, as the paper's §2.2 protocol), Adafactor at
1e-2 with inverse-square-root decay after 10k warm-up steps, no dropout in pre-training.

    python -m moe_jax.main --config=experiments/t5_base_encdec.py --workdir=gs://BUCKET/t5_base_encdec \
        --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.tokenizer=PATH/TO/t5_spm.model

T5 v1.0's ReLU FFN with d_ff 3072 has the same parameter count and FLOPs (`model.activation=relu`,
`model.d_ff=3072`). The logged `eval/neg_log_perplexity` is Table 9's metric (T5-Base: -1.599 after 250k
steps, -1.556 after 500k; experiments/results/switch_paper.md).

Expected: not run by us (needs a pod and C4); `python -m moe_jax.dryrun` reports its memory and FLOPs
(experiments/results/pod_dryrun.md).
"""

from experiments import t5_base
from moe_jax import models


def get_config(arg: str = ""):
    c = t5_base.get_config(arg)  # its data (C4, 2048 rows of 512) and Adafactor schedule; the model replaced
    c.model = models.get("encdec").default_config()
    c.model.update(vocab_size=32128, d_model=768, d_ff=2048, num_heads=12, head_dim=64, num_encoder_layers=12,
                   num_decoder_layers=12, activation="geglu", tie_embeddings=True, dtype="bfloat16",
                   init_scale=0.1, relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   remat="dots_with_no_batch_dims_saveable")
    c.model.moe.num_experts = 0
    return c
