"""``cmim export CKPT OUT [--format safetensors|hub|onnx]``: the pre-trained encoder for use without cmim.

``safetensors`` (default): ``OUT.safetensors`` holds exactly ``timm.create_model(name, **kwargs).state_dict()``
keys (no classifier head: the encoder was built with ``num_classes=0``), so ::

    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=OUT), **kwargs)

loads it without key surgery. ``name`` and ``kwargs`` are stored in the safetensors metadata (key "cmim", as
JSON) and in a ``OUT.json`` sidecar, together with the normalization the encoder was trained with.

``hub``: a folder in the layout of a timm model on the Hugging Face Hub (``config.json`` with the architecture,
its arguments and the preprocessing; ``model.safetensors``; a ``README.md`` model card), which timm opens by
itself: ``timm.create_model("local-dir:OUT", pretrained=True)``, or ``hf-hub:user/repo`` once uploaded.

``onnx``: ``OUT.onnx`` computing ``(tokens, embedding)`` = (``forward_features``, pooled features) for any
batch size, checked against PyTorch with onnxruntime before it is kept; ``OUT.onnx.json`` says how to
preprocess the images and where the weights came from.

:func:`load_encoder` opens any of the cmim-readable ones (and checkpoints) as a timm model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from cmim.core.errors import CheckpointError, ConfigError, first_line, load_error_detail
from cmim.core.io import atomic_path, atomic_write_text, default_file_mode
from cmim.eval.loading import EXPORT_META_KEY, HUB_WEIGHTS, EncoderSource, load_source
from cmim.eval.timm_model import build_timm_model
from cmim.models import MaskedEncoder
from cmim.models.stored_encoder import ENCODER_ROLES

__all__ = ["FORMATS", "add_parser", "export_encoder", "export_hub", "export_onnx", "load_encoder"]

log = logging.getLogger("cmim")

FORMATS = ("safetensors", "hub", "onnx")
# the exported model must reproduce the cmim encoder to this (relative to the largest output value); float32
# reorderings (fused vs. explicit attention, ONNX kernels) stay orders of magnitude below it
_TOLERANCE = 1e-4


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cmim")
    except PackageNotFoundError:
        return "unknown"


def _data_hints(src: EncoderSource) -> dict[str, Any]:
    """The run's data settings (normalization above all), minus its machine-specific root folder."""
    return {k: v for k, v in src.data.items() if k not in ("root", "num_workers")}


def _meta(src: EncoderSource, source: str | os.PathLike) -> dict[str, Any]:
    """What every export records about the encoder and where it came from."""
    enc = src.encoder
    return {
        "timm_name": enc.timm_name, "timm_kwargs": enc.timm_kwargs, "family": enc.family,
        "encoder": src.which, "method": src.method, "source": str(source), "source_sha256": src.sha256,
        "step": src.extra.get("step", src.extra.get("export", {}).get("step")), "data": _data_hints(src),
        "cmim_version": _version(),
    }


def pretrained_cfg_overlay(meta: dict[str, Any], file: str | None = None) -> dict[str, Any]:
    """timm ``pretrained_cfg_overlay`` matching an export: file, input size and normalization."""
    d, kw = meta.get("data", {}), meta["timm_kwargs"]
    size = int(kw.get("img_size", d.get("img_size", 224)))
    chans = int(kw.get("in_chans", d.get("in_chans", 3)))
    # no hub id / url: these weights exist only in the file, never on the hub under the architecture's tag
    overlay: dict[str, Any] = {"input_size": (chans, size, size), "hf_hub_id": None, "url": None,
                               "tag": "cmim", "num_classes": int(kw.get("num_classes", 0))}
    if "mean" in d and "std" in d:
        overlay.update(mean=tuple(d["mean"]), std=tuple(d["std"]))
    if "interpolation" in d:
        overlay["interpolation"] = d["interpolation"]
    if "eval_crop_pct" in d:
        overlay["crop_pct"] = float(d["eval_crop_pct"])
    if file is not None:
        overlay["file"] = str(file)
    return overlay


def _state(enc: MaskedEncoder) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in enc.backbone.state_dict().items()}


def export_encoder(ckpt: str | os.PathLike, out: str | os.PathLike, which: str = "teacher") -> dict[str, Any]:
    """Write a checkpoint's ``which`` encoder as ``out`` (.safetensors) + ``out.json``; return the meta."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"export target must end in .safetensors (--format hub writes a folder, --format "
                              f"onnx a .onnx file): {out}")
    src = load_source(ckpt, which)
    meta = _meta(src, ckpt)
    with atomic_path(out) as tmp:
        save_file(_state(src.encoder), str(tmp), metadata={"format": "pt", EXPORT_META_KEY: json.dumps(meta)})
    sidecar = dict(meta, pretrained_cfg_overlay=pretrained_cfg_overlay(meta, str(out)),
                   usage=(f"timm.create_model({meta['timm_name']!r}, pretrained=True, "
                          f"pretrained_cfg_overlay=dict(file={str(out)!r}), **timm_kwargs)"))
    atomic_write_text(out.with_suffix(".json"), json.dumps(sidecar, indent=2) + "\n")
    return meta


# --- helpers shared by the hub and ONNX formats ------------------------------------------------------------
@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A private folder beside ``target`` to build an export in; removed afterwards, whatever happens. Files are
    moved out of it with :func:`_publish` only once the export has been checked."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, dest: Path) -> None:
    """Flush ``tmp``, give it ordinary permissions (as ``open()`` would) and rename it over ``dest``."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, default_file_mode())
    os.replace(tmp, dest)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """timm's INFO lines about loading weights, the ONNX exporter's progress prints, its optimizer's log lines and
    warnings: none of them is news to someone exporting; failures still raise."""
    loggers = [logging.getLogger(n) for n in ("timm", "torch.onnx", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _probe(enc: MaskedEncoder, batch: int, seed: int = 0) -> Tensor:
    """A fixed random input of the encoder's shape (checks compare on the same numbers every time)."""
    size = enc.grid_size[0] * enc.patch_size
    chans = enc.backbone.patch_embed.proj.in_channels
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(seed))


def _pool_name(model: nn.Module) -> str | None:
    """cmim's name for the pooling a timm model's head applies (None: one cmim does not compute)."""
    return {"avg": "mean", "token": "cls"}.get(str(getattr(model, "global_pool", "")))


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _check_close(what: str, diff: float, ref: Tensor) -> None:
    tol = _TOLERANCE * max(1.0, float(ref.abs().max()))
    if not diff <= tol:
        raise CheckpointError(f"{what} (max abs diff {diff:.3g} > {tol:.3g}); nothing was written")


# --- Hub-style folder ------------------------------------------------------------------------------------
def _explicit_args(model: nn.Module) -> dict[str, Any]:
    """Architecture arguments timm would otherwise take from the registry entry's defaults, written out so
    that ``config.json`` alone says what the model is (and a change of defaults cannot alter it)."""
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(model, VisionTransformer):
        return {"class_token": model.cls_token is not None, "no_embed_class": bool(model.no_embed_class),
                "reg_tokens": int(model.num_reg_tokens),
                "pos_embed": "learn" if model.pos_embed is not None else "none", "dynamic_img_size": False}
    return {}


def _hub_data_config(data: dict[str, Any]) -> dict[str, Any]:
    """The eval preprocessing of the run, in timm's data-config terms (what ``resolve_data_config`` returns)."""
    cfg: dict[str, Any] = {"crop_mode": "center"}
    if "mean" in data and "std" in data:
        cfg.update(mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]))
    if data.get("interpolation"):
        cfg["interpolation"] = str(data["interpolation"])
    if data.get("eval_crop_pct") is not None:
        cfg["crop_pct"] = float(data["eval_crop_pct"])
    return cfg


def _write_hub_config(model: nn.Module, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` by timm's own writer (architecture, ``model_args``, ``pretrained_cfg``), then stripped of
    what describes the registry's weights rather than these (their tag and licence)."""
    from timm.models._hub import save_config_for_hf

    try:
        save_config_for_hf(model, str(path), model_config={"cmim": meta}, model_args=_explicit_args(model),
                           data_config=_hub_data_config(meta["data"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot express the {meta['timm_name']} encoder in a timm config.json: "
                              f"{first_line(e)}") from None
    cfg = json.loads(path.read_text(encoding="utf-8"))
    pre = cfg["pretrained_cfg"]
    pre.pop("license", None)  # the registry weights' licence, not this run's
    pre["tag"] = f"cmim_{meta['method'] or 'encoder'}"
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return cfg


def _run_records(src: EncoderSource) -> dict[str, Any]:
    """What the run recorded next to its checkpoint: ``summary.json`` and ``eval/*.json`` results."""
    if src.kind != "checkpoint":
        return {}
    run_dir = Path(src.path).resolve().parent
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        out["summary"] = json.loads((run_dir / "summary.json").read_text())
    results = []
    for p in sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []:
        try:
            r = json.loads(p.read_text())
            if isinstance(r, dict) and "protocol" in r and "top1" in r:
                results.append((p.name, r))
        except (OSError, ValueError):
            continue
    out["results"] = results
    return out


def model_card(meta: dict[str, Any], src: EncoderSource, folder: str | os.PathLike) -> str:
    """The folder's ``README.md``: what was trained on what, what the run measured, and how to load it."""
    d, kw = meta["data"], meta["timm_kwargs"]
    method = meta["method"] or "unknown method"
    cfg = src.config
    rec = _run_records(src)
    summary = rec.get("summary") or {}
    pool = {"avg": "mean of the patch tokens", "token": "CLS token"}.get(kw.get("global_pool"), kw.get("global_pool"))
    lines = ["---", "library_name: timm", "tags:", "- image-feature-extraction", "- timm", "- cmim",
             f"- {method}", "---", "",
             f"# {method} {meta['family']} encoder ({meta['timm_name']}, cmim)", "",
             f"Self-supervised pre-training with cmim ({method}); this is the run's "
             f"{meta['encoder']} encoder, a plain timm `{meta['timm_name']}` without a classifier head "
             f"(`num_classes=0`).", "", "## Training", ""]
    rows = [("method", method), ("encoder", meta["encoder"]),
            ("architecture", f"{meta['timm_name']}: embed_dim {kw.get('embed_dim')}, depth {kw.get('depth')}, "
                             f"heads {kw.get('num_heads')}, patch {kw.get('patch_size')}"),
            ("data", f"{d.get('name', '?')} (root {src.data.get('root') or 'default'})"),
            ("image size", f"{kw.get('img_size')} px, {kw.get('in_chans')} channel(s)"),
            ("normalization", f"mean {d.get('mean')}, std {d.get('std')}"),
            ("steps", f"{summary.get('steps', meta.get('step'))}"
                      + (f" of {summary['total_steps']}" if summary.get("total_steps") else ""))]
    if summary.get("epochs_done") is not None or cfg is not None:
        rows.append(("epochs", f"{summary.get('epochs_done', '?')}"
                               + (f" of {cfg.train.epochs}" if cfg is not None else "")))
    if cfg is not None:
        rows.append(("batch size", str(cfg.train.batch_size)))
        if cfg.model.pos_embed == "sincos":
            rows.append(("position embedding", "fixed 2-D sin-cos (MoCo v3), stored as the values of timm's "
                                               "`pos_embed`; freeze it when fine-tuning to keep it fixed"))
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    evals = []
    knn = summary.get("knn") or []
    if knn:
        last = knn[-1]
        evals.append(f"| online k-NN (training monitor) | {last.get('feature')} | {d.get('name', '?')} | "
                     f"{last['knn_top1']:.2f} | - |")
    if summary.get("knn_raw_pixels"):
        evals.append(f"| online k-NN on raw pixels (baseline) | pixels | {d.get('name', '?')} | "
                     f"{summary['knn_raw_pixels']['knn_top1']:.2f} | - |")
    for name, r in rec.get("results", []):
        f, ds = r.get("features", {}), r.get("dataset", {})
        init = "" if f.get("init", "pretrained") == "pretrained" else f" ({f.get('init')})"
        evals.append(f"| {r['protocol']}{init} (`eval/{name}`) | {f.get('feature')} | {ds.get('name')} | "
                     f"{r['top1']:.2f} | {r.get('top5', 0):.2f} |")
    lines += ["## Evaluation", ""]
    if evals:
        lines += ["| protocol | feature | dataset | top-1 | top-5 |", "|---|---|---|---|---|", *evals, ""]
    else:
        lines += ["No evaluation was recorded with the run (`cmim eval knn|linear|finetune CHECKPOINT`).", ""]
    lines += ["## How to load", "", "```python", "import timm", "import torch", "",
              f'model = timm.create_model("local-dir:{folder}", pretrained=True).eval()  '
              '# or "hf-hub:<user>/<repo>" once uploaded',
              "cfg = timm.data.resolve_data_config({}, model=model)  # the training normalization and eval crop",
              "transform = timm.data.create_transform(**cfg)",
              "with torch.no_grad():",
              "    tokens = model.forward_features(images)  # (B, 1 + patches, D), CLS first",
              f"    embedding = model(images)  # (B, D): {pool}", "```", "",
              f"With cmim: `cmim embed {folder} embeddings.npy --images DIR` writes one vector per image.", ""]
    return "\n".join(lines)


def _timm_twin(src: EncoderSource) -> nn.Module:
    """``src``'s encoder as a timm model built by the factory (which records its arguments for config.json)."""
    return build_timm_model(src).eval()


def export_hub(ckpt: str | os.PathLike, out: str | os.PathLike, which: str = "teacher") -> dict[str, Any]:
    """Write ``out/{config.json, model.safetensors, README.md}``, checked first: timm builds the model from that
    folder alone and it must give the cmim encoder's outputs; return the meta (with ``max_abs_diff``)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--format hub writes a folder, and {out} is a file")
    src = load_source(ckpt, which)
    meta = _meta(src, ckpt)
    model = _timm_twin(src)
    with _staging(out) as tmp:
        save_file(_state(src.encoder), str(tmp / HUB_WEIGHTS),
                  metadata={"format": "pt", EXPORT_META_KEY: json.dumps(meta)})
        _write_hub_config(model, tmp / "config.json", meta)
        (tmp / "README.md").write_text(model_card(meta, src, out), encoding="utf-8")
        try:
            with _quiet():
                rebuilt = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
        except Exception as e:  # noqa: BLE001 - whatever timm cannot rebuild is not exportable this way
            raise CheckpointError(f"cannot export the {meta['timm_name']} encoder as a Hub folder: timm does not "
                                  f"rebuild it from config.json ({load_error_detail(e)})") from None
        enc = src.encoder.eval()
        x = _probe(enc, 2)
        with torch.no_grad():
            ref = enc(x)
            diff = _max_diff(rebuilt.forward_features(x), ref)
            pool = _pool_name(rebuilt)
            if pool is not None:
                diff = max(diff, _max_diff(rebuilt(x), MaskedEncoder.pool(ref, pool)))
        _check_close(f"cannot export the {meta['timm_name']} encoder as a Hub folder: the model timm builds from "
                     "config.json does not reproduce it", diff, ref)
        out.mkdir(parents=True, exist_ok=True)
        for name in (HUB_WEIGHTS, "config.json", "README.md"):
            _publish(tmp / name, out / name)
    return dict(meta, max_abs_diff=diff)


# --- ONNX -----------------------------------------------------------------------------------------------
class _OnnxEncoder(nn.Module):
    """``images -> (tokens, embedding)``: timm's ``forward_features`` and its pooled, head-less output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        tokens = self.model.forward_features(images)
        return tokens, self.model.forward_head(tokens, pre_logits=True)


def _onnx_export(module: nn.Module, x: Tensor, path: Path) -> str:
    """Export with the torch.export-based exporter, else the TorchScript one; return which one worked."""
    names = dict(input_names=["images"], output_names=["tokens", "embedding"])
    big = sum(t.numel() * t.element_size() for t in module.state_dict().values()) > 1.8 * 2**30  # protobuf: 2 GiB
    try:
        with _quiet():
            torch.onnx.export(module, (x,), str(path), dynamo=True, external_data=big, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 16)},), **names)
        return "dynamo"
    except Exception as e:  # noqa: BLE001 - any failure of the new exporter: try the old one
        log.info("export: the dynamo ONNX exporter failed (%s); using the TorchScript exporter", first_line(e))
        for p in path.parent.iterdir():
            p.unlink()
    try:
        with _quiet():
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17, **names,
                              dynamic_axes={n: {0: "batch"} for n in ("images", "tokens", "embedding")})
    except Exception as e:  # noqa: BLE001 - neither exporter can express the model
        raise CheckpointError(f"cannot export the encoder to ONNX: {first_line(e)}") from None
    return "torchscript"


def export_onnx(ckpt: str | os.PathLike, out: str | os.PathLike, which: str = "teacher") -> dict[str, Any]:
    """Write ``out`` (.onnx; inputs ``images`` (B, C, H, W) normalized as in training; outputs ``tokens`` and
    ``embedding``) + ``out.onnx.json``, after onnxruntime reproduced PyTorch on two batch sizes; return the meta."""
    out = Path(out)
    if out.suffix != ".onnx":
        raise CheckpointError(f"--format onnx: the target must end in .onnx: {out}")
    try:
        import onnx  # noqa: F401 - the exporter needs it
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("--format onnx needs the onnx and onnxruntime packages: pip install 'cmim[onnx]'") from None
    src = load_source(ckpt, which)
    meta = _meta(src, ckpt)
    module = _OnnxEncoder(_timm_twin(src)).eval()
    with _staging(out) as tmp:
        target = tmp / out.name
        exporter = _onnx_export(module, _probe(src.encoder, 2), target)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(target), opts, providers=["CPUExecutionProvider"])
        diff, biggest = 0.0, torch.zeros(1)
        for batch in (1, 3):  # neither is the traced batch size: the batch axis really is dynamic
            x = _probe(src.encoder, batch, seed=batch)
            with torch.no_grad():
                ref = module(x)
            got = session.run(["tokens", "embedding"], {"images": x.numpy()})
            diff = max(diff, *(_max_diff(torch.from_numpy(g), r) for g, r in zip(got, ref)))
            biggest = torch.maximum(biggest, ref[0].abs().max().reshape(1))
        _check_close("the ONNX model does not reproduce the PyTorch encoder under onnxruntime", diff, biggest)
        for p in sorted(tmp.iterdir()):  # the model, and its external-data file when it has one
            _publish(p, out.parent / p.name)
    shape = ["batch", *_probe(src.encoder, 1).shape[1:]]
    meta = dict(meta, exporter=exporter, max_abs_diff=diff, inputs={"images": shape},
                outputs={"tokens": ["batch", "1 + patches", "embed_dim"], "embedding": ["batch", "embed_dim"]},
                pooling=str(getattr(module.model, "global_pool", "")),
                preprocessing=pretrained_cfg_overlay(meta))
    atomic_write_text(onnx_sidecar(out), json.dumps(meta, indent=2) + "\n")
    return meta


def onnx_sidecar(out: str | os.PathLike) -> Path:
    """``enc.onnx`` -> ``enc.onnx.json`` (not ``enc.json``: that is the sidecar of ``enc.safetensors``)."""
    return Path(f"{out}.json")


def load_encoder(path: str | os.PathLike, which: str = "teacher", **timm_kwargs: Any) -> nn.Module:
    """The pre-trained encoder as a timm model (eval mode), from an exported file or folder or a cmim checkpoint.

    Exports go through timm's own loader (``pretrained_cfg_overlay``, or ``local-dir:`` for a Hub folder), so
    the model also carries the right ``pretrained_cfg`` (input size, mean/std) for
    ``timm.data.resolve_data_config``. Extra keyword arguments reach ``timm.create_model`` (e.g.
    ``num_classes=10`` adds a fresh head).
    """
    src = load_source(path, which)
    if src.kind == "export" and "hub_dir" in src.extra:
        with _quiet():
            model = timm.create_model(f"local-dir:{src.extra['hub_dir']}", pretrained=True, **timm_kwargs)
    elif src.kind == "export":
        meta = src.extra["export"]
        model = timm.create_model(meta["timm_name"], pretrained=True,
                                  pretrained_cfg_overlay=pretrained_cfg_overlay(meta, str(path)),
                                  **{**meta["timm_kwargs"], **timm_kwargs})
    else:
        model = build_timm_model(src, **timm_kwargs)
    return model.eval()


# --- command line ---------------------------------------------------------------------------------------
def _run(args: argparse.Namespace) -> int:
    out = args.out
    if args.format == "hub":
        meta = export_hub(args.checkpoint, out, args.encoder)
        print(f"cmim export: {meta['method']} {meta['encoder']} encoder -> {out}/ (config.json, {HUB_WEIGHTS}, "
              f"README.md; timm rebuilds it, max abs diff {meta['max_abs_diff']:.2e}); load with "
              f"timm.create_model('local-dir:{out}', pretrained=True)")
        return 0
    if args.format == "onnx":
        meta = export_onnx(args.checkpoint, out, args.encoder)
        print(f"cmim export: {meta['method']} {meta['encoder']} encoder -> {out} ({meta['exporter']} exporter; "
              f"onnxruntime vs PyTorch max abs diff {meta['max_abs_diff']:.2e}; inputs 'images', outputs 'tokens', "
              f"'embedding'; preprocessing in {onnx_sidecar(out)})")
        return 0
    meta = export_encoder(args.checkpoint, out, args.encoder)
    n = sum(t.numel() for t in load_encoder(out).state_dict().values() if torch.is_tensor(t))
    print(f"cmim export: {meta['method']} {meta['encoder']} encoder -> {out} "
          f"({meta['timm_name']}, {n / 1e6:.2f}M params); load with "
          f"timm.create_model({meta['timm_name']!r}, pretrained=True, "
          f"pretrained_cfg_overlay=dict(file={out!r}), **kwargs) - kwargs in "
          f"{Path(out).with_suffix('.json')}")
    return 0


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="write a checkpoint's encoder for timm (safetensors, Hub folder) or ONNX",
                              description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="cmim checkpoint (checkpoint.pt), or an earlier export")
    p.add_argument("out", help="--format safetensors: OUT.safetensors (+ OUT.json); hub: a folder; onnx: OUT.onnx "
                               "(+ OUT.onnx.json)")
    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors (default): timm state dict + kwargs sidecar; hub: config.json + "
                        "model.safetensors + README.md that timm opens with 'local-dir:OUT' (and the Hub after "
                        "upload); onnx: tokens + pooled embedding, dynamic batch (needs cmim[onnx])")
    p.add_argument("--encoder", choices=ENCODER_ROLES, default="teacher",
                   help="which encoder (default: teacher, the EMA encoder used downstream)")
    p.set_defaults(func=_run)
