"""Worker for tests/test_hf_trainer.py: HF ``Trainer`` runs of one tiny BERT classifier, each in its own process.

Importing transformers takes many seconds, so ``python hf_trainer_worker.py --serve`` imports everything once, prints
"loaded", then reads one JSON job per line on stdin and forks a fresh process per job (a fresh interpreter,
``--job JSON``, when this process is not single-threaded: forking a threaded process is unsafe; the test sets
OPENBLAS_NUM_THREADS=1 and JE_ARROW_MALLOC_CONF=background_thread:false, since numpy's OpenBLAS and the pyarrow that
Trainer imports through ``datasets`` otherwise start threads at import). It prints
"child <pid> fork|spawn" for each job and, on "reap", waits for that child and prints "reaped <pid> <returncode>".

Jobs (``{"job": ..., ...}``):

- ``train``: Trainer with ``CkptkitCallback(url, every=EVERY, retention=Retention(keep_last=keep_last))`` and
  ``save_strategy="no"``, resuming through ``cb.resume_from()`` when the repository holds a checkpoint. Prints
  "committed <step>" after each commit and "fidelity <text>" after a resume; ``slow`` sleeps after each step so that
  the test can SIGKILL it mid-training.
- ``plain``: the same training without the callback.
- ``export``: ``ckptkit.export(url, dest, name, format="hf-trainer")``, then a fresh Trainer resumes from ``dest``.
- ``refusals``: exports that must be refused, and callback misuse that must raise; prints one JSON line per case.

Each run writes the final weights to ``out`` (safetensors) and prints "done".
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

EVERY = 2
STEPS = 12  # 24 samples, batch 4, 2 epochs: 6 optimizer steps per epoch
SLOW_S = 0.3


def build_model() -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=99, max_position_embeddings=16)  # fmt: skip
    return BertForSequenceClassification(config)


class Pairs(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """24 random token sequences with binary labels, in memory."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 99, (24, 8), generator=g)
        self.y = torch.randint(0, 2, (24,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": self.y[i]}


def training_args(out: str) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, per_device_train_batch_size=4, num_train_epochs=2, learning_rate=1e-3,
                             weight_decay=0.01, warmup_steps=2, seed=7, report_to=[], dataloader_num_workers=0,
                             logging_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True)  # fmt: skip


def _finish(model: Any, out: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    print("done", flush=True)


def _train(job: dict[str, Any]) -> None:
    from transformers import Trainer, TrainerCallback

    import ckptkit
    from ckptkit.integrations.hf_trainer import CkptkitCallback

    model = build_model()
    callbacks: list[Any] = []
    cb = None
    if job["job"] == "train":
        keep = job.get("keep_last")
        cb = CkptkitCallback(job["url"], every=EVERY, retention=ckptkit.Retention(keep_last=keep) if keep else None)

        class Report(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                m = cb.manager.wait()
                if m is not None and m.progress.global_step == state.global_step:
                    print(f"committed {state.global_step}", flush=True)
                if job.get("slow"):
                    time.sleep(SLOW_S)

        callbacks = [cb, Report()]
    trainer = Trainer(model, training_args(job["tmp"]), train_dataset=Pairs(), callbacks=callbacks)
    resume = cb.resume_from() if cb is not None else None
    if cb is not None and cb.fidelity is not None:
        print(f"fidelity {cb.fidelity}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    _finish(model, job["out"])


def _export(job: dict[str, Any]) -> None:
    from transformers import Trainer

    import ckptkit

    files = ckptkit.export(job["url"], job["dest"], job["name"], format="hf-trainer")
    print("files " + json.dumps(sorted(os.path.basename(f) for f in files)), flush=True)
    model = build_model()
    Trainer(model, training_args(job["tmp"]), train_dataset=Pairs()).train(resume_from_checkpoint=job["dest"])
    _finish(model, job["out"])


def _refusals(job: dict[str, Any]) -> None:
    """A checkpoint without optimizer, one whose optimizer is not grouped as Trainer groups it, and a wrong
    component: each export must raise a typed error and write nothing."""
    import ckptkit

    model = build_model()
    decay = [p for n, p in model.named_parameters() if "bias" not in n]
    custom = torch.optim.AdamW([{"params": decay}, {"params": [p for n, p in model.named_parameters()
                                                               if "bias" in n], "weight_decay": 0.0}])  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(custom, lambda s: 1.0)
    ckptkit.save(job["url"], {"model": model}, "weights-only")
    ckptkit.save(job["url"], {"model": model, "optimizer": custom, "scheduler": sched}, "custom-groups")
    for case, name, component in (("no-optimizer", "weights-only", None), ("custom-groups", "custom-groups", None),
                                  ("wrong-component", "custom-groups", "encoder")):  # fmt: skip
        dest = os.path.join(job["tmp"], case)
        try:
            ckptkit.export(job["url"], dest, name, component=component, format="hf-trainer")
            err: BaseException | None = None
        except Exception as e:
            err = e
        _case(case, err, sorted(os.listdir(dest)) if os.path.isdir(dest) else [])
    # callback misuse: a resume folder not passed to train(), and a callback that would never save
    from transformers import Trainer

    from ckptkit.integrations.hf_trainer import CkptkitCallback

    for case, cb in (("resume-not-passed", CkptkitCallback(job["ref"], every=EVERY)),
                     ("never-saves", CkptkitCallback(job["url"]))):  # fmt: skip
        trainer = Trainer(build_model(), training_args(job["tmp"]), train_dataset=Pairs(), callbacks=[cb])
        folder = cb.resume_from() if case == "resume-not-passed" else None
        try:
            trainer.train()
            err = None
        except Exception as e:
            err = e
        _case(case, err, [folder or ""])
    print("done", flush=True)


def _case(case: str, err: BaseException | None, wrote: list[str]) -> None:
    print("case " + json.dumps({"case": case, "type": type(err).__name__ if err else None,
                                "classes": [c.__name__ for c in type(err).__mro__] if err else [],
                                "msg": str(err), "wrote": wrote}), flush=True)  # fmt: skip


def run(job: dict[str, Any]) -> None:
    {"train": _train, "plain": _train, "export": _export, "refusals": _refusals}[job["job"]](job)


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def serve() -> None:
    import safetensors.torch  # noqa: F401 - everything a job needs is imported once, before any fork
    import transformers
    from transformers import BertForSequenceClassification, Trainer  # noqa: F401

    import ckptkit.adapters.hf
    import ckptkit.integrations.hf_trainer
    import ckptkit.interop.export_hf_trainer

    transformers.logging.set_verbosity_error()
    import ckptkit

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # the first optimizer costs ~1 s of lazy imports
    ckptkit.save("memory://hf-worker-warm-up", {"model": torch.nn.Linear(2, 2)}, "warm-up")  # and the first save
    print("loaded", flush=True)
    child: int | Any = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "reap" and child is not None:
            if isinstance(child, int):
                pid, status = os.waitpid(child, 0)
                code = os.waitstatus_to_exitcode(status)
            else:
                pid, code = child.pid, child.wait()
            print(f"reaped {pid} {code}", flush=True)
            child = None
        elif cmd.startswith("{"):
            if _threads() == 1:
                pid = os.fork()
                if pid == 0:
                    code = 0
                    try:
                        run(json.loads(cmd))
                    except BaseException as err:
                        print(f"error {type(err).__name__}: {err}", flush=True)
                        code = 1
                    finally:
                        sys.stdout.flush()
                        os._exit(code)
                child = pid
            else:
                import subprocess

                child = subprocess.Popen([sys.executable, __file__, "--job", cmd])
                pid = child.pid
            print(f"child {pid} {'fork' if isinstance(child, int) else 'spawn'}", flush=True)
    sys.stdout.flush()
    os._exit(0)  # EOF: skip the interpreter's slow teardown of everything transformers imported


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve()
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        run(json.loads(sys.argv[2]))
