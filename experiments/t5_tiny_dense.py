"""Tiny T5-style encoder-decoder, dense, trained with span corruption: the reference point for t5_tiny_switch.py.

The encoder-decoder twin of tiny_dense.py: same width (d_model 128, d_ff 512, 4 heads), 4 + 4 layers, T5.1.1
layout (RMSNorm, relative position bias 32 buckets / 128, gated-GELU, untied head), T5's objective on the
built-in synthetic corpus: 15% of each piece's tokens in spans of mean length 3, each replaced by one
sentinel id after the corpus's 1024 ids (vocabulary 1024 + 100 sentinels), encoder rows of 128 tokens and
decoder rows of the matching 29 targets, examples packed whole with segment ids. On C4:
`--config.data.source=jsonl --config.data.paths=c4-train.*.json.gz --config.data.tokenizer=byte
--config.model.vocab_size=359` (259 byte ids + 100 sentinels).

    python -m moe_jax.main --config=experiments/t5_tiny_dense.py --workdir=runs/t5_tiny_dense

Expected: see the README's "The encoder-decoder and span corruption" (2-core CPU, a few minutes).
"""

from experiments import tiny_dense


def get_config(arg: str = ""):
    c = tiny_dense.get_config(arg)
    c.model.name = "encdec"
    c.model.num_encoder_layers = 4
    c.model.num_decoder_layers = 4
    c.model.relative_attention_num_buckets = 32
    c.model.relative_attention_max_distance = 128
    c.model.activation = "geglu"
    c.model.tie_embeddings = False
    c.model.vocab_size = c.data.synthetic.vocab_size + c.data.span_corruption.num_sentinels
    return c
