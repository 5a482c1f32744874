"""``cmim bench --memory``: the memory per GPU of a ConMIM step for ViT-S/B/L/H/g under DDP and FSDP, with and
without activation checkpointing. A plan, computed on this machine, not measured on a GPU.

How: each model's ConMIM method (student, EMA teacher, both projectors) is built here at its true width with
1 and 2 transformer blocks; parameters and activations both grow linearly with depth, so the two give any depth.
Activations are autograd's saved tensors under bf16 autocast with PyTorch's fused attention (what GPUs run),
fitted in the batch size by :func:`cmim.engine.memory.fit_activations`, the probe behind the trainer's memory
check. With activation checkpointing a block keeps only its input, and in backward one block's activations at a
time are rebuilt (added once). Weights, gradients, AdamW moments, the EMA teacher, FSDP's units in flight and
the activations are combined by :func:`cmim.engine.memory.device_memory`, the one rule.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

import torch
from omegaconf import DictConfig

from cmim.bench.step import synthetic_batches
from cmim.core.distributed import DistInfo
from cmim.engine.memory import StepMemory, device_memory, fit_activations
from cmim.engine.run import build_run
from cmim.models import MaskedEncoder
from cmim.models.encoder import PRESETS

__all__ = ["MODELS", "format_memory_table", "memory_table"]

#: The table's models at 224 px: S/B/L as cmim's presets, H/14 and g/14 as timm's vit_huge_patch14_224 and
#: vit_giant_patch14_224 (width, depth, heads, MLP ratio, patch).
MODELS: dict[str, dict[str, Any]] = {
    "ViT-S/16": {"size": "small", "patch_size": 16},
    "ViT-B/16": {"size": "base", "patch_size": 16},
    "ViT-L/16": {"size": "large", "patch_size": 16},
    "ViT-H/14": {"size": "large", "embed_dim": 1280, "depth": 32, "num_heads": 16, "patch_size": 14},
    "ViT-g/14": {"size": "large", "embed_dim": 1408, "depth": 40, "num_heads": 16, "mlp_ratio": 48 / 11,
                 "patch_size": 14},
}
IMG_SIZE = 224
_GIB = 2**30


def _depth(model: dict[str, Any]) -> int:
    return int(model.get("depth") or PRESETS[model["size"]][1])


def _probe(cfg: DictConfig, model: dict[str, Any], depth: int, checkpointing: bool
           ) -> tuple[StepMemory, int, int, int]:
    """(activations, trained parameters, frozen parameters, parameters of one block) of ``depth`` blocks."""
    c = copy.deepcopy(cfg)
    c.method = "conmim"
    for k, v in {**model, "depth": depth, "drop_path": 0.0, "init_from": None}.items():
        c.model[k] = v
    c.data.img_size, c.data.in_chans, c.data.mean, c.data.std = IMG_SIZE, 3, [0.5] * 3, [0.25] * 3
    c.train.precision, c.train.grad_checkpointing, c.train.compile = "bf16", checkpointing, False
    run = build_run(c, DistInfo(), data=False, total_steps=1)
    method = run.method
    for m in method.modules():  # the fused (flash) attention kernel a GPU runs, which keeps no N x N scores
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = True
    acts = fit_activations(method, lambda n: synthetic_batches(c, method, n, 1)[0],
                           lambda b: run.train_step.forward(b, method), torch.device("cpu"))
    trained = sum(p.numel() for p in method.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in method.parameters() if not p.requires_grad)
    student = method.encoder("student")
    assert isinstance(student, MaskedEncoder)
    block = sum(p.numel() for p in student.backbone.blocks[0].parameters())
    return acts, trained, frozen, block


def _at_depth(one: StepMemory, two: StepMemory, depth: int, extra: StepMemory | None = None) -> StepMemory:
    """Activations of ``depth`` blocks from those of 1 and 2 (linear in depth), plus ``extra`` once."""
    fields = ("constant", "linear", "quadratic")
    out = {f: getattr(one, f) + (depth - 1) * (getattr(two, f) - getattr(one, f)) for f in fields}
    if extra is not None:
        out = {f: out[f] + getattr(extra, f) for f in fields}
    return StepMemory(out["constant"], out["linear"], out["quadratic"], 0.0, one.data_per_image)


def memory_table(cfg: DictConfig, *, gpus: int = 8, batch: int = 64,
                 models: list[str] | None = None) -> dict[str, Any]:
    """Per model: parameter counts and the per-GPU memory (bytes, by kind) of DDP and FSDP over ``gpus``, each
    with and without activation checkpointing, at ``batch`` images per GPU."""
    rows = []
    for name in models or list(MODELS):
        model, depth = MODELS[name], _depth(MODELS[name])
        (a1, t1, f1, block), (a2, t2, f2, _) = (_probe(cfg, model, d, False) for d in (1, 2))
        (c1, *_), (c2, *_) = (_probe(cfg, model, d, True) for d in (1, 2))
        trained, frozen = t1 + (depth - 1) * (t2 - t1), f1 + (depth - 1) * (f2 - f1)
        plain = _at_depth(a1, a2, depth)
        one_block = StepMemory(*(getattr(a2, f) - getattr(a1, f) for f in ("constant", "linear", "quadratic")),
                               0.0, 0.0)
        ckpt = _at_depth(c1, c2, depth, extra=one_block)
        cells = {}
        for strategy, shards in (("ddp", 1), ("fsdp", gpus)):
            for ac, acts in (("", plain), ("+ac", ckpt)):
                cells[strategy + ac] = asdict(device_memory(trained, frozen, block, acts, batch, shards=shards))
                cells[strategy + ac]["total"] = sum(cells[strategy + ac].values())
        rows.append({"model": name, "depth": depth, "trained_params": trained, "teacher_params": frozen,
                     "block_params": block, "memory": cells})
    return {"gpus": gpus, "batch_per_gpu": batch, "img_size": IMG_SIZE, "precision": "bf16", "rows": rows}


def format_memory_table(res: dict[str, Any]) -> str:
    """Markdown: one row per model, GiB per GPU."""
    n = res["gpus"]
    head = (f"| model | params (trained + EMA teacher) | DDP | DDP + act. ckpt | FSDP x{n} | FSDP x{n} + act. ckpt |\n"
            "|---|---|---|---|---|---|")
    lines = [head]
    for r in res["rows"]:
        m = r["memory"]
        cells = " | ".join(f"{m[k]['total'] / _GIB:.1f} GiB" for k in ("ddp", "ddp+ac", "fsdp", "fsdp+ac"))
        lines.append(f"| {r['model']} | {r['trained_params'] / 1e6:.0f} M + {r['teacher_params'] / 1e6:.0f} M | "
                     f"{cells} |")
    return "\n".join(lines)
