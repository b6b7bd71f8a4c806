"""The SGD training loop, readable in one sitting.

One step: mini-batch (a pure function of the sampling seed and the step) -> optional AutoAugment ->
pixels in [0, 1] -> optional FGSM -> optional mixup -> forward, per-sample losses, mean -> backward ->
optional gradient scaling / noise (Fig. 4.6) -> optimiser step -> per-layer terms of the Lipschitz
dynamics (``lipexp.dynamics``) -> one metrics row.

Rows are buffered and flushed to parquet parts together with a checkpoint, so a resumed run has exactly
the rows of an uninterrupted one. SIGINT/SIGTERM checkpoint and stop; a non-finite loss stops the run
with a reason. Nothing here knows about Hydra: the runner turns a config into a ``TrainSpec``.

Any data and loss work too: ``train(model, TensorDataset(x, y), None, spec, run_dir, loss_fn=...)`` with a
map-style torch Dataset or a DataLoader (``lipexp.batches``) and per-sample losses; the run directory then
has the same files as a run of the ``lipexp`` command (``spec.json`` in place of ``config.yaml``).
"""
from __future__ import annotations

import logging
import math
import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import regularizers as reg
from . import results
from . import spectral_reg as sreg
from .batches import BatchSource, as_source, to_pixels
from .data import SAMPLINGS, Dataset, normalize
from .layers import k_emp, top_singular_values

log = logging.getLogger(__name__)

TRACKERS = ("off", "sigma1", "full")
SNAPSHOTS_FILE = "snapshots.pt"
# What describes the run being made (written before train() by its caller): kept when an attempt is archived.
RUN_DESCRIPTION = frozenset({"config.yaml", "status.json", "spec.json"})
OPTIMIZERS = ("sgd", "adam")


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""


@dataclass
class TrainSpec:
    steps: int
    lr: float
    batch_size: int
    sampling: str = "shuffle"  # shuffle (epoch permutations) | iid (independent batches, the SDE's model)
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    mixup_alpha: float = 0.0
    label_smoothing: float = 0.0
    fgsm_eps: float = 0.0
    autoaugment: str | None = None
    grad_rho: float = 1.0
    grad_noise: str = "none"
    tracker: str = "sigma1"  # off | sigma1 | full (mu, kappa, lambda and the predicted K)
    split: bool = False  # variance/covariance split of kappa and lambda (Fig. 4.3)
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end
    eval_samples: int | None = 2000
    eval_batch_size: int = 1000
    checkpoint_every: int = 1000
    snapshot_every: int = 0  # >0: keep flattened parameters every N steps (landscape trajectories)
    sampling_seed: int = 0
    aux_seed: int = 0  # mixup partners and injected gradient noise
    spectral_reg: str = "none"  # none | spectral_gap | alignment (Chapter 7, lipexp.spectral_reg)
    reg_beta: float = 0.0
    reg_reduce: str = "per_layer"  # per_layer | sum
    reg_sign: int = 1  # gap only: +1 penalise, -1 reward
    reg_iters: int = 1  # warm-started power / inverse iterations a step
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be a finite number > 0, got {self.lr}"),
            (math.isfinite(self.momentum) and self.momentum >= 0, f"momentum must be finite and >= 0, got {self.momentum}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight decay must be finite and >= 0, got {self.weight_decay}"),
            (self.batch_size >= 2, f"batch size must be >= 2 (gradient noise needs two samples), got {self.batch_size}"),
            (self.sampling in SAMPLINGS, f"unknown sampling '{self.sampling}'; choose one of {SAMPLINGS}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer '{self.optimizer}'; choose one of {OPTIMIZERS}"),
            (self.tracker in TRACKERS, f"unknown tracker '{self.tracker}'; choose one of {TRACKERS}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.mixup_alpha >= 0, f"mixup alpha must be >= 0, got {self.mixup_alpha}"),
            (0 <= self.label_smoothing < 1, f"label smoothing must lie in [0, 1), got {self.label_smoothing}"),
            (self.fgsm_eps >= 0, f"FGSM epsilon must be >= 0, got {self.fgsm_eps}"),
            (0 <= self.grad_rho <= 1, f"grad_rho must lie in [0, 1], got {self.grad_rho}"),
            (self.grad_noise in ("none", "gaussian", "uniform"),
             f"unknown grad_noise '{self.grad_noise}'; choose none, gaussian or uniform"),
            (self.tracker != "full" or self.log_every == 1,
             "tracker=full integrates the SDE every step, so log_every must be 1"),
            (not (self.spectral_reg == "alignment" and self.tracker == "full"),
             "the alignment regulariser backpropagates through the gradient (a second backward the per-sample "
             "hooks of tracker=full cannot follow); use tracker=sigma1 (its columns align/<layer> = sigma1*mu)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        sreg.check(self.spectral_reg, self.reg_beta, self.reg_reduce, self.reg_sign, self.reg_iters)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' was requested but CUDA is not available; use device=cpu or device=auto")
    return torch.device(name)


def make_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, device, batch_size: int = 1000, limit: int | None = None) -> dict:
    """Mean cross-entropy and accuracy on ``limit`` samples (all when None).

    The samples are a fixed seeded selection, not the first ``limit``: a dataset may be sorted by class
    (the offline CIFAR-10 mirror is).
    """
    was_training = model.training
    model.eval()
    n = len(ds) if limit is None else min(limit, len(ds))
    idx = torch.arange(n) if n == len(ds) else torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
    loss_sum, correct = 0.0, 0
    for i in range(0, n, batch_size):
        sel = idx[i : i + batch_size]
        x = to_pixels(ds.x[sel], device)
        y = ds.y[sel].to(device)
        logits = model(normalize(x, ds.name))
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    model.train(was_training)
    return {"loss": loss_sum / n, "acc": correct / n}


@contextmanager
def on_signals(handler: Callable[[int, object], None]):
    """Run the block with ``handler`` for SIGINT and SIGTERM, then restore the previous handlers.

    Outside the main thread (a launcher's worker) Python allows no handlers: the block runs without."""
    installed = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            installed[sig] = signal.signal(sig, handler)
        except ValueError:
            pass
    try:
        yield
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


def _stop_on_signals(flag: dict):
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step."""
    def handler(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    return on_signals(handler)


def _rng_state(gens: dict[str, torch.Generator]) -> dict:
    state = {"torch": torch.get_rng_state(), **{k: g.get_state() for k, g in gens.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, gens: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    for k, g in gens.items():
        g.set_state(state[k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(
    model: nn.Module,
    train_set,
    test_set,
    spec: TrainSpec,
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    log_fn: Callable[[dict], None] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Train ``model`` in place with ``spec``; rows go to ``run_dir`` and to ``log_fn``. Returns the summary.

    ``train_set`` / ``test_set`` (``test_set`` may be None): a ``lipexp.data.Dataset``, any map-style
    ``torch.utils.data.Dataset`` of ``(x, y)`` items, or a ``DataLoader`` (see ``lipexp.batches`` for how
    each is batched and what resuming means for a loader). Batch dimension first; x and y of any shape.
    The project's datasets are turned into standardised pixels; other data reaches the model unchanged.

    ``loss_fn(outputs, targets)`` returns per-sample losses, shape ``(M,)`` or ``(M, ...)``: more than one
    dimension is averaged over the non-batch dimensions (``nn.MSELoss(reduction='none')`` on
    ``(M, D)`` targets gives each sample's mean squared error). The step minimises their mean.
    Default: cross-entropy with ``spec.label_smoothing``. Mixup mixes the loss of both targets. Evaluation
    reports the mean per-sample loss (``loss_fn``, default plain cross-entropy) and the accuracy where it
    is defined (outputs ``(M, C)``, integer targets ``(M,)``).

    The run directory gets the same contract as the ``lipexp`` command: ``spec.json`` (this spec),
    ``status.json`` (running/completed/failed/interrupted, reason, commit, torch version, wall time),
    ``metrics.parquet``, ``summary.json``, ``ckpt.pt``. It resumes from ``run_dir/ckpt.pt`` when that was
    made with the same spec and every row logged before it is on disk; a directory made with another spec,
    or missing rows, is archived under ``previous-<time>/`` and the run starts afresh. Rows reach ``log_fn``
    when they and the checkpoint after them are written (at each checkpoint and at the end), so each step
    is logged once across a kill and a resume. The run directory is locked for the duration
    (``results.RunLocked`` if another process has it). Raises ``Diverged`` or ``Interrupted`` after
    recording the reason.
    """
    spec.validate()
    run_dir = Path(run_dir)
    device = resolve_device(str(device))
    train_src = as_source(train_set, "training set")
    test_src = as_source(test_set, "test set") if test_set is not None else None
    check_data_options(spec, train_src, loss_fn)
    with results.lock_run_dir(run_dir):
        start_run(run_dir, spec, device,
                  {"train": train_src.describe(), "test": test_src.describe() if test_src else None})
        try:
            summary = _train(model, train_src, test_src, spec, run_dir, device, log_fn, loss_fn)
        except (Diverged, Interrupted):
            raise  # recorded where they happen
        except BaseException as err:
            interrupted = isinstance(err, KeyboardInterrupt)
            results.update_status(run_dir, status="interrupted" if interrupted else "failed",
                                  reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
            raise
        results.write_json(run_dir / results.SUMMARY_FILE, {k: v for k, v in summary.items() if k != "wall_time_s"})
        results.update_status(run_dir, status="completed", finished=results.now_iso(),
                              wall_time_s=summary.get("wall_time_s"), steps_done=spec.steps)
        return summary


SPEC_FILE = "spec.json"
# Settings that do not change a run's numbers: a run directory reused with only these changed resumes.
SPEC_IGNORED = ("progress",)


def check_data_options(spec: TrainSpec, src: BatchSource, loss_fn) -> None:
    """Options that need the project's images or its default loss; one line when they do not apply."""
    if spec.autoaugment and src.kind != "project":
        raise ValueError("autoaugment works on the project's uint8 image datasets; put augmentation in your "
                         "dataset's transform instead")
    if spec.fgsm_eps > 0 and (src.kind != "project" or loss_fn is not None):
        raise ValueError("fgsm_eps needs the project's image datasets (pixels in [0, 1]) and the default "
                         "cross-entropy loss")
    if src.kind == "loader" and src.data.batch_size is not None and src.data.batch_size != spec.batch_size:
        raise ValueError(f"the training DataLoader yields batches of {src.data.batch_size} but spec.batch_size is "
                         f"{spec.batch_size}; make them equal (spec.json records the run's batch size)")
    if spec.label_smoothing > 0 and loss_fn is not None:
        raise ValueError("label_smoothing applies to the default cross-entropy; with your own loss_fn put it "
                         "there (e.g. nn.CrossEntropyLoss(reduction='none', label_smoothing=...))")


def spec_changes(saved: dict, spec: TrainSpec) -> list[str]:
    """Fields whose value differs between a saved spec (a dict) and ``spec``; a missing field counts as its
    default (a spec saved before that field existed)."""
    now = results._jsonable(asdict(spec))
    defaults = results._jsonable({f.name: f.default for f in fields(TrainSpec) if f.default is not MISSING})
    missing = object()
    return [k for k in now if k not in SPEC_IGNORED and saved.get(k, defaults.get(k, missing)) != now[k]]


def _saved_spec(run_dir: Path) -> dict | None:
    saved = results.read_json(run_dir / SPEC_FILE)
    ckpt = run_dir / results.CHECKPOINT_FILE
    if saved is None and ckpt.exists():  # a run made before spec.json existed: its checkpoint has the spec
        try:
            saved = results.load_torch(ckpt).get("spec")
        except results.RunFileError:  # unreadable: the resume says so, naming the file
            saved = None
    return saved


def start_run(run_dir: Path, spec: TrainSpec, device: torch.device, data: dict) -> None:
    """Archive a directory made with another spec, then write ``spec.json`` and a ``running`` status."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = _saved_spec(run_dir)
    changed = spec_changes(saved, spec) if saved is not None else []
    if changed:
        # config.yaml belongs to the lipexp command, which has checked it already for this attempt
        dest = results.archive_previous(run_dir, keep=results.ATTEMPT_FILES | {"config.yaml"})
        now = asdict(spec)
        log.warning("%s was made with other settings (%s); archived it under %s/ and starting afresh", run_dir,
                    ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed[:6])
                    + (" ..." if len(changed) > 6 else ""), dest.name if dest else "previous-<time>")
    results.write_json(run_dir / SPEC_FILE, asdict(spec))
    results.update_status(run_dir, status="running", reason=None, traceback=None, started=results.now_iso(),
                          **results.git_info(), **results.environment_info(), device=str(device), data=data)


def _step_losses(outputs, y, spec: TrainSpec, mix, loss_fn) -> torch.Tensor:
    """Per-sample losses (M,) of the step (mixup: both targets' losses, mixed)."""
    if loss_fn is None:
        return reg.per_sample_cross_entropy(outputs, y, spec.label_smoothing, mix)
    losses = per_sample_losses(loss_fn(outputs, y), outputs.shape[0])
    if mix is not None:
        y_b, lam = mix
        losses = lam * losses + (1.0 - lam) * per_sample_losses(loss_fn(outputs, y_b), outputs.shape[0])
    return losses


def per_sample_losses(losses: torch.Tensor, m: int) -> torch.Tensor:
    """``loss_fn``'s output -> (M,): the mean over any non-batch dimensions; one line if it is not per sample."""
    if not torch.is_tensor(losses) or losses.dim() == 0 or losses.shape[0] != m:
        shape = tuple(losses.shape) if torch.is_tensor(losses) else type(losses).__name__
        raise ValueError(
            f"loss_fn must return one loss per sample, shape ({m},) or ({m}, ...) (use reduction='none'); got {shape}"
        )
    return losses.reshape(m, -1).mean(1) if losses.dim() > 1 else losses


def _train(model, train_src: BatchSource, test_src: BatchSource | None, spec: TrainSpec, run_dir: Path, device,
           log_fn, loss_fn) -> dict:
    model.to(device).train()
    opt = make_optimizer(model, spec)
    gens = {"aux": torch.Generator().manual_seed(spec.aux_seed)}
    ckpt_path = run_dir / results.CHECKPOINT_FILE

    tracker = integrator = None
    if spec.tracker == "full":
        from . import dynamics

        tracker = dynamics.DynamicsTracker(
            model,
            lr=spec.lr,
            split=spec.split,
            grad_scale=math.sqrt(spec.grad_rho),
            noise_var=(1.0 - spec.grad_rho) * reg.noise_variance(spec.grad_noise),
            optimizer=opt,
            check_grad=spec.spectral_reg == "none",  # a penalty on the weights adds to .grad beyond the hooks
        )
        integrator = dynamics.KIntegrator(spec.lr)

    penalty = None
    if spec.spectral_reg != "none":
        penalty = sreg.Penalty(model, spec.spectral_reg, spec.reg_beta, spec.reg_reduce, spec.reg_sign,
                               spec.reg_iters)
    start, snapshots, wall_before = 0, [], 0.0
    if ckpt_path.exists():
        ckpt = results.load_torch(ckpt_path, map_location=device)
        lost = results.missing_rows(run_dir, ckpt["step"], spec.log_every)
        if lost is not None:
            # resuming would append to a table with a hole in it: redo the run, keeping the old files
            dest = results.archive_previous(run_dir, keep=results.ATTEMPT_FILES | RUN_DESCRIPTION)
            log.warning("%s: %s; redoing the run from step 0 (old files moved to %s)", run_dir, lost, dest.name)
        else:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            _set_rng_state(ckpt["rng"], gens)
            if integrator is not None:
                integrator.load_state_dict(ckpt["integrator"])
                tracker.load_state_dict(ckpt["tracker"])
            if penalty is not None and ckpt.get("spectral_reg"):
                penalty.load_state_dict(ckpt["spectral_reg"])
            start, wall_before = ckpt["step"], ckpt.get("wall_time_s", 0.0)
            snapshots = [(int(st), v) for st, v in ckpt.get("snapshots", [])]
            results.truncate_metrics(run_dir, before_step=start)
            log.info("resuming from the checkpoint at step %d of %d", start, spec.steps)
    t0 = time.time()

    def flush(rows: list[dict], checkpoint_step: int | None = None) -> None:
        # log_fn sees a row only once it and the checkpoint after it are on disk: a killed run resumes
        # from its last checkpoint, and rows logged past it would reach the logger (W&B) a second time
        results.append_metric_part(run_dir, rows)
        if checkpoint_step is not None:
            write_checkpoint(checkpoint_step)
        if log_fn is not None:
            for r in rows:
                log_fn(r)
        rows.clear()

    def save_checkpoint(step: int, rows: list[dict]) -> None:
        flush(rows, checkpoint_step=step)

    def write_checkpoint(step: int) -> None:
        state = {
            "step": step,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": _rng_state(gens),
            "integrator": integrator.state_dict() if integrator is not None else None,
            "tracker": tracker.state_dict() if tracker is not None else None,
            "spectral_reg": penalty.state_dict() if penalty is not None else None,
            "snapshots": snapshots,
            "wall_time_s": wall_before + time.time() - t0,
            "spec": asdict(spec),
        }
        tmp = ckpt_path.with_name(f".{ckpt_path.name}.tmp")
        torch.save(state, tmp)
        tmp.replace(ckpt_path)

    params = [p for p in model.parameters() if p.requires_grad]
    input_fn = train_src.input_fn
    rows: list[dict] = []
    flag: dict = {}
    bar = None
    if spec.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=spec.steps, initial=start, desc=run_dir.name[:40], dynamic_ncols=True, leave=False)

    with _stop_on_signals(flag):
        for step in range(start, spec.steps):
            xb, yb = train_src.batch(step, spec.batch_size, spec.sampling_seed, spec.sampling)
            if spec.autoaugment:
                xb = reg.autoaugment(xb, spec.autoaugment)
            x = train_src.to_model(xb, device)
            y = yb.to(device)
            if spec.fgsm_eps > 0:
                x = reg.fgsm(model, input_fn, x, y, spec.fgsm_eps)
            mix = None
            if spec.mixup_alpha > 0:
                if not x.is_floating_point():
                    raise ValueError(f"mixup needs float inputs; this training set gives {x.dtype}")
                x, mix = reg.mixup(x, y, spec.mixup_alpha, gens["aux"])

            log_now = step % spec.log_every == 0
            sig = None
            if tracker is not None:
                tracker.begin()
            elif spec.tracker == "sigma1" and log_now:
                sig = top_singular_values(model)
            logits = model(input_fn(x))
            losses = _step_losses(logits, y, spec, mix, loss_fn)
            loss = losses.mean()
            if not torch.isfinite(loss):
                reason = f"non-finite loss ({loss.item()}) at step {step}; lower optim.lr or check the data"
                flush(rows)
                results.update_status(run_dir, status="failed", reason=reason, steps_done=step)
                if bar is not None:
                    bar.close()
                if tracker is not None:
                    tracker.close()
                raise Diverged(reason)
            pen = penalty(loss) if penalty is not None else None  # Chapter 7: added to the mean loss
            opt.zero_grad(set_to_none=True)
            (loss if pen is None else loss + pen).backward()
            if spec.grad_rho != 1.0 or spec.grad_noise != "none":
                reg.inject_gradient_noise(params, spec.grad_rho, spec.grad_noise, gens["aux"])
            opt.step()

            row = {"step": step, "t": step * spec.lr, "loss": loss.item()}
            if penalty is not None:
                row.update(penalty.last)
            if tracker is not None:
                terms = tracker.end()
                try:
                    row.update(integrator.update(terms))
                except OverflowError:  # exp(Z) out of float range: the weights blew up
                    reason = (f"K(t) overflowed at step {step} (the run diverged: K_pred or its variance exceeds "
                              f"float range); lower optim.lr")
                    flush(rows)
                    results.update_status(run_dir, status="failed", reason=reason, steps_done=step)
                    if bar is not None:
                        bar.close()
                    tracker.close()
                    raise Diverged(reason) from None
                for name, t in terms.items():
                    row.update({f"{k}/{name}": v for k, v in t.items()})
            elif sig is not None:
                row["K_emp"] = k_emp(sig)
                row["Z_emp"] = math.log(row["K_emp"])
                row.update({f"sigma1/{k}": v for k, v in sig.items()})
            if spec.eval_every and step % spec.eval_every == 0:
                row.update(_eval_row(model, train_src, test_src, device, spec, loss_fn))
                log.info("%s", _describe(row))
            if log_now or tracker is not None:
                rows.append(row)
            if spec.snapshot_every and step % spec.snapshot_every == 0:
                snapshots.append((step, torch.nn.utils.parameters_to_vector(model.parameters()).detach().cpu()))
            if bar is not None:
                post = {"loss": f"{row['loss']:.4f}"}
                if "K_emp" in row:
                    post["K"] = f"{row['K_emp']:.4g}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)

            done = step + 1
            if flag.get("signal"):
                save_checkpoint(done, rows)
                results.update_status(run_dir, status="interrupted", reason=f"received {flag['signal']}",
                                      steps_done=done)
                if bar is not None:
                    bar.close()
                raise Interrupted(f"received {flag['signal']} after step {step}; rerun to resume")
            if done % spec.checkpoint_every == 0 and done < spec.steps:
                save_checkpoint(done, rows)

    if bar is not None:
        bar.close()
    # The final state: K after the last update, against the prediction integrated through it.
    final = {"step": spec.steps, "t": spec.steps * spec.lr, "loss": float("nan")}
    sig = top_singular_values(model) if spec.tracker != "off" else None
    if sig is not None:
        final.update({"K_emp": k_emp(sig), "Z_emp": math.log(k_emp(sig))})
        final.update({f"sigma1/{k}": v for k, v in sig.items()})
    if integrator is not None:
        final.update(integrator.prediction())
    final.update(_eval_row(model, train_src, test_src, device, spec, loss_fn))
    rows.append(final)
    log.info("final: %s", _describe(final))
    if tracker is not None:
        tracker.close()
    save_checkpoint(spec.steps, rows)
    df = results.finalize_metrics(run_dir)
    summary = summarize(df, spec.lr)
    summary["wall_time_s"] = wall_before + time.time() - t0
    if snapshots:
        torch.save(snapshots, run_dir / SNAPSHOTS_FILE)
    return summary


def _describe(row: dict) -> str:
    """One log line of the headline columns of a metrics row."""
    keys = ("step", "loss", "K_emp", "K_pred", "train_loss", "train_acc", "test_loss", "test_acc")
    # The final row has no step loss (no update follows it); NaN there would read like a divergence.
    shown = [k for k in keys if k in row and not (isinstance(row[k], float) and math.isnan(row[k]))]
    return ", ".join(f"{k} {row[k]:.6g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in shown)


def _eval_row(model, train_src: BatchSource, test_src: BatchSource | None, device, spec: TrainSpec,
              loss_fn=None) -> dict:
    out = {}
    for prefix, src in (("train", train_src), ("test", test_src)):
        if src is None:
            continue
        if src.kind == "project" and loss_fn is None:  # the thesis runs' path, unchanged
            r = evaluate(model, src.data, device, spec.eval_batch_size, spec.eval_samples)
        else:
            r = evaluate_batches(model, src.eval_batches(spec.eval_batch_size, spec.eval_samples, device), loss_fn)
        out.update({f"{prefix}_{k}": v for k, v in r.items()})
    return out


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches, loss_fn=None) -> dict:
    """Mean per-sample loss over model-ready ``(x, y)`` batches (``loss_fn``, default cross-entropy), and
    ``acc`` when every batch is classification (outputs ``(M, C)``, integer targets ``(M,)``)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, n, classify = 0.0, 0, 0, True
    for x, y in batches:
        out = model(x)
        m = out.shape[0]
        losses = F.cross_entropy(out.float(), y, reduction="none") if loss_fn is None else loss_fn(out, y)
        loss_sum += float(per_sample_losses(losses, m).double().sum())
        n += m
        classify = classify and (out.dim() == 2 and out.shape[1] > 1 and torch.is_tensor(y) and y.dim() == 1
                                 and not y.is_floating_point() and not y.is_complex())
        if classify:
            correct += int((out.argmax(1) == y).sum())
    model.train(was_training)
    if n == 0:
        raise ValueError("the evaluation set is empty")
    return {"loss": loss_sum / n, **({"acc": correct / n} if classify else {})}


def summarize(df, lr: float) -> dict:
    """Run scalars from the metrics table: final K and accuracies, and max_t |K_pred - K_emp| / K_emp."""
    out: dict = {"steps": int(df["step"].max()) if len(df) else 0}
    last = df.iloc[-1] if len(df) else {}
    for key in ("K_emp", "K_pred", "EK_pred", "VarK_pred", "K_pred_2nd", "EK_pred_2nd", "VarK_pred_2nd",
                "train_loss", "train_acc", "test_loss", "test_acc"):
        if key in df:
            out[f"final_{key}"] = float(last[key])
    if "K_emp" in df:
        out["K0"] = float(df["K_emp"].dropna().iloc[0])
    for pred, suffix in (("K_pred", ""), ("K_pred_2nd", "_2nd")):  # thesis SDE; second order (mu2, full lambda2)
        if pred in df and "K_emp" in df:
            both = df[[pred, "K_emp"]].dropna()
            rel = (both[pred] - both["K_emp"]).abs() / both["K_emp"]
            out[f"max_rel_err{suffix}"] = float(rel.max())
            out[f"final_rel_err{suffix}"] = float(rel.iloc[-1])
    for key in ("mu_Z", "kappa_Z", "lambda2_Z", "mu2_Z", "lambda2_Z_full"):
        if key in df:
            out[f"int_{key}"] = float(lr * df[key].dropna().sum())  # int_0^t of the term, dt = lr per step
    return out
