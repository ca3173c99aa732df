"""Train the proof model of the shapes task and write it into the package (run once by us, not CI).

    python scripts/train_proof_model.py --out redlens_compile/models/proof_llava

Deterministic from --seed (data are generated from (split, index); torch is seeded; 2 threads).
Held-out accuracy per question type is logged as training goes. What it takes on 2 cores:
- objects aligned to one vision patch each;
- the question before the image (each visual token can match itself against it) and again
  after it (the answer position reads what is asked from its neighbours);
- an auxiliary per-patch loss on the vision tower (object class, row, column), with object
  and empty patches averaged apart: averaged together, empty patches (99%) swamp it, the tower
  learns colour but not shape, and shape answers stay at chance (ln 4) forever;
- attention supervision: heads 0 and 1 of decoder layers 1-3, at each turn's `ASSISTANT:`
  token, pushed onto the patches the question is about (for a position question, head 0 onto
  the first-named object and head 1 onto the second, so that their positions are not mixed);
- a curriculum (one object and colour/shape/presence questions, then up to three objects,
  then the task) and six question/answer turns per image.
The auxiliary heads are dropped when the model is saved and attention goes back to SDPA: the
shipped model is a plain LlavaForConditionalGeneration.

That first phase (the defaults) answers everything but relative position, which stays at chance:
the heads find both objects, but the projector, trained by the LM loss alone, squashes the
patch positions away (a linear probe recovers them from the vision tower, not from the
projector's output). Later phases (`--init-from`, see the README for the exact commands)
oversample position questions, regress each patch's position from the projector's output, and
regress the two objects' offset from the residual stream at the answer position. Phase 2 (one
offset probe after layer 2, weight 2, lr 5e-4) brought the row offset to the answer position
but hardly the column one, and position crept from 34% to 54%. Phase 3 (probes after layers 1
and 2, weight 10, lr 1e-3, probe lr 1e-2) passed 70% within 200 steps. In 300-step trials from
phase 2's model, the first three changes without the faster probe reached 94% position on 50
questions; the 10x probe learning rate alone, 68%.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redlens_compile.models.demo import build_llava, make_tokenizer, save_model_dir  # noqa: E402
from redlens_compile.models.evaluate import accuracy_by_type, answer_questions, blank_like  # noqa: E402
from redlens_compile.models.shapes_task import (  # noqa: E402
    COLOURS, GRID, PLURAL, SHAPES, heldout_questions, prompt, sample, vocabulary,
)

log = logging.getLogger("train")
NUM_CLASSES = 1 + len(COLOURS) * len(SHAPES)  # empty, or (colour, shape)
TURNS = 6


def multi_turn_text(qas, image_token: str) -> str:
    """The first turn is the evaluation prompt; later turns ask about the same image."""
    turns = [f"{prompt(qas[0].question, image_token)} {qas[0].answer} </s>"]
    turns += [f"USER: {qa.question} ASSISTANT: {qa.answer} </s>" for qa in qas[1:]]
    return " ".join(turns)


def patch_targets(objects) -> torch.Tensor:
    target = torch.zeros(GRID * GRID, dtype=torch.long)
    colours = list(COLOURS)
    for o in objects:
        target[o.row * GRID + o.col] = 1 + colours.index(o.colour) * len(SHAPES) + SHAPES.index(o.shape)
    return target


def make_batch(processor, step: int, batch_size: int, curriculum_steps: int, focus: str | None = None,
               focus_share: float = 0.0):
    """Curriculum: one object and colour/shape/presence questions, then up to 3 objects, then the
    task. With `focus`, that share of the images asks only questions of type `focus`."""
    items = []
    for i in range(batch_size):
        index = step * batch_size + i
        if step < curriculum_steps:
            item, seed = sample("train", index, TURNS, qtypes=("colour", "shape", "presence"), max_objects=1)
        elif step < 2 * curriculum_steps:
            item, seed = sample("train", index, TURNS, max_objects=3)
        elif focus and i < round(batch_size * focus_share):
            item, seed = sample("train", index, TURNS, qtypes=(focus,), min_objects=3)
            if not item.qas:
                item, seed = sample("train", index, TURNS)
        else:
            item, seed = sample("train", index, TURNS)
        items.append((item, seed))
    enc = processor(images=[it.image(seed) for it, seed in items],
                    text=[multi_turn_text(it.qas, processor.image_token) for it, _ in items],
                    padding=True, padding_side="right", return_tensors="pt")  # per call: the saved one stays left
    ids = enc["input_ids"]
    assistant = processor.tokenizer.convert_tokens_to_ids("ASSISTANT:")
    labels = torch.full_like(ids, -100)
    after_assistant = torch.zeros_like(ids, dtype=torch.bool)
    after_assistant[:, 1:] = ids[:, :-1] == assistant
    labels[after_assistant] = ids[after_assistant]  # the answer word
    eos_pos = torch.zeros_like(after_assistant)
    eos_pos[:, 1:] = after_assistant[:, :-1]
    labels[eos_pos] = ids[eos_pos]  # the </s> that closes it
    enc["labels"] = labels
    aux = torch.stack([patch_targets(it.objects) for it, _ in items])
    return enc, aux, items


def relevant_objects(qa, objects) -> tuple[list, list]:
    """The objects that the two supervised heads should read for a question: for a position
    question the first-named and the second-named object, otherwise the objects the question is
    about, twice (a presence question whose object is absent has none)."""
    words = qa.question.split()
    plural_to_shape = {PLURAL[s]: s for s in SHAPES}
    colours = [w for w in words if w in COLOURS]
    shapes = [plural_to_shape.get(w, w) for w in words if w in SHAPES or w in plural_to_shape]
    if qa.qtype == "position":
        first, second = (colours[0], shapes[0]), (colours[1], shapes[1])
        return ([o for o in objects if (o.colour, o.shape) == first],
                [o for o in objects if (o.colour, o.shape) == second])
    if qa.qtype == "presence":
        chosen = [o for o in objects if (o.colour, o.shape) == (colours[0], shapes[0])]
    else:
        chosen = [o for o in objects if o.colour in colours or o.shape in shapes]
    return chosen, chosen


@dataclass
class TurnTargets:
    """One row per answered turn, at the turn's `ASSISTANT:` token (the one predicting the answer)."""

    rows: torch.Tensor  # [T] batch row
    queries: torch.Tensor  # [T] position of the `ASSISTANT:` token
    masks: torch.Tensor  # [T, 2, S] the patches heads 0 and 1 should attend to
    offsets: torch.Tensor  # [T, 2] (row, col) of the first-named minus the second-named object / (GRID - 1)
    is_position: torch.Tensor  # [T] position questions (the rows where `offsets` is defined)


def turn_targets(enc, items, image_token_id: int, assistant_id: int) -> TurnTargets:
    ids = enc["input_ids"]
    rows, queries, masks, offsets, is_position = [], [], [], [], []
    for b, (item, _) in enumerate(items):
        image_positions = torch.nonzero(ids[b] == image_token_id).flatten()
        for qa, query in zip(item.qas, torch.nonzero(ids[b] == assistant_id).flatten().tolist()):
            mask = torch.zeros(2, ids.shape[1], dtype=torch.bool)
            first, second = relevant_objects(qa, item.objects)
            for head, chosen in enumerate((first, second)):
                mask[head, image_positions[[o.row * GRID + o.col for o in chosen]]] = True
            positional = qa.qtype == "position"
            offsets.append([(first[0].row - second[0].row) / (GRID - 1), (first[0].col - second[0].col) / (GRID - 1)]
                           if positional else [0.0, 0.0])
            rows.append(b)
            queries.append(query)
            masks.append(mask)
            is_position.append(positional)
    return TurnTargets(torch.tensor(rows), torch.tensor(queries), torch.stack(masks), torch.tensor(offsets),
                       torch.tensor(is_position))


def attention_loss(attentions, rows, queries, masks, layers=(1, 2, 3)) -> torch.Tensor:
    """Heads 0 and 1 of each layer in `layers`: -log(attention mass on their target patches)."""
    has_target = masks.any(dim=2)  # [T, 2]
    if not bool(has_target.any()):
        return torch.zeros(())
    losses = []
    for layer in layers:
        weights = attentions[layer][rows, :2, queries]  # [T, 2, S]
        mass = (weights * masks).sum(dim=2)
        losses.append(-torch.log(mass[has_target] + 1e-6).mean())
    return torch.stack(losses).mean()


class AuxHeads(nn.Module):
    """Per-patch probes on the vision tokens: object class, row, column (training only)."""

    def __init__(self, dim: int):
        super().__init__()
        self.cls = nn.Linear(dim, NUM_CLASSES)
        self.row = nn.Linear(dim, GRID)
        self.col = nn.Linear(dim, GRID)
        self.coords = nn.Linear(dim, 2)  # (row, col) as numbers: position questions compare them

    def loss(self, feats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        feats = feats[:, 1:]  # drop CLS: 256 patch tokens in row-major order
        pos = torch.arange(GRID * GRID)
        rows, cols = (pos // GRID).expand_as(target), (pos % GRID).expand_as(target)
        ce = nn.functional.cross_entropy
        # Objects fill about 1 patch in 100: averaged over all patches, "empty" swamps the loss and
        # the tower learns colour but not shape. Object and empty patches are averaged apart.
        per_patch = ce(self.cls(feats).flatten(0, 1), target.flatten(), reduction="none")
        is_object = target.flatten() > 0
        loss = per_patch[~is_object].mean() + per_patch[is_object].mean()
        coords = torch.stack([rows, cols], dim=-1).float() / (GRID - 1)
        return loss + 0.5 * (ce(self.row(feats).flatten(0, 1), rows.flatten())
                             + ce(self.col(feats).flatten(0, 1), cols.flatten())) \
            + nn.functional.mse_loss(self.coords(feats), coords) * 10


def grow_decoder(model, layers: int):
    """A copy of `model` whose decoder has `layers` layers, each original layer repeated in place
    (0,0,0,1,1,1,... for 4 -> 12), with the projections that write into the residual stream
    (attention o_proj, FFN down_proj) scaled by old/new: k copies each adding 1/k of the original
    update approximate the original step (a smaller step of the same flow), so the grown model
    starts near the original's function and fine-tuning adapts the copies apart."""
    from transformers import LlavaForConditionalGeneration

    old = model.config.text_config.num_hidden_layers
    if layers % old:
        raise SystemExit(f"--layers {layers} must be a multiple of the source's {old} decoder layers")
    repeat = layers // old
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.text_config.num_hidden_layers = layers
    if getattr(config.text_config, "layer_types", None) is not None:
        config.text_config.layer_types = [t for t in config.text_config.layer_types for _ in range(repeat)]
    grown = LlavaForConditionalGeneration(config)
    grown.generation_config = model.generation_config
    prefix = "model.language_model.layers."
    state = model.state_dict()
    new_state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        index, rest = key[len(prefix):].split(".", 1)
        scale = 1.0 / repeat if rest.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        for copy in range(repeat):
            new_state[f"{prefix}{int(index) * repeat + copy}.{rest}"] = value.clone() * scale
    grown.load_state_dict(new_state, strict=True)
    return grown


def evaluate(model, processor, items) -> dict[str, float]:
    model.eval()
    acc = accuracy_by_type(items, answer_questions(model.generate, processor, items))
    model.train()
    return acc


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--curriculum-steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-questions", type=int, default=250)
    parser.add_argument("--final-questions", type=int, default=1000)
    parser.add_argument("--attention-weight", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init-from", default=None,
                        help="continue from a model this script wrote (second phase); the vision tower is frozen")
    parser.add_argument("--focus", default=None, help="a question type to oversample, e.g. position")
    parser.add_argument("--focus-share", type=float, default=0.5, help="share of images asking only --focus")
    parser.add_argument("--offset-probe-layer", type=int, nargs="+", default=None,
                        help="regress a position question's (row, col) offset from the residual stream after these "
                        "decoder layers at the answer position (one probe per layer, dropped at save)")
    parser.add_argument("--offset-weight", type=float, default=2.0, help="weight of the offset probes' loss")
    parser.add_argument("--probe-lr", type=float, default=None,
                        help="learning rate of the offset and projector probes (default: --lr)")
    parser.add_argument("--projector-coords-weight", type=float, default=0.0,
                        help="weight of a loss regressing each patch's (row, col) from the projector's output "
                        "(a probe dropped at save): the LM loss alone lets the projector squash positions away")
    parser.add_argument("--grow-from", default=None,
                        help="start from this model dir with its decoder grown to --layers (each layer repeated in "
                        "place, see grow_decoder); the vision tower is frozen as with --init-from")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the grown model (--grow-from)")
    parser.add_argument("--attention-layers", type=int, nargs="+", default=None,
                        help="decoder layers whose heads 0 and 1 get the attention loss (default: 1-3, or for a grown "
                        "model the copies of the source's layers 1-3)")
    parser.add_argument("--stop-at", type=float, default=None,
                        help="stop after the first held-out eval whose overall accuracy reaches this")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after the first eval past this")
    parser.add_argument("--data-offset", type=int, default=0, help="first train-split batch index")
    parser.add_argument("--out", default="redlens_compile/models/proof_llava")
    parser.add_argument("--log", default="benchmarks/results/train_log.jsonl")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    base_meta = None
    if args.grow_from and args.init_from:
        raise SystemExit("--grow-from and --init-from are exclusive: grow from a model, or continue one")
    if args.grow_from and not args.layers:
        raise SystemExit("--grow-from needs --layers (the grown decoder's depth)")
    source = args.init_from or args.grow_from
    attention_layers = tuple(args.attention_layers or (1, 2, 3))
    if source:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(source)
        processor = AutoProcessor.from_pretrained(source)
        base_meta = json.loads((Path(source) / "redlens_model.json").read_text())
        if args.grow_from:
            old_layers = model.config.text_config.num_hidden_layers
            model = grow_decoder(model, args.layers)
            if not args.attention_layers:  # the copies of the source's supervised layers
                attention_layers = tuple(i for i in range(args.layers) if i * old_layers // args.layers in (1, 2, 3))
        model.model.vision_tower.requires_grad_(False)  # its features are done; no auxiliary loss
    else:
        model, processor = build_llava(make_tokenizer(vocabulary()), seed=args.seed)
    # Attention weights are needed for the attention loss: eager attention while training only.
    model.set_attn_implementation("eager")
    image_token_id = model.config.image_token_id
    assistant_id = processor.tokenizer.convert_tokens_to_ids("ASSISTANT:")
    model.train()
    heads = AuxHeads(model.config.vision_config.hidden_size)
    captured = {}
    model.model.vision_tower.encoder.register_forward_hook(
        lambda m, i, o: captured.__setitem__("feats", o.last_hidden_state))
    model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.__setitem__("projected", o))
    probe_layers = args.offset_probe_layer or []
    offset_probes = nn.ModuleList(nn.Linear(model.config.text_config.hidden_size, 2) for _ in probe_layers)
    projector_coords = nn.Linear(model.config.text_config.hidden_size, 2)
    params = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    probe_params = list(offset_probes.parameters())
    if args.projector_coords_weight:
        probe_params += list(projector_coords.parameters())
    probe_lr_scale = (args.probe_lr or args.lr) / args.lr
    patch_coords = torch.stack([torch.arange(GRID * GRID) // GRID, torch.arange(GRID * GRID) % GRID], -1) / (GRID - 1)
    opt = torch.optim.AdamW([{"params": params, "lr_scale": 1.0}, {"params": probe_params, "lr_scale": probe_lr_scale}],
                            lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = min(200, args.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    eval_items = heldout_questions(args.eval_questions)
    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("a" if args.init_from else "w")  # a second phase continues the first's log; a grown model starts its own
    phase = 1 + len(base_meta["phases"]) if base_meta else 1
    start = time.time()
    if args.grow_from:  # what growing alone keeps, before any fine-tuning
        record = {"phase": phase, "step": 0, "minutes": 0.0, "heldout_accuracy": evaluate(model, processor, eval_items)}
        log.info("eval %s", json.dumps(record))
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()
    for step in range(args.steps):
        enc, aux_target, items = make_batch(processor, args.data_offset + step, args.batch_size,
                                            args.curriculum_steps, args.focus, args.focus_share)
        targets = turn_targets(enc, items, image_token_id, assistant_id)
        for group in opt.param_groups:
            group["lr"] = lr_at(step) * group["lr_scale"]
        out = model(**enc, output_attentions=True, output_hidden_states=bool(probe_layers))
        aux_loss = torch.zeros(()) if source else heads.loss(captured["feats"], aux_target)
        attn_loss = attention_loss(out.attentions, targets.rows, targets.queries, targets.masks, attention_layers)
        loss = out.loss + 0.5 * aux_loss + args.attention_weight * attn_loss
        if args.projector_coords_weight:
            predicted = projector_coords(captured["projected"])  # [B, 256, 2]
            loss = loss + args.projector_coords_weight * 10 * nn.functional.mse_loss(
                predicted, patch_coords.expand_as(predicted))
        offset_error = torch.zeros(2)  # (row, col) mean squared error, averaged over the probed layers
        if probe_layers and bool(targets.is_position.any()):
            pos = targets.is_position
            for layer, probe in zip(probe_layers, offset_probes):
                # hidden_states[0] is the embedding output: layer L's output is hidden_states[L + 1]
                hidden = out.hidden_states[layer + 1][targets.rows[pos], targets.queries[pos]]
                # RMS-normalized: the scale the next layer sees
                hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
                offset_error = offset_error + (probe(hidden) - targets.offsets[pos]).pow(2).mean(0) / len(probe_layers)
            loss = loss + args.offset_weight * offset_error.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + probe_params, 1.0)
        opt.step()
        if step % 50 == 0:
            rate = (step + 1) * args.batch_size / (time.time() - start)
            pos = targets.is_position
            attn_position = attention_loss(out.attentions, targets.rows[pos], targets.queries[pos],
                                           targets.masks[pos], attention_layers) if bool(pos.any()) else torch.zeros(())
            log.info("step %d loss %.4f (qa %.4f aux %.4f attn %.4f [position %.4f] offset row %.4f col %.4f) "
                     "lr %.2e %.1f seq/s", step, loss.item(), out.loss.item(), aux_loss.item(), attn_loss.item(),
                     attn_position.item(), offset_error[0].item(), offset_error[1].item(), lr_at(step), rate)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = evaluate(model, processor, eval_items)
            record = {"phase": phase, "step": step + 1, "minutes": (time.time() - start) / 60, "loss": out.loss.item(),
                      "heldout_accuracy": acc}
            log.info("eval %s", json.dumps(record))
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if args.stop_at is not None and acc["overall"] >= args.stop_at:
                log.info("held-out accuracy %.3f >= --stop-at %.3f: stopping at step %d", acc["overall"], args.stop_at,
                         step + 1)
                break
            if args.max_minutes is not None and record["minutes"] >= args.max_minutes:
                log.info("past --max-minutes %.1f: stopping at step %d", args.max_minutes, step + 1)
                break
    steps_run = step + 1
    train_minutes = (time.time() - start) / 60

    model.set_attn_implementation("sdpa")
    model.eval()
    final_items = heldout_questions(args.final_questions)
    final = accuracy_by_type(final_items, answer_questions(model.generate, processor, final_items))
    blind = accuracy_by_type(final_items, answer_questions(model.generate, processor, blank_like(final_items)))
    fixed50 = accuracy_by_type(final_items[:50], answer_questions(model.generate, processor, final_items[:50]))
    meta = {
        "version": "proof-llava-v2",
        "weights": "trained",
        "task": "redlens_compile.models.shapes_task",
        "phases": (base_meta["phases"] if base_meta else []) + [{
            **{k: getattr(args, k) for k in ("steps", "batch_size", "lr", "curriculum_steps", "attention_weight",
                                           "seed", "threads", "init_from", "grow_from", "layers", "focus", "focus_share",
                                           "offset_probe_layer", "offset_weight", "probe_lr", "projector_coords_weight",
                                           "data_offset", "stop_at", "max_minutes")},
            "attention_layers": list(attention_layers),
            "steps_run": steps_run,  # fewer than --steps when --stop-at or --max-minutes stopped it
            "minutes": train_minutes,  # the training loop, evals included; not the final 1000-question eval
            "heldout_accuracy": final,  # after this phase: what each phase bought
        }],
        "heldout_questions": args.final_questions,
        "heldout_accuracy": final,
        "image_blind_accuracy": blind,
        "fixed50_accuracy": fixed50["overall"],
    }
    log.info("final %s", json.dumps(meta))
    save_model_dir(model, processor, args.out, meta)


if __name__ == "__main__":
    main()
