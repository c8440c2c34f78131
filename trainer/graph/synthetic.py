"""A synthetic TAG generator (methods/h4g.md §6): topic-model texts on a degree-corrected SBM with
controllable edge homophily h; the source and every target graph draw their classes from disjoint topics.

- Vocabulary: pronounceable pseudo-words; each topic owns a disjoint set of words with Zipf weights, the
  remaining words form the background.
- Node text: ``words_per_node`` words, each from the node's class topic with probability
  ``topic_fraction``, else from the background.
- Edges: a node u is drawn with probability ∝ its degree propensity θ (log-normal); with probability h
  its partner comes from u's class, else from class (y_u + 1) mod K ("regular" heterophily), again ∝ θ.
- Label text: "<class name>: <its 10 most probable topic words>".
"""
from __future__ import annotations

import numpy as np

from blocktrain.trainer.graph.tag import Tag

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def pseudo_words(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct pronounceable pseudo-words (3 syllables)."""
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(3)))
    ordered = sorted(words)  # a set's order follows PYTHONHASHSEED; the draw must follow the seed alone
    return [ordered[i] for i in rng.permutation(n)]


def synthetic_tags(homophily_source: float, homophily_targets: list[float], num_nodes: int = 300,
                   num_classes: int = 4, vocab_size: int = 2000, words_per_node: int = 30,
                   topic_fraction: float = 0.7, avg_degree: float = 8.0, seed: int = 0) -> tuple[Tag, list[Tag]]:
    """(source, targets): one target per entry of ``homophily_targets``; class topics disjoint across all."""
    rng = np.random.default_rng(seed)
    n_graphs = 1 + len(homophily_targets)
    n_topics = n_graphs * num_classes
    vocab = pseudo_words(vocab_size + n_topics, rng)
    names, vocab = vocab[:n_topics], vocab[n_topics:]
    per_topic = vocab_size // (2 * n_topics)  # half of the vocabulary is background
    if per_topic < 10:
        raise ValueError(f"vocab_size {vocab_size} is too small for {n_topics} topics of >= 10 words")
    topics = [vocab[i * per_topic:(i + 1) * per_topic] for i in range(n_topics)]
    background = vocab[n_topics * per_topic:]
    zipf = 1.0 / np.arange(1, per_topic + 1)
    zipf /= zipf.sum()

    def graph(name: str, h: float, first_topic: int, role: str) -> Tag:
        y = rng.integers(0, num_classes, num_nodes)
        texts = []
        for cls in y:
            topic = topics[first_topic + cls]
            picks = rng.choice(per_topic, size=words_per_node, p=zipf)
            noise = rng.integers(len(background), size=words_per_node)
            from_topic = rng.random(words_per_node) < topic_fraction
            texts.append(" ".join(topic[i] if t else background[j] for t, i, j in zip(from_topic, picks, noise)))
        theta = rng.lognormal(0.0, 0.5, num_nodes)
        members = [np.flatnonzero(y == k) for k in range(num_classes)]
        n_draws = int(num_nodes * avg_degree / 2)
        u = rng.choice(num_nodes, size=n_draws, p=theta / theta.sum())
        k = np.where(rng.random(n_draws) < h, y[u], (y[u] + 1) % num_classes)
        v = np.full(n_draws, -1)
        for cls, pool in enumerate(members):
            rows = np.flatnonzero(k == cls)
            if len(pool) and len(rows):
                v[rows] = rng.choice(pool, size=len(rows), p=theta[pool] / theta[pool].sum())
        edges = {(int(a), int(b)) for a, b in zip(u, v) if b >= 0 and a != b}
        label_texts = {names[first_topic + k]: f"{names[first_topic + k]}: {' '.join(topics[first_topic + k][:10])}"
                       for k in range(num_classes)}
        labels = [names[first_topic + k] for k in y]
        return Tag(name, [f"n{i}" for i in range(num_nodes)], texts, labels, sorted(edges), label_texts, role,
                   {"builder": "synthetic", "homophily_parameter": h, "seed": seed})

    source = graph("source", homophily_source, 0, "source")
    targets = [graph(f"target{i + 1}_h{h:g}", h, (i + 1) * num_classes, "target") for i, h in enumerate(homophily_targets)]
    return source, targets
