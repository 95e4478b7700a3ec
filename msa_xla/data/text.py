"""WordPiece vocabulary and tokenizer (tensorflow_text) for `raw_text`, so text can enter a model as
token ids through an embedding (`text_input='tokens'`).

The vocabulary is built from the training split only (no peeking at valid/test): special tokens, the
whole words seen at least `min_count` times, then every character seen, both as a word start and as a
`##` continuation, so any word of the training alphabet splits into pieces instead of [UNK].
Tokenisation is `tensorflow_text.BertTokenizer` (lower-casing, punctuation splitting, WordPiece), the
same op a model can run in-graph on raw strings at serving time via `load_tokenizer`.

The vocabulary file may be local or remote (gs://...): it is written through msa_xla.runtime.storage, and
the tokenizer's lookup table reads it through TensorFlow's filesystems.
"""
import collections
import os
import re

import numpy as np

from msa_xla.runtime import storage

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP)
PAD_ID, UNK_ID = 0, 1
VOCAB_FILE = "vocab.txt"

_WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)  # Mirrors BertTokenizer's basic split.


def build_vocab(texts, *, max_size=30000, min_count=1):
    """WordPiece vocabulary (list of str) from an iterable of raw strings."""
    words = collections.Counter()
    chars = set()
    for text in texts:
        for word in _WORD_RE.findall(text.lower()):
            words[word] += 1
            chars.update(word)
    pieces = [c for c in sorted(chars)] + [f"##{c}" for c in sorted(chars)]
    budget = max(0, max_size - len(SPECIAL_TOKENS) - len(pieces))
    common = [w for w, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))
              if n >= min_count and len(w) > 1][:budget]
    return list(SPECIAL_TOKENS) + pieces + common


def save_vocab(vocab, folder):
    """Write `vocab` one token a line as `folder/vocab.txt`; returns its path."""
    path = storage.join(os.fspath(folder), VOCAB_FILE)
    storage.write_text(path, "\n".join(vocab) + "\n")
    return path


def load_tokenizer(vocab_path):
    """A `tensorflow_text.BertTokenizer` over `vocab_path` producing int64 ids."""
    import tensorflow as tf
    import tensorflow_text as tf_text

    return tf_text.BertTokenizer(vocab_path, token_out_type=tf.int64, lower_case=True,
                                 unknown_token=UNK)


def tokenize(texts, vocab_path, seq_len, *, batch_size=1024):
    """Token ids (N, seq_len) int64 0-padded/truncated, kept lengths (N,) and untruncated lengths."""
    tokenizer = load_tokenizer(vocab_path)
    ids = np.zeros((len(texts), seq_len), np.int64)
    full_lengths = np.zeros(len(texts), np.int64)
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        # (batch, words, pieces) ragged -> (batch, pieces) ragged -> dense, padded with PAD_ID.
        pieces = tokenizer.tokenize(chunk).merge_dims(-2, -1)
        row_lengths = pieces.row_lengths().numpy()
        dense = pieces.to_tensor(default_value=PAD_ID).numpy()[:, :seq_len]
        ids[start:start + len(chunk), :dense.shape[1]] = dense
        full_lengths[start:start + len(chunk)] = row_lengths
    return ids, np.minimum(full_lengths, seq_len), full_lengths
