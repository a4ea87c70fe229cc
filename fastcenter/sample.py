"""Sample text from a checkpoint written by train.py.

    python -m fastcenter.sample --ckpt out/ckpt.pt --prompt "To be, or not to be" --max-new-tokens 200

The checkpoint is read by `fastcenter.checkpoint.load_model` (the format is written down there).

Text is encoded and decoded with tiktoken's r50k_base (GPT-2's BPE; offline machines set TIKTOKEN_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from . import checkpoint
from .checkpoint import load_model  # noqa: F401 -- sample.load_model: rebuild a checkpoint's model
from .data import DataError, get_encoding
from .model import GPT

END_OF_TEXT = "<|endoftext|>"


def sample(
    model: GPT,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    num_samples: int = 1,
    seed: Optional[int] = None,
    token_ids: Optional[list[int]] = None,
) -> list[str]:
    """Continuations of `prompt` (the prompt included), decoded to text.

    token_ids: for a model trained on a compacted vocabulary, the GPT-2 id of each of its token ids (the
    checkpoint holds it): the prompt is mapped into the model's ids and the samples back.
    """
    enc = get_encoding()  # the tokenizer data preparation used; a clear message when it is not cached offline
    ids = enc.encode(prompt, allowed_special={END_OF_TEXT}) if prompt else [enc.eot_token]
    if token_ids is not None:
        compact = {gpt2: i for i, gpt2 in enumerate(token_ids)}
        unknown = sorted({enc.decode([t]) for t in ids if t not in compact})
        if unknown:
            raise ValueError(f"the prompt has token(s) the model never saw in its corpus: {unknown[:5]}")
        ids = [compact[t] for t in ids]
    vocab = model.config.vocab_size
    if max(ids) >= vocab:
        raise ValueError(f"the prompt encodes to token id {max(ids)}, outside the model's vocabulary of {vocab}")
    device = model.tok_emb.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    use_autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    rows = out.tolist()
    # Ids beyond the vocabulary of the text (the tokenizer's, or a compacted corpus's mapping) can only come from a
    # model trained with a larger --vocab-size than its data needed, a padded vocabulary: no text has them, so
    # they are dropped.
    if token_ids is not None:
        rows = [[token_ids[t] for t in row if t < len(token_ids)] for row in rows]
    return [enc.decode([t for t in row if t < enc.n_vocab]) for row in rows]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastcenter.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (ckpt.pt)")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start from <|endoftext|>)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    parser.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens (0: all)")
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.seed is not None:
        torch.manual_seed(args.seed)
    try:
        ckpt = checkpoint.load(args.ckpt, map_location=device, keys=("format", "model", "config"))
        model = checkpoint.model_from(ckpt, device, path=args.ckpt)
        texts = sample(
            model,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            num_samples=args.num_samples,
            seed=args.seed,
            token_ids=ckpt.get("token_ids"),
        )
    except (checkpoint.CheckpointError, DataError, ValueError) as exc:  # unreadable or mismatched file, bad prompt
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for i, text in enumerate(texts):
        if i:
            print("\n" + "-" * 40)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
