"""Continue on new data with your own schedule (the AutoML shape).

Fit a (tiny) BERT classifier on part 1 of a dataset with a LambdaLR warmup and save; later, in a new process, fit
on a disjoint part 2 with a fresh warmup: the optimizer's moments come from the checkpoint, the schedule is the one
you built, and the checkpoints list both data parts.

    python examples/new_data_own_schedule.py ./checkpoints/automm fit --part 1
    python examples/new_data_own_schedule.py ./checkpoints/automm fit --part 2 --continue

``--lrs FILE`` writes the LR of every step (JSON), which the tests compare with a reference scheduler.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import BertConfig, BertForSequenceClassification

import ckptkit
from ckptkit.schema import DataSegment
from ckptkit.training import fingerprint

STEPS, WARMUP, BATCH, LR = 12, 4, 8, 5e-4


def warmup(step: int) -> float:
    """Linear warmup over WARMUP steps, then constant (a LambdaLR factor)."""
    return min(1.0, (step + 1) / WARMUP)


def make_part(part: int, n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Part ``part`` of a toy text-classification set: token ids and labels, disjoint parts."""
    g = torch.Generator().manual_seed(1000 + part)
    ids = torch.randint(5, 90, (n, 16), generator=g)
    return ids, (ids[:, 0] > 47).long()


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url")
    ap.add_argument("command", choices=["fit"])
    ap.add_argument("--part", type=int, default=1)
    ap.add_argument("--continue", dest="cont", action="store_true", help="continue the latest checkpoint")
    ap.add_argument("--lrs", help="write the LR of every step to this JSON file")
    a = ap.parse_args()

    model, opt, sched = build()  # a fresh warmup, built by the caller as always
    ids, labels = make_part(a.part)
    data = torch.utils.data.TensorDataset(ids, labels)
    part = DataSegment(name=f"part-{a.part}", size=len(ids), fingerprint=fingerprint(data))
    mgr = ckptkit.CheckpointManager(a.url, {"model": model, "optimizer": opt, "scheduler": sched}, data=part,
                                    name_format=f"part{a.part}-{{step:04d}}", rng=False)  # fmt: skip
    step0 = samples0 = 0
    if a.cont:  # the moments from part 1; this run's own warmup and LR
        res = mgr.continue_from(schedule="restart", new_data=part, changes={"reason": "new data arrived"})
        step0, samples0 = res.progress.global_step, res.progress.samples_seen
    lrs = []
    model.train()
    for i in range(1, STEPS + 1):
        step = step0 + i
        at = (i - 1) * BATCH % len(ids)
        batch = slice(at, at + BATCH)
        lrs.append(opt.param_groups[0]["lr"])
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if i % 6 == 0:
            mgr.save(step, samples_seen=samples0 + i * BATCH, metrics={"loss": loss.item()})
    mgr.close()
    m = mgr.latest()
    assert m is not None
    print(f"{m.name}: lineage {m.lineage.relation}, data {[(d.name, d.samples_consumed) for d in m.data]}")
    if a.lrs:
        with open(a.lrs, "w") as fh:
            json.dump(lrs, fh)


if __name__ == "__main__":
    main()
