"""A token n-gram model of the text already seen, mixed into `carlos eval --adapt`: a cache in the sense of
Grave et al. (2017), estimated the way PPM compressors estimate theirs, so that the adaptive score also keeps
what a compressor keeps (exact repeats of long strings) and a small model forgets.

Every probability is conditioned on the tokens before it and on none after it: each order's counts are taken over
the earlier positions only. Written with numpy rather than taken from a library because none of them returns
a byte-level PPM's probability per position (pyppmd gives only the compressed size)."""

import math

import numpy as np

# Absolute discount of every order's counts. Chosen with order 12 on the val splits of the bench suite's
# corpora (docs/PERFORMANCE.md); 0.6-0.8 measure within 0.005 bpb of one another.
DISCOUNT = 0.7
# Step of the online update of the model's weight in the mixture; 0.003-0.1 measure within 0.01 bpb.
MIX_RATE = 0.01


def _earlier(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each position, how many earlier positions hold the same key; with the order that sorts the keys
    (positions stay in order within a key) and, per sorted index, where its key's run begins."""
    order = np.argsort(keys, kind="stable")
    ranked = keys[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    earlier = np.empty(len(keys), np.int64)
    earlier[order] = np.arange(len(keys)) - first
    return earlier, order, first


def _counts(contexts: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position i, over the earlier positions with i's context: how many there are, how many of them were
    followed by tokens[i], and how many distinct tokens followed them."""
    seen, order, first = _earlier(contexts)
    followed, _, _ = _earlier(contexts * np.uint64(0x9E3779B97F4A7C15) + tokens)
    new = (followed == 0)[order].astype(np.int64)  # a token's first time after this context, in sorted order
    before = np.cumsum(new) - new
    distinct = np.empty(len(tokens), np.int64)
    distinct[order] = before - before[first]
    return seen, followed, distinct


def ngram_probs(tokens: np.ndarray, start: int, vocab: int, order: int, discount: float = DISCOUNT) -> np.ndarray:
    """The probability of tokens[i] given tokens[:i], for each i >= start: order 0's counts (plus one half
    each), then each longer context's counts with `discount` taken off every token seen after it and spread
    over the shorter context's distribution (absolute discounting, interpolated). A context is hashed into
    64 bits; a collision only pools two contexts' counts, and every distribution still sums to one."""
    tokens = tokens.astype(np.uint64)
    zeros = np.zeros(len(tokens), np.uint64)
    seen, followed, _ = _counts(zeros, tokens)
    probs = (followed + 0.5) / (seen + 0.5 * vocab)
    context = zeros
    with np.errstate(over="ignore"):  # the hash wraps around on purpose
        for k in range(1, order + 1):
            shifted = zeros.copy()
            shifted[k:] = tokens[:-k] + np.uint64(1)  # 0 stands for "before the text"
            context = context * np.uint64(1000003) + shifted  # tokens[i - k : i]
            seen, followed, distinct = _counts(context, tokens)
            longer = (np.maximum(followed - discount, 0) + discount * distinct * probs) / np.maximum(seen, 1)
            probs = np.where(seen > 0, longer, probs)
    return probs[start:]


def mix(model: np.ndarray, ngram: np.ndarray, rate: float = MIX_RATE) -> tuple[np.ndarray, float]:
    """The online linear mixture of two predictors' probabilities of the same tokens, and the model's final
    weight. The weight, sigmoid(theta), starts at one half and follows the gradient of the log-loss of the
    tokens already scored, so each token's mixture is fixed before it is seen."""
    theta, mixed = 0.0, np.empty(len(model))
    for i, (a, b) in enumerate(zip(model.tolist(), ngram.tolist(), strict=True)):
        w = 1.0 / (1.0 + math.exp(-theta))
        mixed[i] = p = w * a + (1.0 - w) * b
        theta += rate * w * (1.0 - w) * (a - b) / p
    return mixed, 1.0 / (1.0 + math.exp(-theta))
