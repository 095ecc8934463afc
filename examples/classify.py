"""Image classification with DDP, synchronized BatchNorm and tar shards: the loop users copy.

Runs unchanged on CPU/Gloo and on GPUs/NCCL (``launcher run jobs/classify.yaml``). Practices shown: fixed
seeds per rank, label smoothing, mixup, gradient clipping, warm-up + cosine LR, no weight decay on biases and
norms, AMP with a grad scaler on GPU, pinned memory and non-blocking copies, per-epoch validation with
accuracy and per-class precision/recall over all ranks, best/periodic/end-of-epoch checkpoints with automatic
resume, a progress line with throughput and ETA, metrics in ``metrics.jsonl`` and a learning-curve PNG.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchvision import transforms
from torchvision.models import resnet18
from torchvision.models.resnet import BasicBlock
from tqdm import tqdm

import launcher
from launcher import EXACT, above, at_least, curves
from launcher.data.tar import DecodeImage, open_shards, read_tar

from . import recipes


@dataclass
class ClassifyArgs:
    """The example's own settings: the ``args:`` section of ``jobs/classify.yaml``."""

    data_dir: str = "data/shapes"
    """Folder with ``train/`` and ``val/`` tar shards (``python -m examples.shapes`` writes one)."""
    model: Literal["small", "resnet18"] = "small"
    """``small``: the ResNet of ``width`` and ``depth`` below; ``resnet18``: torchvision's."""
    width: int = field(default=16, metadata=at_least(1))
    """Channels of the small ResNet's first stage."""
    depth: int = field(default=1, metadata=at_least(1))
    """Blocks per stage of the small ResNet."""
    epochs: int = field(default=4, metadata=at_least(1))
    """Passes over the training data."""
    max_steps: int | None = field(default=None, metadata=at_least(1))
    """Stop after this many optimizer steps in total (before ``epochs`` ends if smaller)."""
    batch_size: int = field(default=32, metadata=at_least(1, **EXACT))
    """Samples per rank per micro-batch (the global batch is ``batch_size x world_size x grad_accum``)."""
    grad_accum: int = field(default=1, metadata=at_least(1, **EXACT))
    """Micro-batches per optimizer step (DDP's all-reduce only on the last)."""
    lr: float = field(default=0.1, metadata=at_least(0))
    """Peak learning rate."""
    weight_decay: float = field(default=0.0, metadata=at_least(0))
    """Weight decay for weights; biases and normalization parameters get none."""
    momentum: float = 0.9
    """SGD momentum."""
    grad_clip: float | None = field(default=None, metadata=above(0))
    """Clip the global gradient norm to this value; null disables."""
    warmup_steps: int = field(default=0, metadata=at_least(0))
    """Linear warm-up steps before cosine decay."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy loss."""
    mixup_alpha: float = field(default=0.0, metadata=at_least(0))
    """Mixup Beta(alpha, alpha); 0 disables."""
    amp: Literal["off", "bf16", "fp16"] = "off"
    """Mixed precision on GPU (ignored on CPU)."""
    log_every: int = field(default=10, metadata=at_least(1))
    """A progress line and a metrics row every this many steps."""
    stop_at_step: int | None = None
    """Stop after this step as if preempted (the demo's interruption)."""


def small_resnet(num_classes: int, width: int = 16, depth: int = 1) -> nn.Module:
    """A ResNet of torchvision BasicBlocks with configurable width and depth (CPU-sized)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    inplanes = width
    for stage, planes in enumerate((width, 2 * width, 4 * width)):
        for block in range(depth):
            stride = 2 if stage > 0 and block == 0 else 1
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )
            layers.append(BasicBlock(inplanes, planes, stride, down))
            inplanes = planes
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inplanes, num_classes))


def build_model(args: ClassifyArgs, num_classes: int) -> nn.Module:
    if args.model == "resnet18":
        return resnet18(num_classes=num_classes)
    return small_resnet(num_classes, args.width, args.depth)


def sharded(root: Path, job: launcher.Job, args: ClassifyArgs,
            train: bool) -> tuple[launcher.ShardedIterableDataset, list[str]]:
    paths, sizes, classes = open_shards(root / ("train" if train else "val"))
    norm = transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    if train:
        tf = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(), norm])
    else:
        tf = transforms.Compose([transforms.ToTensor(), norm])
    # evaluation runs no collective: every sample once, in order
    evaluation = {} if train else {"shuffle": False, "shuffle_buffer": 0, "uneven": "none"}
    ds = launcher.ShardedIterableDataset.for_job(job, paths, read_tar, sizes=sizes,
                                                 batch_size=args.batch_size, transform=DecodeImage(tf),
                                                 **evaluation)
    return ds, classes


class Report:
    """What a step and an epoch report, in one place, on rank 0 only: tqdm on an interactive terminal (a line
    every ``every`` steps otherwise); through the launcher, a row in ``metrics.jsonl`` (and TensorBoard, when
    installed) every ``every`` steps and after each validation (``launcher.log_metrics``), and the curves as
    a PNG (what ``launcher curves RUN_DIR`` draws)."""

    def __init__(self, run_dir: Path, total: int, initial: int, every: int) -> None:
        self.on = launcher.is_main_process()
        self.tty = self.on and sys.stderr.isatty()
        self.run_dir = run_dir
        self.total, self.every, self.start, self.first = total, every, time.time(), initial
        self.bar = tqdm(total=total, initial=initial, unit="step", disable=not self.tty)

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        """After optimizer step ``step`` (counted from 1) of ``epoch`` (0-based)."""
        if not self.on:
            return
        if self.tty:
            self.bar.update()
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", refresh=False)
        elif step % self.every == 0 or step == self.total:
            rate = (step - self.first) / max(time.time() - self.start, 1e-9)
            eta = (self.total - step) / max(rate, 1e-9)
            print(f"step {step}/{self.total} loss={loss:.3f} lr={lr:.3g} {rate:.1f} step/s eta {eta:.0f}s",
                  flush=True)
        if step % self.every == 0:
            launcher.log_metrics(step, kind="train", epoch=epoch + 1, loss=loss, lr=lr)

    def validation(self, step: int, epoch: int, loss: float, report: dict[str, Any], classes: list[str],
                   samples_per_s: float) -> None:
        """After the validation that ends ``epoch`` (0-based), or ends a run stopped inside it."""
        if not self.on:
            return
        launcher.log_metrics(step, kind="val", epoch=epoch + 1, **report, samples_per_s=samples_per_s)
        pr = zip(classes, report["precision"], report["recall"])
        rec = ", ".join(f"{c} {p:.2f}/{r:.2f}" for c, p, r in pr)
        print(f"epoch {epoch + 1} step {step}: loss {loss:.3f} val acc {report['accuracy']:.3f} "
              f"(precision/recall {rec}) {samples_per_s:.0f} samples/s", flush=True)
        if (self.run_dir / "metrics.jsonl").exists():  # written through the launcher's run directory
            curves.draw(self.run_dir)

    def close(self) -> None:
        self.bar.close()


def evaluate(model: nn.Module, loader: Any, num_classes: int, device: torch.device) -> dict[str, Any]:
    """*Collective.* Accuracy and per-class precision/recall over every rank's share of the validation set."""
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    with torch.no_grad():
        for x, y in loader:
            pred = model(x.to(device, non_blocking=True)).argmax(1).cpu()
            conf += recipes.confusion(pred, y, num_classes)
    model.train()
    return recipes.classification_report(conf)


def main(job: launcher.Job, args: ClassifyArgs) -> dict[str, Any]:
    device = launcher.get_device()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    root = Path(args.data_dir)
    train_ds, classes = sharded(root, job, args, train=True)
    val_ds, _ = sharded(root, job, args, train=False)
    num_classes = len(classes)

    torch.manual_seed(job.seed)  # identical initial weights on every rank
    model = launcher.wrap_for_job(build_model(args, num_classes), job)
    opt = torch.optim.SGD(recipes.param_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum)
    loader = launcher.make_loader(train_ds, job=job)
    val_loader = launcher.make_loader(val_ds, job=job)
    steps_per_epoch = train_ds.batches_per_rank(loader.num_workers) // args.grad_accum
    total = min(args.max_steps or 10**12, args.epochs * steps_per_epoch)
    launcher.set_total_steps(total)  # the launcher's progress line shows an ETA
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: recipes.warmup_cosine(s, args.warmup_steps, total))
    amp_dtype = launcher.autocast_dtype(args.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)
    ckpt = launcher.Checkpointer.for_job(job, per_rank={"data": loader}, model=model, optimizer=opt,
                                         scheduler=sched, scaler=scaler)
    state = ckpt.resume()
    if state.step >= total:
        launcher.log(f"already finished: resumed at step {state.step} of {total}; nothing to train "
                     "(start over with checkpoint.resume=never or another name)")
        ckpt.close()
        return {"step": state.step, "epoch": state.epoch, "val_accuracy": None,
                "best_accuracy": state.best_metric}
    out = Report(job.run_dir, total, state.step, args.log_every)
    report: dict[str, Any] = {}
    stop_at = args.stop_at_step
    micro, seen, epoch_start, loss_value = 0, 0, time.time(), float("nan")
    while state.step < total and state.step != stop_at:
        epoch = state.epoch  # 0-based; rows and lines say "epoch {epoch + 1}"
        train_ds.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x, ya, yb, lam = recipes.mixup(x, y, args.mixup_alpha)
            micro += 1
            last_micro = micro % args.grad_accum == 0
            with launcher.accumulate(model, sync=last_micro):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = recipes.mixed_loss(model(x), ya, yb, lam, args.label_smoothing) / args.grad_accum
                scaler.scale(loss).backward()
            seen += x.shape[0]
            if not last_micro:
                continue
            if args.grad_clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            state.step += 1
            loss_value = loss.item() * args.grad_accum
            out.step(state.step, epoch, loss_value, float(sched.get_last_lr()[0]))
            ckpt.step(state)  # every checkpoint.every_steps; SLURM preemption: save, requeue, exit
            if state.step >= total or state.step == stop_at:
                break
        epoch_done = state.step >= (epoch + 1) * steps_per_epoch  # also when the last step ended the loop
        if epoch_done:
            state.epoch = epoch + 1
        if seen == 0:  # resumed exactly at the end of an epoch: nothing new to evaluate
            continue
        report = evaluate(model, val_loader, num_classes, device)
        rate = seen * launcher.get_world_size() / max(time.time() - epoch_start, 1e-9)
        out.validation(state.step, epoch, loss_value, report, classes, rate)
        ckpt.save(state, metric=report["accuracy"], per_rank=not epoch_done)
        seen, epoch_start = 0, time.time()
    out.close()
    ckpt.close()
    return {"step": state.step, "epoch": state.epoch, "val_accuracy": report.get("accuracy"),
            "best_accuracy": state.best_metric}

