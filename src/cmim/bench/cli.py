"""``cmim bench``: training-step throughput, FLOPs and MFU of a recipe, plus the data pipeline's cost; with
``--memory``, a table of the memory per GPU of large models under DDP and FSDP.

The step is timed exactly as :class:`cmim.engine.trainer.Trainer` runs it (the same :func:`cmim.engine.run.build_run`:
method, optimizer, autocast, clipping, ``optimizer.step``, ``after_step`` EMA), on synthetic batches prepared in
advance so that only the device work is measured. Model FLOPs are *counted* on one eager step
(``FlopCounterMode``, 2 FLOPs per multiply-add, teacher forward + student forward and backward), and MFU is taken
against square-matmul peaks measured in the same process on the same device, before and after the step timing
(best of both, so that a noisy, shared machine lowers neither side more than the other). The data pipeline is
timed separately: ``PretrainDataset`` items/s in this single process (= per CPU core: decode, crop, both views'
photometric parameters, mask) and the on-device ``ViewMaker``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from cmim.bench.data import data_pipeline
from cmim.bench.memory import format_memory_table, memory_table
from cmim.bench.peak import CPU_PEAK_SIZES, GPU_PEAK_SIZES, count_step_flops, matmul_peak
from cmim.bench.step import StepRunner, count_host_syncs, profile_table
from cmim.bench.timing import machine, sync, timeit
from cmim.config import Config, ConfigError, data_root_problem, load_config, merge_config, to_yaml
from cmim.core.distributed import resolve_device
from cmim.core.errors import TrainingError
from cmim.core.precision import native_bf16, resolve_precision
from cmim.engine.memory import out_of_memory_error
from cmim.engine.trainer import encoder_meta
from cmim.methods import build_method

__all__ = ["add_parser", "format_table", "load_bench_config", "run_bench"]


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
Memory per GPU of ViT-S/B/L/H/g under DDP and FSDP (README "Scaling out"): cmim bench --memory [--gpus 8]
Recipes whose data.root is not given run on procedural images (data pipeline: generated JPEG files); MimCo
without mimco.teacher gets a random MoCo v3 teacher. The last output line is one JSON object.
"""


_TMP_DIRS: list[tempfile.TemporaryDirectory] = []  # random MimCo teachers live until the process ends


def _random_teacher(config: str | None, overrides: list[str], teacher_recipe: str | None) -> str:
    """A cmim checkpoint of a randomly initialised MoCo v3 (``teacher_recipe``, or the recipe's own backbone
    with a projector as wide as MimCo's heads): MimCo's step costs the same whatever the teacher's weights,
    so a benchmark needs no trained teacher."""
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
    """The recipe, and whether its dataset was replaced. A recipe whose data.root is required but not given, or
    missing here (the ImageNet ones), is benchmarked anyway, its data pipeline on generated JPEG files; MimCo
    without a readable ``mimco.teacher`` gets a random MoCo v3 teacher (see :func:`_random_teacher`). Both are
    decided from the recipe as written, before it is checked."""
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]
    given = {o.split("=", 1)[0] for o in overrides}
    written = merge_config(Config, [], config, overrides, lambda cfg: None)  # as written, before the checks
    extra: list[str] = []
    replaced = "data.root" not in given and data_root_problem(written.data) is not None
    if replaced:
        extra += ["data.name=synthetic", "data.root=null"]
    teacher = written.mimco.teacher
    if written.method == "mimco" and "mimco.teacher" not in given and (teacher is None or not Path(teacher).is_file()):
        extra.append(f"mimco.teacher={_random_teacher(config, [*overrides, *extra], teacher_recipe)}")
    return load_config(config, [*overrides, *extra]), replaced


def run_bench(cfg: DictConfig, *, steps: int = 10, warmup: int = 2, rounds: int = 3, data_items: int = 256,
              data_source: str = "auto", peak: bool = True, peak_sizes: list[int] | None = None,
              profile_steps: int = 0, profile_rows: int = 25, data_decode: str | None = None,
              vs_eager: bool = False) -> dict[str, Any]:
    """Measure everything; returns the result dict (also what the JSON line holds). ``vs_eager`` (with
    ``train.compile``): every timed round of the compiled step is followed by one of the eager step on the same
    runner, so that both see the same machine state."""
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
    sync(device)
    flops = count_step_flops(runner.eager_step)
    res["flops_per_img"] = flops["total"] / t.batch_size
    res["flops_by_module"] = {k: v / t.batch_size for k, v in flops.items() if k != "total"}
    res["host_syncs_per_step"] = count_host_syncs(runner)
    per_round, eager_rounds = [], []
    for _ in range(max(1, rounds)):
        per_round.append(timeit(runner.run, device, 1, steps)[0])
        if vs_eager:
            eager_rounds.append(timeit(runner.eager_step, device, 1, steps)[0])
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


def _print_result(res: dict[str, Any], table: str, json_out: str | None) -> None:
    print(table)
    line = json.dumps(res, sort_keys=True)
    if json_out:
        Path(json_out).write_text(line + "\n")
    print(line)


def _run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, replaced = load_bench_config(args.config, list(args.overrides), args.teacher_recipe)
    if args.memory:
        if args.gpus < 1 or args.memory_batch < 1:
            raise ConfigError("bench --memory: --gpus and --memory-batch must be >= 1")
        res = memory_table(cfg, gpus=args.gpus, batch=args.memory_batch)
        _print_result(res, format_memory_table(res), args.json_out)
        return 0
    source = "jpeg" if replaced and args.data_source == "auto" else args.data_source
    try:
        res = run_bench(cfg, steps=args.steps, warmup=args.warmup, rounds=args.rounds, data_items=args.data_items,
                        data_source=source, peak=not args.no_peak,
                        peak_sizes=[int(n) for n in args.peak_sizes.split(",")] if args.peak_sizes else None,
                        profile_steps=args.profile,
                        profile_rows=args.profile_rows, data_decode=args.data_decode, vs_eager=args.vs_eager)
    except torch.OutOfMemoryError:

        raise out_of_memory_error(resolve_device(cfg.train.device), cfg.train.batch_size,
                                  cfg.train.accum_steps) from None
    prof = res.pop("profile", None)
    if prof:
        print(prof)
    _print_result(res, format_table(res), args.json_out)
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
    p.add_argument("--memory", action="store_true",
                   help="instead of timing: the memory per GPU of a ConMIM step for ViT-S/B/L/H/g (224 px, bf16) "
                        "under DDP and FSDP, with and without activation checkpointing (computed, not measured)")
    p.add_argument("--gpus", type=int, default=8, help="--memory: GPUs FSDP shards over (default 8)")
    p.add_argument("--memory-batch", type=int, default=64, help="--memory: images per GPU (default 64)")
    p.set_defaults(func=_run)
