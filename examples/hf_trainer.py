"""Curated fine-tuning with the Hugging Face Trainer: a tiny BERT classifier, noisy labels.

    python examples/hf_trainer.py        # needs accelerate (pip install -e ".[hf]")

The Trainer and its TrainingArguments are used as usual; CuratedTrainer values each batch
with LAI inside the Trainer's forward and logs the kept fraction with its other logs.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import (BertConfig, BertForSequenceClassification, TrainingArguments,
                          default_data_collator)

from lai.integrations.hf_trainer import CuratedTrainer, CurationArguments


def rows(n: int, noise: float, gen: torch.Generator) -> list[dict]:
    out = []
    for _ in range(n):
        label = int(torch.randint(0, 3, (), generator=gen))
        ids = torch.randint(5, 40, (10,), generator=gen)
        ids[0] = 1 + label  # the first token says the class
        if float(torch.rand((), generator=gen)) < noise:
            label = int(torch.randint(0, 3, (), generator=gen))
        out.append({"input_ids": ids, "attention_mask": torch.ones(10, dtype=torch.long),
                    "labels": torch.tensor(label)})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3, attn_implementation="eager"))
    train, val = rows(args.steps * 16, 0.4, gen), rows(64, 0.0, gen)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = CuratedTrainer(
            model=model, train_dataset=train, data_collator=default_data_collator,
            args=TrainingArguments(output_dir=out_dir, per_device_train_batch_size=8,
                                   gradient_accumulation_steps=2, max_steps=args.steps,
                                   learning_rate=1e-3, logging_steps=5, report_to=[],
                                   save_strategy="no", disable_tqdm=True, use_cpu=True),
            curation=CurationArguments(val_dataset=val, method="lai", policy="threshold",
                                       val_fraction=0.5))
        trainer.train()
    kept = [h["kept_fraction"] for h in trainer.state.log_history if "kept_fraction" in h]
    print(f"kept fraction per logging period: {', '.join(f'{k:.2f}' for k in kept)}")
    return {"kept_fractions": kept}


if __name__ == "__main__":
    main()
