"""Next-token choice: greedy, temperature, top-k and top-p against hand-worked cases and frequencies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import sampling

LOGITS = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))


def test_greedy_is_argmax_and_needs_no_rng():
    assert sampling.sample(LOGITS, None).tolist() == [0]


def test_top_k_and_top_p_keep_the_expected_sets():
    top2 = sampling.filter_logits(LOGITS, top_k=2)
    assert np.isfinite(np.asarray(top2)).tolist() == [[True, True, False, False]]
    # mass before each token: 0, .5, .8, .95 -> top_p 0.8 keeps the first two, 0.81 the first three
    assert np.isfinite(np.asarray(sampling.filter_logits(LOGITS, top_p=0.8))).tolist() == [[True, True, False, False]]
    assert np.isfinite(np.asarray(sampling.filter_logits(LOGITS, top_p=0.81))).tolist() == [[True, True, True, False]]
    assert np.isfinite(np.asarray(sampling.filter_logits(LOGITS, top_p=0.01))).tolist() == [[True, False, False, False]]
    shuffled = LOGITS[:, ::-1]  # order of the vocabulary does not matter
    assert np.isfinite(np.asarray(sampling.filter_logits(shuffled, top_p=0.8))).tolist() == [[False, False, True, True]]


def test_sampled_frequencies_follow_the_filtered_distribution():
    draws = jax.vmap(lambda key: sampling.sample(LOGITS, key, temperature=1.0, top_k=3))(
        jax.random.split(jax.random.key(0), 20000))[:, 0]
    counts = np.bincount(np.asarray(draws), minlength=4) / 20000
    np.testing.assert_allclose(counts, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], atol=0.015)


def test_bad_settings_name_the_argument():
    for kwargs, message in [(dict(temperature=-1.0, top_k=None, top_p=None), "temperature=-1.0"),
                            (dict(temperature=1.0, top_k=0, top_p=None), "top_k=0"),
                            (dict(temperature=1.0, top_k=None, top_p=1.5), "top_p=1.5")]:
        with pytest.raises(ValueError, match=message):
            sampling.check(**kwargs)
    with pytest.raises(ValueError, match="needs an rng"):
        sampling.sample(LOGITS, None, temperature=0.5)
