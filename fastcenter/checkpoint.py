"""The checkpoint format of a training run: written by train.py and the training core, read by --resume and
by `fastcenter.sample`.

    {"format": "fastcenter.train/1",
     "model": state_dict of the bare GPT (no DDP / torch.compile prefixes),
     "optimizer": AdamW state_dict, "scaler": GradScaler state_dict or None (float16 only),
     "step": optimizer steps completed,
     "config": {"model": GPTConfig.to_dict(), "train": TrainConfig as a dict},
     "rng": {"python", "numpy", "torch", "cuda"}, "sampler": {"seed", "step"},
     "val_loss": latest validation loss or None,
     "data": the identity of the corpus it was trained on (`fastcenter.data.Corpus.identity`: the token files'
             counts and digests, and the vocabulary's); absent from checkpoints written before it existed,
     "token_ids": (only for a corpus with a compacted vocabulary) the GPT-2 id of each of the model's token ids}

Only tensors and plain Python values, so it loads with torch.load(..., weights_only=True), and
GPTConfig.from_dict(ckpt["config"]["model"]) rebuilds the model. Writes are atomic (fastcenter.files).

A checkpoint proves its integrity on load: the file is torch's zip archive, and `load` checks every member's
CRC-32 before anything is read (torch.load does not), so a damaged byte is refused rather than trained on --
and then rewritten with a valid checksum, the damage out of sight. Then every field is checked for its type
(and the weights for NaN/inf): a damaged or foreign checkpoint is one CheckpointError, never a traceback.
"""

from __future__ import annotations

import math
import pathlib
import random
import zipfile
from typing import Optional

import numpy as np
import torch

from .data import DataError, check_token_ids
from .files import atomic_write, write_failure
from .model import GPT, GPTConfig
from .ops._dispatch import is_int

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
        kept = f"the previous checkpoint {path} is intact" if path.is_file() else "no checkpoint was written"
        raise CheckpointError(f"{write_failure(path, e, 'the checkpoint ')}; {kept} (--resume continues)") from None


def load(path, map_location="cpu", keys=KEYS) -> dict:
    """Read a train.py checkpoint, verified (see the module docstring), and check that it holds `keys` (all of
    them for --resume; the model and its config for sampling); raises CheckpointError when it cannot."""
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file: not a checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint")
    verify(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- whatever torch's reader makes of a foreign archive
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt or truncated?): {_first_line(e)}"
        ) from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (written by train.py)")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(
            f"{path} has format {ckpt['format']!r:.60}: written by another version of fastcenter (this one reads {FORMAT})"
        )
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: an incomplete {FORMAT} checkpoint")
    _check_fields(ckpt, path, keys)
    return ckpt


def verify(path) -> None:
    """Refuse (CheckpointError) a file that is not a zip archive, or one whose members do not match their CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()  # reads every member and checks its CRC-32
    except zipfile.BadZipFile as e:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (corrupt or truncated?): not a zip archive as train.py writes ({e})"
        ) from None
    except Exception as e:  # noqa: BLE001 -- a damaged archive fails in many ways (zlib, EOF, ...)
        raise CheckpointError(f"{path} is damaged: {_first_line(e)}; refused rather than trained on") from None
    if damaged is not None:
        raise CheckpointError(
            f"{path} is damaged: its member {damaged} does not match its checksum (a disk or copy error?); refused "
            "rather than trained on: resume from a copy, or start again"
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def error_summary(e: BaseException) -> str:
    """An exception in one line: its type and its first two lines (load_state_dict puts the detail second)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()][:2]
    return f"{type(e).__name__}: {' '.join(lines)}"[:300]


# What each field must be: (test, description). The trainer checks the rest (shapes, optimizer groups) when
# it applies them (Trainer.load_state_dict).
FIELDS = {
    "model": (
        lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()),
        "a dict of named tensors",
    ),
    "optimizer": (
        lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict) and isinstance(v.get("param_groups"), list),
        "an optimizer state (state, param_groups)",
    ),
    "scaler": (lambda v: v is None or isinstance(v, dict), "a loss-scaler state or None"),
    "step": (lambda v: is_int(v) and v >= 0, "a step count (an int >= 0)"),
    "config": (lambda v: isinstance(v, dict) and isinstance(v.get("model"), dict), "a config with a model part"),
    "rng": (lambda v: isinstance(v, dict) and {"python", "numpy", "torch", "cuda"} <= set(v), "a set of RNG states"),
    "sampler": (
        lambda v: isinstance(v, dict) and is_int(v.get("seed")) and is_int(v.get("step")),
        "a sampler state (int seed and step)",
    ),
    "val_loss": (
        lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
        "a finite loss or None",
    ),
    "data": (lambda v: isinstance(v, dict), "a corpus identity"),
}


def _check_fields(ckpt: dict, path, keys) -> None:
    """Check the fields the reader uses: `keys`, and the optional ones that go with them."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: {what}: a damaged checkpoint, or one from another version of fastcenter")

    resume = set(KEYS) <= set(keys)
    for key, (ok, description) in FIELDS.items():
        if (key in keys or (resume and key in ckpt)) and not ok(ckpt[key]):
            raise bad(f"its {key!r} is not {description}")
    if resume:
        if not isinstance(ckpt["config"].get("train"), dict):
            raise bad("its config has no train part")
        if ckpt["sampler"]["step"] != ckpt["step"]:
            raise bad(f"its sampler is at step {ckpt['sampler']['step']} but the checkpoint at step {ckpt['step']}")
    for name, tensor in ckpt["model"].items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: its weight {name} holds NaN or inf: a damaged checkpoint, refused")
    if ckpt.get("token_ids") is not None:
        try:
            ckpt["token_ids"] = check_token_ids(ckpt["token_ids"], path).tolist()
        except DataError as e:
            raise bad(str(e).removeprefix(f"{path}: ")) from None


def model_config(ckpt: dict, path="the checkpoint") -> GPTConfig:
    try:
        return GPTConfig.from_dict(ckpt["config"]["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: its model config is not valid ({e}): a damaged checkpoint, or one from "
            "another version of fastcenter"
        ) from None


def load_model(path, device: str | torch.device = "cpu", fused: Optional[bool] = None) -> GPT:
    """Rebuild the GPT stored in a checkpoint, in eval mode on `device`; `fused` overrides its choice of ops."""
    return model_from(load(path, map_location=device, keys=("format", "model", "config")), device, fused, path)


def model_from(ckpt: dict, device="cpu", fused: Optional[bool] = None, path="the checkpoint") -> GPT:
    config = model_config(ckpt, path)
    if fused is not None:
        config = GPTConfig.from_dict({**config.to_dict(), "fused": fused})
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the model config ({error_summary(e)})") from None
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
