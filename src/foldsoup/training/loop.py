"""Training: backbone pretraining (demo only), linear probe per fold, full fine-tune per
(grid point, fold). One loop serves all three; data stays on the device as uint8.

Fine-tunes save resume state (weights, AdamW moments, step, generator state) after every epoch
and on SIGTERM, outside the job's declared outputs, so a killed or preempted job continues
where it stopped and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import signal
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from foldsoup.errors import Diverged, Interrupted
from foldsoup.models.classifier import Classifier
from foldsoup.training.augment import eval_transform, mixup, train_transform
from foldsoup.training.optim import AdamW

Log = Callable[[str], None]




def stable_seed(*parts) -> int:
    """A seed derived from names and numbers, the same in every process (unlike hash())."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


@dataclass
class ImageSpec:
    size: int
    mean: list[float]
    std: list[float]
    hflip: bool
    # The resize to `size` on the device (data.interpolation); random crops sample bilinearly.
    interpolation: str = "bilinear"

    @classmethod
    def from_config(cls, data_cfg: dict, channels: int) -> "ImageSpec":
        # One value given for a multi-channel dataset applies to every channel.
        def per_channel(v):
            return list(v) * channels if len(v) == 1 else list(v)

        return cls(data_cfg["image_size"], per_channel(data_cfg["mean"]), per_channel(data_cfg["std"]), data_cfg["hflip"],
                   data_cfg.get("interpolation", "bilinear"))


def autocast(device: torch.device, precision: str):
    enabled = precision == "bf16" and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def predict_logits(
    model: Classifier, images: torch.Tensor, spec: ImageSpec, batch_size: int, precision: str = "fp32"
) -> torch.Tensor:
    """float32 logits [N, classes] of uint8 images already on the model's device."""
    model.eval()
    device = images.device
    out = []
    with autocast(device, precision):
        for start in range(0, images.shape[0], batch_size):
            x = eval_transform(images[start : start + batch_size], spec.size, spec.mean, spec.std, spec.interpolation)
            out.append(model(x).float())
    return torch.cat(out) if out else torch.zeros(0, model.head.out_features, device=device)


@torch.no_grad()
def extract_features(model: Classifier, images: torch.Tensor, spec: ImageSpec, batch_size: int, precision: str) -> torch.Tensor:
    model.eval()
    out = []
    with autocast(images.device, precision):
        for start in range(0, images.shape[0], batch_size):
            x = eval_transform(images[start : start + batch_size], spec.size, spec.mean, spec.std, spec.interpolation)
            out.append(model.features(x).float())
    return torch.cat(out)


def linear_probe(
    model: Classifier, images: torch.Tensor, labels: torch.Tensor, spec: ImageSpec, lp_cfg: dict, precision: str, seed: int, log: Log
) -> dict[str, torch.Tensor]:
    """Train model.head on frozen features (full batch AdamW); returns the head's state.

    The head is fit on standardised features, then the standardisation is folded into its
    weights (W' = W / s, b' = b - W' m): exactly the same function of the raw features, and
    one learning rate works whatever the backbone's feature scale (CLIP's are unit-norm).
    """
    t0 = time.perf_counter()
    feats = extract_features(model, images, spec, lp_cfg["batch_size"], precision)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mean) / std
    torch.manual_seed(seed)
    probe = torch.nn.Linear(z.shape[1], model.head.out_features).to(z.device)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    opt = AdamW(probe.parameters(), lr=lp_cfg["lr"], weight_decay=lp_cfg["weight_decay"])
    with torch.enable_grad():
        for epoch in range(lp_cfg["epochs"]):
            loss = F.cross_entropy(probe(z), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (probe(z).argmax(1) == labels).float().mean().item()
        weight = probe.weight / std
        bias = probe.bias - weight @ mean
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    log(f"linear probe: {len(labels)} images, {lp_cfg['epochs']} epochs, final loss {loss.item():.4f}, "
        f"train acc {acc:.4f}, {time.perf_counter() - t0:.1f} s")
    return {k: v.detach().clone() for k, v in model.head.state_dict().items()}


@dataclass
class LoopConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float | None
    label_smoothing: float
    precision: str
    aug: dict
    mixup_alpha: float | None  # None: no mixup
    seed: int
    tag: str  # names the run in messages ("grid point ..., fold ...")
    compile: bool = False  # torch.compile the training forward (one compile per job; see finetune.compile)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up then cosine decay to zero (model soups' schedule)."""
    warmup = min(warmup, total)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


class ResumeStore:
    """Resume state in one safetensors file plus JSON, written atomically (never pickled).

    The state records a fingerprint of what the run starts from (loop settings, training data,
    initial weights): state left by a run with other inputs (the config or an upstream output
    changed since the job was killed) is ignored, never continued.

    When: every `every_s` seconds of training (checked between steps; None: never), on SIGTERM,
    and, once training is done, on a SIGTERM during the final evaluation (`save_trained`: the
    weights alone, so a rerun only evaluates). ViT-B/32's state is about 1 GB: saved after every
    epoch of 90 fine-tunes it was 850 GB of writes per paper sweep.
    """

    def __init__(self, folder: str | Path, every_s: float | None = None):
        self.folder = Path(folder)
        self.path = self.folder / "state.safetensors"
        self.every_s = every_s
        self.fingerprint = ""  # of the run being trained (train() sets it)
        self.saves = 0
        self._last_save = time.monotonic()

    def exists(self) -> bool:
        return self.path.is_file()

    def due(self) -> bool:
        """Whether `every_s` seconds have passed since the job started or last saved."""
        return self.every_s is not None and time.monotonic() - self._last_save >= self.every_s

    def save(self, model: torch.nn.Module, opt: AdamW, gen: torch.Generator, progress: dict, fingerprint: str = "") -> None:
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update({f"optim.{k}": v for k, v in opt.state_tensors().items()})
        tensors["generator"] = gen.get_state()
        self._write(tensors, progress, fingerprint)

    def save_trained(self, model: torch.nn.Module, stats: dict) -> None:
        """The trained weights alone, training done: a rerun skips training and only evaluates."""
        self._write({f"model.{k}": v for k, v in model.state_dict().items()}, {"done": True, "stats": stats}, self.fingerprint)

    def _write(self, tensors: dict, progress: dict, fingerprint: str) -> None:
        from foldsoup.storage.weights import save_weights

        self.folder.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        save_weights(self.path, tensors, {"progress": progress, "fingerprint": fingerprint})
        self.saves += 1
        self._last_save = time.monotonic()

    def load(self, model: torch.nn.Module, opt: AdamW, gen: torch.Generator, fingerprint: str | None = None) -> dict | None:
        """Restore model, optimizer and generator; the saved progress, or None (nothing
        changed) when the state is unreadable or was saved by a run from other inputs."""
        from foldsoup.errors import WeightsError
        from foldsoup.storage.weights import load_weights

        try:
            tensors, meta = load_weights(self.path)
        except WeightsError:
            return None
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            return None
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if meta["progress"].get("done"):
            return meta["progress"]  # the trained weights alone (save_trained)
        opt.load_state_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("optim.")})
        gen.set_state(tensors["generator"])
        return meta["progress"]

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Temporary files of a save that was SIGKILLed (a signal that allows it cleans up
        itself): ours and safetensors' own, each as large as the state (1 GB for ViT-B/32)."""
        for pattern in (f".{self.path.name}.*.tmp", ".tmp*"):
            for leftover in self.folder.glob(pattern):
                leftover.unlink(missing_ok=True)


def run_fingerprint(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: "LoopConfig") -> str:
    """CRC32 of the loop settings, the training images and labels and the initial weights."""
    crc = zlib.crc32(json.dumps(vars(cfg), sort_keys=True, default=str).encode())
    tensors = [images, labels, *model.state_dict().values()]
    for t in tensors:
        t = t.detach().contiguous().cpu()
        crc = zlib.crc32(f"{t.dtype}{list(t.shape)}".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


class SigtermTrap:
    """Turns SIGTERM (SLURM time limit, preemption) into a flag the loop checks between steps,
    or (`raising`) into Interrupted at once: the final evaluation has no steps to wait for, and
    SLURM kills 30 s after its SIGTERM."""

    def __init__(self, raising: bool = False):
        self.received = False
        self.raising = raising

    def __enter__(self):
        self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = True
        if self.raising:
            raise Interrupted("SIGTERM")

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old)


def train(
    model: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: ImageSpec,
    cfg: LoopConfig,
    log: Log,
    resume: ResumeStore | None = None,
    fail_at_step: int | None = None,
) -> dict:
    """Train the whole model; returns {"steps", "final_loss", "images_per_s"}."""
    device = images.device
    n = images.shape[0]
    num_classes = model.head.out_features
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=device)

    progress = {"epoch": 0, "step_in_epoch": 0}
    fingerprint = run_fingerprint(model, images, labels, cfg) if resume is not None else ""
    if resume is not None:
        resume.fingerprint = fingerprint
    if resume is not None and resume.exists():
        loaded = resume.load(model, opt, gen, fingerprint)
        if loaded is None:
            log(f"{cfg.tag}: ignoring resume state {resume.path}: unreadable or saved by a run with other "
                "settings, data or initial weights; starting from the beginning")
        elif loaded.get("done"):
            log(f"resumed {cfg.tag}: training had finished ({resume.path}); evaluating")
            return loaded["stats"]
        else:
            progress = loaded
            log(f"resumed {cfg.tag} from epoch {progress['epoch']} step {progress['step_in_epoch']} ({resume.path})")

    model.train()
    # Compiled forward shares the model's parameters, so saving and resuming see no difference.
    forward = torch.compile(model) if cfg.compile else model
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    last_loss = float("nan")
    seen, t_start = 0, time.perf_counter()
    with SigtermTrap() as sigterm:
        for epoch in range(progress["epoch"], cfg.epochs):
            epoch_seed = stable_seed(cfg.seed, cfg.tag, epoch)
            start_step = progress["step_in_epoch"] if epoch == progress["epoch"] else 0
            saved_gen_state = gen.get_state() if start_step else None
            gen.manual_seed(epoch_seed)
            perm = torch.randperm(n, generator=gen, device=device)
            lams = np.random.default_rng(epoch_seed).beta(cfg.mixup_alpha, cfg.mixup_alpha, steps_per_epoch) if cfg.mixup_alpha else None
            if saved_gen_state is not None:
                gen.set_state(saved_gen_state)  # continue the epoch's random stream where it stopped
            loss_sum.zero_()
            t_epoch = time.perf_counter()
            for step in range(start_step, steps_per_epoch):
                global_step = epoch * steps_per_epoch + step
                if fail_at_step is not None and global_step == fail_at_step:
                    raise RuntimeError(f"{cfg.tag}: injected failure at step {global_step} (FOLDSOUP_FAIL)")
                if sigterm.received:
                    if resume is None:
                        raise Interrupted(f"{cfg.tag}: SIGTERM at epoch {epoch} step {step}; no resume folder, state lost")
                    resume.save(model, opt, gen, {"epoch": epoch, "step_in_epoch": step}, fingerprint)
                    raise Interrupted(f"{cfg.tag}: SIGTERM at epoch {epoch} step {step}; resume state saved to "
                                      f"{resume.path}, a rerun continues from there")
                if resume is not None and resume.due():
                    resume.save(model, opt, gen, {"epoch": epoch, "step_in_epoch": step}, fingerprint)
                opt.lr = cfg.lr * lr_factor(global_step, cfg.warmup_steps, total)
                idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                x = train_transform(images[idx], spec.size, spec.mean, spec.std, cfg.aug, spec.hflip, gen)
                target = F.one_hot(labels[idx], num_classes).float()
                if lams is not None:
                    x, target = mixup(x, target, float(lams[step]), gen)
                with autocast(device, cfg.precision):
                    logits = forward(x)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
                opt.zero_grad()
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                bad = ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, global_step), first_bad)
                loss_sum += loss.detach()
                seen += idx.shape[0]
            # One host sync per epoch: divergence check and progress line.
            bad_step = int(first_bad.item())
            if bad_step >= 0:
                raise Diverged(f"{cfg.tag}: loss became non-finite at step {bad_step} (epoch {epoch})")
            done = steps_per_epoch - start_step
            last_loss = loss_sum.item() / max(1, done)
            rate = done * cfg.batch_size / max(1e-9, time.perf_counter() - t_epoch)
            log(f"{cfg.tag} epoch {epoch + 1}/{cfg.epochs} loss {last_loss:.4f} "
                f"lr {opt.lr:.2e} {rate:.0f} images/s")
            progress = {"epoch": epoch + 1, "step_in_epoch": 0}
    elapsed = time.perf_counter() - t_start
    return {"steps": total, "final_loss": last_loss, "images_per_s": seen / max(elapsed, 1e-9), "train_seconds": elapsed}


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")


def fold_accuracies(pool_logits: torch.Tensor, pool_labels: torch.Tensor, fold_of: torch.Tensor, k: int) -> dict[int, float]:
    """Acc(model, D_val,i) for every fold i, from logits on the whole pool."""
    correct = (pool_logits.argmax(1) == pool_labels).float()
    return {i: correct[fold_of == i].mean().item() for i in range(k)}
