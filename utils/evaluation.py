"""Perplexity of a model (or base + adapter) on tokenized examples: the loss on the answer tokens only, the
same tokens training learns from, so before/after numbers are comparable with the training eval loss."""

import math

import torch

from utils.prompts import IGNORE_INDEX


@torch.no_grad()
def perplexity(model, examples, pad_id, batch_size=4, progress=None):
    """Token-weighted mean loss over every target token of `examples` ({input_ids, labels} lists).

    Returns {"loss", "perplexity", "tokens", "examples"}. Batches are padded on the right; padding is masked
    from attention and from the loss, so the result does not depend on `batch_size`."""
    model.eval()
    device = next(p.device for p in model.parameters() if p.device.type != "meta")
    total_nll, total_tokens = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))  # less padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress(batches) if progress else batches:
        width = max(len(examples[i]["input_ids"]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(examples[i]["input_ids"])
            ids[row, :n] = torch.tensor(examples[i]["input_ids"])
            labels[row, :n] = torch.tensor(examples[i]["labels"])
            mask[row, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        # position t predicts token t+1
        target = labels[:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                ignore_index=IGNORE_INDEX, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((target != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise ValueError("no target tokens to evaluate")
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": total_tokens,
            "examples": len(examples)}
