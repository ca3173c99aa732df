"""What `OptimizedModel.forward` takes besides the model inputs: checked like generate's options.

The original forward's own arguments are served (the family's vision and merge code runs on
them), and so are `logits_to_keep` and `labels` (the loss through the family's own
`loss_function`: shifted cross-entropy, -100 ignored). With token pruning the logits cover the
kept rows only; positions and labels are mapped to those rows, and whatever falls on a dropped
row is refused, naming it. What the graph cannot give (attention maps, hidden states, a cache
to continue) and keywords the family's forward does not name raise before any work.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from ..ops.token_pruning import KeptRows

_UNSERVED = {
    "output_attentions": "the rewritten graph returns no attention maps",
    "output_hidden_states": "the rewritten graph returns no hidden states",
    "past_key_values": "forward runs the prefill from the prompt (use generate for decoding)",
    "cache": "forward runs the prefill from the prompt (use generate for decoding)",
}
# Taken by forward itself, not handed to the family's code.
_OWN = ("labels", "logits_to_keep", "return_dict", "use_cache")
IGNORE_INDEX = -100  # transformers' loss ignore index


def split_arguments(model: nn.Module, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model inputs, forward's own options); InputError naming every argument that is not served."""
    unserved = {name: why for name, why in _UNSERVED.items() if kwargs.get(name) not in (None, False)}
    parameters = inspect.signature(type(model).forward).parameters
    named = {n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
    unknown = sorted(k for k in kwargs if k not in named and k not in _UNSERVED and k not in _OWN)
    if unknown:
        unserved.update({name: f"{type(model).__name__}.forward takes no such argument" for name in unknown})
    if unserved:
        detail = "; ".join(f"{name} ({why})" for name, why in sorted(unserved.items()))
        raise InputError(f"OptimizedModel.forward does not serve {detail}: remove them")
    own = {k: kwargs[k] for k in _OWN if k in kwargs}
    inputs = {k: v for k, v in kwargs.items() if k not in _OWN and k not in _UNSERVED}
    return inputs, own


def _positions(logits_to_keep: int | torch.Tensor, batch: int, seq: int, device) -> torch.Tensor:
    """[B, P] original positions logits_to_keep asks for (int: the last ones; 1-D or 2-D integer tensor)."""
    if isinstance(logits_to_keep, int):
        start = 0 if logits_to_keep == 0 else seq - logits_to_keep
        wanted = torch.arange(max(start, 0), seq, device=device)
    else:
        if logits_to_keep.dtype == torch.bool:
            raise InputError("logits_to_keep as a boolean mask with token pruning: the pruned rows are not the "
                             "prompt's; pass an int or integer positions")
        wanted = logits_to_keep.to(device)
    wanted = torch.where(wanted < 0, wanted + seq, wanted)
    return wanted.expand(batch, -1) if wanted.dim() == 1 else wanted


def _kept_rows_of(kept: KeptRows, positions: torch.Tensor, what: str) -> torch.Tensor:
    """[B, P] the pruned row holding each original position; InputError where pruning dropped one."""
    match = (kept.index[:, :, None] == positions[:, None, :]) & kept.valid[:, :, None]
    found = match.any(dim=1)
    if not bool(found.all()):
        sample, slot = (~found).nonzero()[0].tolist()
        raise InputError(f"{what} asks for position {int(positions[sample, slot])} of sample {sample}, a visual row "
                         "token pruning dropped: ask for positions of kept rows (text positions are always kept)")
    return match.to(torch.int8).argmax(dim=1)


def keep_logits(logits: torch.Tensor, logits_to_keep: int | torch.Tensor, kept: KeptRows | None,
                seq_len: int) -> torch.Tensor:
    """The logits the family's forward returns for `logits_to_keep` (over the prompt's `seq_len` positions)."""
    from transformers.modeling_utils import slice_logits_to_keep

    if kept is None:
        return slice_logits_to_keep(logits, logits_to_keep)
    if isinstance(logits_to_keep, int) and logits_to_keep == 0:
        return logits  # every kept row
    rows = _kept_rows_of(kept, _positions(logits_to_keep, logits.shape[0], seq_len, logits.device), "logits_to_keep")
    return logits.gather(1, rows[..., None].expand(-1, -1, logits.shape[-1]))


def kept_labels(labels: torch.Tensor, kept: KeptRows | None) -> torch.Tensor:
    """Labels over the rows the decoder ran: the prompt's, or with pruning each kept row's label
    (IGNORE_INDEX on pads); a label on a dropped row is an InputError."""
    if kept is None:
        return labels
    labels = labels.to(kept.index.device)
    on_kept = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device).scatter(1, kept.index, kept.valid)
    lost = (labels != IGNORE_INDEX) & ~on_kept
    if bool(lost.any()):
        sample, position = lost.nonzero()[0].tolist()
        raise InputError(f"labels: {int(lost.sum())} labels fall on visual rows token pruning dropped (the first: "
                         f"sample {sample}, position {position}): set labels there to {IGNORE_INDEX}, the ignore index "
                         "(the loss is taken over the kept rows)")
    gathered = labels.gather(1, kept.index)
    return torch.where(kept.valid, gathered, torch.full_like(gathered, IGNORE_INDEX))
