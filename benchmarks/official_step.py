"""cmim's ConMIM training step against the official code's, interleaved in one process (issue #14).

The official side is TencentARC/ConMIM's own model code (``modeling_pretrain.py``: its BEiT ViT with the
projectors) driven by the body of its ``engine_for_pretraining.train_one_epoch``: EMA-teacher forward without
gradients, student forward, L2 normalization, per-image patch logits over the masked positions, cross-entropy,
backward, gradient clipping, AdamW (``torch.optim.AdamW`` with the no-weight-decay groups, as its
``optim_factory`` builds), and its per-parameter EMA loop. Both sides compute in the precision the recipe
resolves to on this CPU (``cmim.core.precision``): bf16 autocast where the CPU has native bf16, fp32 where it has
not, so that neither side runs emulated bf16 (the reference's CUDA fp16 AMP has no CPU counterpart; its
``loss.item()`` per step is kept). The cmim side is ``cmim bench``'s
:class:`~cmim.bench.StepRunner`, i.e. the trainer's step, including the on-device augmentation the reference does
in its loader workers. Same model (ViT-S/16 ConMIM, shared relative position bias, layer scale 0.1, projector
384-4096-4096-256), same batch, same masks (75 of 196 patches), so the same FLOPs per image.

Rounds alternate official, cmim, official, cmim, ... so both see the same machine state; each round times
``--steps`` steps after ``--warmup`` untimed ones. Both steps' model FLOPs are counted (``FlopCounterMode``, as
``cmim bench`` does) and the matmul peak is measured before and after the rounds, so the output also says how
close each side is to the hardware, and what MFU x1.3 the official step would take (issue #14's target).
The official repository is not part of cmim; clone it anywhere:

    git clone https://github.com/TencentARC/ConMIM /tmp/ConMIM
    python benchmarks/official_step.py --official /tmp/ConMIM --batch 16 --rounds 5 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from cmim.bench import CPU_PEAK_SIZES, StepRunner, count_step_flops, load_bench_config, matmul_peak
from cmim.core.precision import autocast, resolve_precision


def official_model(official: str) -> nn.Module:
    """The reference's ViT-S/16 ConMIM network as its run script creates it (rel. pos. bias shared, no absolute
    position embedding, layer scale 0.1, drop path 0, projectors on)."""
    sys.path.insert(0, official)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecated import paths and re-registered model names
        import modeling_pretrain  # type: ignore[import-not-found]
    return modeling_pretrain.VisionTransformerForMaskedImageModeling(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), vocab_size=8192, drop_path_rate=0.0,
        use_shared_rel_pos_bias=True, use_abs_pos_emb=False, init_values=0.1, use_mlp_projectors=True,
        use_lm_head=True)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """optim_factory's rule: no weight decay for 1-D parameters, biases and the model's no_weight_decay()."""
    skip = set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim == 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class OfficialStep:
    def __init__(self, official: str, batch: int, masks: torch.Tensor, precision: str, temperature: float = 0.1,
                 clip: float = 3.0, lr: float = 1.5e-3 * 16 / 2048) -> None:
        torch.manual_seed(0)
        self.precision = precision
        self.model = official_model(official).train()
        self.teacher = copy.deepcopy(self.model).train()  # the reference's model_copy: a train-mode copy
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, 0.05), lr=lr, betas=(0.9, 0.98))
        self.samples = torch.randn(batch, 3, 224, 224)
        self.samples_aug = torch.randn(batch, 3, 224, 224)
        self.mask = masks[:batch].flatten(1).bool()
        self.temperature, self.clip, self.m = temperature, clip, 0.996

    def run(self) -> float:
        mask, bs = self.mask, self.mask.shape[0]
        zero = torch.zeros_like(mask)
        labels = torch.arange(mask.shape[1]).unsqueeze(0).expand(bs, -1)[mask]
        with autocast("cpu", self.precision):
            with torch.no_grad():
                feat_full = self.teacher(self.samples_aug, bool_masked_pos=zero, return_all_tokens=True,
                                         only_return_before_head=True, use_mlp_projectors=True)
            feat = self.model(self.samples, bool_masked_pos=mask, return_all_tokens=True,
                              only_return_before_head=True, use_mlp_projectors=True)
            feat_full = F.normalize(feat_full, p=2, dim=-1)
            feat = F.normalize(feat, p=2, dim=-1)
            logits = torch.matmul(feat, feat_full.permute(0, 2, 1)) / self.temperature
            loss = nn.CrossEntropyLoss()(logits[mask], labels)
        value = loss.item()
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        with torch.no_grad():  # the reference's EMA: matched by name, one parameter at a time
            q = dict(self.model.named_parameters())
            k = dict(self.teacher.named_parameters())
            for name in set(q) & set(k):
                k[name].data.mul_(self.m).add_((1 - self.m) * q[name].detach().data)
        return value


PROFILED_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::copy_", "aten::gelu", "aten::_softmax",
                "aten::native_batch_norm", "aten::threshold_backward", "aten::add")


def profile_steps(sides: dict, count: int) -> None:
    """``count`` profiled steps per side, alternating, each printed as its wall time and the self CPU time of
    the ops that dominate the step (the GEMMs, then the elementwise work around them)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(count):
        for name, fn in sides.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                seconds = timed(fn, 1)
            ms = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
            gemm = sum(ms.get(k, 0.0) for k in PROFILED_OPS[:3]) / 1e3
            print(f"profile {name}: {seconds:.2f} s, GEMMs {gemm:.2f} s ({100 * gemm / seconds:.0f}%); "
                  + ", ".join(f"{k[6:]} {ms.get(k, 0.0):.0f} ms" for k in PROFILED_OPS), flush=True)


def timed(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help="a checkout of TencentARC/ConMIM")
    ap.add_argument("--config", default="configs/conmim_vit_small_in1k.yaml")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed rounds, profile N steps per side, alternating")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the cmim recipe (e.g. train.compile=true)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, _ = load_bench_config(args.config, [f"train.batch_size={args.batch}", "train.device=cpu",
                                             "train.check_memory=false", *args.overrides])
    ours = StepRunner(cfg, torch.device("cpu"))
    masks = ours.batches[0]["mask"].cpu()  # the same block masks for both sides
    precision = resolve_precision(str(cfg.train.precision), "cpu")
    theirs = OfficialStep(args.official, args.batch, masks, precision, clip=float(cfg.optim.clip_grad))
    n_ours = sum(p.numel() for p in ours.method.parameters() if p.requires_grad)
    n_theirs = sum(p.numel() for p in theirs.model.parameters() if p.requires_grad)
    print(f"trainable parameters: cmim {n_ours / 1e6:.2f} M, official {n_theirs / 1e6:.2f} M; "
          f"batch {args.batch}, {int(masks.sum()) // masks.shape[0]} of {masks.shape[1]} patches masked; "
          f"{torch.get_num_threads()} threads, {precision} on both sides", flush=True)
    for _ in range(args.warmup):
        theirs.run()
        ours.run()
    # Both steps' FLOPs counted the same way (model work only; cmim's on-device augmentation is left out), and
    # the matmul peak of this precision before and after the rounds: how far from the hardware each side is.
    flops = {"official": count_step_flops(theirs.run)["total"] / args.batch,
             "cmim": count_step_flops(ours.eager_step)["total"] / args.batch}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peaks = [matmul_peak(torch.device("cpu"), dtype, CPU_PEAK_SIZES)["flops"]]
    rows = {"official": [], "cmim": []}
    for r in range(args.rounds):
        rows["official"].append(args.batch / timed(theirs.run, args.steps))
        rows["cmim"].append(args.batch / timed(ours.run, args.steps))
        print(f"round {r + 1}: official {rows['official'][-1]:.2f} img/s, cmim {rows['cmim'][-1]:.2f} img/s",
              flush=True)
    peaks.append(matmul_peak(torch.device("cpu"), dtype, CPU_PEAK_SIZES)["flops"])
    peak = max(peaks)
    best = {k: max(v) for k, v in rows.items()}
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio_best, ratio_med = best["cmim"] / best["official"], med["cmim"] / med["official"]
    mfu = {k: best[k] * flops[k] / peak for k in rows}
    print(f"best: official {best['official']:.2f}, cmim {best['cmim']:.2f} img/s (x{ratio_best:.2f}); "
          f"median: official {med['official']:.2f}, cmim {med['cmim']:.2f} img/s (x{ratio_med:.2f})")
    print(f"counted model FLOPs per image: official {flops['official'] / 1e9:.2f} G, cmim {flops['cmim'] / 1e9:.2f} G; "
          f"{precision} matmul peak {peak / 1e9:.0f} GFLOP/s; MFU at the best round: official "
          f"{100 * mfu['official']:.1f}%, cmim {100 * mfu['cmim']:.1f}%; x1.3 the official step needs "
          f"{130 * mfu['official']:.1f}% of the peak")
    print(json.dumps({"batch": args.batch, "threads": torch.get_num_threads(), "precision": precision,
                      "overrides": args.overrides, "official_img_per_s": rows["official"],
                      "cmim_img_per_s": rows["cmim"], "ratio_best": ratio_best, "ratio_median": ratio_med,
                      "flops_per_img": flops, "peak_flops": peak, "mfu_best": mfu}))
    if args.profile:
        profile_steps({"official": theirs.run, "cmim": ours.run}, args.profile)


if __name__ == "__main__":
    main()
