"""The per-instance forward patch behind every family's ``apply_pruner`` / ``remove_pruner`` (the family-agnostic half).

``install_pruner`` swaps ONE model instance's inner model class (a LlavaModel, ...) for a subclass with the family's
mixin in front of it, remembering the original; ``uninstall_pruner`` swaps it back. No class, module or function is
patched globally: other instances of the same class stay stock. The family's mixin owns the forward (its signature and
output type are the family's); between its pruned prefill and the decode steps that follow, a ``PrunerSession`` per
cache (weakly keyed, so it dies with the cache) holds what generate's bookkeeping needs, and ``session_decode``
continues such a cache through the shared ``decoder.decode_step``.

Shapes as in ``decoder.py``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import PrunerConfig
from .decoder import KVCache, PrunedPrefill, decode_step


@dataclass(frozen=True)
class PrunerSession:
    """Per-cache state between the pruned prefill and the decode steps that follow it."""

    prompt_length: int  # T: entries the full-prompt layers cached at prefill
    kept_valid: torch.Tensor  # [B, T'] non-padding mask of the pruned prompt
    position_shift: int  # generate counts positions over the full prompt; K = 0 continues at T', i.e. N - R fewer
    split_layer: int


def open_session(
    sessions: "weakref.WeakKeyDictionary[Any, PrunerSession]", cache: Any, result: PrunedPrefill, prompt_length: int,
    n_image: int, original_positions: bool = False,
) -> None:
    """Remember the pruned prefill that filled ``cache`` so the decode calls on it continue it
    (``original_positions`` as given to ``prune_and_prefill``: positions then continue unshifted at K = 0 too)."""
    budget = result.selection.indices.shape[1]
    sessions[cache] = PrunerSession(
        prompt_length=prompt_length,
        kept_valid=result.kept_valid,
        position_shift=(n_image - budget) if result.split_layer == 0 and not original_positions else 0,
        split_layer=result.split_layer,
    )


def session_decode(
    language_model: nn.Module,
    session: PrunerSession,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: KVCache,
) -> torch.Tensor:
    """One generate decode call on a session's cache: embeds [B, S, D] -> final-norm hidden [B, S, D].

    position_ids [B, S] (M-RoPE: [3, B, S]) as generate counts them (over the full prompt) or None; attention_mask
    [B, T + generated so far + S] as generate keeps it (the full prompt's), or None.
    """
    batch, length, _ = embeds.shape
    if position_ids is None:  # layer 0's cache length: full prompt for K >= 1, pruned (= consecutive) for K = 0
        positions = cache.get_seq_length(0) + torch.arange(length, device=embeds.device)[None].expand(batch, -1)
    else:
        positions = position_ids.long().expand(*position_ids.shape[:-2], batch, length) - session.position_shift
    key_valid_full = key_valid_pruned = None
    if attention_mask is not None:
        valid = attention_mask.bool()  # [B, T + generated so far], as generate keeps it
        last_layer = len(language_model.layers) - 1  # always a pruned layer: T' + generated entries
        generated = cache.get_seq_length(last_layer) - session.kept_valid.shape[1]
        expected = session.prompt_length + generated + length
        if valid.shape[1] != expected:
            raise ValueError(
                f"attention_mask has {valid.shape[1]} entries, expected {expected} (the full prompt, everything "
                "generated so far and the new tokens); pass the mask generate keeps"
            )
        key_valid_full = valid
        key_valid_pruned = torch.cat([session.kept_valid, valid[:, session.prompt_length :]], dim=1)
    return decode_step(language_model, embeds, positions, cache, session.split_layer, key_valid_full, key_valid_pruned)


_PATCHED_CLASSES: dict[tuple[type, type], type] = {}


def patched_class(mixin: type, original: type) -> type:
    """The subclass ``Pruned<Original>`` with ``mixin`` in front, made once per (mixin, original)."""
    patched = _PATCHED_CLASSES.get((mixin, original))
    if patched is None:
        patched = type(f"Pruned{original.__name__}", (mixin, original), {})
        _PATCHED_CLASSES[(mixin, original)] = patched
    return patched


def install_pruner(inner: nn.Module, mixin: type, config: PrunerConfig) -> None:
    """Route this instance through ``mixin`` with ``config`` (again: the config is replaced, sessions dropped)."""
    if not isinstance(inner, mixin):
        original = type(inner)
        inner.__class__ = patched_class(mixin, original)
        inner._pruner_original_class = original
    inner._pruner_config = config
    inner._pruner_sessions = weakref.WeakKeyDictionary()


def uninstall_pruner(inner: nn.Module, mixin: type) -> None:
    """Restore this instance's original class exactly (a no-op if ``mixin`` is not installed)."""
    if isinstance(inner, mixin):
        inner.__class__ = inner._pruner_original_class
        for name in ("_pruner_config", "_pruner_original_class", "_pruner_sessions"):
            inner.__dict__.pop(name, None)


def installed_config(inner: nn.Module, mixin: type) -> PrunerConfig | None:
    """The PrunerConfig ``install_pruner`` gave this instance, or None."""
    return inner._pruner_config if isinstance(inner, mixin) else None
