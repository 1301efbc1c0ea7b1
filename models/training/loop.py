"""The training loop, read top to bottom: ``train`` sets a run up (the process group, the state to resume, the run
folder, the data) and tears it down, ``_loop`` runs it step by step (validation, checkpoints, the divergence stop,
the save on an interrupt, the training state for ``resume``, a sample at the end), and ``train_step`` takes one
optimizer step over a global batch's micro-batches.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.config import ModelConfig, TrainConfig
from models.lm import LanguageModel
from models.progress import Progress
from models.training import folder
from models.training import state as train_state
from models.training.batches import RunData, prepare, saved_source
from models.training.data import IGNORE
from models.training.diagnosis import nonfinite_origin
from models.training.interrupts import Interrupted, StopSignals
from models.training.optim import lr_at, make_optimizer
from models.training.parallel import Layout, all_sum, all_sums, barrier, setup, teardown, unwrapped
from models.training.results import TrainingDiverged, TrainResult
from models.training.runlog import RunLog
from models.training.state import ResumeError, Saved, TrainState
from models.training.validation import evaluate, perplexity

# A validation loss more than this above the best so far (nats per token; x e = 2.7 in perplexity) stops
# the run: a healthy run's validation loss, on the same fixed batches each time, moves far less between
# validations, and a run at lr=10 that was not stopped went on to perplexity 1e16.
DIVERGENCE_MARGIN = 1.0


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    data: bytes | None = None,
    out: str | Path | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    label: str = "",
    divergence_margin: float = DIVERGENCE_MARGIN,
    resume: str | Path | Saved | None = None,
    allow_new_data: bool = False,
) -> TrainResult:
    """Train a model from scratch as ``train_config`` says (its every setting; docs/models.md#trainconfig), on
    in-memory ``data`` (default: the embedded corpus) or on ``train_config.data`` (a text file, a folder of text and
    JSONL files, or a JSONL file) streamed into a memory-mapped token cache ``out/cache/tokens.bin``, reused while
    the files and options are unchanged (docs/training-data.md). ``result.tokenizer`` is the run's tokenizer.

    With ``out``, the checkpoint ``out/model.safetensors`` is written at every validation (atomically), and
    ``out/best.safetensors`` whenever the validation loss is the lowest so far; the whole training state (model,
    optimizer, every rank's RNG, the data position, the step and curves) goes to ``out/train_state`` every
    ``save_every`` steps and when the run is interrupted. While a run trains into ``out``, the folder is locked: a
    second run into it is refused.

    ``resume`` (a run folder holding a training state, or its ``models.training.state.read``) continues that run
    where it stopped: with one process, the result is bit-identical to the uninterrupted run. The state is
    checked first (every file against its checksum, every field of its ``meta.json``). The run trains on the data
    its state records unless other ``data`` or ``train_config.data`` is given; data that differs from the saved
    run's (other files, changed files, other ``DATA_FIELDS``) is refused with what changed, unless
    ``allow_new_data`` (the best validation so far is then forgotten: it measured other data). Resuming into
    another ``out`` first copies the run's checkpoints and log there.

    Under torchrun (``train_config.parallel`` ``"ddp"`` or ``"fsdp"``, or ``context_parallel`` K > 1), each rank
    reads and computes its share of every global batch of ``batch_size`` rows (``models.training.parallel``), and
    the losses, the learning-rate schedule and the result do not depend on the number of ranks. Rank 0 prints,
    validates into the checkpoints and samples.

    Raises ``TrainingDiverged`` when the loss is not finite or the validation loss exceeds its best by more
    than ``divergence_margin`` (the diverged weights are not saved), and ``Interrupted`` on SIGINT or SIGTERM,
    after finishing the current step and saving its model to ``out/model.safetensors``.
    """
    tc, world = train_config, setup(device)
    try:
        layout = Layout.of(world, tc)
        out = Path(out) if out is not None else None
        saved = resume if isinstance(resume, Saved) or resume is None else train_state.read(resume)
        if saved is not None and saved.step >= tc.steps:
            raise ResumeError(
                f"the run in {saved.path.parent} has done {saved.step} steps and this resume asks for {tc.steps} in "
                f"all: nothing is left to train; give --steps (train.steps) greater than {saved.step} to go on"
            )
        if saved is not None and data is None and tc.data in (None, saved.train.data):  # the run's own data
            tc = dataclasses.replace(tc, data=saved_source(saved))
        with StopSignals() as stop, folder.lock(out, world):
            if saved is not None and out is not None and world.main:
                folder.carry_over(saved.path.parent, out)
            with prepare(
                model_config,
                tc,
                world,
                data=data,
                out=out,
                saved=saved,
                allow_new_data=allow_new_data,
                progress=progress and world.main,
            ) as run_data:
                return _loop(run_data, tc, layout, out, saved, stop, progress, label, divergence_margin)
    finally:
        teardown(world, failed=sys.exc_info()[0] is not None)


def _loop(
    run_data: RunData,
    tc: TrainConfig,
    layout: Layout,
    out: Path | None,
    saved: Saved | None,
    stop: StopSignals,
    progress: bool,
    label: str,
    margin: float,
) -> TrainResult:
    """Train on ``run_data`` from scratch or from the state ``saved``, step by step."""
    world, model_config = layout.world, run_data.model_config
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    plain = LanguageModel(model_config).to(world.device)
    plain.checkpoint_blocks = tc.checkpoint_activations
    plain.train()
    model = layout.wrap(plain, precision=tc.precision)
    optimizer = make_optimizer(unwrapped(model), tc)  # after sharding: FSDP's shards
    state = TrainState(model, optimizer, torch.Generator().manual_seed(tc.seed))
    checkpoint, best = (out / folder.LAST, out / folder.BEST) if out is not None else (None, None)
    bar = Progress(tc.steps, label, enabled=progress and world.main)
    for note in run_data.notes + ([layout.note(tc)] if world.size > 1 else []):
        bar.log(note)
    log = RunLog(
        out / folder.LOG if out is not None else Path(folder.LOG),
        every=tc.log_every,
        enabled=world.main and out is not None,
        device=world.device,
    )
    grad_norm = math.nan

    def measures() -> dict[str, float | None]:
        """What the run log records after a step besides a validation loss."""
        step, curve = state.step, state.train_curve
        return {
            "loss": curve[-1][1] if curve and curve[-1][0] == step else None,
            "lr": lr_at(step - 1, tc) if step else None,
            "tokens_per_s": state.tokens / state.train_s if state.train_s else None,
            "grad_norm": grad_norm if step else None,
        }

    def save(paths: list[Path], **info: Any) -> None:
        """Write the whole model to ``paths`` from rank 0 (under FSDP every rank takes part in gathering it), with
        what ``read_header(path)[1]`` returns."""
        whole = layout.whole_model(model, model_config)
        info = {
            "step": state.step,
            "best_step": state.best_step,
            "best_val_loss": state.best_val_loss,
            "train": tc.to_dict(),
            **info,
        }
        for path in paths if whole is not None else ():
            whole.save(path, metadata=info)
        barrier(world)

    def save_state() -> None:
        train_state.save(
            state, out, world, parallel=layout.parallel, model=model_config, train=tc, data=run_data.record
        )

    def diverged(message: str, batches: list[tuple], *, sharded: bool) -> TrainingDiverged:
        """The error for a loss that is not finite, saying where it came from."""
        origin = nonfinite_origin(model, model_config, tc, batches, layout, sharded=sharded)
        bar.close()
        return TrainingDiverged(f"{message}; {origin}", step=state.step, state=state, out=out)

    def validate() -> None:
        """Validate (every rank: the same batches, the same loss), log, stop a diverged run, save checkpoints."""
        step = state.step
        with layout.autocast(tc.precision):
            val = evaluate(model, run_data.val_batches, tc)
        state.val_curve.append((step, val))
        log.log(step, val_loss=val, force=True, **measures())
        line = f"step {step:>5}/{tc.steps}  val loss {val:.3f}  val ppl {perplexity(val):7.2f}"
        if state.train_curve:
            line += f"  train loss {state.train_curve[-1][1]:.3f}  {state.tokens / state.train_s:,.0f} tok/s"
        bar.log(line)
        if not math.isfinite(val):
            best_so_far = "none finite before" if state.best_step is None else _best(state)
            raise diverged(
                f"training diverged at step {step}: validation loss {val:.3f} is not finite; {best_so_far}",
                run_data.val_batches,
                sharded=False,
            )
        if val > state.best_val_loss + margin:
            bar.close()
            message = (
                f"training diverged at step {step}: validation loss {val:.3f} is more than {margin} above "
                f"the best; {_best(state)}; lower lr (now {tc.lr})"
            )
            raise TrainingDiverged(message, step=step, state=state, out=out)
        improved = val < state.best_val_loss
        if improved:
            state.best_step, state.best_val_loss = step, val
        if checkpoint is not None:
            save([checkpoint, *([best] if improved else [])], val_loss=val)

    with log:  # closed however the run ends
        if saved is not None:
            state = train_state.restore(saved, state, world, parallel=layout.parallel, model=model_config)
            bar.log(f"resumed {saved.path.parent} after step {state.step}")
            if run_data.changed and state.best_step is not None:  # its validation measured other data
                bar.log(
                    f"best so far forgotten (step {state.best_step}, val loss {state.best_val_loss:.3f}): other data"
                )
                state.best_step, state.best_val_loss = None, math.inf
        else:
            if log.enabled:
                log.path.unlink(missing_ok=True)  # a new run's log (a resumed one appends)
            validate()
        while state.step < tc.steps:
            signum = stop.requested(world)
            if signum is not None:  # save the model and the whole state of the last whole step, then stop
                bar.close()
                if checkpoint is not None:
                    last_step, last_loss = state.val_curve[-1]
                    save(
                        [checkpoint],
                        interrupted=signal.Signals(signum).name,
                        last_val_step=last_step,
                        last_val_loss=last_loss,
                    )
                    save_state()
                raise Interrupted(signum, state.step, checkpoint)
            t0 = time.perf_counter()
            # This rank's rows of the step's global batch (the same draw on every rank), and its part of them.
            picked = run_data.draw(state.generator)
            micro = [layout.shard(run_data.make(rows)) for rows in layout.micro_batches(picked, tc.accumulate)]
            loss, grad_norm = train_step(state, micro, layout, tc)
            state.step += 1
            if not math.isfinite(loss):
                raise diverged(f"training diverged at step {state.step}: loss {loss}", micro, sharded=True)
            state.train_s += time.perf_counter() - t0
            state.train_curve.append((state.step, loss))
            bar.update(state.step, f"loss {loss:.3f} {state.tokens / state.train_s:,.0f} tok/s")
            log.log(state.step, **measures())
            if state.step % tc.eval_every == 0 or state.step == tc.steps:
                validate()
            if out is not None and tc.save_every and state.step % tc.save_every == 0:
                save_state()
        bar.close()
    stop.release()  # from here (the sample), Ctrl-C interrupts at once: the last checkpoint is saved
    if stop.signum is not None:
        raise Interrupted(stop.signum, tc.steps, checkpoint)
    trained = (layout.whole_model(model, model_config) if layout.parallel == "fsdp" else None) or plain
    result = TrainResult.of(trained, state, out, run_data.tokenizer)
    if tc.sample_tokens and world.main:
        prompt = torch.tensor(run_data.tokenizer.encode(tc.sample_prompt or "\n"), dtype=torch.long)
        tokens = result.model.generate(
            prompt, tc.sample_tokens, temperature=tc.temperature, top_k=tc.top_k, seed=tc.seed
        )
        result.sample = run_data.tokenizer.decode(tokens)
    result.model.eval()
    return result


def train_step(state: TrainState, micro: list[tuple], layout: Layout, tc: TrainConfig) -> tuple[float, float]:
    """One optimizer step after ``state.step`` steps on this rank's micro-batches ``micro`` of the global batch,
    each ``(x, y, cu_seqlens or None, real tokens)``; returns the global batch's loss (the same on every rank) and
    the norm of the whole gradient. Counts the real tokens trained on into ``state.tokens``."""
    model, world = state.model, layout.world
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, tc)
    # The loss is the mean over the global batch's counted targets: each micro-batch's sum over that count
    # (not a mean per micro-batch, which would weigh a micro-batch of few targets as much as a full one),
    # times the data-parallel ranks, whose gradients DDP and FSDP average (context-parallel ranks' are summed).
    counted = all_sum(sum(int((y != IGNORE).sum()) for _, y, _, _ in micro), world)
    scale = layout.data_ranks / counted
    state.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for m, (x, y, cu_seqlens, _) in enumerate(micro):
        x, y = x.to(world.device), y.to(world.device)
        cu_seqlens = cu_seqlens.to(world.device) if cu_seqlens is not None else None
        with layout.sync_gradients(model, last=m == len(micro) - 1), layout.context(model):
            with layout.autocast(tc.precision):  # the forward pass only: backward runs in the forward's dtypes
                logits, _ = model(x, mode=tc.mode, chunk_size=tc.chunk_size, cu_seqlens=cu_seqlens)  # (B, T, V)
            loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="sum")
            (loss_sum * scale).backward()
        total += loss_sum.item()
    layout.reduce_context_gradients(model)
    # The norm of the whole gradient (FSDP's clip_grad_norm_ reduces it over the shards); inf: measured only.
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf))
    state.optimizer.step()
    real = sum(n for *_, n in micro)
    total, real_everywhere = all_sums([total, real], world)
    state.tokens += real if layout.cp is not None else int(real_everywhere)  # context-parallel ranks share rows
    return total / counted, grad_norm


def _best(state: TrainState) -> str:
    return f"best {state.best_val_loss:.3f} (step {state.best_step})"
