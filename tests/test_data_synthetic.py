"""The synthetic generator: exact entropy floor vs Monte-Carlo, determinism, domain labels, knobs."""

import collections
import math

import numpy as np
import pytest

from moe_jax import data
from moe_jax.data import synthetic


def small_corpus(**overrides):
    knobs = dict(num_domains=3, content_vocab=20, domain_vocab=5, order=2, branching=3, mean_length=8.0,
                 alpha=1.0, seed=1)
    knobs.update(overrides)
    return synthetic.SyntheticCorpus(**knobs)


def test_floor_matches_monte_carlo_log_likelihood():
    corpus = small_corpus()
    log_probs = np.concatenate([corpus.target_log_probs(*corpus.document(i)) for i in range(6000)])
    estimate, stderr = -log_probs.mean(), log_probs.std() / math.sqrt(len(log_probs))
    assert abs(estimate - corpus.entropy_floor()) < 4 * stderr + 1e-3


@pytest.mark.parametrize("neighborhood", [0, 4])
def test_floor_matches_plug_in_entropy_from_counts(neighborhood):
    """Independent of the generator's own probabilities: count next tokens per (domain, context)."""
    corpus = small_corpus(mean_length=12.0, neighborhood=neighborhood)
    counts = collections.defaultdict(collections.Counter)
    for i in range(6000):
        tokens, domain = corpus.document(i)
        seq = [synthetic.BOS] * corpus.order + tokens.tolist() + [synthetic.EOS]
        for t in range(corpus.order + 1, len(seq)):  # targets x_2..x_N, EOS
            counts[(domain, tuple(seq[t - corpus.order:t]))][seq[t]] += 1
    total = sum(sum(c.values()) for c in counts.values())
    plug_in = -sum(n * math.log(n / sum(c.values())) for c in counts.values() for n in c.values()) / total
    assert abs(plug_in - corpus.entropy_floor()) < 0.03


def test_last_token_narrows_successors_to_its_neighborhood():
    corpus = small_corpus(domain_vocab=10, neighborhood=5, branching=2)
    m = corpus.domain_vocab
    for d in range(corpus.num_domains):
        for last in range(m + 1):
            contexts = [c for c in range((m + 1) ** corpus.order) if c % (m + 1) == last]
            union = set(corpus.successors_DCB[d, contexts].ravel().tolist())
            assert len(union) == 5  # n candidates after this token, b = 2 of them per full context
            assert all(len(set(corpus.successors_DCB[d, c].tolist())) == 2 for c in contexts)


def test_formula_by_hand():
    corpus = small_corpus(branching=1, mean_length=4.0)  # one successor: only the stop decision is random
    q = 0.25
    assert corpus.entropy_floor() == pytest.approx(-q * math.log(q) - (1 - q) * math.log(1 - q))
    assert corpus.bayes_gap_bound() == pytest.approx(math.log(3) / 4)


def test_documents_are_deterministic_in_domain_alphabet_and_streams_differ():
    a, b = small_corpus(), small_corpus()
    for i in range(50):
        tokens, domain = a.document(i)
        np.testing.assert_array_equal(tokens, b.document(i)[0])
        assert set(tokens.tolist()) <= set(a.alphabet_DM[domain].tolist())
        assert tokens.min() >= synthetic.NUM_SPECIAL and tokens.max() < a.vocab_size
    assert any(len(a.document(i, 1)[0]) != len(a.document(i, 0)[0]) for i in range(20))
    assert not np.array_equal(small_corpus(seed=2).probs_DB, a.probs_DB)


def test_default_config_floor_and_batches_carry_domains():
    cfg = data.default_config()
    cfg.update(seq_len=32, batch_size=4)
    assert data.make_tokenizer(cfg).vocab_size == cfg.synthetic.vocab_size == 1024
    floor = data.entropy_floor(cfg)
    assert 0.5 < floor < math.log(cfg.synthetic.branching) + 0.2
    batch = next(data.make_train_iterator(cfg, process_index=0, process_count=1))
    real = batch["segment_ids"] > 0
    assert (batch["domains"][real] >= 0).all() and (batch["domains"][real] < cfg.synthetic.num_domains).all()
    assert (batch["domains"][~real] == -1).all()
    # one domain per segment
    for row in range(4):
        for seg in np.unique(batch["segment_ids"][row][real[row]]):
            assert len(np.unique(batch["domains"][row][batch["segment_ids"][row] == seg])) == 1
    cfg.source = "text"
    assert data.entropy_floor(cfg) is None


@pytest.mark.parametrize("knob,value,message", [("order", 1, "order"), ("branching", 9, "branching"),
                                                ("mean_length", 0.5, "mean_length"),
                                                ("neighborhood", 2, "neighborhood")])
def test_bad_knobs_name_themselves(knob, value, message):
    with pytest.raises(ValueError, match=message):
        small_corpus(**{knob: value})
