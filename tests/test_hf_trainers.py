"""fastcenter.hf under the trainers people use: transformers' Trainer (gradient accumulation, evaluation with
the fused loss) and TRL's SFTTrainer (a few steps, the same losses and token accuracy as unpatched).
Tiny random models (hf_models.py), in-memory datasets, nothing from the network.
"""

import copy

import pytest
import torch
from hf_models import FP32, VOCAB, count_op_calls, make_batch, pair, transformers


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny matmuls: one thread is as fast and unaffected by the other core's load."""


class _Rows(torch.utils.data.Dataset):
    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _arguments(out_dir, **overrides):
    return transformers.TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        **overrides,
    )


def _train_one_step(model, rows, out_dir):
    trainer = transformers.Trainer(model=model, args=_arguments(out_dir), train_dataset=rows)
    trainer.train()
    return trainer


def test_trainer_step_with_gradient_accumulation(tmp_path):
    """One SGD step over 2 accumulated micro-batches with unequal token counts: the Trainer passes
    num_items_in_batch, and the patched model's update equals transformers'."""
    reference, patched = pair("llama")
    initial = copy.deepcopy(reference)
    ids, labels = make_batch(4)
    labels[:2, 3:] = -100  # the first micro-batch has far fewer targets than the second
    rows = _Rows(ids, labels)
    trainers = [_train_one_step(m, rows, tmp_path / name) for m, name in ((reference, "ref"), (patched, "pat"))]
    assert all(t.model_accepts_loss_kwargs for t in trainers)  # so num_items_in_batch reached the forward
    parameters = zip(reference.named_parameters(), patched.parameters(), initial.parameters())
    for (name, expected), actual, start in parameters:
        assert not torch.equal(expected, start), f"{name} did not move"
        torch.testing.assert_close(actual, expected, **FP32, msg=lambda m: f"{name} after one step: {m}")


def test_trainer_evaluate_with_the_fused_loss(tmp_path, monkeypatch):
    """Trainer.evaluate without compute_metrics wants the loss only (prediction_loss_only): with
    patch(eval_logits=False) the fused loss serves evaluation too, the logits are never formed, and the eval loss
    equals transformers'."""
    reference, patched = pair("qwen2", eval_logits=False)
    ids, labels = make_batch(4)
    rows = _Rows(ids, labels)
    args = _arguments(tmp_path, per_device_eval_batch_size=2)
    expected = transformers.Trainer(model=reference, args=args, eval_dataset=rows).evaluate()
    calls = count_op_calls(monkeypatch)
    head_calls = []
    patched.lm_head.register_forward_pre_hook(lambda m, args, kwargs: head_calls.append(kwargs), with_kwargs=True)
    got = transformers.Trainer(model=patched, args=args, eval_dataset=rows).evaluate()
    assert calls["linear_cross_entropy"] == 2  # one per eval batch
    assert len(head_calls) == 2 and all("fastcenter_loss" in kwargs for kwargs in head_calls)
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=2e-5)


# ---------------------------------------------------------------------------------------------------------
# TRL's SFTTrainer.
# ---------------------------------------------------------------------------------------------------------


def _word_tokenizer():
    """A tokenizer over the tiny vocabulary, built in memory (TRL wants one for padding; no download)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", eos_token="w1")


def _sft_losses(model, out_dir, rows, **config):
    trl = pytest.importorskip("trl", minversion="1.15")
    # float32 (SFTConfig defaults to bf16 autocast) and no checkpointing unless asked
    config = dict(dict(bf16=False, gradient_checkpointing=False), **config)
    args = trl.SFTConfig(
        output_dir=str(out_dir),
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        **config,
    )
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=_word_tokenizer())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return [entry["loss"] for entry in logged], [entry["mean_token_accuracy"] for entry in logged]


def _sft_rows(model, n: int = 6):
    """Greedy continuations of random prompts by `model`: its own top-1 predictions, so the token accuracy is
    far from zero (and a wrong one would show)."""
    datasets = pytest.importorskip("datasets")
    with torch.no_grad():
        rows = model.eval().generate(torch.randint(2, VOCAB, (n, 2)), max_new_tokens=9, do_sample=False)
    model.train()
    return datasets.Dataset.from_dict({"input_ids": rows.tolist()})


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_trl_sft_trainer_same_losses(tmp_path):
    """TRL's SFTTrainer (1.15 on) computes the loss and its token accuracy through its own chunked head on the
    backbone's output, never the logits: a few steps of a patched model (fastcenter's layers and centering in
    the backbone) log the same losses and accuracies as transformers' model."""
    reference, patched = pair("llama")
    rows = _sft_rows(copy.deepcopy(reference))
    expected = _sft_losses(reference, tmp_path / "ref", rows)
    got = _sft_losses(patched, tmp_path / "pat", rows)
    assert len(got[0]) == 3
    assert got[0] == pytest.approx(expected[0], rel=1e-4)
    assert got[1] == pytest.approx(expected[1], abs=1e-6) and expected[1][0] > 0.5


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_trl_gradient_checkpointing_guard(tmp_path):
    """The centering guards sit on the backbone, which TRL's fused head calls directly: values centering with
    SFTConfig's gradient checkpointing is refused there too (before the fix the guard sat in the causal LM's
    forward, which TRL bypasses, and the running means were updated twice per step)."""
    _, patched = pair("llama", center=("values",))
    with pytest.raises(NotImplementedError, match="gradient checkpointing"):
        _sft_losses(patched, tmp_path, _sft_rows(copy.deepcopy(patched)), gradient_checkpointing=True)
