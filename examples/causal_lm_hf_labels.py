"""Curate causal-LM training with Hugging Face labels (labels = input ids, shifted inside).

    python examples/causal_lm_hf_labels.py

A tiny GPT-2 built from a config (nothing downloaded) learns a repeating pattern; some
training sequences are random noise. The labels are the input ids, as for any Hugging Face
causal LM: the library shifts them as the model's own loss does.
"""
from __future__ import annotations

import argparse

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lai


def sequences(n: int, noise: float, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    start = torch.randint(0, 10, (n, 1), generator=gen)
    ids = (start + torch.arange(12)) % 10 + 2  # counting sequences
    junk = torch.rand(n, generator=gen) < noise
    ids[junk] = torch.randint(2, 30, (int(junk.sum()), 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}, junk


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=2, n_head=2,
                                       n_positions=16, attn_implementation="eager"))
    val, _ = sequences(32, 0.0, gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    curator = lai.Curator(model, val, method="lli", policy="threshold", val_fraction=0.5)
    dropped_junk = n_junk = 0
    model.train()
    for _ in range(args.steps):
        batch, junk = sequences(16, 0.3, gen)
        with curator.step(batch) as step:
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = step.loss(outputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dropped_junk += int((~step.keep & junk).sum())
        n_junk += int(junk.sum())
    out = {"junk_dropped": dropped_junk / max(1, n_junk), "last_loss": float(loss)}
    print(f"dropped {out['junk_dropped']:.0%} of the noise sequences; last loss "
          f"{out['last_loss']:.3f}")
    return out


if __name__ == "__main__":
    main()
