"""Reading the official METER Lightning checkpoints (``meter_clip16_288_roberta_{coco,flickr}.ckpt``).

``read_checkpoint(path)`` -> ``(state_dict, hyper_parameters)``: ``torch.load(weights_only=True)``, then
``ckpt["state_dict"]`` (a bare state dict is accepted too). ``config_from_checkpoint`` derives a
``METERConfig`` from the tensor shapes (vision width / patch / blocks, text tower sizes, fusion width /
depth) and ``hyper_parameters["config"]`` when present (``image_size``, ``max_text_len``, ``tokenizer``,
``num_heads``). ``load_state_into(model, state_dict)`` interpolates the positional table to the model's
grid, drops the known leftovers (:data:`KNOWN_LEFTOVERS`) and raises :class:`CheckpointError` naming any
other missing or unexpected key, or any shape mismatch.
"""
from __future__ import annotations

import math
import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .clip_vit import interpolate_pos_embed
from .meter_config import BERT_BASE, ROBERTA_BASE, METERConfig

__all__ = ["CheckpointError", "KNOWN_LEFTOVERS", "config_from_checkpoint", "load_state_into", "read_checkpoint"]

POS_KEY = "vit_model.visual.positional_embedding"

#: keys of the official checkpoints that this re-implementation does not build (unused at inference)
KNOWN_LEFTOVERS = (
    r"vit_model\.token_embedding\.weight",  # CLIP text tower leftovers (removed from METER's code later)
    r"vit_model\.positional_embedding",
    r"vit_model\.ln_final\..*",
    r"text_transformer\.embeddings\.position_ids",  # a persistent buffer in transformers 4.6
    r"text_transformer\.embeddings\.token_type_ids",
    r"text_transformer\.pooler\..*",  # RoBERTa's own pooler: METER never uses it
    r"mlm_score\..*",  # pre-training heads
)
_LEFTOVER_RE = re.compile("|".join(f"(?:{p})" for p in KNOWN_LEFTOVERS))


class CheckpointError(RuntimeError):
    """A checkpoint that does not fit the model: names the missing / unexpected / mis-shaped keys."""


def _listing(keys: List[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def read_checkpoint(path: str | Path, trusted: bool = False, family: str = "METER"
                    ) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """``(state_dict, hyper_parameters)`` of a Lightning ``.ckpt`` (or a bare state dict / safetensors file).

    Loads with ``weights_only=True``; a file that pickles other Python objects (the released Lightning files:
    callback classes, ``AttributeDict``, ``Namespace``) is read again by :mod:`teachers.safe_pickle`, where those
    objects stay inert placeholders and hyper-parameters read back as plain dicts; a file that tries to call
    anything is refused with a ``CheckpointError`` and nothing in it runs. ``trusted=True`` unpickles in full
    (``weights_only=False``: only for files you trust). ``family`` names the teacher in the messages (the ViLT
    loader reads its ``.ckpt`` files here too).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{family} checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError:
        from . import safe_pickle

        try:
            obj = safe_pickle.plain(safe_pickle.load(path))
        except safe_pickle.UnsafePickle as err:
            raise CheckpointError(
                f"{family} checkpoint {path} was refused: {err}; nothing in it was run. A released checkpoint never "
                f"does that: if you wrote this file yourself and trust it, load it with trusted=True "
                f"(create_teacher('{family.lower()}', checkpoint=..., trusted=True))"
            ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or a state dict")
    hparams: Dict[str, Any] = {}
    if "state_dict" in obj:
        state = obj["state_dict"]
        hp = obj.get("hyper_parameters")
        if isinstance(hp, Mapping):
            hparams = dict(hp)
    else:
        state = obj
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a mapping of parameter names to tensors")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from a DataParallel wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, hparams


def _hp_config(hparams: Mapping[str, Any]) -> Dict[str, Any]:
    cfg = hparams.get("config", hparams)
    return dict(cfg) if isinstance(cfg, Mapping) else {}


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state for m in [rx.match(k)] if m})


def config_from_checkpoint(state: Mapping[str, Tensor], hparams: Optional[Mapping[str, Any]] = None,
                           base: Optional[METERConfig] = None, **overrides) -> METERConfig:
    """A ``METERConfig`` that fits ``state``: sizes from tensor shapes, the rest from ``hparams`` / ``base``.

    Precedence for ``image_size``: ``overrides`` > ``hyper_parameters.config.image_size`` > the stored
    positional grid x patch size. Head counts are not visible in shapes: ``hparams`` ``num_heads`` for the
    fusion layers, else ``base``'s when the width matches ``base``, else width / 64 (CLIP's rule).
    """
    base = base or METERConfig.preset("base")
    hp = _hp_config(hparams or {})
    if "swin" in str(hp.get("vit", "")).lower():
        raise CheckpointError(f"METER with a Swin image tower ({hp['vit']}) is not supported; use a CLIP-ViT checkpoint")
    cfg = base.to_dict()
    try:
        conv = state["vit_model.visual.conv1.weight"]
        pos = state[POS_KEY]
        tt = state["cross_modal_text_transform.weight"]
        word = state["text_transformer.embeddings.word_embeddings.weight"]
    except KeyError as err:
        raise CheckpointError(f"not a METER (CLIP-ViT) checkpoint: no {err.args[0]!r} entry") from None
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = math.isqrt(int(pos.shape[-2]) - 1)
    heads = base.vision_heads if width == base.vision_width else max(1, width // 64)  # CLIP: 64 per head
    cfg.update(vision_width=width, patch_size=patch, vision_heads=heads,
               vision_layers=_count(state, r"vit_model\.visual\.transformer\.resblocks\.(\d+)\."),
               vision_position_init="default")  # the checkpoint holds the table: how a fresh one starts is moot
    c_fc = state.get("vit_model.visual.transformer.resblocks.0.mlp.c_fc.weight")
    if c_fc is not None:
        cfg["vision_mlp_ratio"] = c_fc.shape[0] / width
    hidden = int(tt.shape[0])
    cfg.update(hidden_size=hidden, num_fusion_layers=_count(state, r"cross_modal_text_layers\.(\d+)\."))
    inter = state.get("cross_modal_text_layers.0.intermediate.dense.weight")
    if inter is not None:
        cfg["intermediate_size"] = int(inter.shape[0])
    cfg["num_heads"] = int(hp.get("num_heads", cfg["num_heads"] if hidden == base.hidden_size else max(1, hidden // 64)))
    cfg["max_text_len"] = int(hp.get("max_text_len", cfg["max_text_len"]))
    if "drop_rate" in hp:
        cfg["hidden_dropout_prob"] = cfg["attention_probs_dropout_prob"] = float(hp["drop_rate"])
    cfg["image_size"] = int(hp.get("image_size", grid * patch))

    # ---- text tower
    tokenizer = str(hp.get("tokenizer", cfg["tokenizer"]))
    vocab, text_hidden = int(word.shape[0]), int(word.shape[1])
    if "roberta" in tokenizer.lower() or (not hp and vocab == ROBERTA_BASE["vocab_size"]):
        text = dict(ROBERTA_BASE)
    elif hp and "bert" in tokenizer.lower():
        text = dict(BERT_BASE)
    else:
        text = dict(base.text_config)
    if tokenizer != cfg["tokenizer"] and hp:
        cfg["tokenizer"] = tokenizer
    text.update(vocab_size=vocab, hidden_size=text_hidden,
                num_hidden_layers=_count(state, r"text_transformer\.encoder\.layer\.(\d+)\."))
    if text_hidden != int(base.text_config.get("hidden_size", -1)) or "num_attention_heads" not in text:
        text["num_attention_heads"] = max(1, text_hidden // 64)
    for key, field_name in (("text_transformer.embeddings.position_embeddings.weight", "max_position_embeddings"),
                            ("text_transformer.embeddings.token_type_embeddings.weight", "type_vocab_size"),
                            ("text_transformer.encoder.layer.0.intermediate.dense.weight", "intermediate_size")):
        if key in state:
            text[field_name] = int(state[key].shape[0])
    cfg["text_config"] = text
    cfg.update(overrides)
    return METERConfig.from_dict(cfg)


def load_state_into(model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint",
                    assign: bool = False) -> Dict[str, List[str]]:
    """Load an official-format state dict into ``model`` (a ``METER``); strict up to the known leftovers.

    ``assign=True`` is for a model built on the ``meta`` device: the (dtype-converted) checkpoint tensors
    become the parameters, and the text tower's non-persistent buffers (``position_ids``,
    ``token_type_ids``) are materialised on the CPU.
    Returns ``{"ignored": [...leftover keys...], "interpolated": [...]}``. Raises ``CheckpointError`` naming
    the first ~10 missing / unexpected / mis-shaped keys.
    """
    target = model.state_dict()
    state = dict(state)
    report: Dict[str, List[str]] = {"ignored": [], "interpolated": []}
    if POS_KEY in state and POS_KEY in target and state[POS_KEY].shape != target[POS_KEY].shape:
        try:
            state[POS_KEY] = interpolate_pos_embed(state[POS_KEY], target[POS_KEY].shape[-2])
        except ValueError as err:
            raise CheckpointError(f"{source}: {POS_KEY}: {err}") from None
        report["interpolated"].append(POS_KEY)
    unexpected = [k for k in state if k not in target]
    report["ignored"] = [k for k in unexpected if _LEFTOVER_RE.fullmatch(k)]
    unexpected = [k for k in unexpected if not _LEFTOVER_RE.fullmatch(k)]
    missing = [k for k in target if k not in state]
    mismatched = [f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(target[k].shape)})"
                  for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
        raise CheckpointError(f"{source} does not fit this METER: " + "; ".join(parts))
    for key in report["ignored"]:
        del state[key]
    if assign:
        state = {k: v.to(target[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
        # METER's rank_output is a view of itm_score.fc in the released files: never let parameters share storage
        seen: Dict[int, int] = {}
        for v in state.values():
            ptr = v.untyped_storage().data_ptr()
            seen[ptr] = seen.get(ptr, 0) + 1
        state = {k: v.clone() if seen[v.untyped_storage().data_ptr()] > 1 or not v.is_contiguous() else v
                 for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)
    if assign:
        materialize_meta_buffers(model)
    return report


def materialize_meta_buffers(model: nn.Module) -> None:
    """Fill the meta buffers that no state dict holds: the text tower's ``position_ids`` / ``token_type_ids``."""
    for module_name, module in model.named_modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if name == "position_ids":
                module._buffers[name] = torch.arange(buf.shape[-1], dtype=buf.dtype).expand(buf.shape)
            elif name == "token_type_ids":
                module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype)
            else:
                raise CheckpointError(f"cannot materialise the buffer {module_name}.{name}: it is not in the checkpoint")
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"parameters left uninitialised after loading: {_listing(left)}")
