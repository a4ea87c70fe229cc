"""The checkpoint format of a training run: written by train.py and the training core, read by --resume and
by `fastcenter.sample`.

    {"format": "fastcenter.train/1",
     "model": state_dict of the bare GPT (no DDP / torch.compile prefixes),
     "optimizer": AdamW state_dict, "scaler": GradScaler state_dict or None (float16 only),
     "step": optimizer steps completed,
     "config": {"model": GPTConfig.to_dict(), "train": TrainConfig as a dict},
     "rng": {"python", "numpy", "torch", "cuda"}, "sampler": {"seed", "step"},
     "val_loss": latest validation loss or None,
     "token_ids": (only for a corpus with a compacted vocabulary) the GPT-2 id of each of the model's token ids}

Only tensors and plain Python values, so it loads with torch.load(..., weights_only=True), and
GPTConfig.from_dict(ckpt["config"]["model"]) rebuilds the model. Writes are atomic (fastcenter.files).
"""

from __future__ import annotations

import errno
import pathlib
import pickle
import random
from typing import Optional

import numpy as np
import torch

from .files import atomic_write
from .model import GPT, GPTConfig

FORMAT = "fastcenter.train/1"
KEYS = ("format", "model", "optimizer", "scaler", "step", "config", "rng", "sampler", "val_loss")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and what to do."""


def save(path, state: dict) -> None:
    """Write `state` (every key of KEYS but "format") atomically; a failure leaves the previous file intact."""
    path = pathlib.Path(path)
    try:
        atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        kept = f"the previous checkpoint {path} is intact" if path.exists() else "no checkpoint was written"
        raise CheckpointError(
            f"could not write the checkpoint {path}: {e.strerror or e}"
            f"{' (free some space, then --resume)' if full else ''}; {kept}"
        ) from None


def load(path, map_location="cpu", keys=KEYS) -> dict:
    """Read a train.py checkpoint and check that it holds `keys` (all of them for --resume; the model and its
    config for sampling); raises CheckpointError with a clear message when it cannot."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {first_line}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (written by train.py)")
    missing = [k for k in keys if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict) or not isinstance(ckpt["config"].get("model"), dict):
        raise CheckpointError(f"{path} lacks {missing or ['config.model']}: an incomplete {FORMAT} checkpoint")
    return ckpt


def model_config(ckpt: dict) -> GPTConfig:
    try:
        return GPTConfig.from_dict(ckpt["config"]["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's model config is not valid: {e}") from None


def load_model(path, device: str | torch.device = "cpu", fused: Optional[bool] = None) -> GPT:
    """Rebuild the GPT stored in a checkpoint, in eval mode on `device`; `fused` overrides its choice of ops."""
    return model_from(load(path, map_location=device, keys=("format", "model", "config")), device, fused, path)


def model_from(ckpt: dict, device="cpu", fused: Optional[bool] = None, path="the checkpoint") -> GPT:
    config = model_config(ckpt)
    if fused is not None:
        config = GPTConfig.from_dict({**config.to_dict(), "fused": fused})
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the model config: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


def rng_state(device: torch.device) -> dict:
    """Every RNG's state as tensors and plain Python values (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
