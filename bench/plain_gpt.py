"""The CPU benchmark's baseline: a plain-PyTorch GPT of fastcenter's architecture, nanoGPT style.

Same shapes and init as `fastcenter.model.GPT` at the same config (pre-norm RMSNorm, RoPE half-split pairs, causal
SDPA, SwiGLU with one gate|up projection, no biases, embedding tied to the head, GPT-2 init with the branch
outputs scaled by 1/sqrt(2 * n_layers)), written the way one would write it without fastcenter: the full
[B, T, V] logits and `F.cross_entropy`. Trained like train.py trains: AdamW (betas 0.9/0.95, weight decay 0.1 on
matrices only), gradient clipping 1.0, float32 on the CPU.

    python -m bench.plain_gpt --data DIR --out metrics.jsonl --batch-size 16 --seq-len 512 --max-iters 3

writes one JSON row per step (step, loss, tokens_per_sec, peak_mem_mb) as train.py's metrics.jsonl does, so
`bench.compare_plain` reads both alike. Nothing here imports fastcenter.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        q, k, v = (t.view(B, T, self.n_heads, -1).transpose(1, 2) for t in self.qkv(x).split(D, dim=-1))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


def rotate(x, cos, sin):
    """RoPE on [B, H, T, Dh], pairing (i, i + Dh/2); cos, sin: [T, Dh/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, dim, n_heads, hidden, eps):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
        self.attn, self.mlp = Attention(dim, n_heads), MLP(dim, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class PlainGPT(nn.Module):
    def __init__(
        self,
        vocab_size=50257,  # GPT-2's; fastcenter.data.GPT2_VOCAB_SIZE, but this file imports nothing of fastcenter
        dim=256,
        n_layers=4,
        n_heads=4,
        max_seq_len=512,
        hidden=None,
        rope_base=10000.0,
        eps=1e-6,
    ):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, dim)  # also the output head
        self.blocks = nn.ModuleList(Block(dim, n_heads, hidden or 4 * dim, eps) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim, eps=eps)
        head_dim = dim // n_heads
        inv_freq = rope_base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for block in self.blocks:  # residual branch outputs, as fastcenter.model.GPT
            for w in (block.attn.proj.weight, block.mlp.down.weight):
                nn.init.normal_(w, mean=0.0, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.tok_emb(idx)
        for block in self.blocks:
            x = block(x, self.cos[:T], self.sin[:T])
        logits = F.linear(self.norm(x), self.tok_emb.weight)  # [B, T, V]: all of them, at once
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.plain_gpt", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="directory holding train.bin (raw uint16 token ids)")
    p.add_argument("--out", required=True, help="metrics.jsonl to write")
    for name, default in (
        ("batch-size", 16),
        ("seq-len", 512),
        ("max-iters", 3),
        ("dim", 256),
        ("n-layers", 4),
        ("n-heads", 4),
        ("vocab-size", 50257),
        ("seed", 1337),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    tokens = np.memmap(pathlib.Path(args.data) / "train.bin", dtype=np.uint16, mode="r")
    model = PlainGPT(args.vocab_size, args.dim, args.n_layers, args.n_heads, args.seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    B, T = args.batch_size, args.seq_len
    with open(args.out, "w") as out:
        for step in range(1, args.max_iters + 1):
            t0 = time.perf_counter()
            starts = rng.integers(0, len(tokens) - T - 1, size=B)
            windows = torch.from_numpy(np.stack([tokens[s : s + T + 1] for s in starts]).astype(np.int64))
            loss = model(windows[:, :-1], windows[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux, as train.py
            row = {"step": step, "loss": loss.item(), "tokens_per_sec": B * T / seconds, "peak_mem_mb": peak_mb}
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
