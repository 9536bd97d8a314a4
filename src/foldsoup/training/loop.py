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

from foldsoup.errors import ConfigError, Diverged, Interrupted
from foldsoup.models.classifier import Classifier
from foldsoup.training.augment import eval_transform, mixup, train_transform
from foldsoup.training.guard import FAR_FACTOR, FAR_MARGIN, started_far
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


def _inner_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, check) indices: a stratified, seeded share `fraction` of every class for checking
    (floor, so a class of one image is only fitted on)."""
    gen = torch.Generator().manual_seed(seed)
    fit, check = [], []
    cpu = labels.cpu()
    for c in torch.unique(cpu).tolist():
        idx = torch.nonzero(cpu == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_check = int(fraction * len(idx))
        check.append(idx[:n_check])
        fit.append(idx[n_check:])
    return torch.cat(fit).to(labels.device), torch.cat(check).to(labels.device)


def fit_logistic(z: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression: min mean CE(z W^T + b) + l2/2 |W|^2 (full batch, L-BFGS
    with strong Wolfe line search, from zero; the bias is not penalised). Deterministic."""
    weight = torch.zeros(num_classes, z.shape[1], device=z.device, dtype=z.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, device=z.device, dtype=z.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def linear_probe(
    model: Classifier, images: torch.Tensor, labels: torch.Tensor, spec: ImageSpec, lp_cfg: dict, precision: str, seed: int, log: Log
) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit model.head on frozen features of `images`; returns (the head's state, what the fit did).

    An L2-regularised logistic regression (CLIP's linear-probe protocol): each strength of
    lp_cfg["l2"] is fit on a stratified inner split of `images` and scored by cross-entropy on
    the rest of them (no image of the fold's val part is seen); the best strength is refit on
    all of `images`. Cross-entropy rather than accuracy: it is smooth, ties rarely, and rewards
    a calibrated head, the point of LP-FT's probe (an over-confident head turns the feature shift
    of the first fine-tune steps into a large loss).

    Features are centred and divided by one scale, their root-mean-square deviation, so one L2
    grid fits every backbone (CLIP's features are unit-norm, CNNs' are not) while the penalty
    stays isotropic in the raw features. Dividing each dimension by its own deviation (what this
    did before) put large weights on near-constant features: on real ImageNet weights, head
    weights up to 800 and, with train-mode BatchNorm, first-epoch losses of 230-650 (docs/benchmarks.md).
    The centring and scale are folded into the head (W' = W / s, b' = b - W' m): the same
    function of the raw features.
    """
    t0 = time.perf_counter()
    num_classes = model.head.out_features
    feats = extract_features(model, images, spec, lp_cfg["batch_size"], precision)
    mean = feats.mean(0)
    scale = float((feats - mean).square().mean().sqrt().clamp_min(1e-12))
    z = (feats - mean) / scale
    strengths = sorted(float(v) for v in lp_cfg["l2"])
    sweep: dict[str, dict] = {}
    if len(strengths) == 1:
        chosen = strengths[0]
    else:
        fit, check = _inner_split(labels, lp_cfg["inner_val_fraction"], stable_seed(seed, "lp-inner", len(labels)))
        if len(check) == 0:
            chosen = strengths[len(strengths) // 2]
            log(f"linear probe: {len(labels)} images leave no inner validation images at lp.inner_val_fraction "
                f"{lp_cfg['inner_val_fraction']}; L2 strength {chosen:g} (the middle of lp.l2) without a sweep")
        else:
            for l2 in strengths:
                weight, bias = fit_logistic(z[fit], labels[fit], num_classes, l2, lp_cfg["max_iter"])
                logits = z[check] @ weight.T + bias
                sweep[f"{l2:g}"] = {"loss": F.cross_entropy(logits, labels[check]).item(),
                                    "acc": (logits.argmax(1) == labels[check]).float().mean().item()}
            # Lowest inner-val loss; a tie goes to the stronger regularisation.
            chosen = min(strengths, key=lambda l2: (sweep[f"{l2:g}"]["loss"], -l2))
            log(f"linear probe: L2 sweep on {len(fit)} images, checked on {len(check)} (inner split of the fold's "
                "training part): " + ", ".join(f"{k} loss {v['loss']:.4f} acc {v['acc']:.4f}" for k, v in sweep.items())
                + f"; chose {chosen:g}")
    weight, bias = fit_logistic(z, labels, num_classes, chosen, lp_cfg["max_iter"])
    with torch.no_grad():
        logits = z @ weight.T + bias
        loss = F.cross_entropy(logits, labels).item()
        acc = (logits.argmax(1) == labels).float().mean().item()
        raw_weight = weight / scale
        model.head.weight.copy_(raw_weight)
        model.head.bias.copy_(bias - raw_weight @ mean)
    fit_info = {"l2": chosen, "train_loss": loss, "train_acc": acc, "max_abs_weight": raw_weight.abs().max().item(),
                "feature_scale": scale, "sweep": sweep}
    log(f"linear probe: {len(labels)} images, L2 {chosen:g}, train loss {loss:.4f}, train acc {acc:.4f}, "
        f"head weights max |w| {fit_info['max_abs_weight']:.4g} (features' scale {scale:.4g}), "
        f"{time.perf_counter() - t0:.1f} s")
    return {k: v.detach().clone() for k, v in model.head.state_dict().items()}, fit_info


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
    batchnorm: str = "train"  # "frozen": BatchNorm normalises with its running statistics (finetune.batchnorm)


BATCHNORM_MODES = ("frozen", "train")


def set_train_mode(model: torch.nn.Module, batchnorm: str) -> None:
    """model.train(), except that with batchnorm "frozen" every BatchNorm layer stays in eval
    mode: it normalises with its running (pretrained) statistics and leaves them unchanged,
    while its affine weight and bias are still trained (DiWA's and Model Ratatouille's practice).
    Batch statistics differ from the pretrained ones the linear probe was fit on: on real
    ImageNet weights they made the first fine-tune step start from chance (README, "Recipe on real weights")."""
    if batchnorm not in BATCHNORM_MODES:
        raise ConfigError(f"finetune.batchnorm: {batchnorm!r} is unknown; allowed: {', '.join(BATCHNORM_MODES)}")
    model.train()
    if batchnorm == "frozen":
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


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

    progress = {"epoch": 0, "step_in_epoch": 0, "guard": {}}
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
            progress = {"guard": {}, **loaded}
            log(f"resumed {cfg.tag} from epoch {progress['epoch']} step {progress['step_in_epoch']} ({resume.path})")

    set_train_mode(model, cfg.batchnorm)
    # Compiled forward shares the model's parameters, so saving and resuming see no difference.
    forward = torch.compile(model) if cfg.compile else model
    loss_sum = torch.zeros((), device=device)
    first_bad = torch.full((), -1, device=device, dtype=torch.long)
    last_loss = float("nan")
    seen, t_start = 0, time.perf_counter()
    guard = progress["guard"]  # lp_step_loss, first_step_loss, first_epoch_loss: kept in the resume state
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
                    resume.save(model, opt, gen, {"epoch": epoch, "step_in_epoch": step, "guard": guard}, fingerprint)
                    raise Interrupted(f"{cfg.tag}: SIGTERM at epoch {epoch} step {step}; resume state saved to "
                                      f"{resume.path}, a rerun continues from there")
                if resume is not None and resume.due():
                    resume.save(model, opt, gen, {"epoch": epoch, "step_in_epoch": step, "guard": guard}, fingerprint)
                opt.lr = cfg.lr * lr_factor(global_step, cfg.warmup_steps, total)
                idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                x = train_transform(images[idx], spec.size, spec.mean, spec.std, cfg.aug, spec.hflip, gen)
                target = F.one_hot(labels[idx], num_classes).float()
                if lams is not None:
                    x, target = mixup(x, target, float(lams[step]), gen)
                if global_step == 0:
                    # The first-step guard: the loss of the starting weights in eval mode (the LP's own
                    # view) on this very batch, beside the training forward's loss below.
                    model.eval()
                    with torch.no_grad(), autocast(device, cfg.precision):
                        start_logits = model(x)
                    guard["lp_step_loss"] = F.cross_entropy(start_logits.float(), target,
                                                            label_smoothing=cfg.label_smoothing).item()
                    set_train_mode(model, cfg.batchnorm)
                with autocast(device, cfg.precision):
                    logits = forward(x)
                loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
                if global_step == 0:
                    guard["first_step_loss"] = loss.item()
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
                raise Diverged(f"{cfg.tag}: loss became non-finite at step {bad_step} (epoch {epoch})", guard)
            done = steps_per_epoch - start_step
            last_loss = loss_sum.item() / max(1, done)
            rate = done * cfg.batch_size / max(1e-9, time.perf_counter() - t_epoch)
            log(f"{cfg.tag} epoch {epoch + 1}/{cfg.epochs} loss {last_loss:.4f} "
                f"lr {opt.lr:.2e} {rate:.0f} images/s")
            if epoch == 0 and start_step == 0:
                guard["first_epoch_loss"] = last_loss
                log(f"{cfg.tag}: first-step guard: loss of the LP init on the first batch {guard['lp_step_loss']:.4f} "
                    f"(eval mode), first training step {guard['first_step_loss']:.4f}, first epoch {last_loss:.4f}")
                if started_far(last_loss, guard["lp_step_loss"]):
                    log(f"WARNING {cfg.tag}: fine-tune started far from its LP init: first epoch's loss {last_loss:.4f} "
                        f"is above {FAR_FACTOR:g} x the LP init's {guard['lp_step_loss']:.4f} + {FAR_MARGIN:g} on the same "
                        f"images (first step {guard['first_step_loss']:.4f}). Look at finetune.batchnorm (batch "
                        f"statistics), a learning rate too high for grid.lr, or the linear probe")
            progress = {"epoch": epoch + 1, "step_in_epoch": 0, "guard": guard}
    elapsed = time.perf_counter() - t_start
    return {"steps": total, "final_loss": last_loss, "images_per_s": seen / max(elapsed, 1e-9), "train_seconds": elapsed,
            **guard_stats(guard)}


def guard_stats(guard: dict, diverged: bool = False) -> dict:
    """The first-step guard's losses and verdict for metrics.json. A run that diverged within its
    first epoch has no first-epoch loss: it counts as non-finite, so as started far."""
    first_epoch = guard.get("first_epoch_loss", float("nan") if diverged else None)
    return {"lp_step_loss": guard.get("lp_step_loss"), "first_step_loss": guard.get("first_step_loss"),
            "first_epoch_loss": guard.get("first_epoch_loss"),
            "started_far": started_far(first_epoch, guard.get("lp_step_loss"))}


def count(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total): what every accuracy is derived from (`soups.select.fold_acc`)."""
    return int((logits.argmax(1) == labels).sum()), len(labels)


def fold_logits(model: Classifier, pool_images: torch.Tensor, fold_of: torch.Tensor, spec: ImageSpec, batch_size: int,
                precision: str = "fp32") -> torch.Tensor:
    """Logits on the whole pool, predicted fold by fold in batches from each fold's first image:
    the batching of `soups.evaluation.Evaluator`, so a single model's counts are those of the
    same weights scored as a soup (batched kernels need not give the same answers on
    differently cut batches, in bf16 on a GPU least of all)."""
    out = torch.zeros(0)
    for fold in torch.unique(fold_of).tolist():
        idx = torch.nonzero(fold_of == fold).flatten()
        logits = predict_logits(model, pool_images[idx], spec, batch_size, precision)
        if out.numel() == 0:
            out = torch.zeros(len(pool_images), logits.shape[1], dtype=logits.dtype, device=logits.device)
        out[idx] = logits
    return out
