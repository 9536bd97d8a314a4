"""The GPU figures, in one run of under 8 minutes (`make gpu-check` on a machine with a GPU).

Prints one JSON summary (and writes it to --json):
  throughput   ViT-B/32 (random weights, 224 px, the paper preset's batch 256) fine-tune and
               evaluation images/s in bf16, the fraction of the GPU's bf16 peak reached and the
               peak memory. FLOPs: torch's FlopCounterMode over one forward pass of the whole
               classifier with autograd on (2 FLOPs per multiply-add; augmentation and the
               optimiser not counted), training = 3 x forward (backward about twice the forward).
  adamw        foldsoup.training.optim.AdamW (torch's fused kernel) on CUDA against torch.optim.AdamW:
               the largest parameter difference after 20 steps on the same gradients.
  gpu_slots    the demo's smoke run with --resources gpu=2 on the GPU: which device slot each GPU
               job held and when; no two jobs held one device at once (with one GPU, the check
               says so and shows the jobs took turns).
  paper_smoke  presets/paper-cifar10.yaml + presets/smoke.yaml end to end on the GPU, on a
               CIFAR-10 miniature in the real on-disk format and a random-weights ViT-B/32
               checkpoint file (nothing downloaded): exit status, wall time, methods.csv rows.

`--rehearse` runs every part on the CPU at toy sizes (checks the script, not the GPU).
No test depends on a GPU; this script is how the GPU figures in docs/benchmarks.md are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))  # the CIFAR-10 miniature writer
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from bench import KNOWN_PEAK_TFLOPS, flops_per_image  # noqa: E402
from foldsoup.models.build import build_classifier  # noqa: E402
from foldsoup.training.loop import ImageSpec, LoopConfig, predict_logits, train  # noqa: E402

VIT = {"name": "open_clip", "arch": "ViT-B-32", "pretrained": "openai", "quick_gelu": True, "normalize_features": True}
AUG = {"scale": [0.6, 1.0], "rotate": 10, "translate": 0.1, "jitter": 0.2, "erase": 0.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = next((v for k, v in KNOWN_PEAK_TFLOPS.items() if k in name), None)
        if known:
            return known * 1e12, f"spec sheet ({name}, dense bf16)"
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t), f"measured {n}^3 {dtype} matmul"


def throughput(device: torch.device, rehearse: bool) -> dict:
    # ViT-B/32's position embedding fixes 224 px; the rehearsal only shrinks the batch.
    size, batch, n_train, precision = (224, 4, 16, "fp32") if rehearse else (224, 256, 256 * 12, "bf16")
    shape = (3, 32, 32)  # CIFAR-10 images, resized on the device as in the paper preset
    torch.manual_seed(0)
    model = build_classifier(VIT, 10).to(device)
    spec = ImageSpec(size, [0.48, 0.46, 0.41], [0.27, 0.26, 0.28], True)
    images = torch.randint(0, 256, (n_train, *shape), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (n_train,), device=device)
    warm = LoopConfig(1, batch, 1e-5, 0.1, 10, 1.0, 0.0, precision, AUG, 0.4, 0, "warm-up")
    train(model, images[: batch * 2], labels[: batch * 2], spec, warm, lambda s: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    loop = LoopConfig(1, batch, 1e-5, 0.1, 10, 1.0, 0.0, precision, AUG, 0.4, 0, "gpu-check")
    stats = train(model, images, labels, spec, loop, lambda s: None)
    train_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    eval_batch = 1024 if not rehearse else 32
    predict_logits(model, images[:eval_batch], spec, eval_batch, precision)
    sync(device)
    t = time.perf_counter()
    predict_logits(model, images, spec, eval_batch, precision)
    sync(device)
    eval_ips = n_train / (time.perf_counter() - t)
    fwd = flops_per_image(model, spec, shape, device)
    peak, peak_source = peak_flops(device)
    return {
        "model": "open_clip ViT-B-32 (random weights)", "image_size": size, "batch_size": batch, "precision": precision,
        "train_images": n_train, "train_images_per_s": stats["images_per_s"], "eval_images_per_s": eval_ips,
        "forward_gflop_per_image": fwd / 1e9, "peak_tflops": peak / 1e12, "peak_source": peak_source,
        "train_fraction_of_peak": stats["images_per_s"] * 3 * fwd / peak, "eval_fraction_of_peak": eval_ips * fwd / peak,
        "train_peak_memory_gib": train_mem,
        "flops_counted": "FlopCounterMode over one forward of the classifier with autograd on (2 per multiply-add); "
                         "training = 3 x forward",
    }


def adamw_check(device: torch.device) -> dict:
    from foldsoup.training.optim import AdamW

    torch.manual_seed(0)
    shapes = [(768, 768), (768,), (3072, 768), (10, 512)]
    ours = [torch.randn(s, device=device, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_(True) for p in ours]
    opt, ref_opt = AdamW(ours, lr=1e-3, weight_decay=0.1), torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.1)
    for _ in range(20):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    diff = max((p - q).abs().max().item() for p, q in zip(ours, ref))
    return {"fused": bool(opt.fused), "steps": 20, "max_abs_diff": diff, "ok": diff <= 1e-5}


def soup_on_device(device: torch.device) -> dict:
    """A soup of bf16 states on the GPU sums in fp32 on that GPU and equals the CPU average."""
    from foldsoup.soups.average import RunningSum, average

    torch.manual_seed(0)
    states = [{"w": torch.randn(64, 32), "b": torch.randn(32)} for _ in range(4)]
    states = [{k: v.to(device, torch.bfloat16) for k, v in s.items()} for s in states]
    running = RunningSum()
    for s in states:
        running.add(s)
    on_device = all(t.device.type == device.type and t.dtype == torch.float32 for t in running._sums.values())
    soup = running.mean()
    cpu = average([{k: v.cpu() for k, v in s.items()} for s in states])
    diff = max((soup[k].cpu() - cpu[k]).abs().max().item() for k in cpu)
    return {"sums_on_device_fp32": on_device, "max_abs_diff_vs_cpu": diff, "ok": on_device and diff <= 1e-6}


def _snakemake(args: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    snakemake = [sys.executable, "-m", "snakemake"]
    t = time.perf_counter()
    proc = subprocess.run([*snakemake, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, time.perf_counter() - t


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLDSOUP_")}
    env.update(extra)
    return env


def gpu_slots(device: torch.device, work: Path, rehearse: bool) -> dict:
    """The demo's smoke run with two GPU slots asked for: who held which device, and when."""
    results, locks = work / "slots-results", work / "slots-locks"
    extra = {"FOLDSOUP_GPU_LOCK_DIR": str(locks)}
    if rehearse:
        extra["FOLDSOUP_FAKE_GPUS"] = "2"
    rc, out, seconds = _snakemake(["--cores", "4", "--resources", "gpu=2", "--configfile", "presets/smoke.yaml",
                                   "--config", f"results={results}", f"device={'auto' if rehearse else 'cuda'}",
                                   ], _env(**extra), 300)
    holds = []
    for log in sorted((results / "logs").rglob("*.log")):
        text = log.read_text()
        acq = re.search(r"device slot (\d+) \((\S+)\) acquired.* at t=(\d+\.\d+)", text)
        rel = re.search(r"device slot \d+ \(\S+\) released at t=(\d+\.\d+)", text)
        if acq:
            end = float(rel.group(1)) if rel else log.stat().st_mtime
            holds.append({"job": str(log.relative_to(results / "logs")), "lock": acq.group(2), "start": float(acq.group(3)),
                          "end": end})
    shared = [(a["job"], b["job"]) for i, a in enumerate(holds) for b in holds[i + 1:]
              if a["lock"] == b["lock"] and not (a["end"] <= b["start"] or b["end"] <= a["start"])]
    events = sorted([(h["start"], 1) for h in holds] + [(h["end"], -1) for h in holds])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    return {
        "exit_status": rc, "seconds": seconds, "visible_gpus": visible, "gpu_jobs": len(holds),
        "locks_used": sorted({h["lock"] for h in holds}), "most_gpu_jobs_at_once": most, "jobs_sharing_a_device": shared,
        "ok": rc == 0 and bool(holds) and not shared,
        "note": ("one GPU: --resources gpu=2 lets two GPU jobs start, and the second waits for the device's lock; "
                 "the jobs took turns" if visible == 1 else
                 "CPU rehearsal with 2 fake GPU slots (FOLDSOUP_FAKE_GPUS)" if rehearse else
                 f"{visible} GPUs: jobs on distinct devices"),
        "output_tail": out.splitlines()[-15:] if rc else [],
    }


def paper_smoke(device: torch.device, work: Path, rehearse: bool) -> dict:
    """The paper preset's smoke run end to end on a CIFAR-10 miniature and a local checkpoint."""
    import open_clip
    from safetensors.torch import save_file

    from cifar_miniature import write_cifar10_miniature

    data = work / "cifar10"
    write_cifar10_miniature(data, n_train_per_class=6 if rehearse else 20, n_test_per_class=2 if rehearse else 10)
    torch.manual_seed(0)
    arch = "ViT-S-32" if rehearse else "ViT-B-32"  # the rehearsal: 4x fewer FLOPs on a CPU
    clip = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True)
    checkpoint = work / f"{arch}-random.safetensors"  # OpenAI's key layout: visual.* (and the text tower)
    save_file({k: v.detach().contiguous() for k, v in clip.state_dict().items()}, str(checkpoint))
    del clip
    overlay = work / "paper-smoke.yaml"
    overlay.write_text(json.dumps({
        "results": str(work / "paper-results"), "device": "cpu" if rehearse else "cuda",
        "data": {"root": str(data), "download": False},
        "model": {"arch": arch, "pretrained": str(checkpoint), "quick_gelu": True},
        **({"finetune": {"batch_size": 16, "eval_batch_size": 64, "precision": "fp32"}} if rehearse else {}),
    }))
    rc, out, seconds = _snakemake(["--cores", "8", "--resources", "gpu=1", "--configfile", "presets/paper-cifar10.yaml",
                                   "presets/smoke.yaml", str(overlay)], _env(), 900 if rehearse else 420)
    methods = work / "paper-results" / "tables" / "methods.csv"
    rows = []
    if methods.is_file():
        import pandas as pd

        rows = pd.read_csv(methods)[["method", "val_acc", "test_acc"]].to_dict("records")
    return {"exit_status": rc, "seconds": seconds, "jobs": len(re.findall(r"^Finished jobid", out, re.M)),
            "methods": rows, "ok": rc == 0 and bool(rows), "output_tail": out.splitlines()[-25:] if rc else []}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rehearse", action="store_true", help="run every part on the CPU at toy sizes")
    p.add_argument("--json", help="also write the summary here")
    p.add_argument("--skip", nargs="*", default=[], choices=["throughput", "adamw", "soup", "gpu_slots", "paper_smoke"])
    args = p.parse_args()
    if not args.rehearse and not torch.cuda.is_available():
        print("gpu-check: torch sees no GPU (use --rehearse to check the script on a CPU)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.rehearse else "cuda:0")
    summary: dict = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                     else f"CPU rehearsal ({os.cpu_count()} cores)", "torch": torch.__version__,
                     "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    work = Path(tempfile.mkdtemp(prefix="foldsoup-gpu-check-"))
    parts = {"throughput": lambda: throughput(device, args.rehearse), "adamw": lambda: adamw_check(device),
             "soup": lambda: soup_on_device(device),
             "gpu_slots": lambda: gpu_slots(device, work, args.rehearse),
             "paper_smoke": lambda: paper_smoke(device, work, args.rehearse)}
    t0 = time.perf_counter()
    for name, part in parts.items():
        if name in args.skip:
            continue
        t = time.perf_counter()
        try:
            summary[name] = part()
        except Exception as exc:  # one failed part must not hide the others' figures
            summary[name] = {"error": f"{type(exc).__name__}: {exc}"}
        summary[name]["part_seconds"] = time.perf_counter() - t
        print(f"gpu-check: {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    summary["total_seconds"] = time.perf_counter() - t0
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    ok = all("error" not in summary.get(n, {}) and summary.get(n, {}).get("ok", True) for n in parts)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
