"""Token pruning: a stage on the decoder's inputs, before the first layer or between two layers.

Why a stage and not a graph rewrite: before layer 0 pruning is a gather of the graph's inputs
(embeddings, attention mask, position ids, visual mask), and everything in the graph that
depends on the sequence length (the causal mask, RoPE, the cache) is derived from those
inputs. Gathering them ahead of the graph gives every layer, the KV cache and the FLOPs audit
the pruned sequence without touching a node, and the graph stays one graph for every method.

Kept rows keep their order and their original position ids (1-D and M-RoPE alike: positions
are not renumbered); text rows stay. The batch's pad rows are dropped and the kept rows come
back left-padded (whatever the caller's padding side: each sample's last row is its last real
token, what generate reads), as wide as the batch's longest kept sample; `KeptRows` says which
original position each row is (OptimizedModel's output carries it as `kept_positions`). Methods:
- `codebook`: drop the visual rows most similar to a redundancy codebook's prototypes
  (max cosine similarity, on the projector output, i.e. the visual rows of inputs_embeds);
- `random`: a seeded baseline drawn per sample (from the seed and the sample's own content), so a
  sample keeps the same rows alone, in any batch and on either padding side;
- `fastv` (after layer K): keep the visual rows the last query attends to most at layer K (the
  graph returns that attention row, passes/last_query_attention.py);
- `vtw` (after layer K): drop every visual row.
For the last two the decoder runs as two graphs (capture/decoder_parts.py) and this stage sits
between them, on the head's output hidden state instead of the embeddings.

`build_pruning` makes the stage a config asks for, checked against the model before any work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..analysis.codebook_file import Codebook
from ..capture.decoder_inputs import DecoderInputs
from ..capture.layer_kinds import unserved_reason
from ..config import RedLensConfig
from ..errors import ConfigError, PruningError, ReductionUnavailableError
from ..ops.token_pruning import (
    KeptRows, gather_seq, keep_counts, left_aligned, proportional_flops, proportional_key_bias, random_scores,
    redundancy_flops, redundancy_scores, select_rows, visual_counts,
)

logger = logging.getLogger(__name__)

BEFORE_FIRST_LAYER = ("codebook", "random")
AFTER_LAYER = ("fastv", "vtw")


def check_keep(method: str, keep: int | float, visual_mask: torch.Tensor) -> None:
    """An int keep above a sample's visual count is an error (a fraction always fits)."""
    if method == "vtw" or not isinstance(keep, int):
        return
    short = [(b, int(c)) for b, c in enumerate(visual_counts(visual_mask).tolist()) if 0 < c < keep]
    if short:
        b, c = short[0]
        raise PruningError(f"prune_keep={keep} is above the {c} visual tokens of sample {b}: give a count <= {c} or "
                           "a fraction such as prune_keep=0.25")


def gather_inputs(inputs: DecoderInputs, kept: KeptRows) -> DecoderInputs:
    """The decoder inputs cut to the rows `kept` names (pads: mask 0, position 1, not visual)."""
    pos_dim = inputs.position_ids.dim() - 1  # the sequence axis: 1 (1-D) or 2 (M-RoPE rows first)
    return DecoderInputs(
        inputs_embeds=gather_seq(inputs.inputs_embeds, kept, 1),
        attention_mask=gather_seq(inputs.attention_mask, kept, 1, fill=0),
        # 1 for the pad rows, as transformers gives left-padded positions
        position_ids=gather_seq(inputs.position_ids, kept, pos_dim, fill=1),
        visual_mask=gather_seq(inputs.visual_mask, kept, 1, fill=False),
    )


def align_left(inputs: DecoderInputs) -> tuple[DecoderInputs, KeptRows | None]:
    """Right-padded inputs as left-padded ones (None: already so), for the stages that read each
    sample's last row as its last real token (FastV's last query); one host sync per forward."""
    if not bool((inputs.attention_mask[:, -1] == 0).any()):
        return inputs, None
    aligned = left_aligned(inputs.attention_mask)
    return gather_inputs(inputs, aligned), aligned


def compose(outer: KeptRows | None, inner: KeptRows) -> KeptRows:
    """Rows `inner` keeps of rows that `outer` kept, as original positions."""
    if outer is None:
        return inner
    index = outer.index.gather(1, inner.index)
    return KeptRows(torch.where(inner.valid, index, torch.zeros_like(index)), inner.valid)


@dataclass
class PrunedInputs:
    inputs: DecoderInputs  # what the decoder graph runs on
    kept: KeptRows
    visual_before: torch.Tensor  # [B] visual tokens per sample before pruning
    visual_after: torch.Tensor  # [B] after


@dataclass
class TokenPruning:
    """Keep `keep` visual tokens per sample (an int count, or a fraction of each sample's count)."""

    method: str
    keep: int | float
    prototypes: torch.Tensor | None = None
    seed: int = 0
    layer: int | None = None  # K, for the methods that prune after layer K
    # Before the first layer: each kept visual row keeps the attention mass of the dropped rows most
    # like it (a log-count key bias; the graph then takes a `key_bias` input, passes/key_bias.py).
    proportional: bool = False

    def __post_init__(self) -> None:
        if self.method not in BEFORE_FIRST_LAYER + AFTER_LAYER:
            raise ConfigError(f"prune={self.method!r}: must be one of {BEFORE_FIRST_LAYER + AFTER_LAYER}")
        if self.method == "codebook" and self.prototypes is None:
            raise ConfigError("prune='codebook' needs the codebook's prototypes")
        if self.method in AFTER_LAYER and self.layer is None:
            raise ConfigError(f"prune={self.method!r} needs the layer K after which it prunes")

    @property
    def after_layer(self) -> int | None:
        """K when the stage runs between layers K and K+1; None before the first layer."""
        return self.layer if self.method in AFTER_LAYER else None

    @classmethod
    def from_codebook(cls, codebook: Codebook, keep: int | float, proportional: bool = False) -> "TokenPruning":
        return cls("codebook", keep, prototypes=codebook.prototypes.to(torch.float32), proportional=proportional)

    @property
    def key_bias(self) -> bool:
        """The graph takes a per-key attention bias (proportional attention before the first layer)."""
        return self.proportional and self.after_layer is None

    def keep_counts(self, visual_mask: torch.Tensor) -> torch.Tensor:
        """[B] visual rows each sample keeps; an int keep above a sample's visual count is an error."""
        self.check_keep(visual_mask)
        return self._counts(visual_mask)

    def _counts(self, visual_mask: torch.Tensor) -> torch.Tensor:
        return keep_counts(visual_counts(visual_mask), 0 if self.method == "vtw" else self.keep)

    def check_keep(self, visual_mask: torch.Tensor) -> None:
        check_keep(self.method, self.keep, visual_mask)

    def keep_scores(self, inputs: DecoderInputs, attention: torch.Tensor | None = None) -> torch.Tensor:
        """[B, S]; higher is kept first. `attention`: fastv's last-query attention at layer K."""
        if self.method == "codebook":
            return -redundancy_scores(inputs.inputs_embeds, self.prototypes, inputs.visual_mask)
        if self.method == "fastv":
            if attention is None:
                raise ValueError("prune='fastv' selects by the attention of layer K's last query; none was given")
            return attention
        return random_scores(inputs.inputs_embeds, inputs.attention_mask, inputs.visual_mask, self.seed)

    def scoring_flops(self, inputs: DecoderInputs) -> int:
        """Matrix work of the stage itself, as computed (per sample padded to the batch's longest):
        codebook similarities of the visual rows, each dropped row against the kept visual rows."""
        batch, dim = inputs.inputs_embeds.shape[0], inputs.inputs_embeds.shape[-1]
        counts = visual_counts(inputs.visual_mask)
        flops = 0
        if self.method == "codebook":
            flops += redundancy_flops(batch * int(counts.max()), int(self.prototypes.shape[0]), dim)
        if self.key_bias:
            kept = self.keep_counts(inputs.visual_mask)
            flops += batch * proportional_flops(int((counts - kept).max()), int(kept.max()), dim)
        return flops

    def __call__(self, inputs: DecoderInputs, attention: torch.Tensor | None = None) -> PrunedInputs:
        self.check_keep(inputs.visual_mask)
        return self.prune(inputs, self.keep_scores(inputs, attention))

    def prune(self, inputs: DecoderInputs, scores: torch.Tensor) -> PrunedInputs:
        """The rows kept by `scores` [B, S] (higher first), gathered; tensor ops only, no checks: the
        body of the exported prune graph (exporters/prune_graph.py) as of the eager stage."""
        visual = inputs.visual_mask
        kept = select_rows(visual, scores, self._counts(visual), inputs.attention_mask)
        pruned = gather_inputs(inputs, kept)
        if self.key_bias:
            pruned.key_bias = proportional_key_bias(inputs.inputs_embeds, visual, kept)
        return PrunedInputs(pruned, kept, visual_counts(visual), visual_counts(pruned.visual_mask))

    def describe(self) -> dict:
        where = "before the first decoder layer" if self.after_layer is None else f"after decoder layer {self.layer}"
        out = {"method": self.method, "keep": 0 if self.method == "vtw" else self.keep, "where": where}
        if self.after_layer is None:
            out["proportional_attention"] = self.proportional
        if self.method == "codebook":
            out["prototypes"] = int(self.prototypes.shape[0])
        elif self.method == "random":
            out["seed"] = self.seed
        else:
            out["layer"] = self.layer
        return out


def _refuse_layered_decode(model: nn.Module, adapter, what: str, instead: str) -> None:
    """Decode steps the project runs layer by layer (artifact/layered_decode.py) serve full-attention
    and sliding-window layers (each takes its own cache's rows); other decoders are refused."""
    why = unserved_reason(model, adapter)
    if why is not None:
        raise ReductionUnavailableError(f"{what}: the decode steps it needs run layer by layer with one mask per layer, "
                                        f"and {why}; {instead}")


def build_pruning(config: RedLensConfig, model: nn.Module, adapter) -> TokenPruning | None:
    """The token pruning stage the config asks for, checked against the model before any work."""
    if config.prune is None:
        return None
    num_layers = adapter.num_layers(model)
    if config.prune in AFTER_LAYER:
        if config.prune_layer >= num_layers - 1:
            where = "beyond the last decoder layer" if config.prune_layer >= num_layers else "the last decoder layer"
            raise ConfigError(f"prune_layer={config.prune_layer} is {where}: the decoder has {num_layers} layers and "
                              f"{config.prune!r} prunes after layer K for the layers after it (valid: 0..{num_layers - 2})")
        _refuse_layered_decode(model, adapter, f"prune={config.prune!r} (pruning inside the decoder)",
                               "use prune='codebook' or 'random' (before the first layer)")
        return TokenPruning(config.prune, config.prune_keep, layer=config.prune_layer)
    if config.prune_proportional:
        _refuse_layered_decode(model, adapter, "prune_proportional=True (a key bias in every layer)",
                               "set prune_proportional=False (presets: the '-plain' ones)")
    if config.prune == "random":
        return TokenPruning("random", config.prune_keep, seed=config.prune_seed, proportional=config.prune_proportional)
    codebook = Codebook.load(config.codebook)
    text_config = adapter.language_model(model).config
    codebook.check_compatible(model.config.model_type, text_config.hidden_size, path=f"codebook {config.codebook}")
    return TokenPruning.from_codebook(codebook, config.prune_keep, proportional=config.prune_proportional)
