"""The SGD training loop, readable in one sitting.

One step: mini-batch (a pure function of the sampling seed and the step) -> optional AutoAugment ->
pixels in [0, 1] -> optional FGSM -> optional mixup -> forward, per-sample losses, mean -> backward ->
optional gradient scaling / noise (Fig. 4.6) -> optimiser step -> per-layer terms of the Lipschitz
dynamics (``lipexp.dynamics``) -> one metrics row.

Rows are buffered and flushed to parquet parts together with a checkpoint, so a resumed run has exactly
the rows of an uninterrupted one. SIGINT/SIGTERM checkpoint and stop; a non-finite loss stops the run
with a reason. Nothing here knows about Hydra: the runner turns a config into a ``TrainSpec``.
"""
from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import regularizers as reg
from . import results
from . import spectral_reg as sreg
from .data import SAMPLINGS, Dataset, batch_indices, normalize
from .layers import k_emp, top_singular_values

log = logging.getLogger(__name__)

TRACKERS = ("off", "sigma1", "full")
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
            (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
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


def to_pixels(xb: torch.Tensor, device) -> torch.Tensor:
    """uint8 images -> float pixels in [0, 1]; float images (e.g. frequency-filtered) pass through."""
    x = xb.to(device)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


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
def _stop_on_signals(flag: dict):
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (handlers need the main thread)."""
    installed = {}

    def handler(signum, _frame):
        flag["signal"] = signal.Signals(signum).name

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            installed[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: run without the handler
            pass
    try:
        yield
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


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
    train_set: Dataset,
    test_set: Dataset | None,
    spec: TrainSpec,
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    log_fn: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``model`` in place with ``spec``; rows go to ``run_dir`` and to ``log_fn``. Returns the summary.

    Resumes from ``run_dir/ckpt.pt`` when it exists. Raises ``Diverged`` or ``Interrupted`` after
    recording the reason in ``status.json``.
    """
    spec.validate()
    run_dir = Path(run_dir)
    device = torch.device(device)
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
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"], gens)
        if integrator is not None:
            integrator.load_state_dict(ckpt["integrator"])
            tracker.load_state_dict(ckpt["tracker"])
        if penalty is not None and ckpt.get("spectral_reg"):
            penalty.load_state_dict(ckpt["spectral_reg"])
        start, snapshots, wall_before = ckpt["step"], ckpt.get("snapshots", []), ckpt.get("wall_time_s", 0.0)
        results.truncate_metrics(run_dir, before_step=start)
        log.info("resuming from the checkpoint at step %d of %d", start, spec.steps)
    t0 = time.time()

    def save_checkpoint(step: int, rows: list[dict]) -> None:
        results.append_metric_part(run_dir, rows)
        rows.clear()
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
    input_fn = lambda x: normalize(x, train_set.name)  # noqa: E731
    n_train = len(train_set)
    rows: list[dict] = []
    flag: dict = {}
    bar = None
    if spec.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=spec.steps, initial=start, desc=run_dir.name[:40], dynamic_ncols=True, leave=False)

    with _stop_on_signals(flag):
        for step in range(start, spec.steps):
            idx = batch_indices(n_train, spec.batch_size, spec.sampling_seed, step, spec.sampling)
            xb, yb = train_set.x[idx], train_set.y[idx]
            if spec.autoaugment:
                xb = reg.autoaugment(xb, spec.autoaugment)
            x = to_pixels(xb, device)
            y = yb.to(device)
            if spec.fgsm_eps > 0:
                x = reg.fgsm(model, input_fn, x, y, spec.fgsm_eps)
            mix = None
            if spec.mixup_alpha > 0:
                x, mix = reg.mixup(x, y, spec.mixup_alpha, gens["aux"])

            log_now = step % spec.log_every == 0
            sig = None
            if tracker is not None:
                tracker.begin()
            elif spec.tracker == "sigma1" and log_now:
                sig = top_singular_values(model)
            logits = model(input_fn(x))
            losses = reg.per_sample_cross_entropy(logits, y, spec.label_smoothing, mix)
            loss = losses.mean()
            if not torch.isfinite(loss):
                reason = f"non-finite loss ({loss.item()}) at step {step}; lower optim.lr or check the data"
                results.append_metric_part(run_dir, rows)
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
                row.update(integrator.update(terms))
                for name, t in terms.items():
                    row.update({f"{k}/{name}": v for k, v in t.items()})
            elif sig is not None:
                row["K_emp"] = k_emp(sig)
                row["Z_emp"] = math.log(row["K_emp"])
                row.update({f"sigma1/{k}": v for k, v in sig.items()})
            if spec.eval_every and step % spec.eval_every == 0:
                row.update(_eval_row(model, train_set, test_set, device, spec))
                log.info("%s", _describe(row))
            if log_now or tracker is not None:
                rows.append(row)
                if log_fn is not None:
                    log_fn(row)
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
    final.update(_eval_row(model, train_set, test_set, device, spec))
    rows.append(final)
    log.info("final: %s", _describe(final))
    if log_fn is not None:
        log_fn(final)
    if tracker is not None:
        tracker.close()
    save_checkpoint(spec.steps, rows)
    df = results.finalize_metrics(run_dir)
    summary = summarize(df, spec.lr)
    summary["wall_time_s"] = wall_before + time.time() - t0
    if snapshots:
        torch.save(snapshots, run_dir / "snapshots.pt")
    return summary


def _describe(row: dict) -> str:
    """One log line of the headline columns of a metrics row."""
    keys = ("step", "loss", "K_emp", "K_pred", "train_loss", "train_acc", "test_loss", "test_acc")
    # The final row has no step loss (no update follows it); NaN there would read like a divergence.
    shown = [k for k in keys if k in row and not (isinstance(row[k], float) and math.isnan(row[k]))]
    return ", ".join(f"{k} {row[k]:.6g}" if isinstance(row[k], float) else f"{k} {row[k]}" for k in shown)


def _eval_row(model, train_set, test_set, device, spec: TrainSpec) -> dict:
    out = {}
    tr = evaluate(model, train_set, device, spec.eval_batch_size, spec.eval_samples)
    out.update({"train_loss": tr["loss"], "train_acc": tr["acc"]})
    if test_set is not None:
        te = evaluate(model, test_set, device, spec.eval_batch_size, spec.eval_samples)
        out.update({"test_loss": te["loss"], "test_acc": te["acc"]})
    return out


def summarize(df, lr: float) -> dict:
    """Run scalars from the metrics table: final K and accuracies, and max_t |K_pred - K_emp| / K_emp."""
    out: dict = {"steps": int(df["step"].max()) if len(df) else 0}
    last = df.iloc[-1] if len(df) else {}
    for key in ("K_emp", "K_pred", "EK_pred", "VarK_pred", "train_loss", "train_acc", "test_loss", "test_acc"):
        if key in df:
            out[f"final_{key}"] = float(last[key])
    if "K_emp" in df:
        out["K0"] = float(df["K_emp"].dropna().iloc[0])
    if "K_pred" in df and "K_emp" in df:
        both = df[["K_pred", "K_emp"]].dropna()
        rel = (both["K_pred"] - both["K_emp"]).abs() / both["K_emp"]
        out["max_rel_err"] = float(rel.max())
        out["final_rel_err"] = float(rel.iloc[-1])
    for key in ("mu_Z", "kappa_Z", "lambda2_Z"):
        if key in df:
            out[f"int_{key}"] = float(lr * df[key].dropna().sum())  # int_0^t of the term, dt = lr per step
    return out
