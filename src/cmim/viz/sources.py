"""The encoders a picture shows side by side, opened with one eval config, and the names of the panels; shared by
``cmim viz`` and ``cmim report``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from cmim.core.errors import ConfigError
from cmim.eval.loading import EncoderSource, load_source, random_init_like
from cmim.eval.run import open_source
from cmim.models.stored_encoder import ENCODER_ROLES

__all__ = ["class_names", "load_sources", "source_label"]


def source_label(src: EncoderSource) -> str:
    if src.init != "pretrained":
        return "random init"
    run = Path(src.path).resolve().parent.name
    return f"{src.method or 'encoder'} {src.which} ({run})"


def _path_and_encoder(spec: str) -> tuple[str, str | None]:
    """``PATH`` or ``PATH@teacher`` / ``PATH@student``: one panel per spec, so a run's two encoders can sit
    side by side."""
    path, sep, which = spec.rpartition("@")
    if sep and which in ENCODER_ROLES:
        return path, which
    return spec, None


def load_sources(paths: list[str], recipe: str | None, overrides: list[str], random_init: bool,
                 labels: list[str] | None = None) -> tuple[list[tuple[str, EncoderSource]], DictConfig]:
    """Open every path with one eval config (taken from the first): [(label, source)], config."""
    if not paths:
        raise ConfigError("give at least one checkpoint")
    specs = [_path_and_encoder(p) for p in paths]
    first_over = [o for o in overrides if not o.startswith("init=")]
    if specs[0][1]:
        first_over.append(f"encoder={specs[0][1]}")
    first, cfg = open_source(specs[0][0], recipe, first_over)
    sources = [first] + [load_source(p, w or cfg.encoder) for p, w in specs[1:]]
    if random_init:
        sources = [random_init_like(first, cfg.seed)] + sources
    names = [source_label(s) for s in sources]
    if labels:
        if len(labels) != len(sources):
            raise ConfigError(f"--labels: {len(labels)} labels for {len(sources)} panels")
        names = labels
    return list(zip(names, sources)), cfg


def class_names(cfg: DictConfig) -> list[str]:
    """The eval split's class names (empty when the data has none or cannot be read)."""
    from cmim.data.factory import build_base_dataset

    try:
        return list(build_base_dataset(cfg.data, str(cfg.data.eval_split)).classes)
    except (ValueError, OSError):
        return []
