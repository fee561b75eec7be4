"""T5-Base-sized dense decoder-only LM on C4: the dense baseline of the Switch paper, at pod scale.

Sizes from Fedus et al. 2022, Table 9 (T5-Base row): d_model 768, GEGLU FFN with d_ff 2048, 12 heads of
64, T5's 32k SentencePiece vocabulary, 2^20 tokens per batch (512 x 2048).

How this differs from the paper: the paper's T5-Base is an encoder-decoder (12 + 12 layers) trained on span
corruption; ours is a decoder-only causal LM. We give it 24 layers so that parameters and FLOPs per token
match the 12 + 12 stack to first order (the paper's cross-attention is the part we do not have), and we
report next-token loss, which is not comparable number-for-number with the paper's span-corruption
negative log perplexity (Table 9: -1.599 at 250k steps).

    python -m moe_jax.main --config=experiments/t5_base.py --workdir=gs://BUCKET/t5_base \
        --config.data.tfds_data_dir=gs://BUCKET/tfds --config.data.tokenizer=PATH/TO/t5_spm.model

Expected: not run by us (needs a pod and C4); `python -m moe_jax.dryrun` reports its memory and FLOPs.
"""

from moe_jax import train


def get_config(arg: str = ""):
    del arg
    c = train.default_config()
    c.model.vocab_size = 32128
    c.model.d_model = 768
    c.model.d_ff = 2048
    c.model.num_layers = 24
    c.model.num_heads = 12
    c.model.head_dim = 64
    c.model.activation = "geglu"
    c.model.dtype = "bfloat16"
    c.model.init_scale = 0.1
    c.model.tie_embeddings = True
    c.model.remat = "dots_with_no_batch_dims_saveable"
    c.model.moe.num_experts = 0

    c.data.source = "tfds"
    c.data.tfds_name = "c4/en:3.1.0"
    c.data.seq_len = 512
    c.data.batch_size = 2048

    c.train.steps = 500_000
    c.train.optimizer = "adafactor"
    c.train.learning_rate = 1e-2  # T5: 0.01 for the warmup steps, then inverse square root
    c.train.warmup_steps = 10_000
    c.train.grad_clip = 0.0
    c.train.log_every = 100
    c.train.eval_every = 5_000
    c.train.eval_steps = 20
    c.train.checkpoint_every = 5_000
    c.mesh.shape = (-1, 1, 1)
    return c
