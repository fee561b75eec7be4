"""routing.py against the NumPy reference, hand-worked fixtures, the DESIGN.md invariants, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import routing_reference as ref
from moe_jax import routing

# Shapes come from small sets: every new shape costs XLA compilations, and these sets already cover
# E > S, S > E, E == 1 and S == 1.
# 15 random problems per property (each new shape compiles its ops once: the suite's largest cost at 25)
SETTINGS = settings(max_examples=15, deadline=None)
GROUP_SIZES = (1, 3, 8, 12)
EXPERT_COUNTS = (1, 2, 5, 12)


# ------------------------------------------------------------------------------------- strategies


@st.composite
def routing_problems(draw, max_k=4):
    """Random logits [G, S, E] with E > S and S > E both reachable, k in 1..min(4, E), capacity in 1..S,
    and a random padding mask."""
    num_groups = draw(st.sampled_from((1, 2)))
    group_size = draw(st.sampled_from(GROUP_SIZES))
    num_experts = draw(st.sampled_from(EXPERT_COUNTS))
    k = draw(st.integers(1, min(max_k, num_experts)))
    capacity = draw(st.one_of(st.none(), st.integers(1, group_size)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(num_groups, group_size, num_experts)).astype(np.float32) * 2
    padding_mask = rng.random((num_groups, group_size)) < 0.8 if draw(st.booleans()) else None
    return logits, k, capacity, padding_mask


def assert_routing_equal(routing_out, expected, num_choices):
    choices, slot, weight, kept = expected
    np.testing.assert_array_equal(np.asarray(routing_out.kept), kept)
    # Where an assignment is not kept only kept/weight matter; compare experts and slots where kept.
    np.testing.assert_array_equal(np.where(kept, routing_out.expert_index, -1), np.where(kept, choices, -1))
    np.testing.assert_array_equal(np.asarray(routing_out.slot), slot)
    np.testing.assert_allclose(np.asarray(routing_out.weight), weight, rtol=1e-5, atol=1e-6)
    assert routing_out.expert_index.shape[-1] == num_choices


# ------------------------------------------------------------------------------------- against the reference


@SETTINGS
@given(routing_problems(), st.booleans(), st.booleans())
def test_route_top_k_matches_reference(problem, batch_prioritized, normalize):
    logits, k, capacity, padding_mask = problem
    out = routing.route_top_k(jnp.asarray(logits), k=k, capacity=capacity, batch_prioritized=batch_prioritized,
                              normalize=normalize,
                              padding_mask=None if padding_mask is None else jnp.asarray(padding_mask))
    expected = ref.route_top_k(logits, k=k, capacity=capacity, batch_prioritized=batch_prioritized,
                               normalize=normalize, padding_mask=padding_mask)
    assert_routing_equal(out, expected, k)


@SETTINGS
@given(routing_problems())
def test_route_top_k_with_selection_bias_matches_reference(problem):
    logits, k, capacity, padding_mask = problem
    bias = np.random.default_rng(0).normal(size=logits.shape[-1]).astype(np.float32) * 0.3
    out = routing.route_top_k(jnp.asarray(logits), k=k, capacity=capacity, selection_bias=jnp.asarray(bias),
                              padding_mask=padding_mask)
    expected = ref.route_top_k(logits, k=k, capacity=capacity, selection_bias=bias, padding_mask=padding_mask)
    assert_routing_equal(out, expected, k)


@SETTINGS
@given(routing_problems())
def test_route_expert_choice_matches_reference(problem):
    logits, _, capacity, padding_mask = problem
    capacity = capacity or logits.shape[1]
    out = routing.route_expert_choice(jnp.asarray(logits), capacity=capacity, padding_mask=padding_mask)
    expected = ref.route_expert_choice(logits, capacity=capacity, padding_mask=padding_mask)
    assert_routing_equal(out, expected, logits.shape[-1])


@SETTINGS
@given(routing_problems())
def test_dispatch_and_combine_tensors_match_per_token_form(problem):
    logits, k, capacity, padding_mask = problem
    out = routing.route_top_k(jnp.asarray(logits), k=k, capacity=capacity, padding_mask=padding_mask)
    choices, slot, weight, kept = (np.asarray(a) for a in (out.expert_index, out.slot, out.weight, out.kept))
    num_groups, group_size, num_experts = logits.shape
    buffer_size = group_size if capacity is None else capacity
    dispatch = np.zeros((num_groups, group_size, num_experts, buffer_size), bool)
    combine = np.zeros(dispatch.shape, np.float32)
    for g, s, c in zip(*np.nonzero(kept)):
        dispatch[g, s, choices[g, s, c], slot[g, s, c]] = True
        combine[g, s, choices[g, s, c], slot[g, s, c]] = weight[g, s, c]
    np.testing.assert_array_equal(np.asarray(out.dispatch_mask()), dispatch)
    np.testing.assert_allclose(np.asarray(out.combine_tensor()), combine, rtol=1e-6)


@SETTINGS
@given(routing_problems())
def test_losses_match_reference(problem):
    logits, k, capacity, padding_mask = problem
    probs = jax.nn.softmax(jnp.asarray(logits))
    out = routing.route_top_k(jnp.asarray(logits), k=k, capacity=capacity)
    np.testing.assert_allclose(
        routing.load_balancing_loss(probs, out.expert_index, padding_mask),
        ref.load_balancing_loss(np.asarray(probs), np.asarray(out.expert_index), padding_mask), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(routing.router_z_loss(jnp.asarray(logits), padding_mask),
                               ref.router_z_loss(logits, padding_mask), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------- hand-worked fixtures


def test_hand_worked_vanilla_versus_batch_prioritized():
    """3 tokens x 3 experts, k = 2, capacity 2.

    logits        top-1 prob   choices (1st, 2nd)
    t0 [1, 2, 0]  0.665        (e1, e0)
    t1 [0, 3, 1]  0.844        (e1, e2)
    t2 [0, 4, 1]  0.936        (e1, e2)

    Vanilla (token order): first choices go t0->e1 slot 0, t1->e1 slot 1, t2->e1 full: dropped.
      Second choices: t0->e0 slot 0, t1->e2 slot 0, t2->e2 slot 1.
    Batch-prioritized (order t2, t1, t0 by top-1 prob): t2->e1 slot 0, t1->e1 slot 1, t0->e1 dropped.
      Second choices: t2->e2 slot 0, t1->e2 slot 1, t0->e0 slot 0.
    So vanilla drops t2's first choice and batch-prioritized drops t0's.
    """
    logits = jnp.array([[[1.0, 2.0, 0.0], [0.0, 3.0, 1.0], [0.0, 4.0, 1.0]]])
    vanilla = routing.route_top_k(logits, k=2, capacity=2)
    np.testing.assert_array_equal(vanilla.expert_index[0], [[1, 0], [1, 2], [1, 2]])
    np.testing.assert_array_equal(vanilla.kept[0], [[True, True], [True, True], [False, True]])
    np.testing.assert_array_equal(vanilla.slot[0], [[0, 0], [1, 0], [2, 1]])

    prioritized = routing.route_top_k(logits, k=2, capacity=2, batch_prioritized=True)
    np.testing.assert_array_equal(prioritized.kept[0], [[False, True], [True, True], [True, True]])
    np.testing.assert_array_equal(prioritized.slot[0], [[2, 0], [1, 1], [0, 0]])
    # The dropped choice has weight exactly 0; the kept ones keep their raw softmax probability.
    probs = jax.nn.softmax(logits)[0]
    assert prioritized.weight[0, 0, 0] == 0.0
    np.testing.assert_allclose(prioritized.weight[0, 2, 0], probs[2, 1], rtol=1e-6)


def test_hand_worked_expert_choice():
    """3 tokens x 3 experts, capacity 1: each expert takes the token with its highest probability.

    probs (rounded)  e0    e1    e2
    t0 [1, 2, 0]     .245  .665  .090
    t1 [0, 3, 1]     .042  .844  .114
    t2 [2, 0, 0]     .787  .107  .107
    e0 takes t2, e1 takes t1, e2 takes t1: t0 gets no expert, t1 gets two.
    """
    logits = jnp.array([[[1.0, 2.0, 0.0], [0.0, 3.0, 1.0], [2.0, 0.0, 0.0]]])
    out = routing.route_expert_choice(logits, capacity=1)
    np.testing.assert_array_equal(out.kept[0], [[False, False, False], [False, True, True], [True, False, False]])


def test_expert_capacity_formula():
    assert routing.expert_capacity(8, 4, 1.0) == 2
    assert routing.expert_capacity(8, 4, 1.0, k=2) == 4  # CF 1.0 is exact balance for any k
    assert routing.expert_capacity(100, 10, 1.1) == 11  # no float noise turning 11.000000000000002 into 12
    assert routing.expert_capacity(10, 4, 1.25) == math.ceil(10 * 1.25 / 4)
    assert routing.expert_capacity(4, 64, 1.0) == 1  # min_capacity floor
    assert routing.expert_capacity(4, 64, 1.0, min_capacity=4) == 4
    assert routing.expert_capacity(1024, 8, 1.25, multiple_of=8) == 160
    assert routing.expert_capacity(1000, 8, 1.25, multiple_of=128) == 256


def test_load_balancing_loss_is_k_at_perfect_balance():
    # 4 tokens, 4 experts, uniform probabilities and each expert chosen equally often.
    probs = jnp.full((1, 4, 4), 0.25)
    for k in (1, 2, 4):
        choices = (jnp.arange(4)[:, None] + jnp.arange(k)[None, :]) % 4
        np.testing.assert_allclose(routing.load_balancing_loss(probs, choices[None]), k, rtol=1e-6)


def test_load_balancing_loss_is_maximal_under_collapse():
    probs = jnp.zeros((1, 8, 4)).at[..., 0].set(1.0)
    np.testing.assert_allclose(routing.load_balancing_loss(probs, jnp.zeros((1, 8, 1), jnp.int32)), 4.0)


# ------------------------------------------------------------------------------------- invariants


@SETTINGS
@given(routing_problems())
def test_no_expert_receives_more_than_capacity(problem):
    logits, k, capacity, padding_mask = problem
    out = routing.route_top_k(jnp.asarray(logits), k=k, capacity=capacity, padding_mask=padding_mask)
    per_expert_per_group = np.asarray(out.dispatch_mask()).sum(axis=(1, 3))
    assert per_expert_per_group.max(initial=0) <= out.buffer_size


@SETTINGS
@given(routing_problems())
def test_no_slot_is_used_twice(problem):
    logits, k, capacity, padding_mask = problem
    for out in (routing.route_top_k(jnp.asarray(logits), k=k, capacity=capacity, padding_mask=padding_mask),
                routing.route_expert_choice(jnp.asarray(logits), capacity=capacity or logits.shape[1],
                                            padding_mask=padding_mask)):
        occupancy = np.asarray(out.dispatch_mask()).sum(axis=1)  # [G, E, C]
        assert occupancy.max(initial=0) <= 1


@SETTINGS
@given(routing_problems())
def test_dropped_assignments_have_zero_weight(problem):
    logits, k, capacity, padding_mask = problem
    out = routing.route_top_k(jnp.asarray(logits), k=k, capacity=capacity, padding_mask=padding_mask)
    assert np.all(np.asarray(out.weight)[~np.asarray(out.kept)] == 0.0)
    assert np.all(np.asarray(out.slot)[~np.asarray(out.kept)] == out.buffer_size)
    # Kept weights are the positive router probabilities.
    assert np.all(np.asarray(out.weight)[np.asarray(out.kept)] > 0.0)


@SETTINGS
@given(routing_problems())
def test_padding_is_never_routed_uses_no_capacity_and_not_counted(problem):
    logits, k, capacity, padding_mask = problem
    if padding_mask is None:
        padding_mask = np.random.default_rng(1).random(logits.shape[:2]) < 0.5
    padded = routing.route_top_k(jnp.asarray(logits), k=k, capacity=capacity, padding_mask=padding_mask)
    assert not np.asarray(padded.kept)[~padding_mask].any()
    assert np.all(np.asarray(padded.weight)[~padding_mask] == 0.0)
    # Real tokens are routed exactly as if the padding were not there: remove the padding tokens of a
    # group and the kept set of the remaining tokens is unchanged.
    for g in range(logits.shape[0]):
        real = np.nonzero(padding_mask[g])[0]
        if len(real) == 0:
            continue
        alone = routing.route_top_k(jnp.asarray(logits[g:g + 1, real]), k=k, capacity=capacity or logits.shape[1])
        np.testing.assert_array_equal(np.asarray(padded.kept)[g, real], np.asarray(alone.kept)[0])
    # Losses ignore padding: changing padded logits leaves them unchanged.
    scrambled = np.where(padding_mask[..., None], logits, 100.0 * np.random.default_rng(2).normal(size=logits.shape))
    for loss in (lambda x: routing.load_balancing_loss(jax.nn.softmax(x), routing.route_top_k(
                     x, k=k, capacity=capacity, padding_mask=padding_mask).expert_index, padding_mask),
                 lambda x: routing.router_z_loss(x, padding_mask)):
        np.testing.assert_allclose(loss(jnp.asarray(logits)), loss(jnp.asarray(scrambled, jnp.float32)),
                                   rtol=1e-5)


def test_router_math_is_float32_whatever_the_input_dtype():
    logits = jax.random.normal(jax.random.key(0), (2, 16, 8)).astype(jnp.bfloat16)
    for out in (routing.route_top_k(logits, k=2, capacity=4), routing.route_expert_choice(logits, capacity=4),
                routing.route_noisy_top_k(logits, jnp.ones_like(logits), k=2, capacity=4,
                                          rng=jax.random.key(1))[0]):
        assert out.weight.dtype == jnp.float32
        assert out.combine_tensor().dtype == jnp.float32
    assert routing.router_z_loss(logits).dtype == jnp.float32
    assert routing.load_balancing_loss(jax.nn.softmax(logits), jnp.zeros((2, 16, 1), jnp.int32)).dtype == jnp.float32
    # Weights equal those computed from the float32 upcast of the same values (no bf16 softmax).
    expected = jax.nn.softmax(logits.astype(jnp.float32)).max(axis=-1)
    np.testing.assert_allclose(routing.route_top_k(logits, k=1, capacity=None).weight[..., 0], expected, rtol=1e-6)


@pytest.mark.parametrize("k, capacity", [(1, 3), (2, None), (3, None)])
def test_default_token_order_routing_is_causal(k, capacity):
    """Changing the router logits of tokens t+1.. never changes what tokens 0..t get."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 24, 6)).astype(np.float32)
    base = routing.route_top_k(jnp.asarray(logits), k=k, capacity=capacity)
    for t in (0, 5, 17):
        changed = logits.copy()
        changed[:, t + 1:] = rng.normal(size=changed[:, t + 1:].shape) * 5
        out = routing.route_top_k(jnp.asarray(changed), k=k, capacity=capacity)
        # What reaches the output: which experts, with what weight. (With k >= 2 the slot *numbers* of
        # second choices shift when later first choices change, but dropless keeps everything anyway.)
        fields = ("expert_index", "weight", "kept") + (("slot",) if k == 1 else ())
        for field in fields:
            np.testing.assert_array_equal(np.asarray(getattr(out, field))[:, :t + 1],
                                          np.asarray(getattr(base, field))[:, :t + 1])


def test_top_two_with_capacity_is_not_causal_as_documented():
    """Choice-rank-major slots: a later token's first choice can take the slot of an earlier second choice."""
    logits = jnp.array([[[3.0, 2.0], [0.0, 1.0]]])  # t0 wants (e0, e1), t1 wants (e1, e0)
    out = routing.route_top_k(logits, k=2, capacity=1)
    assert not bool(out.kept[0, 0, 1])  # t0's second choice (e1) lost its slot to t1's first choice


def test_jitter_is_multiplicative_and_bounded():
    x = jnp.ones((4, 64), jnp.bfloat16) * 3
    y = routing.jitter(x, jax.random.key(0), 0.01)
    assert y.dtype == x.dtype
    ratio = np.asarray(y, np.float32) / 3
    assert ratio.min() >= 0.99 - 1e-2 and ratio.max() <= 1.01 + 1e-2 and ratio.std() > 0
    assert routing.jitter(x, jax.random.key(0), 0.0) is x


def test_balancing_bias_moves_against_the_load():
    bias = jnp.zeros(4)
    new = routing.update_balancing_bias(bias, jnp.array([10.0, 2.0, 2.0, 2.0]), rate=1e-3)
    np.testing.assert_allclose(new, [-1e-3, 1e-3, 1e-3, 1e-3])
    # The bias changes selection: a strong enough bias moves tokens off the overloaded expert.
    logits = jnp.array([[[2.0, 1.0, 0.0, 0.0]] * 4])
    assert np.all(routing.route_top_k(logits, k=1, capacity=None).expert_index == 0)
    biased = routing.route_top_k(logits, k=1, capacity=None, selection_bias=jnp.array([-1.0, 0, 0, 0]))
    assert np.all(biased.expert_index == 1)
    # ...but not the weight, which stays the unbiased probability.
    np.testing.assert_allclose(biased.weight[..., 0], jax.nn.softmax(logits)[..., 1], rtol=1e-6)


def test_hash_routing_uses_the_table_and_balances_the_vocabulary():
    table = routing.hash_expert_table(1000, 8, seed=3)
    assert np.bincount(table, minlength=8).tolist() == [125] * 8
    token_ids = jnp.array([[5, 17, 5, 999]])
    out = routing.route_hash(token_ids, expert_of_token=table, num_experts=8, capacity=None)
    np.testing.assert_array_equal(out.expert_index[0, :, 0], table[[5, 17, 5, 999]])
    np.testing.assert_array_equal(out.weight, 1.0)
    assert routing.route_hash(jnp.zeros((1, 4), jnp.int32), expert_of_token=table, num_experts=8,
                              capacity=2).kept.sum() == 2


def test_noisy_top_k_gates_sum_to_one_and_losses_are_balanced_when_uniform():
    logits = jax.random.normal(jax.random.key(0), (2, 64, 8))
    out, losses = routing.route_noisy_top_k(logits, jnp.full_like(logits, 0.5), k=2, capacity=None,
                                            rng=jax.random.key(1))
    np.testing.assert_allclose(out.weight.sum(-1), 1.0, rtol=1e-5)
    assert losses["importance_loss"] >= 0 and losses["load_loss"] >= 0
    # Without rng there is no noise: the choice is the clean top-k.
    clean, _ = routing.route_noisy_top_k(logits, None, k=2, capacity=None)
    np.testing.assert_array_equal(jnp.sort(clean.expert_index, -1),
                                  jnp.sort(jax.lax.top_k(logits, 2)[1], -1))
    # Collapsed logits give a large importance loss; the smooth load loss has a gradient to the noise.
    collapsed = jnp.zeros((1, 32, 4)).at[..., 0].set(10.0)
    _, collapsed_losses = routing.route_noisy_top_k(collapsed, jnp.ones_like(collapsed), k=1, capacity=None,
                                                    rng=jax.random.key(2))
    assert collapsed_losses["importance_loss"] > 1.0
    grad = jax.grad(lambda s: routing.route_noisy_top_k(logits, s, k=2, capacity=None, rng=jax.random.key(1))[1][
        "load_loss"])(jnp.full_like(logits, 0.5))
    assert jnp.abs(grad).sum() > 0


def test_routing_metrics():
    logits = jnp.array([[[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [0.0, 5.0]]])
    out = routing.route_top_k(logits, k=1, capacity=2)
    metrics = routing.routing_metrics(out, jax.nn.softmax(logits))
    np.testing.assert_allclose(metrics["dropped_fraction"], 0.25)
    np.testing.assert_allclose(metrics["expert_load"], [2 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(metrics["load_cv"], (1 / 6) / 0.5, rtol=1e-5)
    assert 0 < metrics["router_entropy"] < np.log(2)
    np.testing.assert_allclose(metrics["top1_prob"], jax.nn.softmax(jnp.array([5.0, 0.0]))[0], rtol=1e-6)


def test_routing_is_a_pytree_that_jits():
    logits = jax.random.normal(jax.random.key(0), (2, 8, 4))
    out = jax.jit(lambda x: routing.route_top_k(x, k=2, capacity=3))(logits)
    assert isinstance(out, routing.Routing) and out.capacity == 3 and out.num_experts == 4
    leaves = jax.tree_util.tree_leaves(out)
    assert len(leaves) == 4


def test_task_loss_sends_gradient_to_router_logits_through_combine_weights():
    logits = jax.random.normal(jax.random.key(0), (1, 8, 4))
    expert_out = jax.random.normal(jax.random.key(1), (1, 8, 4))

    def task_loss(x):
        combine = routing.route_top_k(x, k=1, capacity=2).combine_tensor()  # [G, S, E, C]
        return jnp.sum(combine.sum(-1) * expert_out)

    assert jnp.abs(jax.grad(task_loss)(logits)).sum() > 0


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: routing.route_top_k(x, k=5, capacity=2), r"k must be an integer in \[1, num_experts=4\]"),
        (lambda x: routing.route_top_k(x, k=0, capacity=2), r"k must be"),
        (lambda x: routing.route_top_k(x, k=1, capacity=0), r"capacity must be a positive integer"),
        (lambda x: routing.route_top_k(x, k=1, capacity=-3), r"capacity must be a positive integer"),
        (lambda x: routing.route_top_k(x[0], k=1, capacity=2), r"router_logits must be \[G, S, E\]"),
        (lambda x: routing.route_top_k(x, k=1, capacity=2, padding_mask=jnp.ones((2, 3), bool)),
         r"padding_mask must have shape \[G, S\] = \(2, 8\)"),
        (lambda x: routing.route_expert_choice(x, capacity=9), r"capacity must be in \[1, group size 8\]"),
        (lambda x: routing.route_expert_choice(x, capacity=None), r"needs an integer capacity"),
        (lambda x: routing.expert_capacity(8, 4, 0.0), r"capacity_factor must be > 0, got 0.0"),
        (lambda x: routing.expert_capacity(8, 4, -1.0), r"capacity_factor must be > 0"),
        (lambda x: routing.expert_capacity(0, 4, 1.0), r"num_tokens must be a positive integer, got 0"),
        (lambda x: routing.expert_capacity(8, 4, 1.0, k=0), r"k must be a positive integer, got 0"),
    ],
)
def test_bad_input_names_the_argument_and_valid_range(call, message):
    logits = jnp.zeros((2, 8, 4))
    with pytest.raises(ValueError, match=message):
        call(logits)


def test_balancing_bias_update_treats_stacked_layers_independently():
    load = jnp.array([[10.0, 2.0], [1.0, 3.0]])
    new = routing.update_balancing_bias(jnp.zeros((2, 2)), load, rate=0.5)
    np.testing.assert_allclose(new, [[-0.5, 0.5], [0.5, -0.5]])
