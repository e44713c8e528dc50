"""The training loop, shared by continual pretraining and instruction tuning: build everything, then
`while step < total_steps`: one step, log, evaluate, save or stop.

What the loop calls, each in its own module: the backend's verbs (backends/), one step's forwards and backwards
(step.py), the step's accounting and metrics (accounting.py), when to save and when to stop
(checkpointing.py), where to start (startup.py), the guard (guard.py), the forgetting monitor (evaluation.py)
and the hang watchdog (watchdog.py). The loop never names a concrete backend.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mellama_train import checkpoint, lora
from mellama_train.accounting import Window, window_metrics, window_part
from mellama_train.backends import Backend, BackendMaker, collectives, open_backend
from mellama_train.checkpointing import CheckpointManager, StopPolicy
from mellama_train.config import Config, is_frozen, replaced
from mellama_train.data.pipeline import (
    build_eval_batches,
    build_train_batches,
    data_manifest,
    prepare_indexes,
)
from mellama_train.data.pubmed import INDEX_DIR
from mellama_train.ds_config import resolve_ds_config
from mellama_train.evaluation import ForgettingMonitor, evaluate
from mellama_train.export import final as export
from mellama_train.feed import StepFeed
from mellama_train.guard import StepGuard
from mellama_train.metrics import MetricsLogger
from mellama_train.model import (
    build_model,
    count_params,
    device_peak_flops,
    flops_per_token,
    load_tokenizer,
    param_groups,
)
from mellama_train.outputs import amend_run_record, default_output_dir, source_licenses, write_run_record
from mellama_train.preemption import StopFlag
from mellama_train.schedule import lr_lambda
from mellama_train.startup import resume, start_point
from mellama_train.step import NEXT_TOKENS, first_scale, loss_scale, train_step
from mellama_train.threads import set_rank_threads
from mellama_train.trackers import open_trackers
from mellama_train.watchdog import Watchdog, outcome

log = logging.getLogger(__name__)


def train(cfg: Config) -> Path:
    """The whole run, under the hang watchdog and the stop flag from its first line to its last: start-up
    (rendezvous, model load, resume), the step-0 evaluation, the loop, the final export and merge.

    `cfg` is the frozen config `preflight()` returns: checked, with tuning epochs already turned into steps."""
    if not is_frozen(cfg):
        raise TypeError("train() takes the config preflight() returns: preflight(cfg).config, once .ok")
    rank = int(os.environ.get("RANK", "0"))  # the launcher's; the process group does not exist yet
    # A default output dir is decided on rank 0 after the rendezvous: until then a dump goes to stderr only.
    given = Path(cfg.train.output_dir) if cfg.train.output_dir else None
    watchdog = Watchdog(cfg.train.watchdog_minutes * 60, given, rank, heartbeat=rank == 0).start()
    stop = StopFlag().install()
    try:
        run_dir = _train(cfg, watchdog, stop)
    except BaseException as exc:
        watchdog.stop(outcome(exc))
        raise
    finally:
        stop.uninstall()
    watchdog.stop(outcome(None))
    return run_dir


@dataclass
class Run:
    """What start-up built: the loop's inputs."""

    cfg: Config
    """The run's config, with what start-up decided: its output directory, the demo's random base as its base."""
    backend: Backend
    maker: BackendMaker
    run_dir: Path
    tokenizer: Any
    data: Any
    """The training batches (data/pipeline.py): an iterator with its mixture, state_dict and counters."""
    eval_batches: list[dict[str, torch.Tensor]]
    eval_passes: int
    """Forward passes of every evaluation, equal on every rank (a ZeRO-3 forward is a collective)."""
    state: checkpoint.TrainerState
    flops_per_token: float
    load_seconds: float = 0.0
    """Wall seconds the resume's checkpoint load took (0: a fresh start)."""
    record_path: Path | None = None
    """This start's run record (rank 0; None on the others)."""


def _train(cfg: Config, watchdog: Watchdog, stop: StopFlag) -> Path:
    run = _build(cfg, watchdog)
    t, is_main = run.cfg.train, run.backend.env.is_main
    trackers = open_trackers(t.report_to, run.run_dir, run.cfg.to_dict()) if is_main else []
    metrics = MetricsLogger(run.run_dir, is_main, "tensorboard" in t.report_to, trackers)
    try:
        if trackers and run.record_path:  # the next start continues the same tracker runs
            amend_run_record(run.record_path, trackers={g.name: g.run_id for g in trackers if g.run_id})
        _train_and_export(run, metrics, watchdog, stop)
    except BaseException:
        # Whatever ended the run (a stop has closed them as stopped already): the tracker runs end as failed,
        # and closing never hides the error.
        metrics.close_quietly("failed")
        raise
    metrics.close("finished")
    return run.run_dir


def _train_and_export(run: Run, metrics: MetricsLogger, watchdog: Watchdog, stop: StopFlag) -> None:
    """The loop, then final/ (or adapter/). Every rank; rank 0 logs."""
    cfg = run.cfg
    b, t, data, state = run.backend, cfg.train, run.data, run.state
    names, env = data.source_names, run.backend.env
    guard = StepGuard(t.loss_spike_factor, t.skip_loss_spikes, t.max_consecutive_skips)
    guard.load_state_dict(state.guard)
    forgetting = ForgettingMonitor(t.forgetting_source, t.forgetting_margin, t.stop_on_forgetting)
    forgetting.baseline = dict(state.eval_baseline)
    stops = StopPolicy(t, guard, forgetting, stop)
    feed = StepFeed(data, cfg.grad_accum_steps)
    saver = CheckpointManager(
        b, run.run_dir / "checkpoints", t, guard, feed, names, _probe_meta(run, cfg.train.precision), cfg
    )
    pad_id = run.tokenizer.pad_token_id
    pad_id = run.tokenizer.eos_token_id if pad_id is None else pad_id
    peak_flops = device_peak_flops(env.device)
    screened = cfg.data.decontamination is not None  # data/decontaminated/<source> in the metrics

    def held_out() -> dict[str, float]:  # collective: every rank runs the same number of forward passes
        values = evaluate(b, run.eval_batches, run.eval_passes, names, pad_id)
        values.update(forgetting.observe(state.step, values))
        state.eval_baseline = forgetting.baseline
        return values

    progress = tqdm(
        total=cfg.total_steps, initial=state.step, disable=not env.is_main, unit="step", dynamic_ncols=True
    )
    window = Window.new(len(names), env.device)
    if run.load_seconds:
        metrics.log(state.step, {"checkpoint/load_seconds": run.load_seconds})
    watchdog.beat("start-up")
    if run.eval_passes and state.step == 0:  # the baseline: the model before any training step
        watchdog.enter("step-0 evaluation")
        metrics.log(0, held_out())
        watchdog.beat("step-0 evaluation")
    watchdog.enter("training")
    b.train()
    scale = None
    # The one collective outside a step: the first step's loss scale (later ones ride on the step before).
    if state.step < cfg.total_steps:
        scale = first_scale(feed.draw(), cfg.grad_accum_steps, env.world_size, env.device)
    try:
        while state.step < cfg.total_steps:
            lr = b.lr  # the rate this step applies; the scheduler advances inside the last b.step()
            micro_batches = feed.take()
            last = state.step + 1 == cfg.total_steps
            logged = (state.step + 1) % t.log_every == 0 or last
            step_tokens = sum(mb["input_ids"].numel() for mb in micro_batches)
            ranks_part = functools.partial(
                _ranks_part, feed, window, data, step_tokens, logged, last, stop, env.device
            )
            result = train_step(b, micro_batches, scale, guard, len(names), ranks_part)
            state.step += 1
            reduced, loss_value = result.read()  # the step's one host read, after its work is queued
            _, votes, *window_total = result.tail(reduced)
            next_tokens = result.reduced[2 * len(names) + NEXT_TOKENS]  # on the device: no second read
            scale = loss_scale(next_tokens, cfg.grad_accum_steps, env.world_size)
            verdict = guard.after_step(state.step, loss_value, b.step_applied)
            window.add(result.sums, result.counts, step_tokens, verdict.applied)
            watchdog.beat(f"step {state.step}")

            if logged:
                step_totals = reduced[: 2 * len(names)] if verdict.applied else None
                values = window_metrics(
                    window_total,
                    step_totals,
                    window,
                    b,
                    data,
                    feed.counts.epochs,
                    run.flops_per_token,
                    peak_flops,
                    env.world_size,
                    screened,
                )
                values.update({"train/lr": lr, **guard.metrics()})
                metrics.log(state.step, values)
                progress.set_postfix(
                    loss=f"{values.get('train/loss', math.nan):.4f}",
                    tok_s=f"{values['train/tokens_per_sec']:.0f}",
                )
                window = Window.new(len(names), env.device)
            if run.eval_passes and (last or (t.eval_every and state.step % t.eval_every == 0)):
                metrics.log(state.step, held_out())
                watchdog.beat(f"evaluation at step {state.step}")
            progress.update(1)
            stopping = stops.after_step(state.step, last, votes)
            if saver.due(state.step, last, stopping):
                began = time.perf_counter()
                saved = saver.save(state)
                # Blocking on every rank: its share of wall time is the cost of the interval (PERFORMANCE.md).
                metrics.log(state.step, {"checkpoint/save_seconds": time.perf_counter() - began})
                watchdog.beat(f"checkpoint {saved.name}")
            if stopping:
                metrics.close("stopped")
                raise stopping.error(str(saved))
    finally:
        progress.close()

    watchdog.enter("final export")
    # The same batch on every rank; the PubMed update index built at start-up is read back, not built again.
    probe = next(
        build_train_batches(cfg, run.tokenizer, rank=0, world_size=1, index_dir=run.run_dir / INDEX_DIR)
    )
    metrics.log(state.step, {"export/probe_loss": export.probe_loss(b, probe, len(names))})
    began = time.perf_counter()
    _write_outputs(cfg, run)
    metrics.log(state.step, {"export/seconds": time.perf_counter() - began})


def _ranks_part(
    feed: StepFeed,
    window: Window,
    data: Any,
    step_tokens: int,
    logged: bool,
    last: bool,
    stop: StopFlag,
    device: torch.device,
) -> torch.Tensor:
    """This rank's share of the step's one collective (step.py), built once the step's last forward is queued:
    the next step's labelled tokens (drawn now: feed.py), its stop vote and, on a logged step, the log window's
    counters (read before the draw, so that they end at this step)."""
    window_now = window_part(window, data, window.processed + step_tokens) if logged else None
    head = torch.tensor(
        [0.0 if last else feed.draw(), float(stop.requested)], dtype=torch.float64, device=device
    )
    return head if window_now is None else torch.cat([head, window_now])


def _build(cfg: Config, watchdog: Watchdog) -> Run:
    """Collective start-up: the ranks, the run directory and its record, the data, the model inside the backend,
    and the resume from the start point."""
    t = cfg.train
    maker = open_backend(
        t.backend,
        lambda: resolve_ds_config(t.ds_config, cfg),
        cfg.optim,
        cfg.grad_accum_steps,
        t.loss_chunk_tokens,
    )
    env = maker.start(t.dist_timeout_minutes)
    threads = set_rank_threads()
    watchdog.beat("process group start-up")
    if t.world_size and t.world_size != env.world_size:
        raise ValueError(
            f"train.world_size is {t.world_size} but the launcher started {env.world_size} ranks;"
            " drop train.world_size (it only sizes a --dry-run)"
        )
    run_dir = Path(collectives.broadcast_object(t.output_dir or str(default_output_dir(cfg))))
    cfg = replaced(cfg, {"train.output_dir": str(run_dir)})
    resume_from = start_point(cfg, run_dir, env.is_main)
    watchdog.set_run_dir(run_dir)  # dumps go there; rank 0's heartbeat starts (the start point was accepted)
    record = None
    if env.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        record = write_run_record(
            run_dir,
            cfg,
            maker.ds_config,
            data_manifest(cfg),
            str(resume_from[0]) if resume_from else None,
            threads=threads,
        )
        watchdog.beat("PubMed update index")
        prepare_indexes(cfg, run_dir / INDEX_DIR)  # once, before every rank's streams load it
    collectives.barrier()

    log.info("run directory %s (world size %d)", run_dir, env.world_size)
    tokenizer = load_tokenizer(cfg)  # (tune: installs the chat template)
    data = build_train_batches(cfg, tokenizer, env.rank, env.world_size, run_dir / INDEX_DIR)
    if cfg.lora.enabled and cfg.model.init == "random":
        # The demo's random base goes to disk first, so the adapter (and `mellama-train merge`) has a base.
        if env.is_main:
            lora.write_random_base(cfg, tokenizer, run_dir / "base")
        collectives.barrier()
        cfg = replaced(cfg, {"model.init": "pretrained", "model.path": str(run_dir / "base")})
    with maker.building_model() as device:
        model = build_model(cfg, tokenizer, device=device)
    watchdog.beat("model loaded")
    n_params = count_params(model)
    flops_tok = flops_per_token(model.config, n_params, cfg.data.seq_len, frozen_base=cfg.lora.enabled)
    if cfg.lora.enabled:
        model = lora.apply_lora(model, cfg)
    groups = param_groups(model, cfg.optim.weight_decay)
    backend = maker.wrap(
        model, groups, lr_lambda(cfg.warmup_steps, cfg.total_steps, cfg.optim.min_lr_ratio), env
    )
    watchdog.beat("engine built")
    log.info(
        "model ready: %.1fM parameters (%.2fM trained), %d steps of %d sequences",
        n_params / 1e6,
        lora.trainable_count(model) / 1e6,
        cfg.total_steps,
        t.global_batch_size,
    )
    eval_batches = build_eval_batches(cfg, tokenizer, env.rank, env.world_size)
    eval_passes = collectives.all_reduce_max(len(eval_batches))
    state = checkpoint.TrainerState(world_size=env.world_size)
    began = time.perf_counter()
    if resume_from:
        state = resume(backend, data, resume_from, record)
    load_seconds = time.perf_counter() - began if resume_from else 0.0
    state.data_licenses = source_licenses(cfg)  # the recipe's notes, into each checkpoint's trainer.json
    return Run(
        cfg,
        backend,
        maker,
        run_dir,
        tokenizer,
        data,
        eval_batches,
        eval_passes,
        state,
        flops_tok,
        load_seconds,
        record,
    )


def _probe_meta(run: Run, precision: str) -> Any:
    """What each checkpoint of an exportable backend carries for `mellama-train export`'s check: the logits of a
    fixed probe sequence (export/final.py). Called at each save; collective (every rank takes part in the forward)."""
    b = run.backend
    probe_ids = export.probe_input(min(len(run.tokenizer), b.module.config.vocab_size))

    def meta() -> Any:
        if not b.exportable:
            return None
        logits = export.probe_logits(b, probe_ids, b.env.device)
        return lambda path: export.write_checkpoint_meta(
            path, b.module.config, run.tokenizer, probe_ids, logits, precision
        )

    return meta


def _write_outputs(cfg: Config, run: Run) -> None:
    """Collective: final/ (full training) or adapter/ and, merged on rank 0, final/ (LoRA)."""
    b, is_main = run.backend, run.backend.env.is_main
    if not cfg.lora.enabled:
        export.write_hf_model(b, run.tokenizer, run.run_dir / "final", is_main)
        return
    lora.save_adapter(b, run.run_dir / "adapter", cfg.model.path, run.tokenizer, is_main)
    if cfg.lora.merge and is_main:
        # Rank 0 alone, after the last collective: the other ranks may exit while it merges.
        run.maker.release_model_construction()
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        lora.merge_adapter(
            cfg.model.path, run.run_dir / "adapter", run.run_dir / "final", dtype, cfg.model.trust_remote_code
        )
