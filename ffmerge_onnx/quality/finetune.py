"""Recovery fine-tuning of a merged (tied) model; the same routine serves the layer-drop baseline.

Tied FF sublayers are one nn.Parameter, so the optimizer sees it once and its gradient is the
sum over the layers that read it: ties survive training by construction.

`finetune` is the training loop on any module; `recover` runs it on a MergeResult, with the
objective its task allows, and records it in the manifest. Objectives, what can be trained and the
learning-rate schedules are registries below. The best state by the validation score is kept; with
an output folder, progress is saved after every evaluation and a rerun resumes from it."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from ..errors import InputError
from ..families import adapter_for, task_of
from ..merging import MergeResult
from ..merging.data import rebatch, to_device
from ..progress import track
from .search import default_score

STATE = "finetune_state.pt"
HISTORY = ("step", "score", "loss", "seconds")
LossFn = Callable[[nn.Module, dict], torch.Tensor]


@dataclass
class FinetuneResult:
    history: list[dict] = field(default_factory=list)  # {"step", "score", "loss", "seconds"}
    best_step: int = 0
    best_score: float = math.nan


TRAINABLE = {
    "all": "every parameter",
    "merged": "only what the merge made: the shared FF tensors (and the delta method's corrections)",
    "merged+norms": "the merged FF tensors, their corrections and the norms",
    "deltas": "only the delta method's per-layer corrections",
    "from-merge": "every parameter except those that run before the first merged layer (embeddings, a head tied "
    "to them, earlier layers): their backward pass is skipped",
}
# rows per recovery step when none is given: a task's default, else the data's batches. A causal LM's
# rows are long (256 tokens): SmolLM2 in 5 minutes, 2 rows 98 steps, test perplexity 25.92; 8 rows 22
# steps, 31.55. The ViT takes thousands of steps of 16 images either way and lost 0.71 % with 2 rows
# against 0.39 % with 16.
DEFAULT_ROWS = {"causal-lm": 2}
SCHEDULES = {
    "constant": "warm up, then constant",
    "linear": "warm up, then fall linearly to zero at the last step or the end of the time budget",
}


def trainable_params(
    model: nn.Module,
    train: str = "all",
    shared: list[nn.Parameter] | None = None,
    deltas: list[nn.Parameter] | None = None,
    earlier: set[int] | None = None,
) -> list[nn.Parameter]:
    """Unique parameters to train: all; only what the merge made (the `shared` FF tensors and the
    `deltas`), or that plus norms; only the deltas; or all but the `earlier` ones (ids: what runs
    before the first merged layer, `earlier_parameters`)."""
    if train not in TRAINABLE:
        raise InputError(f"train must be one of {', '.join(TRAINABLE)}; got {train!r}.")
    unique = {id(p): (n, p) for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    if train == "all":
        return [p for _, p in unique.values()]
    if train == "from-merge":
        if not shared:
            raise InputError("train=from-merge needs a merged model (it trains from the first merged layer on).")
        return [p for i, (_, p) in unique.items() if i not in (earlier or set())]
    if train == "deltas":
        if not deltas:
            raise InputError("train=deltas needs a model merged with --method delta (at a rank above 0).")
        ids = {id(p) for p in deltas}
        return [p for i, (_, p) in unique.items() if i in ids]
    if not shared:
        raise InputError("train=merged needs a merged model (it trains only the shared FF tensors).")
    ids = {id(p) for p in [*shared, *(deltas or [])]}
    return [p for i, (n, p) in unique.items() if i in ids or (train == "merged+norms" and "norm" in n.lower())]


class _Reached(Exception):
    pass


def earlier_parameters(model: nn.Module, firsts: list[nn.Module], batch: dict) -> set[int]:
    """Ids of the parameters of every module that finishes its forward before the first of `firsts`
    starts, on one forward pass of `batch` (stopped there): the embeddings and the layers before a
    merged window, however the family names them."""
    done: set[int] = set()
    reached = False

    def finished(module, args, out):
        if not reached:
            done.update(id(p) for p in module.parameters(recurse=False))

    def start(module, args):
        nonlocal reached
        reached = True
        raise _Reached

    hooks = [m.register_forward_pre_hook(start) for m in firsts]
    hooks += [m.register_forward_hook(finished) for m in model.modules()]
    try:
        with torch.no_grad():
            model(**_inputs(to_device(batch, next(model.parameters()).device)))
    except _Reached:
        pass
    finally:
        for h in hooks:
            h.remove()
    if not reached:
        raise InputError("No merged layer ran on a recovery batch: train=from-merge cannot tell what comes before.")
    return done


def _lm_loss(model, batch):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, use_cache=False
    ).loss


def _inputs(batch):
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "input_values")}


def _classify_loss(model, batch):
    """Cross-entropy on the batch's labels (classifiers)."""
    if "labels" not in batch:
        raise InputError("objective classify needs labelled data (batches with labels).")
    return model(**_inputs(batch), labels=batch["labels"]).loss


def _last_hidden(out):
    return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]


def _distill_loss(original):
    def loss(model, batch):
        inputs = _inputs(batch)
        kw = {"output_hidden_states": True}  # heads (classifiers) return logits, not last_hidden_state
        with torch.no_grad():
            target = _last_hidden(original(**inputs, **kw))
        hidden = _last_hidden(model(**inputs, **kw))
        if "attention_mask" in batch and batch["attention_mask"].shape == hidden.shape[:2]:
            mask = batch["attention_mask"].bool()
        else:  # images, and waveforms (their mask runs over samples)
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return torch.nn.functional.mse_loss(hidden[mask], target[mask])

    return loss


def _kl_loss(original):
    """KL(original || model) of the output distributions: next-token distributions on real tokens
    (causal LMs) or class distributions (classifiers)."""

    def loss(model, batch):
        inputs = _inputs(batch)
        if "input_ids" in inputs:
            inputs["use_cache"] = False
        with torch.no_grad():
            target = original(**inputs).logits
        return _kl(model(**inputs).logits, target, batch)

    return loss


def _kl(logits: torch.Tensor, target_logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """KL(target || model) per distribution, over real tokens when the logits are per token."""
    logp = torch.log_softmax(logits.float(), -1)
    target = torch.log_softmax(target_logits.float(), -1)
    if logp.dim() == 3 and "attention_mask" in batch:
        mask = batch["attention_mask"].bool()
        logp, target = logp[mask], target[mask]
    return torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")


def layer_map(model: nn.Module, original: nn.Module, dropped: set[int] = frozenset()) -> list[int]:
    """For each of the model's hidden states (embeddings, then every layer's output), the original's
    hidden state it should match: the same index for merged models, shifted past the gap for
    layer-dropped ones (`dropped`: the original's layers that are gone)."""
    adapter = adapter_for(original)
    stacks = adapter.stack_names()
    if len(stacks) != 1:
        raise InputError("Layer-by-layer distillation covers single-stack models (decoders or encoders).")
    n = adapter.num_layers(original, stacks[0])
    kept = [i for i in range(n) if i not in dropped]
    if len(kept) != adapter.num_layers(model, stacks[0]):
        raise InputError(
            "The model's layers do not line up with the original's (and no manifest says which were dropped)."
        )
    return [0] + [i + 1 for i in kept]


def _kl_layers_loss(original, dropped: set[int] = frozenset(), weight: float = 1.0):
    """KL of the output distributions plus, for every layer, the squared error of its output against
    the original's matching layer, relative to that hidden state's mean square (real tokens only).
    A dense signal per layer: the merged FF learns what each layer that uses it must produce."""

    def loss(model, batch):
        inputs = {**_inputs(batch), "use_cache": False, "output_hidden_states": True}
        matching = layer_map(getattr(model, "module", model), original, dropped)  # cheap; unwraps DDP
        with torch.no_grad():
            ref = original(**inputs)
        out = model(**inputs)
        mask = batch["attention_mask"].bool()
        total = _kl(out.logits, ref.logits, batch)
        pairs = list(zip(out.hidden_states[1:], matching[1:]))
        for h, j in pairs:
            t = ref.hidden_states[j][mask].float()
            total = total + weight * ((h[mask].float() - t) ** 2).mean() / (t**2).mean() / len(pairs)
        return total

    return loss


def _real_tokens(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return _rows(batch)


def _predicted_tokens(batch: dict) -> int:
    """Tokens with a next-token target (the first of each row predicts nothing)."""
    return int(batch["attention_mask"][:, 1:].sum())


def _rows(batch: dict) -> int:
    return next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))


@dataclass(frozen=True)
class Objective:
    """A recovery objective: `make(original, dropped)` gives the loss of a (model, batch); `count(batch)`
    is what that loss averages over (tokens or rows), so ranks holding parts of a batch weigh it right."""

    name: str
    help: str
    make: Callable[[nn.Module | None, set[int]], LossFn]
    needs_original: bool = False
    causal_lm_only: bool = False
    count: Callable[[dict], int] = _real_tokens


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective(
            "lm",
            "next-token loss (causal LMs)",
            lambda original, dropped: _lm_loss,
            causal_lm_only=True,
            count=_predicted_tokens,
        ),
        Objective(
            "classify",
            "cross-entropy on labelled data (classifiers)",
            lambda original, dropped: _classify_loss,
            count=_rows,
        ),
        Objective(
            "distill",
            "match the original's last hidden states (encoders)",
            lambda original, dropped: _distill_loss(original),
            needs_original=True,
        ),
        Objective(
            "kl",
            "match the original's output distributions",
            lambda original, dropped: _kl_loss(original),
            needs_original=True,
        ),
        Objective(
            "kl+layers",
            "kl, plus every layer's output against the original's matching layer (causal LMs)",
            lambda original, dropped: _kl_layers_loss(original, dropped),
            needs_original=True,
            causal_lm_only=True,
        ),
    )
}


def loss_for(objective: str, model: nn.Module, original: nn.Module | None, dropped: set[int] = frozenset()) -> LossFn:
    if objective not in OBJECTIVES:
        raise InputError(f"objective is one of {', '.join(OBJECTIVES)}; got {objective!r}.")
    o = OBJECTIVES[objective]
    if o.causal_lm_only and task_of(model) != "causal-lm":
        raise InputError(f"objective {objective} needs a causal LM; use distill for other models.")
    if o.needs_original and original is None:
        raise InputError(f"objective {objective} needs the original model.")
    return o.make(original.eval() if original is not None else None, set(dropped))


def lr_factor(step: int, warmup: int, steps: int, trained_s: float, budget_s: float | None, schedule: str) -> float:
    """Multiplier of the learning rate for `step` (1-based), `trained_s` seconds into training."""
    factor = min(1.0, step / warmup)
    if schedule == "linear":
        done = (step - 1) / steps
        if budget_s:
            done = max(done, trained_s / budget_s)
        factor *= max(0.0, 1.0 - done)
    return factor


def finetune(
    model: nn.Module,
    batches: list[dict],
    score: Callable[[nn.Module], float],
    *,
    higher_is_better: bool,
    steps: int,
    lr: float = 5e-5,
    eval_every: int = 25,
    objective: str = "lm",
    original: nn.Module | None = None,
    output: Path | None = None,
    progress: bool = True,
    seed: int = 0,
    train: str = "all",
    shared: list[nn.Parameter] | None = None,
    deltas: list[nn.Parameter] | None = None,
    dropped: set[int] = frozenset(),
    budget_s: float | None = None,
    schedule: str = "constant",
    shard: bool = False,
    rows: int = 0,
    firsts: list[nn.Module] | None = None,
) -> FinetuneResult:
    """Train in place for `steps` steps, or until `budget_s` seconds of training (evaluation not
    counted) have passed; the model ends at its best validation state. History "seconds" is
    training time so far. The learning rate warms up linearly, then stays (`constant`) or falls
    linearly to zero at the end of the steps or of the time budget, whichever comes first (`linear`).
    `shared`: the merged tensors (for train=merged*); `dropped`: the original's removed layers (kl+layers);
    `firsts`: the first layer of each merged window (train=from-merge); `rows`: rows per step (0: the
    batches as given).
    Under torchrun the ranks train one model on their rows of every batch: DDP, or with `shard` FSDP2
    (each rank holds a shard of the weights, gradients and optimizer moments)."""
    if steps < 1 or not batches:
        raise InputError("Fine-tuning needs at least one step and one batch of data.")
    if schedule not in SCHEDULES:
        raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}.")
    loss_fn = loss_for(objective, model, original, dropped)
    batches = rebatch(batches, rows)
    earlier = earlier_parameters(model, firsts, batches[0]) if train == "from-merge" and firsts else None
    params = trainable_params(model, train, shared, deltas, earlier)
    rank = distributed.world()
    sharded = rank.active and shard
    trainer, scored = model, model  # what trains (DDP or FSDP around the model) and what validation scores
    if sharded:
        _to(distributed.device(), original)
        trainer = scored = _fully_sharded(model)
        names = {id(p): n for n, p in model.named_parameters()}
        mine = dict(trainer.named_parameters())
        params = [mine[names[id(p)]] for p in params]
    elif rank.active:
        _to(distributed.device(), model, original)
        trainer = _data_parallel(model)
    device = params[0].device  # the model's device: CPU, or a GPU when the caller moved it there
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, min(steps // 10, 50))
    result, start = FinetuneResult(), 0
    best_state = None
    state_path = Path(output) / STATE if output else None
    if state_path and state_path.exists():  # resume (any number of ranks: the state is the whole model's)
        saved = torch.load(state_path, map_location=device, weights_only=True)
        with torch.no_grad():
            for p, v in zip(params, saved["params"]):
                p.copy_(_placed(v, p))
        opt.load_state_dict(saved["optimizer"])
        for p in params:  # moments saved whole: this rank's shard of them under --shard
            opt.state[p] = {k: _placed(v, p) if v.shape == p.shape else v for k, v in opt.state[p].items()}
        start = int(saved["step"])
        result.history = [dict(zip(HISTORY, row)) for row in saved["history"].tolist()]
        best_state = [_placed(v, p) for v, p in zip(saved["best"], params)]
        result.best_step, result.best_score = int(saved["best_step"]), float(saved["best_score"])
    if best_state is None:
        model.eval()
        result.best_score = _scored(score, scored, everyone=sharded)
        result.history.append({"step": 0, "score": result.best_score, "loss": math.nan, "seconds": 0.0})
        best_state = [p.detach().clone() for p in params]
    better = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
    g = torch.Generator().manual_seed(seed)
    order = itertools.cycle(torch.randperm(len(batches), generator=g).tolist())
    for _ in range(start):
        next(order)
    running = []
    trained = result.history[-1].get("seconds", 0.0)
    for step in track(range(start + 1, steps + 1), "fine-tuning", enabled=progress):
        tick = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, warmup, steps, trained, budget_s, schedule)
        model.train()
        batch = batches[next(order)]
        part = distributed.shard_rows(batch)
        loss = loss_fn(trainer, to_device(part, device))
        if rank.active:  # DDP averages the ranks' gradients: weigh each by its share of the batch's tokens
            count = OBJECTIVES[objective].count
            loss = loss * (count(part) * rank.size / max(count(batch), 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running.append(float(distributed.all_reduce_sum(loss.detach().clone())) / rank.size)
        trained = distributed.broadcast_object(trained + time.perf_counter() - tick)  # rank 0's clock decides
        out_of_time = budget_s is not None and trained >= budget_s
        if step % eval_every == 0 or step == steps or out_of_time:
            model.eval()
            value = _scored(score, scored, everyone=sharded)
            result.history.append(
                {"step": step, "score": value, "loss": sum(running) / len(running), "seconds": trained}
            )
            running = []
            if better(value, result.best_score):
                result.best_step, result.best_score = step, value
                best_state = [p.detach().clone() for p in params]
            if state_path:
                _save_state(state_path, params, opt, step, result, best_state)
        if out_of_time:
            break
    with torch.no_grad():
        for p, v in zip(params, best_state):
            p.copy_(v)
        if sharded:  # the sharded copy's tensors, gathered whole, back into the model
            own = dict(model.named_parameters())
            for name, p in trainer.named_parameters():
                own[name].copy_(_whole(p).to(own[name].device))
    model.eval()
    if rank.active:
        _to(torch.device("cpu"), model, original)
        distributed.check_identical(model, "the recovered weights")
    return result


def _scored(score: Callable[[nn.Module], float], model: nn.Module, everyone: bool = False) -> float:
    """The validation score; under torchrun rank 0 scores (every rank takes part when the model is
    sharded) and every rank takes rank 0's value."""
    value = float(score(model)) if everyone or distributed.world().main else None
    return float(distributed.broadcast_object(value))


def _fully_sharded(model: nn.Module) -> nn.Module:
    """A copy of the model sharded over the ranks with FSDP2 (`fully_shard`). Each block whose tensors
    are its own is one unit; blocks that read a merged (tied) tensor stay in the root unit with the
    embeddings and heads, so every shared tensor lives in exactly one unit and its gradient is whole."""
    import copy

    from torch.distributed.fsdp import fully_shard

    copied = copy.deepcopy(model)
    uses: dict[int, int] = {}
    for _, p in copied.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    adapter = adapter_for(copied)
    for stack in adapter.stack_names():
        for block in adapter.layers(copied, stack):
            inside: dict[int, int] = {}
            for _, p in block.named_parameters(remove_duplicate=False):
                inside[id(p)] = inside.get(id(p), 0) + 1
            if all(uses[i] == n for i, n in inside.items()):
                fully_shard(block)
    fully_shard(copied)
    return copied


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor gathered whole on every rank; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _placed(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole saved tensor laid out like `like` (this rank's shard when `like` is sharded)."""
    if not hasattr(like, "device_mesh"):
        return v
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(v.to(like.device), like.device_mesh, like.placements)


def _data_parallel(model: nn.Module) -> nn.Module:
    """DDP over the ranks. Tied (merged) tensors are one Parameter, so DDP reduces each gradient once;
    unused parameters (a pooler the loss never reads) are allowed."""
    from torch.nn.parallel import DistributedDataParallel

    dev = distributed.device()
    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                                   find_unused_parameters=True)  # fmt: skip


def _to(device: torch.device, *models: nn.Module | None) -> None:
    for m in models:
        if m is not None and next(m.parameters()).device != device:
            m.to(device)


def _save_state(path: Path, params, opt, step: int, result: FinetuneResult, best_state) -> None:
    """Progress, whole (sharded tensors gathered), so a run resumes on any number of ranks; rank 0
    writes it atomically (every rank must call this: gathering is collective)."""
    optimizer = opt.state_dict()
    optimizer["state"] = {k: {n: _whole(v) for n, v in st.items()} for k, st in optimizer["state"].items()}
    state = {
        "params": [_whole(p.detach()) for p in params],
        "optimizer": optimizer,
        "step": step,
        "history": torch.tensor([[h[k] for k in HISTORY] for h in result.history], dtype=torch.float64),
        "best": [_whole(v) for v in best_state],
        "best_step": result.best_step,
        "best_score": result.best_score,
    }
    if not distributed.world().main:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def recover(
    result: MergeResult,
    original: nn.Module,
    batches: list[dict],
    validation: list[dict],
    *,
    steps: int,
    lr: float = 5e-5,
    eval_every: int = 25,
    output: Path | None = None,
    progress: bool = True,
    objective: str | None = None,
    train: str = "all",
    budget_s: float | None = None,
    schedule: str = "constant",
    shard: bool = False,
    rows: int | None = None,
) -> FinetuneResult:
    """Fine-tune a merged (or layer-dropped) model with the objective its task allows, scored on
    validation batches, and record it in the manifest (whose fingerprint follows the new weights).
    `rows`: rows per step (0: the batches as given; None: the task's default, DEFAULT_ROWS, or one a process if there are more)."""
    model = result.model
    score, higher, name = default_score(original, validation)
    task = task_of(model)
    if rows is None:  # the same global batch on any number of processes, at least a row each
        rows = max(DEFAULT_ROWS[task], distributed.world().size) if task in DEFAULT_ROWS else 0
    if objective is None:  # the original's outputs, labelled data or not (classify: --finetune-objective)
        objective = "lm" if task == "causal-lm" else "distill"
    dropped = {i for layers in result.manifest.dropped.values() for i in layers}
    out = finetune(
        model,
        batches,
        score,
        higher_is_better=higher,
        steps=steps,
        lr=lr,
        eval_every=eval_every,
        objective=objective,
        original=original,
        output=output,
        progress=progress,
        train=train,
        shared=result.shared_parameters(),
        deltas=result.delta_parameters(),
        dropped=dropped,
        budget_s=budget_s,
        schedule=schedule,
        shard=shard,
        rows=rows,
        firsts=result.first_merged_layers(),
    )
    result.manifest.finetune = {
        "steps": steps,
        "steps_run": int(out.history[-1]["step"]),
        "budget_s": budget_s,
        "lr": lr,
        "schedule": schedule,
        "processes": distributed.world().size,
        "shard": shard,
        "rows": rows,
        "objective": objective,
        "train": train,
        "score": name,
        "best_step": out.best_step,
        "best_score": out.best_score,
        "history": out.history,
    }
    result.refresh_fingerprint()
    return out
