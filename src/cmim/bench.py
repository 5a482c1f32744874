"""``cmim bench``: training-step throughput, FLOPs and MFU of a recipe, plus the data pipeline's cost.

The step is timed exactly as :class:`cmim.engine.trainer.Trainer` runs it (same method, optimizer, autocast,
clipping, ``optimizer.step``, ``after_step`` EMA), on synthetic batches prepared in advance so that only the
device work is measured. Model FLOPs are *counted* on one eager step (``FlopCounterMode``, 2 FLOPs per
multiply-add, teacher forward + student forward and backward), and MFU is taken against square-matmul peaks
measured in the same process on the same device, before and after the step timing (best of both, so that a
noisy, shared machine lowers neither side more than the other). The data pipeline is timed separately:
``PretrainDataset`` items/s in this single process (= per CPU core: decode, crop, both views' photometric
parameters, mask) and the on-device ``ViewMaker``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor
from torch.utils.data import default_collate

from cmim.config import ConfigError, load_config
from cmim.core.errors import TrainingError

log = logging.getLogger("cmim")

EPILOG = """\
Reproduce the BENCHMARKS.md tables (2-core CPU, quiet machine; on a shared machine add --threads 1):
  cmim bench configs/conmim_vit_small_in1k.yaml train.batch_size=32 --steps 2 --rounds 2 --warmup 1
  cmim bench configs/conmim_vit_small_in1k.yaml train.batch_size=16 --steps 2 --rounds 3 --warmup 1
  cmim bench configs/conmim_vit_small_in1k.yaml train.batch_size=16 train.precision=fp32 --steps 2 --warmup 1
  cmim bench configs/conmim_fmnist_cpu.yaml --steps 10 --rounds 3 --data-items 2048
  cmim bench configs/conmim_fmnist_cpu.yaml train.compile=true --steps 10 --rounds 3
  cmim bench configs/mocov3_fmnist_cpu.yaml --steps 10 --rounds 3 --data-items 2048
  cmim bench configs/mimco_fmnist_cpu.yaml --teacher-recipe configs/mocov3_fmnist_cpu.yaml --steps 10 --rounds 3
Profiles: add --threads 1 --profile 1. GPU (one H100/H200; see benchmarks/gpu_check.sh):
  cmim bench configs/conmim_vit_base_in1k.yaml train.batch_size=128 --steps 20 --rounds 3
  cmim bench configs/conmim_vit_small_in1k.yaml train.batch_size=256 --steps 20 --rounds 3
Recipes whose data.root is not given run on procedural images (data pipeline: generated JPEG files); MimCo
without mimco.teacher gets a random MoCo v3 teacher. The last output line is one JSON object.
"""

_ATEN = torch.ops.aten
#: square matmul sizes of the peak MFU is measured against (large enough to reach the device's best GEMM speed)
CPU_PEAK_SIZES, GPU_PEAK_SIZES = [2048, 4096], [4096, 8192]


# ----------------------------------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timeit(fn: Callable[[], Any], device: torch.device, reps: int, inner: int = 1) -> list[float]:
    """Seconds per call of ``fn`` for ``reps`` repetitions of ``inner`` back-to-back calls each."""
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        out.append((time.perf_counter() - t0) / inner)
    return out


def matmul_peak(device: torch.device, dtype: torch.dtype, sizes: list[int],
                reps: int = 4) -> dict[str, float]:
    """Best FLOP/s of square ``n x n @ n x n`` matmuls (2 n^3 FLOPs) over ``sizes`` and ``reps``."""
    best, best_n = 0.0, 0
    inner = 10 if device.type == "cuda" else 1
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.mm(a, b)  # warm-up: library initialisation, page faults, clocks
        sec = min(_timeit(lambda a=a, b=b: torch.mm(a, b), device, reps, inner))
        rate = 2.0 * n**3 / sec
        if rate > best:
            best, best_n = rate, n
        del a, b
    return {"flops": best, "n": best_n}


# ----------------------------------------------------------------------------------------------------
# FLOP counting
# ----------------------------------------------------------------------------------------------------


def _cpu_sdpa_mapping() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode has no formula for the CPU flash-attention kernels that SDPA dispatches to on CPU."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    mapping: dict[Any, Callable[..., int]] = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", fwd),
                     ("_scaled_dot_product_flash_attention_for_cpu_backward", bwd)):
        op = getattr(_ATEN, name, None)
        if op is not None:
            mapping[op] = fn
    return mapping


def count_step_flops(step: Callable[[], None]) -> dict[str, int]:
    """Model FLOPs of one call of ``step`` (matmul, conv, attention; forward and backward), in all and by
    top-level module. The on-device augmentation (the ``ViewMaker``: the blur convolution) is data work, not
    model work, and is left out."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_mapping())
    with counter:
        step()
    counts = counter.get_flop_counts()
    data = sum(sum(v.values()) for k, v in counts.items() if k.split(".")[-1] == "ViewMaker")
    top = {k: int(sum(v.values())) for k, v in counts.items()
           if k.count(".") == 1 and k.split(".")[-1] != "ViewMaker"}
    total = int(counter.get_total_flops()) - data
    # "other": outside any submodule's forward (losses; modules called through another method)
    return {"total": total, **top, "other": total - sum(top.values())}


# ----------------------------------------------------------------------------------------------------
# Synthetic batches and the step
# ----------------------------------------------------------------------------------------------------


def synthetic_batches(cfg: DictConfig, method: Any, batch: int, count: int) -> list[dict[str, Tensor]]:
    """``count`` collated pre-training batches of procedural images, built by the recipe's own views."""
    from cmim.data.synthetic import SyntheticDataset
    from cmim.data.views import PretrainDataset

    d = cfg.data
    base = SyntheticDataset(batch * count, max(2, d.synthetic_classes), d.img_size, d.in_chans, seed=0)
    ds = PretrainDataset(base, method.view_spec(), d.img_size, d.crop_scale, d.crop_ratio, d.interpolation,
                         d.hflip_prob, seed=0)
    return [default_collate([ds[i] for i in range(k * batch, (k + 1) * batch)]) for k in range(count)]


class StepRunner:
    """The trainer's own step (:class:`cmim.engine.step.TrainStep`: views on the device, forward under autocast,
    backward per micro-batch, clip, fused AdamW, the non-finite skip, ``after_step``), cycling over pre-built
    device batches."""

    def __init__(self, cfg: DictConfig, device: torch.device, total_steps: int = 10_000) -> None:
        from cmim.core.host_memory import keep_freed_memory
        from cmim.core.schedules import cosine_schedule
        from cmim.data.augment import ViewMaker
        from cmim.engine.step import TrainStep, to_device
        from cmim.engine.trainer import build_optimizer, peak_lr
        from cmim.methods import build_method

        t, d = cfg.train, cfg.data
        self.cfg, self.device, self.total_steps = cfg, device, total_steps
        if t.keep_freed_memory and device.type == "cpu":  # as the trainer does
            keep_freed_memory()
        torch.manual_seed(t.seed)
        self.method = build_method(cfg).to(device)
        self.method.train()
        self.optimizer = build_optimizer(self.method, cfg, device)
        self.accum = int(t.accum_steps)
        self.micro = t.batch_size // self.accum
        self.forward = torch.compile(self.method) if t.compile else self.method
        # data.mean/std=auto changes no timing: unit statistics stand in for the estimate a run makes first
        mean, std = ([0.5] * d.in_chans if isinstance(v, str) else v for v in (d.mean, d.std))
        self.view_maker = ViewMaker(self.method.view_spec(), mean, std, d.in_chans).to(device)
        self.train_step = TrainStep(self.method, self.optimizer, self.view_maker, device, accum_steps=self.accum,
                                    precision=t.precision, clip_grad=cfg.optim.clip_grad, model=self.forward)
        self._lr = lambda step: cosine_schedule(step, total_steps, peak_lr(cfg), cfg.optim.min_lr, 0)
        if t.check_memory:  # before building batches that cannot fit (the trainer's check; 2 batches kept)
            from cmim.engine.memory import check_batch_fits

            check_batch_fits(self.method, lambda n: synthetic_batches(cfg, self.method, n, 1)[0],
                             lambda b: self.train_step.forward(b, self.method), self.optimizer, device,
                             batch_size=t.batch_size, accum_steps=self.accum, data_batches=2)
        host = synthetic_batches(cfg, self.method, self.micro, 2)
        self.batches = [to_device(b, device) for b in host]
        self.step = 0
        self.loss = torch.zeros((), device=device)

    def run(self, forward: Callable[..., dict[str, Tensor]] | None = None) -> None:
        micro = (self.batches[(self.step * self.accum + a) % len(self.batches)] for a in range(self.accum))
        res = self.train_step(micro, self.step, self.total_steps, self._lr(self.step), model=forward)
        self.loss += res.loss
        self.step += 1

    def eager_step(self) -> None:
        self.run(self.method)

    def view_maker_seconds(self, reps: int) -> list[float]:
        """The on-device augmentation of one micro-batch, under the step's autocast as in the step."""
        batch = self.batches[0]

        def views() -> None:
            with self.train_step.autocast:
                self.train_step.inputs(batch)

        return _timeit(views, self.device, reps)


def count_host_syncs(runner: StepRunner) -> int | None:
    """CUDA only: how many host-device synchronizations one step performs (0 is the goal)."""
    if runner.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            runner.run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    _sync(runner.device)
    return sum("synchroniz" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------------------------------
# Data pipeline
# ----------------------------------------------------------------------------------------------------


def _jpeg_folder(root: Path, count: int, in_chans: int) -> None:
    """Write ``count`` ImageNet-like JPEGs (500x375, quality 90) of procedural images into class folders."""
    import numpy as np
    from PIL import Image

    from cmim.data.synthetic import SyntheticDataset

    synth = SyntheticDataset(count, 4, 500, 3, seed=1)
    for i in range(count):
        arr = synth[i][0][:375]
        arr = arr + np.random.default_rng(i).integers(0, 24, arr.shape, dtype=np.uint8)  # texture
        img = Image.fromarray(arr)
        if in_chans == 1:
            img = img.convert("L")
        (root / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        img.save(root / f"c{i % 4}" / f"{i:05d}.jpg", quality=90)


def data_pipeline(cfg: DictConfig, spec: Any, items: int, source: str,
                  device: torch.device | None = None, decode: str | None = None) -> dict[str, Any]:
    """``PretrainDataset`` items/s in this process (one core): read+decode, crop+resize, flip, photometric
    parameters of every view and the mask. ``source``: the recipe's dataset, JPEG files, or procedural. With
    ``decode="device"`` (default: ``data.decode``) on files, the per-core rate is the workers' share (read the
    bytes, draw the crops), and ``device_decode_img_per_s`` times the step's decoding of 64 of them on ``device``."""
    from cmim.data.base import DecodeMode
    from cmim.data.factory import build_base_dataset
    from cmim.data.folder import ImageFolderDataset
    from cmim.data.synthetic import SyntheticDataset
    from cmim.data.views import PretrainDataset

    d = cfg.data
    tmp: tempfile.TemporaryDirectory | None = None
    label = source
    base: Any = None
    if source in ("auto", "recipe"):
        try:
            base = build_base_dataset(d, d.train_split)
            label = f"recipe ({d.name})"
        except Exception as e:  # noqa: BLE001 - a missing dataset only changes what is timed
            if source == "recipe":
                raise
            log.info("bench: recipe dataset unavailable (%s); timing JPEG files instead", e)
            source = "jpeg" if d.name == "folder" or d.img_size >= 64 else "synthetic"
    if base is None and source == "jpeg":
        tmp = tempfile.TemporaryDirectory(prefix="cmim_bench_")
        _jpeg_folder(Path(tmp.name), 64, d.in_chans)
        base = ImageFolderDataset(tmp.name, in_chans=d.in_chans)
        label = "jpeg files 500x375 q90"
    elif base is None:
        base = SyntheticDataset(max(items, 1), max(2, d.synthetic_classes), d.img_size, d.in_chans)
        label = "procedural (rendered per item)"
    decode = decode or str(getattr(d, "decode", "cpu"))
    on_device = decode == "device" and isinstance(base, ImageFolderDataset)
    if on_device:
        base = base.with_decode_mode(DecodeMode.device)
        label += ", decode on the device"
    out: dict[str, Any] = {"source": label, "items": items}
    try:
        ds = PretrainDataset(base, spec, d.img_size, d.crop_scale, d.crop_ratio, d.interpolation,
                             d.hflip_prob)
        n = len(ds)
        for i in range(min(8, items)):  # warm-up: file cache, lazy imports
            ds[i % n]
        t0 = time.perf_counter()
        for i in range(items):
            ds[(i * 7919) % n]
        sec = time.perf_counter() - t0
        out["items_per_s_per_core"] = items / sec if sec > 0 else math.inf
        if on_device:
            from cmim.data.decode import DeviceDecoder, collate_pretrain
            from cmim.engine.step import to_device

            dev = device or torch.device("cpu")
            batch = to_device(collate_pretrain([ds[i % n] for i in range(min(max(items, 1), 64))]), dev)
            decoder = DeviceDecoder(d.img_size, d.in_chans, dev, ds.decoded_item, d.interpolation)
            per_batch = min(_timeit(lambda: decoder(batch), dev, 3))
            out["device_decode_img_per_s"] = batch["aug"].shape[0] / per_batch
    finally:
        if tmp is not None:
            tmp.cleanup()
    return out


# ----------------------------------------------------------------------------------------------------
# Profile
# ----------------------------------------------------------------------------------------------------


def profile_table(runner: StepRunner, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            runner.run()
        _sync(runner.device)
    key = "self_cuda_time_total" if runner.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


_TMP_DIRS: list[tempfile.TemporaryDirectory] = []  # random MimCo teachers live until the process ends


def _random_teacher(config: str | None, overrides: list[str], teacher_recipe: str | None) -> str:
    """A cmim checkpoint of a randomly initialised MoCo v3 (``teacher_recipe``, or the recipe's own backbone
    with a projector as wide as MimCo's heads): MimCo's step costs the same whatever the teacher's weights,
    so a benchmark needs no trained teacher."""
    from cmim.config import to_yaml
    from cmim.engine.trainer import encoder_meta
    from cmim.methods import build_method

    if teacher_recipe is not None:
        cfg = load_config(teacher_recipe, ["method=mocov3", "mimco.teacher=null"])
    else:
        ov = [*overrides, "method=mocov3", "mimco.teacher=null"]
        hidden = load_config(config, ov).mimco.proj_hidden_dim
        cfg = load_config(config, [*ov, f"mocov3.proj_hidden_dim={hidden}"])
    method = build_method(cfg)
    tmp = tempfile.TemporaryDirectory(prefix="cmim_bench_")
    _TMP_DIRS.append(tmp)
    path = Path(tmp.name) / "random_mocov3.pt"
    torch.save({"model": method.state_dict(), "encoder": encoder_meta(method), "config": to_yaml(cfg),
                "method": "mocov3"}, path)
    return str(path)


def load_bench_config(config: str | None, overrides: list[str],
                      teacher_recipe: str | None = None) -> tuple[DictConfig, bool]:
    """The recipe, and whether its dataset was replaced. A recipe whose data.root is required but not given
    (the ImageNet ones) is benchmarked anyway, its data pipeline on generated JPEG files; MimCo without
    ``mimco.teacher`` gets a random MoCo v3 teacher (see :func:`_random_teacher`)."""
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]
    extra: list[str] = []
    for _ in range(3):
        try:
            return load_config(config, [*overrides, *extra]), "data.name=synthetic" in extra
        except ConfigError as e:
            msg, given = str(e), {o.split("=", 1)[0] for o in overrides}
            if msg.startswith("data.root") and "data.root" not in given and "data.root=null" not in extra:
                extra += ["data.name=synthetic", "data.root=null"]
            elif msg.startswith("mimco.teacher") and "mimco.teacher" not in given:
                extra.append(f"mimco.teacher={_random_teacher(config, [*overrides, *extra], teacher_recipe)}")
            else:
                raise
    return load_config(config, [*overrides, *extra]), "data.name=synthetic" in extra


def run_bench(cfg: DictConfig, *, steps: int = 10, warmup: int = 2, rounds: int = 3, data_items: int = 256,
              data_source: str = "auto", peak: bool = True, peak_sizes: list[int] | None = None,
              profile_steps: int = 0, profile_rows: int = 25, data_decode: str | None = None,
              vs_eager: bool = False) -> dict[str, Any]:
    """Measure everything; returns the result dict (also what the JSON line holds). ``vs_eager`` (with
    ``train.compile``): every timed round of the compiled step is followed by one of the eager step on the same
    runner, so that both see the same machine state."""
    from cmim.core.distributed import resolve_device
    from cmim.core.precision import native_bf16, resolve_precision

    device = resolve_device(cfg.train.device)
    t, m = cfg.train, cfg.model
    if vs_eager and not t.compile:
        raise ConfigError("bench --vs-eager compares the compiled step with the eager one: add train.compile=true")
    cpu = device.type == "cpu"
    peak_sizes = peak_sizes or (CPU_PEAK_SIZES if cpu else GPU_PEAK_SIZES)
    res: dict[str, Any] = {
        "method": cfg.method, "family": m.family, "size": m.size, "embed_dim": m.embed_dim, "depth": m.depth,
        "patch_size": m.patch_size, "img_size": cfg.data.img_size, "batch": t.batch_size,
        "accum_steps": t.accum_steps, "precision": resolve_precision(t.precision, device),
        "precision_requested": t.precision, "compile": bool(t.compile),
        "device": str(device), "machine": machine(),
    }
    peaks: dict[str, list[float]] = {"bf16": [], "fp32": []}

    def measure_peaks() -> None:
        if not peak:
            return
        if native_bf16(device.type):  # emulated bf16 matmuls would take minutes; no peak to report
            peaks["bf16"].append(matmul_peak(device, torch.bfloat16, peak_sizes)["flops"])
        peaks["fp32"].append(matmul_peak(device, torch.float32, peak_sizes)["flops"])

    runner = StepRunner(cfg, device)  # first: it refuses a batch that cannot fit before any timing
    measure_peaks()
    p = sum(x.numel() for x in runner.train_step.params)
    res["trainable_params_m"] = p / 1e6
    for _ in range(max(1, warmup)):
        runner.run()
    _sync(device)
    flops = count_step_flops(runner.eager_step)
    res["flops_per_img"] = flops["total"] / t.batch_size
    res["flops_by_module"] = {k: v / t.batch_size for k, v in flops.items() if k != "total"}
    res["host_syncs_per_step"] = count_host_syncs(runner)
    per_round, eager_rounds = [], []
    for _ in range(max(1, rounds)):
        per_round.append(_timeit(runner.run, device, 1, steps)[0])
        if vs_eager:
            eager_rounds.append(_timeit(runner.eager_step, device, 1, steps)[0])
    if vs_eager:
        res.update(eager_img_per_s=[t.batch_size / x for x in eager_rounds],
                   compiled_img_per_s=[t.batch_size / x for x in per_round],
                   compile_speedup_best=min(eager_rounds) / min(per_round),
                   compile_speedup_median=statistics.median(eager_rounds) / statistics.median(per_round))
    loss = (runner.loss / max(1, runner.step * runner.accum)).item()
    if not math.isfinite(loss):
        raise TrainingError(f"bench: non-finite loss ({loss}) on synthetic batches; the recipe diverges")
    best, med = min(per_round), statistics.median(per_round)
    res.update(step_s_best=best, step_s_median=med, img_per_s=t.batch_size / best,
               img_per_s_median=t.batch_size / med)
    vm = min(runner.view_maker_seconds(max(3, rounds)))
    res["viewmaker_img_per_s"] = t.batch_size / runner.accum / vm if vm > 0 else math.inf
    res["viewmaker_share"] = vm * runner.accum / best
    measure_peaks()
    achieved = res["flops_per_img"] * res["img_per_s"]
    res["achieved_tflops"] = achieved / 1e12
    if peak:
        res["peak_bf16_tflops"] = max(peaks["bf16"]) / 1e12 if peaks["bf16"] else None
        res["peak_fp32_tflops"] = max(peaks["fp32"]) / 1e12
        ref = res["peak_bf16_tflops"] if res["precision"] == "bf16" else res["peak_fp32_tflops"]
        res["mfu"] = res["achieved_tflops"] / ref
        # the ceiling of any implementation of these FLOPs on this device: every FLOP at the matmul peak
        res["img_per_s_at_peak"] = ref * 1e12 / res["flops_per_img"]
        res["peak_sizes"] = peak_sizes
    if data_items > 0:
        dp = data_pipeline(cfg, runner.method.view_spec(), data_items, data_source, device, data_decode)
        if "device_decode_img_per_s" in dp:
            res["device_decode_img_per_s"] = dp["device_decode_img_per_s"]
        res["data_source"] = dp["source"]
        res["data_items_per_s_per_core"] = dp["items_per_s_per_core"]
        # cores the loader needs to keep up with this step (on a CPU-only run they are taken from compute)
        res["data_cores_needed"] = res["img_per_s"] / dp["items_per_s_per_core"]
    if profile_steps > 0:
        res["profile"] = profile_table(runner, profile_steps, profile_rows)
    return res


def _fmt_flops(x: float) -> str:
    return f"{x / 1e9:.2f} GFLOP" if x >= 1e8 else f"{x / 1e6:.1f} MFLOP"


def format_table(r: dict[str, Any]) -> str:
    mc = r["machine"]
    dim = f", dim {r['embed_dim']}x{r['depth']}" if r.get("embed_dim") else ""
    asked = r.get("precision_requested", r["precision"])
    fallback = f" (asked {asked}: no native bf16 here)" if asked != r["precision"] else ""
    rows = [
        ("recipe", f"{r['method']} {r['family']}-{r['size']}/{r['patch_size']}{dim} @ {r['img_size']}px, "
                   f"batch {r['batch']} (accum {r['accum_steps']}), {r['precision']}{fallback}"
                   + (", torch.compile" if r["compile"] else "")),
        ("device", f"{r['device']} - {mc.get('gpu', mc['cpu'])}, {mc['cores']} cores, "
                   f"{mc['torch_threads']} torch threads, torch {mc['torch']}"),
        ("trainable params", f"{r['trainable_params_m']:.2f} M"),
        ("model FLOPs / image", f"{_fmt_flops(r['flops_per_img'])} (counted: teacher fwd + student fwd+bwd)"),
        ("  by module", ", ".join(f"{k} {_fmt_flops(v)}" for k, v in r["flops_by_module"].items())),
        ("step time", f"{r['step_s_best'] * 1e3:.1f} ms best, {r['step_s_median'] * 1e3:.1f} ms median"),
        ("throughput", f"{r['img_per_s']:.1f} img/s best, {r['img_per_s_median']:.1f} img/s median"),
        ("achieved", f"{r['achieved_tflops'] * 1e3:.1f} GFLOP/s"),
    ]
    if "mfu" in r:
        bf16_peak = r["peak_bf16_tflops"]
        bf16_text = f"{bf16_peak * 1e3:.1f} GFLOP/s" if bf16_peak else "not measured (no native bf16)"
        rows += [("matmul peak bf16", bf16_text),
                 ("matmul peak fp32", f"{r['peak_fp32_tflops'] * 1e3:.1f} GFLOP/s"),
                 ("MFU", f"{100 * r['mfu']:.1f}% of the {r['precision']} matmul peak (at 100%: "
                         f"{r['img_per_s_at_peak']:.1f} img/s, the ceiling of these FLOPs here)")]
    rows.append(("ViewMaker (device)", f"{r['viewmaker_img_per_s']:.0f} img/s, "
                                       f"{100 * r['viewmaker_share']:.1f}% of the step"))
    if r.get("host_syncs_per_step") is not None:
        rows.append(("host syncs / step", str(r["host_syncs_per_step"])))
    if "data_items_per_s_per_core" in r:
        rows.append(("data pipeline", f"{r['data_items_per_s_per_core']:.0f} items/s per core "
                                      f"[{r['data_source']}]; {r['data_cores_needed']:.2f} cores to keep up"))
    if "device_decode_img_per_s" in r:
        rows.append(("JPEG decode (device)", f"{r['device_decode_img_per_s']:.0f} img/s"))
    if "compile_speedup_best" in r:
        rounds = ", ".join(f"{c:.1f}/{e:.1f}" for c, e in zip(r["compiled_img_per_s"], r["eager_img_per_s"]))
        rows.append(("compiled vs eager", f"x{r['compile_speedup_best']:.2f} best, x{r['compile_speedup_median']:.2f} "
                                          f"median (img/s per round, compiled/eager: {rounds})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, replaced = load_bench_config(args.config, list(args.overrides), args.teacher_recipe)
    source = "jpeg" if replaced and args.data_source == "auto" else args.data_source
    try:
        res = run_bench(cfg, steps=args.steps, warmup=args.warmup, rounds=args.rounds, data_items=args.data_items,
                        data_source=source, peak=not args.no_peak,
                        peak_sizes=[int(n) for n in args.peak_sizes.split(",")] if args.peak_sizes else None,
                        profile_steps=args.profile,
                        profile_rows=args.profile_rows, data_decode=args.data_decode, vs_eager=args.vs_eager)
    except torch.OutOfMemoryError:
        from cmim.core.distributed import resolve_device
        from cmim.engine.memory import out_of_memory_error

        raise out_of_memory_error(resolve_device(cfg.train.device), cfg.train.batch_size,
                                  cfg.train.accum_steps) from None
    prof = res.pop("profile", None)
    if prof:
        print(prof)
    print(format_table(res))
    line = json.dumps(res, sort_keys=True)
    if args.json_out:
        Path(args.json_out).write_text(line + "\n")
    print(line)
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="time a recipe's training step (img/s, FLOPs, MFU) and its data pipeline",
        description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None, help="YAML recipe (see configs/); optional")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=32")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per timed round (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (default 2; compiles)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; best and median reported (default 3)")
    p.add_argument("--data-items", type=int, default=256, help="items for the data-pipeline timing (0: skip)")
    p.add_argument("--data-source", choices=("auto", "recipe", "jpeg", "synthetic"), default="auto",
                   help="data timed: the recipe's dataset (auto falls back to JPEG files when it is missing)")
    p.add_argument("--data-decode", choices=("cpu", "device"), default=None,
                   help="time the loader as with data.decode=cpu|device (default: the recipe's); device: the "
                        "workers read JPEG bytes, and the step's decoding on the device is timed too")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak (no MFU)")
    p.add_argument("--peak-sizes", default=None, metavar="N,N",
                   help="square matmul sizes for the peak (default 2048,4096 on CPU, 4096,8192 on GPU)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS steps with torch.profiler and print the top ops")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--teacher-recipe", default=None, metavar="YAML",
                   help="MimCo without mimco.teacher: build a random MoCo v3 teacher from this recipe")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--json-out", default=None, help="also write the JSON line to this file")
    p.add_argument("--vs-eager", action="store_true",
                   help="with train.compile=true: time the eager step too, one round of each in turn")
    p.set_defaults(func=_run)
