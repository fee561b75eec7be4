"""The built-in synthetic corpus: a mixture of D domains, each a sparse order-k Markov chain, with an exact floor.

Generator (all tables drawn once from `seed`):
  * token ids: 0 pad, 1 eos, 2 bos, 3..3+V-1 content tokens (`vocab_size` = V + 3 in total);
  * domain d owns a random subset A_d of m = `domain_vocab` content tokens (domains overlap only by chance);
  * for each context c (the previous k tokens of the document, BOS-padded at the start) domain d allows
    `branching` = b distinct successors, in a random order, with branch probabilities p_d (one
    Dirichlet(`alpha`) draw per domain, the same for all its contexts); the successors are drawn from a
    random `neighborhood` of n tokens of A_d that depends only on the last token, so the last token alone
    narrows the next to n candidates and the whole context to b (a graded task: unigram, bigram, order k);
  * document i: domain d ~ Uniform(D), length N ~ Geometric(q), q = 1 / `mean_length` (N >= 1), tokens
    x_t = successor j_t of context (x_{t-k}..x_{t-1}), j_t ~ p_d i.i.d.; then EOS.

Entropy floor. The pipeline predicts x_2..x_N and the EOS (x_1 follows the previous document's EOS and is
not a target). Before each of these targets the document is still running, so given the domain and the
context the target is EOS with probability q and successor j with probability (1 - q) p_d[j]:

    h_d = H_b(q) + (1 - q) H(p_d),   H_b(q) = -q log q - (1-q) log(1-q),   H(p) = -sum_j p_j log p_j,
    floor = (1/D) sum_d h_d   nats per weighted target token.

Lengths do not depend on the domain, so every domain has the same share of targets and the average is
exact (no stationary distribution is needed because h_d does not depend on the context). This is the
cross-entropy of a predictor that *knows each document's domain*. A model sees only the tokens, so it must
infer the domain from the document's first tokens: the Bayes-optimal mixture predictor pays at most log D
nats per document more, i.e. its loss lies in [floor, floor + log(D) / mean_length]. `entropy_floor` reports
the lower end; `bayes_gap_bound` the width.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

PAD, EOS, BOS = 0, 1, 2
NUM_SPECIAL = 3


@dataclasses.dataclass(frozen=True)
class SyntheticCorpus:
    """Tables of the generator; `document(i)` is a pure function of (seed, i)."""

    num_domains: int
    content_vocab: int
    domain_vocab: int
    order: int
    branching: int
    mean_length: float
    alpha: float
    seed: int
    neighborhood: int = 0  # 0 = domain_vocab (no bigram structure)

    def __post_init__(self):
        for name in ("num_domains", "content_vocab", "domain_vocab", "order", "branching"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"data.synthetic.{name}={getattr(self, name)!r} must be a positive integer")
        if self.order < 2:
            raise ValueError(f"data.synthetic.order={self.order} must be >= 2")
        n = self.neighborhood or self.domain_vocab
        if not self.branching <= n <= self.domain_vocab <= self.content_vocab:
            raise ValueError(f"need branching ({self.branching}) <= neighborhood ({n}) <= domain_vocab "
                             f"({self.domain_vocab}) <= content_vocab ({self.content_vocab})")
        if not self.mean_length >= 1:
            raise ValueError(f"data.synthetic.mean_length={self.mean_length} must be >= 1")
        rng = np.random.default_rng([self.seed, 0x5EED])
        m, k, b = self.domain_vocab, self.order, self.branching
        alphabet = np.stack([rng.choice(self.content_vocab, m, replace=False) for _ in range(self.num_domains)])
        contexts = (m + 1) ** k  # local ids 0..m-1 and m = BOS
        # Each (domain, last token) has a neighbourhood of n tokens; a context's b distinct successors are the
        # first b of a random permutation of its last token's neighbourhood. So the last token alone narrows
        # the next one to n (a bigram model gets part way), the full order-k context to b.
        hoods = np.argsort(rng.random((self.num_domains, m + 1, m)), axis=-1)[..., :n]
        pick = np.argsort(rng.random((self.num_domains, contexts, n)), axis=-1)[..., :b]
        last = np.arange(contexts) % (m + 1)
        successors = np.take_along_axis(hoods[:, last, :], pick, axis=-1)
        probs = rng.dirichlet([self.alpha] * b, size=self.num_domains)
        object.__setattr__(self, "alphabet_DM", alphabet.astype(np.int32) + NUM_SPECIAL)
        object.__setattr__(self, "successors_DCB", successors.astype(np.int32))
        object.__setattr__(self, "probs_DB", probs)
        object.__setattr__(self, "_cdf_DB", np.cumsum(probs, axis=-1))
        object.__setattr__(self, "_tables", [t.tolist() for t in successors.astype(np.int32)])  # fast lookups

    @classmethod
    def from_config(cls, config) -> "SyntheticCorpus":
        s = config.synthetic
        return cls(num_domains=s.num_domains, content_vocab=s.vocab_size - NUM_SPECIAL,
                   domain_vocab=s.domain_vocab, order=s.order, branching=s.branching,
                   mean_length=float(s.mean_length), alpha=float(s.alpha), seed=s.seed,
                   neighborhood=s.get("neighborhood", 0))

    @property
    def vocab_size(self) -> int:
        return self.content_vocab + NUM_SPECIAL

    @property
    def stop_probability(self) -> float:
        return 1.0 / self.mean_length

    def domain_entropies(self) -> np.ndarray:
        """h_d, nats per target token given domain d and the context ([D])."""
        q = self.stop_probability
        h_stop = 0.0 if q in (0.0, 1.0) else -q * math.log(q) - (1 - q) * math.log(1 - q)
        p = self.probs_DB
        h_branch = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
        return h_stop + (1 - q) * h_branch

    def entropy_floor(self) -> float:
        """Nats per target token of a predictor that knows each document's domain (see module docstring)."""
        return float(np.mean(self.domain_entropies()))

    def bayes_gap_bound(self) -> float:
        """Upper bound on (Bayes-optimal loss without the domain) - floor: log(D) / mean_length."""
        return math.log(self.num_domains) / self.mean_length

    def document(self, index: int, stream: int = 0) -> tuple[np.ndarray, int]:
        """Document `index` of `stream` (0 train, 1 eval): (content tokens [N] int32, without EOS; its domain)."""
        rng = np.random.default_rng([self.seed, 1 + stream, index])
        domain = int(rng.integers(self.num_domains))
        length = int(rng.geometric(self.stop_probability)) if self.stop_probability < 1 else 1
        branch = np.searchsorted(self._cdf_DB[domain], rng.random(length) * self._cdf_DB[domain, -1],
                                 side="right").tolist()
        table = self._tables[domain]
        m = self.domain_vocab
        radix = (m + 1) ** (self.order - 1)
        context = sum(m * (m + 1) ** i for i in range(self.order))  # all BOS
        local = []
        for j in branch:
            nxt = table[context][j]
            local.append(nxt)
            context = (context % radix) * (m + 1) + nxt
        return self.alphabet_DM[domain][np.asarray(local, dtype=np.int64)].astype(np.int32), domain

    def target_log_probs(self, tokens: np.ndarray, domain: int) -> np.ndarray:
        """log P(target | domain, context) for the targets x_2..x_N, EOS of one document ([N] float)."""
        q = self.stop_probability
        local_of = {int(t): i for i, t in enumerate(self.alphabet_DM[domain])}
        m = self.domain_vocab
        contexts = [m] * self.order
        out = []
        seq = [local_of[int(t)] for t in tokens] + [None]
        for t, nxt in enumerate(seq):
            if t > 0:
                if nxt is None:
                    out.append(math.log(q))
                else:
                    ctx = sum(c * (m + 1) ** (self.order - 1 - i) for i, c in enumerate(contexts))
                    j = list(self.successors_DCB[domain, ctx]).index(nxt)
                    out.append(math.log(1 - q) + math.log(self.probs_DB[domain, j]))
            if nxt is not None:
                contexts = contexts[1:] + [nxt]
        return np.asarray(out)


class SyntheticTokenizer:
    """The synthetic corpus's token space as a tokenizer: `vocab_size`, specials, and a readable `decode`."""

    pad_id, eos_id, bos_id = PAD, EOS, BOS

    def __init__(self, corpus: SyntheticCorpus):
        self.vocab_size = corpus.vocab_size

    def encode(self, text: str) -> list[int]:
        """Inverse of `decode` for content tokens written as space-separated `t<id>`."""
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(f"t{int(i)}" for i in ids if int(i) >= NUM_SPECIAL)
