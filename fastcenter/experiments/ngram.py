"""The regime a study reached: count-based n-gram models of the same tokens, scored on the same windows as the runs.

A validation loss says little on its own. Beside count-based models of the same training tokens it says which
phase training reached: near the unigram's, the model predicts frequencies; near the bigram's, from the previous
token; only below the trigram's does it use more context than a table of counts would. For each paired seed the
tokens are those its runs trained on -- recomputed from the seeded window sampler (`fastcenter.data.WindowSampler`)
as the runs draw them, with the digest the runs recorded (`batches_digest`) to prove it -- fitted on the windows of
the first s steps for every evaluation step s; and, beside them, the whole training split.

The models: interpolated Kneser-Ney (Chen & Goodman, "An empirical study of smoothing techniques for language
modeling", 1998) with one fixed discount D = 0.75 at every order, interpolated down to the uniform distribution
over the model's vocabulary, so every validation token has a probability. Nothing is tuned, on validation data or
otherwise. The highest order uses counts c, the lower orders continuation counts (the number of distinct tokens
seen before a k-gram):

    p_k(w | h) = (max(c(h w) - D, 0) + D * N1+(h *) * p_{k-1}(w | h')) / c(h *)    if c(h *) > 0
    p_k(w | h) = p_{k-1}(w | h')                                                 otherwise
    p_0(w)     = 1 / vocab_size

with h' the context h without its first token, c(h *) the count of h followed by anything and N1+(h *) the number
of distinct tokens seen after h. Counting follows what a run sees: a window of seq_len + 1 tokens gives the
n-grams that end at its positions 1..seq_len (its targets), inside the window; the training split counts as one
long window. Scoring follows the runs' validation loss: the mean over every target of the fixed validation windows
(`fastcenter.data.validation_positions`) of -log p(target | the up to n - 1 tokens before it in its window), nats.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from collections.abc import Callable

import numpy as np

from .. import data
from ..files import atomic_write_text
from .plan import eval_steps

DISCOUNT = 0.75
ORDERS = {"unigram": 1, "bigram": 2, "trigram": 3}
REGIME_FILE = "ngrams.json"
METHOD = (
    f"interpolated Kneser-Ney, discount {DISCOUNT} at every order, down to the uniform distribution over the "
    "vocabulary; fitted to training windows, scored on the runs' validation windows (fastcenter/experiments/"
    "ngram.py)"
)


def _grams(windows: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
    """int64 keys of the k-grams that end at positions 1.. of every window (row), inside the window."""
    start, length = max(1, k - 1), windows.shape[1]
    key = np.zeros((windows.shape[0], length - start), dtype=np.int64)
    for j in range(k):  # token j of the gram ending at target position t is windows[:, t - k + 1 + j]
        key = key * vocab_size + windows[:, start - k + 1 + j : length - k + 1 + j]
    return key.reshape(-1)


def _lookup(keys: np.ndarray, values: np.ndarray, query: np.ndarray) -> np.ndarray:
    """values[i] where keys[i] == query (keys sorted and unique), else 0."""
    if len(keys) == 0:
        return np.zeros(query.shape, dtype=values.dtype)
    i = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
    return np.where(keys[i] == query, values[i], 0)


class KneserNey:
    """An interpolated Kneser-Ney model of order 1-3 fitted to token windows [N, L] (see the module docstring)."""

    def __init__(self, windows: np.ndarray, order: int, vocab_size: int, discount: float = DISCOUNT):
        windows = np.asarray(windows, dtype=np.int64)
        if windows.ndim != 2 or windows.shape[1] < order:
            raise ValueError(f"windows must be [N, L >= {order}], got shape {windows.shape}")
        if order not in (1, 2, 3) or vocab_size**order >= 2**63:
            raise ValueError(f"order must be 1, 2 or 3 (with vocab_size ** order < 2 ** 63), got {order}")
        self.order, self.vocab_size, self.discount = order, vocab_size, discount
        self.levels = []  # per k = 1..order: gram keys, their counts, context keys, context totals and types
        for k in range(1, order + 1):
            if k == order:
                keys, counts = np.unique(_grams(windows, k, vocab_size), return_counts=True)
            else:  # continuation counts: the distinct (k+1)-grams, less their first token
                longer = np.unique(_grams(windows, k + 1, vocab_size))
                keys, counts = np.unique(longer % vocab_size**k, return_counts=True)
            contexts, inverse = np.unique(keys // vocab_size, return_inverse=True)
            totals = np.bincount(inverse, weights=counts, minlength=len(contexts))
            types = np.bincount(inverse, minlength=len(contexts)).astype(np.float64)
            self.levels.append((keys, counts.astype(np.float64), contexts, totals, types))

    def probability(self, context: np.ndarray, target: np.ndarray) -> np.ndarray:
        """p(target | context) for context [M, order - 1] (the nearest token last; -1 where there is none)."""
        V, D = self.vocab_size, self.discount
        p = np.full(target.shape, 1.0 / V)
        for k, (keys, counts, contexts, totals, types) in enumerate(self.levels, start=1):
            ctx = context[:, context.shape[1] - (k - 1) :]
            have = (ctx >= 0).all(axis=1)
            ctx_key = np.zeros(target.shape, dtype=np.int64)
            for j in range(k - 1):
                ctx_key = ctx_key * V + np.maximum(ctx[:, j], 0)
            count = _lookup(keys, counts, ctx_key * V + target)
            total, kinds = _lookup(contexts, totals, ctx_key), _lookup(contexts, types, ctx_key)
            seen = have & (total > 0)
            p = np.where(seen, (np.maximum(count - D, 0.0) + D * kinds * p) / np.where(seen, total, 1.0), p)
        return p

    def loss(self, windows: np.ndarray) -> float:
        """Mean -log p over the targets (positions 1..) of windows [N, L], each predicted inside its window; nats."""
        windows = np.asarray(windows, dtype=np.int64)
        n, length = windows.shape
        padded = np.concatenate([np.full((n, self.order - 1), -1, dtype=np.int64), windows], axis=1)
        columns = [padded[:, 1 + j : length + j].reshape(-1) for j in range(self.order - 1)]  # nearest last
        context = np.stack(columns, axis=1) if columns else np.empty((n * (length - 1), 0), dtype=np.int64)
        p = self.probability(context, windows[:, 1:].reshape(-1))
        return float(-np.log(p).mean())


def seen_windows(train: np.ndarray, config: dict, seed: int) -> tuple[np.ndarray, str]:
    """Every training window a run of `seed` sees, in order ([iters * batch * accumulation, seq_len + 1]), and
    the sha256 of them as the training core records it (`batches_digest`)."""
    sampler = data.WindowSampler(
        train,
        seq_len=config["seq_len"],
        batch_size=config["batch_size"],
        grad_accum_steps=config["grad_accum_steps"],
        seed=seed,
    )
    h, windows = hashlib.sha256(), []
    for _ in range(config["iters"]):
        for w in sampler.next_step():
            h.update(w.tobytes())
            windows.append(w)
    return np.concatenate(windows), h.hexdigest()


def validation_windows(val: np.ndarray, config: dict) -> np.ndarray:
    """The runs' fixed validation windows: eval_batches x batch_size of them (fastcenter.training.Trainer)."""
    count = config["eval_batches"] * config["batch_size"]
    return data.gather_windows(val, data.validation_positions(len(val), config["seq_len"], count), config["seq_len"])


def _scores(windows: np.ndarray, val_windows: np.ndarray, vocab_size: int) -> dict:
    return {name: KneserNey(windows, order, vocab_size).loss(val_windows) for name, order in ORDERS.items()}


def _identity(config: dict, data_digest: str) -> dict:
    """What n-gram numbers depend on: the data, the windows and the vocabulary, the run length and batch."""
    keys = ("vocab_size", "seq_len", "batch_size", "grad_accum_steps", "iters", "eval_batches", "eval_points")
    return {"data_digest": data_digest, **{k: config[k] for k in keys}}


def update_regime(
    out_dir: pathlib.Path,
    train: np.ndarray,
    val: np.ndarray,
    config: dict,
    data_digest: str,
    seeds: list[int],
    log: Callable[[str], None] = print,
) -> dict:
    """OUT/ngrams.json with the n-gram losses of the training split and of every seed in `seeds` (computing
    only what the file lacks); returns its content."""
    path = pathlib.Path(out_dir) / REGIME_FILE
    identity = _identity(config, data_digest)
    regime = load_regime(out_dir, config, data_digest) or {
        "method": METHOD,
        "discount": DISCOUNT,
        **identity,
        "split": None,
        "seeds": {},
    }
    missing = [s for s in seeds if str(s) not in regime["seeds"]]
    if regime["split"] is not None and not missing:
        return regime
    t0 = time.perf_counter()
    val_windows = validation_windows(val, config)
    regime["validation"] = {"windows": len(val_windows), "targets": int(val_windows[:, 1:].size)}
    V = config["vocab_size"]
    if regime["split"] is None:
        regime["split"] = {"tokens": len(train), **_scores(np.asarray(train)[None, :], val_windows, V)}
    steps = eval_steps(config["iters"], config["eval_points"])
    per_step = config["batch_size"] * config["grad_accum_steps"]
    for seed in missing:
        windows, digest = seen_windows(train, config, seed)
        by_step = [_scores(windows[: s * per_step], val_windows, V) for s in steps]
        regime["seeds"][str(seed)] = {
            "batches_digest": digest,
            "targets": int(windows[:, 1:].size),
            "step": steps,
            **{name: [scores[name] for scores in by_step] for name in ORDERS},
        }
    atomic_write_text(path, json.dumps(regime, indent=1) + "\n")
    log(
        f"n-gram baselines ({', '.join(ORDERS)}) of the training split and seed(s) "
        f"{', '.join(map(str, missing)) or '-'}: {time.perf_counter() - t0:.0f} s, in {path}"
    )
    return regime


def load_regime(out_dir: pathlib.Path, config: dict, data_digest: str) -> dict | None:
    """OUT/ngrams.json if it was computed for this configuration and data, else None."""
    path = pathlib.Path(out_dir) / REGIME_FILE
    if not path.exists():
        return None
    regime = json.loads(path.read_text())
    identity = _identity(config, data_digest)
    if any(regime.get(k) != v for k, v in identity.items()):
        return None
    return regime
