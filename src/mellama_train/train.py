"""The training loop, shared by continual pretraining and instruction tuning: build everything, then
`while step < total_steps`: forward, backward, step, log, evaluate, save. Setup, checkpoint I/O, metrics, LoRA
and export live in their own modules and are called from here.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mellama_train import checkpoint, disk_space, engine, export, lora, single_device
from mellama_train.config import Config
from mellama_train.data.pipeline import (
    build_eval_batches,
    build_train_batches,
    data_manifest,
    prepare_indexes,
)
from mellama_train.data.pubmed import INDEX_DIR
from mellama_train.data.source import CheckShare, data_counts, reason_counts
from mellama_train.ds_config import resolve_ds_config
from mellama_train.evaluation import Forgetting, ForgettingMonitor, evaluate
from mellama_train.guard import Diverged, StepGuard
from mellama_train.loss import forward_loss, labelled_tokens
from mellama_train.metrics import MetricsLogger
from mellama_train.model import (
    build_model,
    count_params,
    device_peak_flops,
    flops_per_token,
    load_tokenizer,
    param_groups,
)
from mellama_train.outputs import (
    amend_run_record,
    check_same_run,
    default_output_dir,
    same_run,
    source_licenses,
    write_run_record,
)
from mellama_train.preemption import Preempted, StopFlag
from mellama_train.schedule import lr_lambda
from mellama_train.watchdog import Watchdog, outcome

log = logging.getLogger(__name__)


@dataclass
class Window:
    """Loss sums, token counts and time since the last log line; kept on device until logging."""

    sums: torch.Tensor
    counts: torch.Tensor
    processed: int = 0
    """Tokens this rank ran through the model (padding included): the throughput numerator."""
    steps: int = 0
    started: float = 0.0

    @classmethod
    def new(cls, num_sources: int, device: torch.device) -> Window:
        zeros = torch.zeros(num_sources, dtype=torch.float64, device=device)
        return cls(zeros, zeros.clone(), 0, 0, time.perf_counter())

    def add(self, sums: torch.Tensor, counts: torch.Tensor, processed: int, applied: bool) -> None:
        """Count one step; a skipped step's (non-finite or spiking) loss stays out of the logged loss."""
        if applied:
            self.sums += sums
            self.counts += counts
            self.steps += 1
        self.processed += processed


def train(cfg: Config) -> Path:
    """The whole run, under the hang watchdog and the stop flag from its first line to its last: start-up
    (rendezvous, model load, resume), the step-0 evaluation, the loop, the final export and merge."""
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


def _train(cfg: Config, watchdog: Watchdog, stop: StopFlag) -> Path:
    single = cfg.train.backend == "single"
    env = single_device.local_env() if single else engine.init_distributed(cfg.train.dist_timeout_minutes)
    watchdog.beat("process group start-up")
    if cfg.train.world_size and cfg.train.world_size != env.world_size:
        raise ValueError(
            f"train.world_size is {cfg.train.world_size} but the launcher started {env.world_size} ranks;"
            " drop train.world_size (it only sizes a --dry-run)"
        )
    run_dir = Path(engine.broadcast_object(cfg.train.output_dir or str(default_output_dir(cfg))))
    cfg.train.output_dir = str(run_dir)
    resume_from = _start_point(cfg, run_dir, env.is_main)
    watchdog.set_run_dir(run_dir)  # dumps go there; rank 0's heartbeat starts (the start point was accepted)
    ds_config = {} if single else resolve_ds_config(cfg.train.ds_config, cfg)
    record = None
    if env.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        record = write_run_record(
            run_dir, cfg, ds_config, data_manifest(cfg), str(resume_from[0]) if resume_from else None
        )
        watchdog.beat("PubMed update index")
        prepare_indexes(cfg, run_dir / INDEX_DIR)  # once, before every rank's streams load it
    engine.barrier()

    log.info("run directory %s (world size %d)", run_dir, env.world_size)
    tokenizer = load_tokenizer(cfg)
    # (tune: installs the chat template)
    data = build_train_batches(cfg, tokenizer, env.rank, env.world_size, run_dir / INDEX_DIR)
    if cfg.lora.enabled and cfg.model.init == "random":
        # The demo's random base goes to disk first, so the adapter (and `mellama-train merge`) has a base.
        if env.is_main:
            lora.write_random_base(cfg, tokenizer, run_dir / "base")
        engine.barrier()
        cfg.model.init, cfg.model.path = "pretrained", str(run_dir / "base")
    if single:
        model = build_model(cfg, tokenizer, device=env.device)
    else:
        with engine.model_construction(ds_config):
            model = build_model(cfg, tokenizer)
    watchdog.beat("model loaded")
    n_params = count_params(model)
    flops_tok = flops_per_token(model.config, n_params, cfg.data.seq_len, frozen_base=cfg.lora.enabled)
    if cfg.lora.enabled:
        model = lora.apply_lora(model, cfg)
    eng = _make_engine(cfg, model, ds_config)
    watchdog.beat("engine built")
    log.info(
        "model ready: %.1fM parameters (%.2fM trained), %d steps of %d sequences",
        n_params / 1e6,
        lora.trainable_count(model) / 1e6,
        cfg.total_steps,
        cfg.train.global_batch_size,
    )
    eval_batches = build_eval_batches(cfg, tokenizer, env.rank, env.world_size)
    eval_passes = engine.all_reduce_max(len(eval_batches))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    state = checkpoint.TrainerState(world_size=env.world_size)
    if resume_from:
        state = _resume(eng, data, resume_from, env, record)
    state.data_licenses = source_licenses(cfg)  # the recipe's notes, into each checkpoint's trainer.json

    names = data.source_names
    metrics = MetricsLogger(run_dir, env.is_main)
    peak_flops = device_peak_flops(env.device)
    progress = tqdm(
        total=cfg.total_steps, initial=state.step, disable=not env.is_main, unit="step", dynamic_ncols=True
    )
    window = Window.new(len(names), env.device)
    chunk = cfg.train.loss_chunk_tokens
    screened = cfg.data.decontamination is not None  # data/decontaminated/<source> in the metrics
    t = cfg.train
    guard = StepGuard(t.loss_spike_factor, t.skip_loss_spikes, t.max_consecutive_skips)
    guard.load_state_dict(state.guard)
    forgetting = ForgettingMonitor(t.forgetting_source, t.forgetting_margin, t.stop_on_forgetting)
    forgetting.baseline = dict(state.eval_baseline)

    def held_out() -> dict[str, float]:  # collective: every rank runs the same number of forward passes
        values = evaluate(eng, eval_batches, eval_passes, names, pad_id, env.device, chunk)
        values.update(forgetting.observe(state.step, values))
        state.eval_baseline = forgetting.baseline
        return values

    # Every checkpoint carries the logits of a fixed probe sequence, for `mellama-train export`'s check (LoRA and
    # single-device checkpoints are not exported by it).
    exportable = not single and not cfg.lora.enabled
    probe_ids = export.probe_input(min(len(tokenizer), model.config.vocab_size))

    def checkpoint_meta() -> Any:  # collective: every rank takes part in the probe's forward
        if not exportable:
            return None
        logits = export.probe_logits(eng, probe_ids, env.device)
        return lambda path: export.write_checkpoint_meta(
            path, eng.module.config, tokenizer, probe_ids, logits, cfg.train.precision
        )

    watchdog.beat("start-up")
    if eval_passes and state.step == 0:  # the baseline: the model before any training step
        watchdog.enter("step-0 evaluation")
        metrics.log(0, held_out())
        watchdog.beat("step-0 evaluation")
    watchdog.enter("training")
    eng.train()
    try:
        while state.step < cfg.total_steps:
            lr = eng.lr  # the rate this step applies; the scheduler advances inside the last eng.step()
            micro_batches = [next(data) for _ in range(cfg.grad_accum_steps)]
            sums, counts, step_loss, stop_votes = _train_step(
                eng, micro_batches, guard, stop.requested, cfg, env, len(names)
            )
            state.step += 1
            # The step's one host read, after its work is queued: its global loss and the ranks' stop votes.
            loss_value, votes = torch.cat([step_loss.reshape(1), stop_votes.reshape(1)]).tolist()
            verdict = guard.after_step(state.step, loss_value, eng.step_applied)
            window.add(sums, counts, sum(b["input_ids"].numel() for b in micro_batches), verdict.applied)
            watchdog.beat(f"step {state.step}")

            last = state.step == cfg.total_steps
            if state.step % t.log_every == 0 or last:
                values = _window_metrics(
                    window, eng, data, names, flops_tok, peak_flops, env.world_size, screened
                )
                values.update({"train/lr": lr, **guard.metrics()})
                metrics.log(state.step, values)
                progress.set_postfix(
                    loss=f"{values.get('train/loss', math.nan):.4f}",
                    tok_s=f"{values['train/tokens_per_sec']:.0f}",
                )
                window = Window.new(len(names), env.device)
            if eval_passes and (last or (t.eval_every and state.step % t.eval_every == 0)):
                metrics.log(state.step, held_out())
                watchdog.beat(f"evaluation at step {state.step}")
            progress.update(1)
            # Ranks get signals at different moments: they stop after the same step by acting on the shared count.
            stopping = not last and votes > 0
            forgot = forgetting.alarm and forgetting.stop and not last
            if state.step % t.save_every == 0 or last or stopping or guard.diverged or forgot:
                state.guard = guard.state_dict()
                # Small collectives per save: the mixture ledger, and rank 0's free-disk verdict.
                _record_ledger(state, data, names, env.device)
                disk_space.ensure_room(run_dir / "checkpoints", cfg, env.is_main)
                saved = checkpoint.save(
                    eng,
                    run_dir / "checkpoints",
                    state,
                    data.state_dict(),
                    env.rank,
                    t.keep_last,
                    checkpoint_meta(),
                )
                watchdog.beat(f"checkpoint {saved.name}")
            if guard.diverged:  # the weights saved are the last good ones: the skipped steps changed nothing
                metrics.close()
                raise Diverged(state.step, guard.consecutive_skips, str(saved))
            if forgot:
                metrics.close()
                raise Forgetting(
                    state.step, str(t.forgetting_source), forgetting.rise, t.forgetting_margin, str(saved)
                )
            if stopping:
                metrics.close()
                raise Preempted(state.step, stop.reason or "a peer rank's stop signal")
    finally:
        progress.close()

    watchdog.enter("final export")
    # The same batch on every rank; the PubMed update index built at start-up is read back, not built again.
    probe = next(build_train_batches(cfg, tokenizer, rank=0, world_size=1, index_dir=run_dir / INDEX_DIR))
    metrics.log(
        state.step, {"export/probe_loss": export.probe_loss(eng, probe, len(names), env.device, chunk)}
    )
    metrics.close()
    _write_outputs(cfg, eng, tokenizer, run_dir, env.is_main)
    return run_dir


def _resume(
    eng: Any, data: Any, candidates: list[Path], env: engine.DistEnv, record: Path | None
) -> checkpoint.TrainerState:
    """Collective: the newest intact checkpoint of `candidates` (checkpoint.load: each rank checks its own files'
    digests, their safe unpickling and the counters; together they fall back past a damaged one), then each
    rank's data position, checked against the data before it (data/source.py)."""
    loaded, state, data_state = checkpoint.load(eng, candidates, env.rank, env.world_size)
    # Every rank read every file: the files finished earlier in the epoch are checked once, shared out over the
    # ranks by what each one finished (data/source.py CheckShare), not re-hashed by every rank.
    try:
        claims = data.finished_claims(data_state)
    except Exception:  # noqa: BLE001 (a position of the wrong shape: refused just below, on this rank)
        claims = {}
    share = CheckShare(env.rank, engine.gather_objects(claims))
    # The ranks agree on the data verdict: a change any rank finds stops every rank with that rank's line
    # (unless data.accept_changes), and every rank's accepted changes go into trainer.json (rank 0 writes it).
    try:
        verdict: tuple[str | None, list[dict[str, str]]] = (None, data.load_state_dict(data_state, share))
    except ValueError as exc:
        verdict = (str(exc), [])
    except Exception as exc:  # noqa: BLE001 (a position of the wrong shape; the rank's files were verified)
        verdict = (f"{loaded}: this rank's data position cannot be used ({type(exc).__name__})", [])
    verdicts = engine.gather_objects(verdict)
    if refusal := next((problem for problem, _ in verdicts if problem), None):
        raise ValueError(refusal)
    for change in (change for _, changes in verdicts for change in changes):
        if (entry := {"step": state.step, **change}) not in state.data_changes:
            state.data_changes.append(entry)
    if record is not None and loaded != candidates[0]:
        amend_run_record(record, resumed_from=str(loaded))  # damaged ones were passed over
    log.info("resumed from %s at step %d", loaded, state.step)
    return state


def _start_point(cfg: Config, run_dir: Path, is_main: bool) -> list[Path]:
    """Collective: the checkpoints to try, newest first (empty: a fresh start), or the refusal, on every rank.

    Rank 0 decides and tells the others, so ranks on different nodes cannot disagree about the start point.
    A refusal is broadcast too: raised on rank 0 alone it would leave the others waiting for the timeout."""
    decision: tuple[list[str], str | None] = ([], None)
    if is_main:
        try:
            found = checkpoint.resume_candidates(run_dir, cfg.train.resume, same_run(run_dir, cfg))
            # Another run's checkpoints are refused, naming what differs.
            check_same_run(run_dir, cfg, found[0] if found else None)
            disk_space.check_room(run_dir / "checkpoints", cfg)
            decision = ([str(p) for p in found], None)
        except ValueError as exc:
            decision = ([], str(exc))
        except Exception as exc:  # noqa: BLE001 (a hostile run directory: the others must not wait for rank 0)
            decision = ([], f"{run_dir}: cannot decide where to resume ({type(exc).__name__}: {exc})")
    found_paths, refusal = engine.broadcast_object(decision)
    if refusal:
        raise ValueError(refusal)
    return [Path(p) for p in found_paths]


def _write_outputs(cfg: Config, eng: Any, tokenizer: Any, run_dir: Path, is_main: bool) -> None:
    """Collective: final/ (full training) or adapter/ and, merged on rank 0, final/ (LoRA)."""
    if not cfg.lora.enabled:
        export.write_hf_model(eng, tokenizer, run_dir / "final", is_main)
        return
    lora.save_adapter(eng, run_dir / "adapter", cfg.model.path, tokenizer, is_main)
    if cfg.lora.merge and is_main:
        # Rank 0 alone, after the last collective: the other ranks may exit while it merges.
        engine.end_model_construction()
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        lora.merge_adapter(
            cfg.model.path, run_dir / "adapter", run_dir / "final", dtype, cfg.model.trust_remote_code
        )


def _make_engine(cfg: Config, model: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
    """The backend behind the loop's verbs: DeepSpeed's engine, or one device without DeepSpeed."""
    groups = param_groups(model, cfg.optim.weight_decay)
    schedule = lr_lambda(cfg.warmup_steps, cfg.total_steps, cfg.optim.min_lr_ratio)
    if cfg.train.backend == "deepspeed":
        return engine.Engine(model, ds_config, groups, schedule)
    o = cfg.optim
    return single_device.SingleDeviceEngine(
        model,
        groups,
        schedule,
        optimizer=o.optimizer,
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
        grad_clip=o.grad_clip,
        accum_steps=cfg.grad_accum_steps,
    )


def _train_step(
    eng: Any,
    micro_batches: list[dict[str, torch.Tensor]],
    guard: StepGuard,
    stop_requested: bool,
    cfg: Config,
    env: engine.DistEnv,
    num_sources: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and backward every micro-batch; the optimizer steps inside the last `eng.step()`.

    Returns this rank's per-source loss sums and token counts, the step's global loss and the ranks' stop votes,
    all still on the device."""
    scale, stop_votes = _step_reduce(
        micro_batches, cfg.grad_accum_steps, env.world_size, env.device, stop_requested
    )
    sums = torch.zeros(num_sources, dtype=torch.float64, device=env.device)
    counts = torch.zeros_like(sums)
    step_loss = sums.new_zeros(())
    for i, batch in enumerate(micro_batches):
        loss_sum, batch_sums, batch_counts = forward_loss(
            eng, batch, num_sources, env.device, cfg.train.loss_chunk_tokens
        )
        sums += batch_sums
        counts += batch_counts
        factor = scale
        if i == len(micro_batches) - 1:
            # The step's loss is known once its last forward is done. For a step the guard rejects, this last
            # backward is multiplied by NaN on every rank, so the engine discards the whole step (guard.py).
            step_loss = _global_step_loss(sums, counts)
            factor = scale * guard.backward_factor(step_loss)
        eng.backward(loss_sum * factor.to(loss_sum.dtype))
        eng.step()  # optimizer + lr schedule step only on the last micro-batch
    return sums, counts, step_loss, stop_votes


def _step_reduce(
    micro_batches: list[dict[str, torch.Tensor]],
    accum: int,
    world_size: int,
    device: torch.device,
    stop_requested: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's first collective, before its forward passes: (loss scale, ranks that asked to stop).

    The scale turns a micro-batch's loss SUM into its share of the global-batch token mean (loss.py). The stop
    count rides along so every rank learns of a peer's stop signal without another collective; both stay on
    the device, and the loop reads the stop count only after the step's work is queued."""
    local = torch.tensor(
        [float(sum(labelled_tokens(b) for b in micro_batches)), float(stop_requested)], device=device
    )
    total = engine.all_reduce_sum(local)
    return (accum * world_size) / total[:1].clamp(min=1.0), total[1]


def _global_step_loss(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The step's loss over the whole global batch: one all-reduce of two numbers, on the device (no host
    sync). A non-finite loss on any rank makes it non-finite on every rank."""
    total = engine.all_reduce_sum(torch.stack([sums.sum(), counts.sum()]))
    return total[0] / total[1].clamp(min=1.0)


def _record_ledger(state: checkpoint.TrainerState, data: Any, names: list[str], device: torch.device) -> None:
    """The mixture ledger saved with every checkpoint, over all ranks: tokens and weight units (tokens; tune:
    examples) taken per source, summed, and epochs completed per source, the fewest (an epoch counts once every
    rank has finished it)."""
    mix, n = data.mixture, len(names)
    sums = torch.tensor([*mix.tokens_by_source, *mix.taken], dtype=torch.float64, device=device)
    epochs = torch.tensor([s.epochs_completed for s in mix.streams], dtype=torch.float64, device=device)
    sums_ = engine.all_reduce_sum(sums).tolist()
    state.tokens_by_source = {name: int(v) for name, v in zip(names, sums_[:n])}
    state.mixture_taken = {name: int(v) for name, v in zip(names, sums_[n:])}
    state.epochs_by_source = {name: int(v) for name, v in zip(names, engine.all_reduce_min(epochs).tolist())}


def _window_metrics(
    window: Window,
    eng: engine.Engine,
    data: Any,
    names: list[str],
    flops_tok: float,
    peak_flops: float | None,
    world_size: int,
    decontaminating: bool = False,
) -> dict[str, float]:
    """One all-reduce of loss sums, token counts and data counters; the only host sync of a logged step."""
    n = len(names)
    device = window.sums.device
    truncated = getattr(data, "truncated", None)  # instruction data only

    def vector(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64, device=device)

    local = torch.cat(
        [
            window.sums,
            window.counts,
            vector(data.mixture.tokens_by_source),
            vector(truncated or [0] * n),
            vector(data.mixture.taken),
            vector([window.processed]),
            vector(reason_counts(data.mixture.streams)),
        ]
    )
    total = engine.all_reduce_sum(local).tolist()
    sums, counts, tokens = total[:n], total[n : 2 * n], total[2 * n : 3 * n]
    cut, taken, processed = total[3 * n : 4 * n], total[4 * n : 5 * n], total[5 * n]
    by_reason = data_counts(names, total[5 * n + 1 :])
    elapsed = time.perf_counter() - window.started
    tokens_per_sec = processed / max(elapsed, 1e-9)
    values = {"train/tokens_per_sec": tokens_per_sec, "train/tokens": sum(tokens)}
    if sum(counts):  # none when every step of the window was skipped
        values["train/loss"] = sum(sums) / sum(counts)
    if (norm := eng.grad_norm) is not None:
        values["train/grad_norm"] = norm
    if peak_flops:
        values["train/mfu"] = flops_tok * tokens_per_sec / (peak_flops * world_size)
    if device.type == "cuda":  # this rank's peak since the start (what the memory plan predicts)
        values["train/gpu_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    for i, name in enumerate(names):
        if counts[i]:
            values[f"train/loss/{name}"] = sums[i] / counts[i]
        values[f"data/tokens/{name}"] = tokens[i]
        if truncated is not None:
            values[f"data/truncated/{name}"] = cut[i]
        if decontaminating:
            values[f"data/decontaminated/{name}"] = by_reason.get(f"data/reasons/{name}/contaminated", 0.0)
        # Epochs started by this (rank 0's) reader; ranks hold equal shares, so they wrap within a few documents.
        values[f"data/epochs/{name}"] = data.mixture.streams[i].epochs_completed
    values.update(by_reason)
    values.update(data.mixture.drift_metrics(taken, world_size * data.mixture.max_take))
    return values
