"""Transfer before the new run exists (the AutoMM shape).

Dump a (tiny) BERT classifier; later, in a new process, build a regression model, load the dumped encoder into it
with ``ckptkit.transfer``, and only then create the new run's optimizer, scheduler and repository and train. The
new run's first checkpoint records the ``transfer`` edge: the classifier's id and repository, the per-tensor plan,
and the data the loaded tensors were trained on.

    python examples/transfer_first.py ./checkpoints/classifier dump
    python examples/transfer_first.py ./checkpoints/classifier regress --into ./checkpoints/regressor
"""

from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification

import ckptkit
from ckptkit.schema import DataSegment


def bert(num_labels: int) -> BertForSequenceClassification:
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=num_labels,
                        problem_type="regression" if num_labels == 1 else None)  # fmt: skip
    return BertForSequenceClassification(config)


def data(seed: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 90, (n, 16), generator=g)
    return ids, ids.float().mean(dim=1, keepdim=True) / 90


def dump(url: str) -> None:
    torch.manual_seed(0)
    clf = bert(3)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3)
    ids, y = data(1)
    labels = (y[:, 0] * 3).long().clamp(0, 2)
    for _ in range(4):
        opt.zero_grad()
        clf(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    m = ckptkit.save(url, {"model": clf}, "classifier", data=[DataSegment(name="reviews-labelled", size=len(ids))],
                     rng=False)  # fmt: skip
    print(f"dumped {m.name} ({m.id[:12]}) to {url}")


def regress(source: str, url: str, steps: int) -> None:
    torch.manual_seed(1)
    reg = bert(1)
    plan = ckptkit.transfer(source, reg, reset_heads=True)  # no optimizer, scheduler or repository yet
    print(plan)
    opt = torch.optim.AdamW(reg.parameters(), lr=5e-4)  # the new run, built after the transfer
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.25, total_iters=max(steps, 1))
    with ckptkit.CheckpointManager(url, {"model": reg, "optimizer": opt, "scheduler": sched}, rng=False,
                                   data=DataSegment(name="ratings", size=32)) as mgr:  # fmt: skip
        ids, y = data(2)
        for _ in range(steps):
            opt.zero_grad()
            reg(input_ids=ids, labels=y).loss.backward()
            opt.step()
            sched.step()
        m = mgr.save(steps, samples_seen=steps * len(ids), force=True)
    assert m is not None
    parent = m.lineage.parents[0]
    print(f"{m.name}: lineage {m.lineage.relation} from {parent.name} in {parent.url}, "
          f"plan {parent.changes['plan']['counts']}")  # type: ignore[index,call-overload]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="the classifier's repository")
    ap.add_argument("command", choices=["dump", "regress"])
    ap.add_argument("--into", help="the regression run's repository")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    if a.command == "dump":
        dump(a.url)
    else:
        if not a.into:
            ap.error("regress needs --into REPO")
        regress(a.url, a.into, a.steps)


if __name__ == "__main__":
    main()
