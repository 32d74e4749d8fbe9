"""Train one LoRA adapter: AdamW, warmup + decay, gradient accumulation, clipping,
validation, atomic checkpoints and exact resume.

The trainer is a function with injected parts (``loss_fn``, ``callback``), configured by
one dataclass whose field metadata is the CLI help (see cli.py).

Memory: ``memory_strategy="auto"`` (the default) runs the plain step (every activation
kept, no recompute) when the planner says it fits (``memory_gb``, else half this
machine's memory); otherwise per-block gradient checkpointing (``model.grad_checkpoint``),
the MLP in chunks along the sequence (``model.mlp_chunk``) and a chunked loss that never
builds (L, vocab) logits, so a step's peak memory grows linearly in the sequence length,
or a costlier strategy of :mod:`.memory`. The choice is ``TrainResult.memory_strategy``
(and the fleet's manifest).

Attention: packed documents attend only within themselves (``attention_mask="document"``,
the batches' segment ids; evaluation too, so the valid loss is each document's own);
``s2_attn_group`` turns on LongLoRA's S²-Attn (``model.s2_group``) for the training
steps only -- the model uses it in training mode, so validation and generation use full
attention.

Data-parallel (``group=``, :mod:`mozgach_mlx.distributed`): each rank computes its share
of every step's micro-batches, the LoRA gradients are summed over the ranks, every rank
takes the same step; rank 0 alone reads and writes checkpoints, logs and the adapter.

Resume: every ``save_every`` optimizer steps an atomic checkpoint is written
(:mod:`mozgach_mlx.checkpoints`). Dropout randomness is derived from (seed, micro-step),
so a resumed run reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import checkpoints, contrast, lora, memory
from . import data as data_mod
from . import distributed as dist
from . import loss as loss_mod
from .checkpoints import load_checkpoint_state
from .errors import ConfigError, TrainingError
from .io import atomic_write_json
from .train_config import TrainConfig

LOG_FILE = "train_log.jsonl"
RESULT_FILE = "result.json"


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    tokens: int
    train_loss: float
    valid_loss: float | None
    valid_ppl: float | None
    seconds: float
    peak_memory_gb: float
    losses: list[float]
    resumed_from: int = 0
    base_valid_loss: float | None = None  # the fresh adapter's (= the base's), with base_loss=True
    memory_strategy: dict = field(default_factory=dict)  # the MemoryStrategy the steps ran with
    ranks: int = 1  # the processes this run's steps ran on (a resumed run's earlier steps: its log's "ranks")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def training_record(cfg: TrainConfig) -> dict:
    """How an adapter was trained, as its ``adapter_config.json`` records it (the
    ``"mozgach"`` block's ``"training"``; trainable embeddings / norms are in its
    ``"lora"``): the attention it saw and the sequence length."""
    return {"max_seq_length": cfg.max_seq_length, "pack": cfg.pack, "attention_mask": cfg.attention_mask,
            "s2_attn_group": cfg.s2_attn_group}


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from 0 to the peak
    over ``warmup_steps``, then cosine/linear decay to ``min_lr_ratio * peak`` at the end."""
    peak = cfg.learning_rate
    if step < cfg.warmup_steps:
        return peak * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_schedule == "constant":
        return peak
    span = max(1, total_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    floor = peak * cfg.min_lr_ratio
    if cfg.lr_schedule == "linear":
        return floor + (peak - floor) * (1.0 - t)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def default_loss(model, inputs: mx.array, targets: mx.array, mask: mx.array, cfg: TrainConfig, *,
                 with_grad: bool = True, segment_ids: mx.array | None = None):
    """Sum of token losses and the token count (chunked lm_head + cross-entropy).
    ``with_grad=False`` (evaluation) skips the per-chunk gradient work; ``segment_ids``
    (B, L) keeps the attention of packed documents apart."""
    return loss_mod.sequence_loss(model, inputs, targets, mask, chunk=cfg.loss_chunk, with_grad=with_grad,
                                  segment_ids=segment_ids)


_eval_loss = partial(default_loss, with_grad=False)  # the default loss of evaluations


def memory_plan(model, cfg: TrainConfig, *, quantize: int | None = None):
    """The planner's :class:`~mozgach_mlx.plan.Plan` of ``cfg``'s training step on
    ``model`` (a loaded model, or anything :func:`mozgach_mlx.plan` takes): the strategy
    ``cfg.memory_strategy`` resolves to (``auto``: the fastest that fits
    ``cfg.memory_gb``) and whether it fits."""
    from .plan import plan

    kw = {} if quantize is None else {"quantize": quantize}
    attention = {}
    if cfg.s2_attn_group is not None:
        attention["s2_group"] = cfg.s2_attn_group
    return plan(model, cfg.max_seq_length, batch_size=cfg.batch_size, lora_rank=cfg.lora.r,
                lora_targets=tuple(t for t in cfg.lora.targets if t.endswith("_proj")), mlp_chunk=cfg.mlp_chunk,
                loss_chunk=cfg.loss_chunk, memory_gb=cfg.memory_gb, strategy=cfg.memory_strategy,
                tile_chunk=cfg.tile_chunk, attention=attention or None, plain=cfg.grad_checkpoint is not True,
                contrast=cfg.contrast > 0, **kw)


def check_memory(p) -> None:
    """ConfigError (one line: what, the numbers, concrete ways out) when plan ``p`` does
    not fit its budget."""
    if p.fits is False:
        GiB = 2**30
        raise ConfigError(f"memory: a training step of {p.context:,} tokens needs ~{p.total_bytes / GiB:.1f} GiB "
                          f"by the plan, over the budget of {p.budget_bytes / GiB:.2f} GiB (memory_gb / --memory-gb); "
                          + "; ".join(p.suggestions) + "; see `mozgach plan`")


def _segment_kwargs(loss_fn: Callable, segment_ids: mx.array | None) -> dict:
    """``{"segment_ids": ...}`` for a batch that packs several documents (else ``{}``),
    checking that ``loss_fn`` takes the keyword."""
    if segment_ids is None:
        return {}
    params = inspect.signature(loss_fn).parameters.values()
    if not any(p.name == "segment_ids" or p.kind is p.VAR_KEYWORD for p in params):
        raise ConfigError("loss_fn takes no segment_ids= keyword but the batch packs several documents "
                          "(TrainConfig.attention_mask='document'); accept segment_ids=None in loss_fn and pass it "
                          "to the model, or set attention_mask='causal'.")
    return {"segment_ids": segment_ids}


def evaluate(model, seqs, cfg: TrainConfig, max_batches: int | None = None,
             loss_fn: Callable | None = None, group=None) -> tuple[float, int]:
    """Mean token loss over ``seqs`` (in order, no dropout); returns (loss, tokens).
    ``loss_fn`` as in :func:`train_adapter` (default: the chunked loss without its
    gradient work). With a process ``group`` each rank evaluates every W-th batch and
    the sums are added over the group (every rank gets the same answer)."""
    if loss_fn is None:
        loss_fn = _eval_loss
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, (x, y, m, seg) in enumerate(_micro_batches(seqs, cfg, 0, 0, shuffle=False)):
            if max_batches is not None and i >= max_batches:
                break
            if i % dist.size(group) != dist.rank(group):
                continue
            s, n = loss_fn(model, x, y, m, cfg, **_segment_kwargs(loss_fn, seg))
            mx.eval(s, n)
            total += s.item()
            count += int(n.item())
    finally:
        if was_training:
            model.train()
    if group is not None:
        total, count = dist.sum_scalars([total, count], group)
        count = int(round(count))
    if count == 0:
        return float("nan"), 0
    return total / count, count


# ---------------------------------------------------------------------------- the loop

def _resolve_data(data: Any, tok, cfg: TrainConfig) -> dict:
    if isinstance(data, dict) and "train" in data:
        return data
    return data_mod.load_dataset(data, tok, max_seq_length=cfg.max_seq_length, pack=cfg.pack,
                                 overlap=cfg.window_overlap, skip_bad_lines=cfg.skip_bad_lines)


def _documents(cfg: TrainConfig) -> bool:
    return cfg.attention_mask == "document"


def _micro_batches(seqs, cfg: TrainConfig, epoch: int, start: int, *, shuffle: bool = True) -> Iterator:
    """(inputs, targets, mask, segment_ids or None) micro-batches of one epoch."""
    it = data_mod.batches(seqs, cfg.batch_size, seed=cfg.seed, epoch=epoch, start=start, shuffle=shuffle,
                          segments=_documents(cfg), group_by_length=cfg.group_by_length)
    return it if _documents(cfg) else ((*b, None) for b in it)


@contextlib.contextmanager
def _model_settings(model, **attrs: Any) -> Iterator[None]:
    """Set attributes of ``model`` (and training mode) for the block, restore them after."""
    before = {k: getattr(model, k, None) for k in attrs}
    was_training = model.training
    for k, v in attrs.items():
        setattr(model, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(model, k, v)
        model.train(was_training)


@dataclass
class _Progress:
    """Where a run is: what a checkpoint's state.json restores."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # micro-batches of the current epoch already consumed
    tokens: int = 0
    losses: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, state: dict | None) -> _Progress:
        if state is None:
            return cls()
        return cls(state["step"], state["epoch"], state["position"], state["tokens"], list(state["losses"]))


class _Batches:
    """The endless micro-batch stream of a run: epochs of ``data.batches`` in order,
    resumable at (epoch, position)."""

    def __init__(self, train, cfg: TrainConfig, prog: _Progress) -> None:
        self.train, self.cfg, self.prog = train, cfg, prog
        self.n_micro = math.ceil(len(train) / cfg.batch_size)
        self._it = _micro_batches(train, cfg, prog.epoch, prog.position)

    def _next_epoch(self) -> None:
        self.prog.epoch, self.prog.position = self.prog.epoch + 1, 0
        self._it = _micro_batches(self.train, self.cfg, self.prog.epoch, 0)

    def next(self):
        try:
            batch = next(self._it)
        except StopIteration:
            self._next_epoch()
            batch = next(self._it)
        self.prog.position += 1
        if self.prog.position >= self.n_micro:  # epoch boundary inside an optimizer step
            self._next_epoch()
        return batch


def _accumulate(grad_fn, loss_fn: Callable, batches: _Batches, cfg: TrainConfig, step: int, group=None,
                negatives: contrast.Negatives | None = None, eval_fn: Callable | None = None):
    """Sum of ``grad_accumulation`` micro-batches' gradients, loss sums and token counts
    (data-parallel: this rank's micro-batches, then the sums over the group); with
    ``negatives`` (``cfg.contrast``) each micro-batch's hinge gradient is added, and the
    fourth item is ``(hinge total, rows held, rows drawn)`` of the step (None without)."""
    acc, step_loss, step_tokens, hinge = None, 0.0, 0, [0.0, 0, 0]
    seg_kwargs = partial(_segment_kwargs, loss_fn)
    mine = dist.my_micro_batches(cfg.grad_accumulation, None if cfg.context_parallel else group)
    for micro in range(cfg.grad_accumulation):
        x, y, m, seg = batches.next()  # every rank walks the whole stream: same data position
        if micro not in mine:
            continue
        # Dropout keys from (seed, micro-step): exact replay after resume.
        mx.random.seed((cfg.seed * 1_000_003 + step * cfg.grad_accumulation + micro) % 2**31)
        (s, n), g = grad_fn(x, y, m, **_segment_kwargs(loss_fn, seg))
        acc = g if acc is None else tree_map(mx.add, acc, g)
        mx.eval(s, n, acc)
        step_loss += s.item()
        step_tokens += int(n.item())
        if negatives is not None:
            h, gh, held = negatives.penalty(grad_fn, eval_fn, seg_kwargs, step, micro)
            hinge = [hinge[0] + h, hinge[1] + held, hinge[2] + cfg.batch_size]
            if gh is not None:
                acc = tree_map(mx.add, acc, gh)
                mx.eval(acc)
    acc, step_loss, step_tokens = dist.sum_step(acc, step_loss, step_tokens, group)
    if negatives is None:
        return acc, step_loss, step_tokens, None
    if group is not None:
        hinge = dist.sum_scalars(hinge, group)
    return acc, step_loss, step_tokens, tuple(hinge)


def _update(model, opt: optim.Optimizer, acc, step_tokens: int, cfg: TrainConfig, lr: float) -> float:
    """One AdamW step on the token-mean gradient (clipped); returns the gradient norm."""
    grads = tree_map(lambda g, n=step_tokens: g / n, acc)
    if cfg.max_grad_norm > 0:
        grads, gnorm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
    else:
        gnorm = mx.sqrt(sum((g * g).sum() for _, g in tree_flatten(grads)))
    opt.learning_rate = lr
    opt.update(model, grads)
    mx.eval(model.trainable_parameters(), opt.state)
    return float(gnorm.item())


def _check_step(loss_sum: float, step_tokens: int, step: int, out_dir: Path) -> float:
    """The step's mean loss; TrainingError for a step without targets or a non-finite loss."""
    if step_tokens == 0:
        raise TrainingError("an optimizer step saw no target tokens (all masked); check the data's "
                            "prompt/completion masking")
    loss_value = loss_sum / step_tokens
    if not math.isfinite(loss_value):
        raise TrainingError(f"non-finite loss ({loss_value}) at step {step + 1}; lower the learning "
                            f"rate or check the data. The last good checkpoint is kept in "
                            f"{checkpoints.checkpoint_dir(out_dir)}")
    return loss_value


def _resume(out_dir: Path, model, opt: optim.Optimizer, cfg: TrainConfig) -> dict | None:
    """Restore the committed checkpoint of ``out_dir`` (if any) into model and optimizer."""
    state = load_checkpoint_state(out_dir)
    if state is None:
        return None
    if state.get("fingerprint") != cfg.fingerprint():
        raise TrainingError(f"{out_dir}: a checkpoint from a different configuration exists; use the "
                            f"same config to resume, or delete {checkpoints.checkpoint_dir(out_dir)} to start over")
    checkpoints.restore_checkpoint(out_dir, model, opt, state)
    return state


def train_adapter(model, tok, data: Any, cfg: TrainConfig | None = None, out_dir: str | Path = "adapter",
                  *, loss_fn: Callable = default_loss, callback: Callable[[dict], None] | None = None,
                  resume: bool = True, save_formats: str = "both", log_path: str | Path | None = None,
                  base_loss: bool = False, group=None, negatives: list | None = None) -> TrainResult:
    """Train one LoRA adapter on ``data`` and save it to ``out_dir``.

    Args:
        model: a mozgach model. This function owns the adapter's lifecycle: it applies
            ``cfg.lora`` (replacing adapters of another config), resets the adapter to a
            fresh one seeded by ``cfg.seed``, trains and saves it. The model's
            ``grad_checkpoint`` / ``mlp_chunk`` / ``s2_group`` and train/eval mode are
            restored after.
        tok: its tokenizer.
        data: a dataset path (dir with train/valid JSONL, or one JSONL file) or a dict
            ``{"train": seqs, "valid": seqs}`` of already tokenized sequences.
        cfg: the training configuration (defaults: the seed's).
        out_dir: where the adapter, checkpoints and logs go.
        loss_fn: ``(model, inputs, targets, mask, cfg) -> (loss_sum, n_tokens)``; it also
            gets ``segment_ids=`` (B, L) for a batch that packs several documents when
            ``cfg.attention_mask == "document"`` (pass it to ``model.hidden``).
        callback: called with a dict after every optimizer step and evaluation.
        resume: continue from ``out_dir/checkpoint`` if it exists and matches ``cfg``.
        save_formats: adapter layouts to write: ``peft``, ``mlx-lm`` or ``both``.
        log_path: the JSONL step log (default ``out_dir/train_log.jsonl``).
        base_loss: also measure the validation loss of the fresh adapter (B = 0: exactly
            the base) before training, as ``TrainResult.base_valid_loss``.
        group: an ``mx.distributed`` group (``mozgach_mlx.distributed.init("data")``)
            to train data-parallel: every rank calls this with the same model, data and
            config (checked at the start); rank r computes micro-batches r, r + W, ...
            of every step (``grad_accumulation`` must be a multiple of W), the LoRA
            gradients are summed over the group, every rank takes the same step. Only
            rank 0 writes files, logs and calls ``callback``; every rank returns the
            same result.
        negatives: with ``cfg.contrast > 0``, the other domains' training sequences (a
            list per domain, tokenized as ``data``'s; a fleet passes them): the adapter is
            also kept from lowering their loss below the base's (:mod:`mozgach_mlx.contrast`).

    Returns:
        TrainResult with the loss history, validation loss/perplexity, tokens and timing.
    """
    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    main = dist.is_main(group)
    mplan = memory_plan(model, cfg)
    check_memory(mplan)  # before any data is read
    strategy = memory.MemoryStrategy(**mplan.strategy)
    if not strategy.runs_model_step and loss_fn is not default_loss:
        raise ConfigError(f"memory strategy {strategy.describe()} runs the default loss only; pass "
                          "memory_strategy='none' with a custom loss_fn")
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    splits = _resolve_data(data, tok, cfg)
    train, valid = splits["train"], splits.get("valid")
    if group is not None:
        _check_group(model, train, valid, cfg, group)
    if not train:
        raise ConfigError("the training split is empty after tokenization; check the data path and format")
    no_checkpoint = strategy.plain or cfg.grad_checkpoint is False  # None (auto) and not plain: checkpoint
    with _model_settings(model, grad_checkpoint=not no_checkpoint, mlp_chunk=None if strategy.plain else cfg.mlp_chunk,
                         s2_group=cfg.s2_attn_group):
        lora.ensure(model, cfg.lora)
        lora.reset(model, seed=cfg.seed)
        neg = contrast.of_fresh_adapter(model, negatives, cfg)  # None unless cfg.contrast
        eval_fn = None if loss_fn is default_loss else loss_fn
        base_valid = evaluate(model, valid, cfg, cfg.eval_batches, eval_fn, group)[0] if base_loss and valid \
            else None
        result = _train(model, train, valid, cfg, out_dir, loss_fn, eval_fn, callback if main else None, resume,
                        Path(log_path) if log_path is not None else out_dir / LOG_FILE, group, strategy, neg)
        result.base_valid_loss = base_valid
        result.memory_strategy = strategy.to_dict()
        if main:
            lora.save(model, out_dir, format=save_formats, training=training_record(cfg))
    shutil.rmtree(_offload_dir(out_dir, group), ignore_errors=True)
    if main:
        atomic_write_json(out_dir / RESULT_FILE, {**result.to_dict(), "config": cfg.to_dict()})
        # A finished run needs no resume state (optimizer moments are 2x the adapter's size);
        # a crash before this line just replays the steps after the last checkpoint.
        shutil.rmtree(checkpoints.checkpoint_dir(out_dir), ignore_errors=True)
        shutil.rmtree(out_dir / OFFLOAD_DIR, ignore_errors=True)
    return result


def _check_group(model, train, valid, cfg: TrainConfig, group) -> None:
    """ConfigError on every rank unless all ranks train the same config over the same base
    and data, with micro-batches that split evenly over the ranks."""
    from .rundir import base_fingerprint

    data = hashlib.sha256()
    for seqs in (train, valid or []):
        data.update(str(len(seqs)).encode())
        for seq in seqs:
            data.update(np.asarray(seq[0]).tobytes())
    dist.check_same(group, config=cfg.fingerprint(), base=base_fingerprint(model), data=data.hexdigest()[:16])
    if not cfg.context_parallel:
        dist.check_data_parallel(cfg.grad_accumulation, group)


def _start(out_dir: Path, model, opt: optim.Optimizer, cfg: TrainConfig, resume: bool, group) -> dict | None:
    """The checkpoint state to continue from (restored into model and optimizer); with a
    group, rank 0 reads it and every rank gets rank 0's adapter, optimizer state and
    progress, so all ranks start identical."""
    state = dist.together(group, lambda: _resume(out_dir, model, opt, cfg) if resume else None, main_only=True)
    if group is None:
        return state
    state = dist.broadcast_json(state, group)
    params = dist.broadcast_tree(model.trainable_parameters(), group)
    model.load_weights(tree_flatten(params), strict=False)
    opt.state = dist.broadcast_tree(opt.state, group)
    return state


def _train(model, train, valid, cfg: TrainConfig, out_dir: Path, loss_fn: Callable, eval_fn: Callable | None,
           callback: Callable[[dict], None] | None, resume: bool, log_path: Path, group=None,
           strategy: memory.MemoryStrategy | None = None, negatives: contrast.Negatives | None = None) -> TrainResult:
    """The optimisation loop of :func:`train_adapter` (adapter already fresh), then the
    final validation."""
    n_micro = math.ceil(len(train) / cfg.batch_size)
    steps_per_epoch = math.ceil(n_micro / cfg.grad_accumulation)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    opt = optim.AdamW(learning_rate=lr_at(0, cfg, total_steps), weight_decay=cfg.weight_decay)
    opt.init(model.trainable_parameters())
    state = _start(out_dir, model, opt, cfg, resume, group)
    prog = _Progress.of(state)
    main = dist.is_main(group)
    kept = checkpoints.read_log(log_path, prog.step) if state is not None else []
    log = checkpoints.RunLog(log_path, kept) if main else None

    model.train()
    grad_fn = _grad_fn(model, loss_fn, cfg, strategy or memory.MemoryStrategy(), _offload_dir(out_dir, group),
                       group)
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    bar = _progress(cfg, total_steps, prog.step) if main else None
    batches = _Batches(train, cfg, prog)
    saved = state["step"] if state is not None else 0  # the last committed checkpoint's step
    try:
        while prog.step < total_steps:
            try:
                acc, loss_sum, step_tokens, hinge = _accumulate(grad_fn, loss_fn, batches, cfg, prog.step, group,
                                                                negatives, eval_fn or _eval_loss)
            except RuntimeError as e:
                if group is None or not str(e).startswith(COLLECTIVE_ERRORS):
                    raise
                raise _group_lost(e, group, prog.step + 1, saved, out_dir) from None
            loss_value = _check_step(loss_sum, step_tokens, prog.step, out_dir)
            gnorm = _update(model, opt, acc, step_tokens, cfg, lr_at(prog.step, cfg, total_steps))
            prog.step += 1
            prog.tokens += step_tokens
            prog.losses.append(loss_value)
            elapsed = time.perf_counter() - t0
            rec = {"step": prog.step, "loss": loss_value, "lr": lr_at(prog.step - 1, cfg, total_steps),
                   "grad_norm": gnorm, "tokens": prog.tokens, "epoch": prog.epoch,
                   "peak_memory_gb": mx.get_peak_memory() / 1e9, "elapsed_s": elapsed}
            if group is not None:  # what ran: a resumed run's log can mix rank counts
                rec["ranks"] = dist.size(group)
            if hinge is not None:  # the contrastive term per own token (not in "loss"), rows held
                rec["contrast"] = hinge[0] / step_tokens
                rec["contrast_active"] = hinge[1] / max(1, hinge[2])
            if cfg.eval_every and valid and prog.step % cfg.eval_every == 0 and prog.step < total_steps:
                rec["valid_loss"], _ = evaluate(model, valid, cfg, cfg.eval_batches, eval_fn, group)
            if log is not None:
                log.write(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{(prog.tokens - _tok0(state)) / elapsed:.0f}",
                                peak=f"{mx.get_peak_memory() / 1e9:.2f}GB")
            if cfg.save_every and prog.step % cfg.save_every == 0 and prog.step < total_steps:
                if main:  # rank 0 writes it for the group
                    checkpoints.save_checkpoint(out_dir, model, opt, {
                        **dataclasses.asdict(prog), "fingerprint": cfg.fingerprint(), "total_steps": total_steps})
                saved = prog.step
            if callback is not None:
                callback(rec)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()

    valid_loss = evaluate(model, valid, cfg, cfg.eval_batches, eval_fn, group)[0] if valid else None
    losses = prog.losses
    return TrainResult(
        out_dir=str(out_dir), steps=prog.step, tokens=prog.tokens,
        train_loss=float(np.mean(losses[-max(1, steps_per_epoch):])) if losses else float("nan"),
        valid_loss=valid_loss, valid_ppl=math.exp(valid_loss) if valid_loss is not None else None,
        seconds=time.perf_counter() - t0, peak_memory_gb=mx.get_peak_memory() / 1e9, losses=losses,
        resumed_from=state["step"] if state is not None else 0, ranks=dist.size(group))


# how MLX's distributed backends begin their errors ("[ring] connection to a peer was lost")
COLLECTIVE_ERRORS = ("[ring]", "[jaccl]", "[mpi]", "[nccl]")


def _group_lost(e: RuntimeError, group, step: int, saved: int, out_dir: Path) -> dist.GroupLost:
    """The one-line error of a rank whose step's collective failed (MLX's ring raises
    "connection to a peer was lost" when another rank died): which rank, which step, and
    where the rerun resumes."""
    where = f"the checkpoint of step {saved} in {checkpoints.checkpoint_dir(out_dir)}" if saved else \
        "the start (no checkpoint was committed yet)"
    me, n = dist.rank(group), dist.size(group)
    who = f"rank {1 - me}" if n == 2 else f"another of the {n} ranks"
    return dist.GroupLost(f"rank {me}: a collective of step {step} failed ({' '.join(str(e).split())}): {who} left "
                          f"the group (died or was killed); rerun the same command to resume from {where}, on any "
                          "number of ranks")


OFFLOAD_DIR = ".offload"


def _offload_dir(out_dir: Path, group=None) -> Path:
    """Where this process's offload files go: ``out_dir/.offload``, one folder per rank
    in a group (ranks on several machines may share the disk)."""
    return out_dir / OFFLOAD_DIR / (f"rank{dist.rank(group)}" if group is not None else "")


def _grad_fn(model, loss_fn: Callable, cfg: TrainConfig, strategy: memory.MemoryStrategy, offload: Path,
             group=None):
    """``(x, y, mask, **kw) -> ((loss_sum, n), grads)``: the default step, or the memory
    strategy's (offload files in ``offload``; a crashed run's are removed here).

    The default step is compiled with ``cfg.compile`` on one process with the built-in
    loss: a user's ``loss_fn`` may have Python side effects that a traced graph would run
    only once, and the data-parallel step's collectives stay outside a trace."""
    if cfg.context_parallel:  # every rank: its slice of every sequence (mozgach_mlx.context)
        from .context.step import grad_fn

        return grad_fn(model, loss_fn, cfg, strategy, group, offload_dir=offload)
    if strategy.runs_model_step:
        vg = nn.value_and_grad(model, lambda x, y, k, **kw: loss_fn(model, x, y, k, cfg, **kw))
        return compiled(model, vg) if cfg.compile and group is None and loss_fn is default_loss else vg
    if offload.exists():
        memory.clean_stale_offload(offload)
    return memory.value_and_grad(model, strategy, loss_chunk=cfg.loss_chunk, offload_dir=offload)


def compiled(model, vg: Callable) -> Callable:
    """``vg`` (an ``nn.value_and_grad`` of ``model``) under ``mx.compile``, with the model's
    state and the random state (dropout) as the graph's inputs and outputs, as mlx-lm
    compiles its step. One trace per input shape (a new shape traces again); elementwise
    chains fuse into one kernel each, which on the CPU matters most (MLX's unfused CPU
    elementwise ops are slow next to its BLAS matmuls)."""
    state = [model.state, mx.random.state]
    return mx.compile(vg, inputs=state, outputs=state)


def _tok0(state: dict | None) -> int:
    return state["tokens"] if state else 0


def _progress(cfg: TrainConfig, total: int, initial: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", leave=False, dynamic_ncols=True)
