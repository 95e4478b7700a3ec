"""MOSI-shaped synthetic clips whose label is a known, learnable function of the features.

The label of a clip is

    score = 3 * tanh(gain * sum_m  w_m . masked_mean_m(x_m)  +  bias)

where `masked_mean_m` averages modality m over its valid rows only (padding never counts), and the
weights `w_m` are fixed by `LABEL_SEED`. Scores are then rounded to MOSI-like steps of 0.2 and those
with |score| < 0.2 snapped to exactly 0 (MOSI has exact zeros, which the Non0 metrics drop). Each clip
carries a hidden sentiment `z` that shifts its rows along the direction of `w_m`, so the masked means
predict the label well and a working model learns it within a few epochs; predicting the mean does not.

`raw_text` per clip is a few words from a small vocabulary whose sentiment words agree with the label,
so `--tokenize` has something meaningful to tokenise.
"""
import numpy as np

from msa_xla.data.sources import SplitData
from msa_xla.options import MODALITIES, SPLITS

MOSI_SPLIT_SIZES = (1284, 229, 686)
MOSI_DIMS = (300, 74, 47)  # GloVe text, COVAREP audio, Facet video (MulT's MOSI).
UNALIGNED_SEQ_LEN = (50, 375, 500)
LABEL_SEED = 1234  # Fixes the label function; the `seed` argument only varies the clips.
LABEL_STEP = 0.2
SIGNAL = 1.0  # How far a unit of hidden sentiment moves a row along w_m.

POSITIVE = ("good", "great", "love", "amazing", "funny", "enjoyed", "best", "wonderful", "fun")
NEGATIVE = ("bad", "boring", "hate", "awful", "worst", "terrible", "dull", "stupid", "waste")
NEUTRAL = ("the", "movie", "it", "was", "and", "i", "a", "really", "plot", "acting", "this",
           "film", "kind", "of", "just", "um", "so", "like", "story", "characters")


def label_weights(dims=MOSI_DIMS):
    """The fixed per-modality unit directions u_m and their weights alpha_m (w_m = alpha_m * u_m)."""
    rng = np.random.default_rng(LABEL_SEED)
    directions = []
    for dim in dims:
        u = rng.standard_normal(dim)
        directions.append(u / np.linalg.norm(u))
    alphas = np.array([0.5, 0.3, 0.2])  # Text carries the most sentiment, as in MOSI.
    return directions, alphas


def masked_means(split):
    """(N, sum(dims)) concatenated masked means of one SplitData (used by tests and the label)."""
    parts = []
    for name in MODALITIES:
        rows = split.features[name]
        parts.append(np.stack([r.mean(axis=0) if len(r) else np.zeros(r.shape[1]) for r in rows]))
    return np.concatenate(parts, axis=1)


def label_function(means, dims=MOSI_DIMS, gain=0.7, bias=0.05):
    """Exact score in [-3, 3] from masked means (N, sum(dims)), before rounding."""
    directions, alphas = label_weights(dims)
    w = np.concatenate([a * u for a, u in zip(alphas, directions)])
    return 3.0 * np.tanh(gain * (means @ w) + bias)


def _round_label(score):
    rounded = np.round(score / LABEL_STEP) * LABEL_STEP
    rounded[np.abs(score) < LABEL_STEP] = 0.0
    return np.clip(np.round(rounded, 1), -3.0, 3.0)


def _true_lengths(rng, n, seq_lens, aligned):
    """Variable true lengths: aligned clips share one length; unaligned ones scale with the text."""
    frac = rng.uniform(0.25, 1.0, size=n)
    if aligned:
        length = np.maximum(1, np.round(frac * seq_lens[0])).astype(np.int64)
        return [length] * 3
    out = []
    for t in seq_lens:
        jitter = np.clip(frac * rng.uniform(0.8, 1.2, size=n), 0.05, 1.0)
        out.append(np.maximum(1, np.round(jitter * t)).astype(np.int64))
    return out


def _raw_text(rng, labels):
    texts = []
    for y in labels:
        n_words = rng.integers(4, 12)
        p_pos = 1.0 / (1.0 + np.exp(-1.5 * y))
        words = []
        for _ in range(n_words):
            if rng.random() < 0.35 and y != 0:
                pool = POSITIVE if rng.random() < p_pos else NEGATIVE
            else:
                pool = NEUTRAL
            words.append(pool[rng.integers(len(pool))])
        texts.append(" ".join(words))
    return texts


def generate_split(n, *, seq_len=50, dims=MOSI_DIMS, seed=0, prefix="clip"):
    """One SplitData of `n` clips. `seq_len` int (aligned) or (text, audio, video) (unaligned)."""
    aligned = np.isscalar(seq_len)
    seq_lens = (int(seq_len),) * 3 if aligned else tuple(int(t) for t in seq_len)
    rng = np.random.default_rng(seed)
    directions, _ = label_weights(dims)
    lengths = _true_lengths(rng, n, seq_lens, aligned)
    sentiment = rng.standard_normal(n)  # Hidden z per clip.
    features = {}
    for m, (name, dim) in enumerate(zip(MODALITIES, dims)):
        # Each modality sees z plus its own noise, so fusing all three beats any single one.
        shift = SIGNAL * (sentiment + 0.5 * rng.standard_normal(n))
        rows = []
        for i in range(n):
            x = rng.standard_normal((lengths[m][i], dim)).astype(np.float32)
            x += (shift[i] * directions[m]).astype(np.float32)
            rows.append(x)
        features[name] = rows
    split = SplitData(features, np.zeros(n), [f"{prefix}_{i:05d}" for i in range(n)])
    split.labels = _round_label(label_function(masked_means(split), dims))
    split.raw_text = _raw_text(rng, split.labels)
    return split


def generate(split_sizes=MOSI_SPLIT_SIZES, *, seq_len=50, dims=MOSI_DIMS, seed=0):
    """{split: SplitData} with MOSI's split sizes by default; each split has its own stream."""
    return {split: generate_split(n, seq_len=seq_len, dims=dims, seed=seed * 1000 + k,
                                  prefix=f"synth{split}")
            for k, (split, n) in enumerate(zip(SPLITS, split_sizes))}
