"""fastcenter.hf under data parallelism, two processes on the CPU (gloo) against one: FSDP2 (`fully_shard`, the
lm_head in its own group as it is where memory matters most, or tied to the embedding in one group as accelerate
shards it) and DDP. Each rank trains on its half of the batch with the fused loss (never the logits) and
num_items_in_batch counted over both, as Trainer does; the averaged loss and every gathered gradient equal one
process's transformers model on the whole batch.
"""

import copy
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hf_models import make_batch, tiny_model

from fastcenter import hf

WORLD = 2
CASES = ("fsdp2-untied", "fsdp2-tied", "ddp")
TOL = dict(rtol=1e-5, atol=1e-5)

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(case: str, model):
    if case == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model), model
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    if case == "fsdp2-untied":
        fully_shard(model.lm_head)  # its own group, resharded after the forward: gathered again for the backward
    else:
        fully_shard([model.model.norm, model.model.embed_tokens, model.lm_head], reshard_after_forward=False)
    fully_shard(model)
    return model, model


def _check(case: str, rank: int) -> None:
    torch.manual_seed(0)
    reference = tiny_model("llama", tied=case == "fsdp2-tied")
    ids, labels = make_batch(2 * WORLD)
    expected = reference(input_ids=ids, labels=labels).loss
    expected.backward()

    wrapped, model = _shard(case, hf.patch(copy.deepcopy(reference)))
    rows = slice(rank * 2, rank * 2 + 2)
    num_items = int((labels[:, 1:] != -100).sum())  # over both ranks: their micro-batches weigh by token
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastcenter.hf: lm_head")  # no fallback to the logits
        out = wrapped(input_ids=ids[rows], labels=labels[rows], num_items_in_batch=num_items)
    assert out.logits is None, case
    (out.loss * WORLD).backward()  # the ranks' gradients are averaged: each carries its share of the sum
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    torch.testing.assert_close(loss, expected.detach(), **TOL, msg=lambda m: f"{case} loss: {m}")
    for (name, param), (_, truth) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        torch.testing.assert_close(grad, truth.grad, **TOL, msg=lambda m: f"{case} gradient of {name}: {m}")


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="0")  # the CPU ops
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for case in CASES:
            _check(case, rank)
    finally:
        dist.destroy_process_group()


def test_fsdp2_and_ddp_match_one_process():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
