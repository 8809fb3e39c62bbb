"""CuratedTrainer: curated fine-tuning through transformers.Trainer, offline, tiny models."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import TrainingArguments, default_data_collator  # noqa: E402

from lai import value  # noqa: E402
from lai.integrations.hf_trainer import CuratedTrainer, CurationArguments  # noqa: E402


def rows(n, t, vocab, classes, seed, lm=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (t,), generator=g)
        label = ids.clone() if lm else torch.randint(0, classes, (), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(t, dtype=torch.long),
                    "labels": label})
    return out


def bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")
    return transformers.BertForSequenceClassification(cfg)


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg)


class Checked(CuratedTrainer):
    """Checks every curated step against lai.value on the same batch, cache draw and model
    state (before the backward)."""

    checks: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not return_outputs and model.training:
            step = self.last_step
            was = model.training
            model.eval()  # the tiny models have no dropout: the modes compute the same
            ref = value(model, dict(inputs), self.curator.last_val_batch,
                        method=self.curator.est.name)
            model.train(was)
            self.checks.append((step.values.detach().clone(), ref, step.keep.clone()))
        return loss


@pytest.mark.parametrize("kind,method", [("bert", "lai"), ("bert", "ghost"), ("gpt2", "lli")])
def test_curated_trainer_steps_equal_value_and_log_the_kept_fraction(tmp_path, kind, method):
    lm = kind == "gpt2"
    model = gpt2() if lm else bert()
    train, val = rows(32, 8, 40, 3, 1, lm), rows(16, 8, 40, 3, 2, lm)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, max_steps=3, logging_steps=1,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = Checked(model=model, args=args, train_dataset=train,
                      data_collator=default_data_collator,
                      curation=CurationArguments(val_dataset=val, method=method,
                                                 val_fraction=0.5))
    trainer.checks = []
    trainer.train()
    assert len(trainer.checks) == 6  # 3 optimizer steps x 2 accumulated micro-batches
    for got, ref, keep in trainer.checks:
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-7)
        assert torch.equal(keep, got >= 0)  # policy threshold 0
    logged = [h for h in trainer.state.log_history if "kept_fraction" in h]
    assert logged and all(0.0 <= h["kept_fraction"] <= 1.0 for h in logged)
    kept = sum(int(k.sum()) for _, _, k in trainer.checks)
    assert sum(h["kept_fraction"] for h in logged) * 16 == pytest.approx(kept)


def test_evaluation_uses_the_models_own_loss_and_warm_up_keeps_everything(tmp_path):
    model = bert()
    train, val = rows(16, 8, 40, 3, 1), rows(8, 8, 40, 3, 2)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                             num_train_epochs=1, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = CuratedTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                             data_collator=default_data_collator,
                             curation=CurationArguments(val_dataset=val, start_epoch=1))
    trainer.train()
    assert trainer.last_step.values is None  # warm-up: not scored
    assert all(h["kept_fraction"] == 1.0 for h in trainer.state.log_history
               if "kept_fraction" in h)
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    with pytest.raises(ValueError, match="curation="):
        CuratedTrainer(model=model, args=args, train_dataset=train)


def test_bf16_training_arguments_autocast_the_cache_forwards_too(tmp_path):
    """bf16: the Trainer autocasts its forward, and the curator's validation-cache forwards
    run under the same context; values stay fp32 and follow lai.value's closely."""
    model = bert()
    train, val = rows(16, 8, 40, 3, 1), rows(16, 8, 40, 3, 2)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                             max_steps=2, bf16=True, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_steps=1)
    trainer = Checked(model=model, args=args, train_dataset=train,
                      data_collator=default_data_collator,
                      curation=CurationArguments(val_dataset=val, method="lai"))
    trainer.checks = []
    trainer.train()
    for got, ref, _ in trainer.checks:
        assert got.dtype == torch.float32
        assert torch.corrcoef(torch.stack([got, ref.float()]))[0, 1] > 0.95
