"""The fine-tuning loop: AdamW, warm-up + cosine, bf16 autocast on GPU, gradient clipping, resumable.

Files written to the output folder:

- ``model.pt``: the fine-tuned weights as an open_clip trainer checkpoint (``{"epoch", "name",
  "state_dict"}``, OpenAI/open_clip key names); ``vlpbench run --model clip --checkpoint model.pt`` loads it.
- ``latest.pt``: the resume state, also an open_clip trainer checkpoint (``state_dict`` and ``optimizer``)
  plus ``scheduler``, ``step``, ``rng`` (torch CPU / CUDA generator states), ``losses`` and the ``config``
  and data hash it was trained with. Rewritten every ``save_every`` steps and at the end.
- ``metadata.json``: configuration, data description and hash, initial checkpoint, steps, loss summary,
  timing and package versions. ``loss.csv`` (step, epoch, loss, lr, logit_scale); ``loss.png`` where
  matplotlib is installed.

Training order is reproducible without hidden state: epoch e visits the pairs in the permutation drawn
from ``numpy.random.default_rng([seed, 0, e])``, and at step s the sentence of each image is drawn from
``default_rng([seed, 1, s])``. Resuming from ``latest.pt`` (model, optimizer, scheduler, step and torch
RNG states) therefore continues exactly as an uninterrupted run would.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from vlpbench import __version__
from vlpbench.adapters.base import save_checkpoint, sha256_file
from vlpbench.errors import CheckpointError, ConfigError, DataError
from vlpbench.tools.clip_finetune.loss import clip_loss
from vlpbench.tools.clip_finetune.pairs import Pairs
from vlpbench.tools.clip_finetune.sentences import DEFAULT_MIN_WORDS, split_sentences

log = logging.getLogger("vlpbench")

MODEL_FILE, RESUME_FILE, METADATA_FILE, LOSS_CSV, LOSS_PNG = (
    "model.pt", "latest.pt", "metadata.json", "loss.csv", "loss.png")
PRECISIONS = ("auto", "bf16", "fp32")
# CLIP caps the learnable temperature at 100 (open_clip clamps logit_scale to [0, ln 100] after each step).
MAX_LOGIT_SCALE = math.log(100)
# OpenAI CLIP's Adam betas and epsilon.
BETAS, EPS = (0.9, 0.98), 1e-6
RUN_NAME = "vlpbench-finetune-clip"


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of a fine-tuning run. Jang et al. publish none; these are vlpbench's defaults.

    Attributes:
        epochs: passes over the pairs; each has ``len(pairs) // batch_size`` steps (the last partial batch
            is dropped: a contrastive batch needs its negatives).
        batch_size: pairs per step (CheXzero fine-tuned with 64).
        lr: peak learning rate of AdamW, reached after ``warmup_steps`` and followed by a cosine decay to 0.
        weight_decay: AdamW's decay of the matrices; biases, norms, embeddings of one dimension and the
            logit scale (every parameter with fewer than 2 dimensions) are not decayed, as in open_clip.
        warmup_steps: linear warm-up from 0 (capped at the total step count).
        grad_clip: the maximum L2 norm of all gradients together; 0 switches clipping off.
        sentence_sampling: pair each image with one sentence drawn from its report at every step;
            False pairs it with the whole report text (truncated to the context length).
        min_words: a sentence needs this many words with a letter (:mod:`.sentences`).
        margin: positive-pair loss relaxation: positives whose cosine exceeds it are not pulled closer
            (:mod:`.loss`); None is the plain CLIP loss.
        normalization: the ``clip`` adapter's normalisation the images are trained with ("openai" or
            "chexzero"); evaluate with the same (``--model-option normalization=...``).
        precision: "auto" (bf16 autocast on a CUDA device that supports it, else fp32), "bf16" or "fp32".
        save_every: steps between writes of ``latest.pt``; 0 writes it at the end of each epoch.
        seed: the order of the pairs and the sentence draws.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float = 1.0
    sentence_sampling: bool = True
    min_words: int = DEFAULT_MIN_WORDS
    margin: float | None = 0.5
    normalization: str = "openai"
    precision: str = "auto"
    save_every: int = 0
    seed: int = 0

    def check(self) -> None:
        """Raise ``ConfigError`` naming the first setting out of range."""
        problems = {
            "epochs": self.epochs < 1, "batch_size": self.batch_size < 2, "lr": not self.lr > 0,
            "weight_decay": self.weight_decay < 0, "warmup_steps": self.warmup_steps < 0,
            "grad_clip": self.grad_clip < 0, "min_words": self.min_words < 1, "save_every": self.save_every < 0,
            "margin": self.margin is not None and not -1 <= self.margin <= 1,
            "precision": self.precision not in PRECISIONS,
        }
        wanted = {"epochs": "at least 1", "batch_size": "at least 2 (a contrastive batch needs negatives)",
                  "lr": "positive", "weight_decay": "0 or more", "warmup_steps": "0 or more",
                  "grad_clip": "0 (off) or more", "min_words": "at least 1", "save_every": "0 or more",
                  "margin": "a cosine in [-1, 1], or None for the plain loss",
                  "precision": f"one of {', '.join(PRECISIONS)}"}
        for name, bad in problems.items():
            if bad:
                raise ConfigError(f"fine-tuning setting {name}={getattr(self, name)!r}: expected {wanted[name]}")


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up over ``warmup`` steps from 1/warmup,
    then a cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for autocast, or None for fp32, as ``FinetuneConfig.precision`` describes."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type != "cuda":
            raise ConfigError(f"precision bf16 needs a CUDA device; training runs on {device} (use auto or fp32)")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, keep = [], []
    for parameter in model.parameters():
        (decay if parameter.ndim >= 2 else keep).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _versions() -> dict[str, str]:
    import open_clip

    return {"vlpbench": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _write_loss_curve(out: Path, history: list[dict[str, float]]) -> str | None:
    """Write ``loss.csv`` and, with matplotlib, ``loss.png``; return the PNG's name or None."""
    with open(out / LOSS_CSV, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=("step", "epoch", "loss", "lr", "logit_scale"))
        writer.writeheader()
        writer.writerows(history)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot([h["step"] for h in history], [h["loss"] for h in history], linewidth=0.8)
    axes.set(xlabel="step", ylabel="contrastive loss", title="CLIP fine-tuning")
    figure.tight_layout()
    figure.savefig(out / LOSS_PNG, dpi=120)
    return LOSS_PNG


class _Batches:
    """The images and text views of step ``s`` (module docstring): a pure function of the step."""

    def __init__(self, images: np.ndarray, pairs: Pairs, config: FinetuneConfig) -> None:
        self.images = images
        self.config = config
        self.steps_per_epoch = len(pairs.ids) // config.batch_size
        if config.sentence_sampling:
            self.views = [split_sentences(text, config.min_words) for text in pairs.texts]
            empty = [i for i, views in zip(pairs.ids, self.views) if not views]
            if empty:
                raise DataError(f"{len(empty)} reports have no sentence (no letter at all), e.g. image {empty[0]}")
        else:
            self.views = [[text] for text in pairs.texts]

    def __call__(self, step: int) -> tuple[np.ndarray, list[str]]:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.config.seed, 0, epoch]).permutation(len(self.views))
        chosen = order[position * self.config.batch_size:(position + 1) * self.config.batch_size]
        draws = np.random.default_rng([self.config.seed, 1, step]).integers(0, 2**62, size=len(chosen))
        texts = [self.views[i][draw % len(self.views[i])] for i, draw in zip(chosen, draws)]
        return np.asarray(self.images[chosen]), texts


def _load_resume(path: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The resume state in ``path``, after checking it belongs to this run (config, data, start point).

    Raises:
        ConfigError: no file, or it was written with other settings, data or initial checkpoint.
        CheckpointError: the file cannot be read.
    """
    if not path.is_file():
        raise ConfigError(f"--resume: no {RESUME_FILE} in {path.parent}; start without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged or foreign files
        raise CheckpointError(f"{path}: cannot read the resume state ({type(exc).__name__}: {exc})") from exc
    differing = [k for k, v in expected.items() if state.get("run", {}).get(k) != v]
    if differing:
        found = {k: state.get("run", {}).get(k) for k in differing}
        raise ConfigError(f"--resume: {path} was written by another run; differing {', '.join(differing)}: "
                          f"{found} there, {({k: expected[k] for k in differing})} now")
    return state


def finetune(pairs: Pairs, checkpoint: str | Path, out: str | Path, config: FinetuneConfig, *,
             device: torch.device, resume: bool = False, stop_at_step: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Fine-tune the CLIP in ``checkpoint`` on ``pairs``; write the files of the module docstring to ``out``.

    Args:
        checkpoint: the initial CLIP, any form the ``clip`` adapter loads.
        resume: continue from ``out/latest.pt`` (same settings, data and initial checkpoint required).
        stop_at_step: stop after this many steps in all (the schedule still spans every epoch), e.g. to
            fit a job's time limit; ``resume`` continues later. None trains to the end.

    Returns:
        The metadata (also written to ``metadata.json``).

    Raises:
        ConfigError: a bad setting, fewer pairs than one batch, ``out`` already holding a run without
            ``resume``, or a resume state of another run.
        CheckpointError: the initial checkpoint is not a ViT CLIP the ``clip`` adapter loads.
        DataError: a report without any sentence, or an image that cannot be read.
    """
    from vlpbench.adapters import build_adapter
    from vlpbench.adapters.clip import tokenize
    from vlpbench.data.cache import cached_images

    config.check()
    out = Path(out)
    if not resume and (out / RESUME_FILE).exists():
        raise ConfigError(f"{out} already holds a fine-tuning run ({RESUME_FILE}); pass --resume to continue it "
                          "or choose a new folder")
    if len(pairs.ids) < config.batch_size:
        raise ConfigError(f"batch size {config.batch_size} is more than the {len(pairs.ids)} pairs")
    started = time.perf_counter()
    adapter = build_adapter("clip", checkpoint, normalization=config.normalization)
    model = adapter.model
    model.visual.output_tokens = False  # training needs the pooled embedding only
    model.to(device).train().requires_grad_(True)
    autocast_dtype = _autocast_dtype(config.precision, device)

    images = cached_images(pairs.reader, pairs.dataset, pairs.ids, adapter.image_size, progress=progress)
    batches = _Batches(images, pairs, config)
    total = config.epochs * batches.steps_per_epoch
    warmup = min(config.warmup_steps, total)
    save_every = config.save_every or batches.steps_per_epoch
    end = total if stop_at_step is None else min(total, stop_at_step)

    optimizer = torch.optim.AdamW(_parameter_groups(model, config.weight_decay), lr=config.lr, betas=BETAS,
                                  eps=EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))
    run = {"config": asdict(config), "data_sha256": pairs.sha256(), "initial_sha256": adapter.checkpoint_sha256}
    step, history = 0, []
    if resume:
        state = _load_resume(out / RESUME_FILE, run)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        step, history = int(state["step"]), list(state["losses"])
        log.info("resuming %s at step %d of %d", out, step, total)
    out.mkdir(parents=True, exist_ok=True)

    def save_resume_state() -> None:
        save_checkpoint({"epoch": step // batches.steps_per_epoch, "name": RUN_NAME,
                         "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                         "rng": _rng_state(), "losses": history, "run": run}, out / RESUME_FILE)

    bar = tqdm(total=total, initial=step, desc="fine-tune CLIP", unit="step", disable=not progress)
    while step < end:
        pixels, texts = batches(step)
        pixels = adapter.preprocess(torch.from_numpy(pixels).unsqueeze(1).to(device))
        tokens = tokenize(texts, adapter.config.context_length).to(device)
        lr = optimizer.param_groups[0]["lr"]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            image_features = model.encode_image(pixels, normalize=True)
            text_features = model.encode_text(tokens, normalize=True)
        loss = clip_loss(image_features.float(), text_features.float(), model.logit_scale.exp(),
                         margin=config.margin)
        if not torch.isfinite(loss):
            raise ConfigError(f"the loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        history.append({"step": step, "epoch": step // batches.steps_per_epoch, "loss": loss.item(), "lr": lr,
                        "logit_scale": model.logit_scale.exp().item()})
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", lr=f"{lr:.2e}")
        if step % save_every == 0 and step < end:
            save_resume_state()
    bar.close()
    save_resume_state()

    done = step >= total
    model_file = None
    if done:
        save_checkpoint({"epoch": config.epochs, "name": RUN_NAME,
                         "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}},
                        out / MODEL_FILE)
        model_file = {"path": str(out / MODEL_FILE), "sha256": sha256_file(out / MODEL_FILE)}
    png = _write_loss_curve(out, history)
    last_epoch = [h["loss"] for h in history if h["epoch"] == history[-1]["epoch"]] if history else []
    metadata = {
        "method": "CLIP fine-tuning with random sentence sampling and positive-pair loss relaxation, vlpbench's "
                  "interpretation of Jang et al. (Sci. Rep. 2024), whose full method text is unavailable",
        "config": asdict(config),
        "data": {**pairs.description, "sha256": run["data_sha256"], "image_size": adapter.image_size,
                 "text_views": sum(len(v) for v in batches.views)},
        "initial_checkpoint": adapter.describe()["checkpoint"],
        "architecture": asdict(adapter.config),
        "steps": {"done": step, "total": total, "per_epoch": batches.steps_per_epoch, "warmup": warmup,
                  "finished": done},
        "loss": {"first": history[0]["loss"] if history else None,
                 "last": history[-1]["loss"] if history else None,
                 "mean_last_epoch": float(np.mean(last_epoch)) if last_epoch else None},
        "device": str(device),
        "precision": "bf16 autocast" if autocast_dtype is not None else "fp32",
        "files": {"model": model_file, "resume": RESUME_FILE, "loss_csv": LOSS_CSV, "loss_png": png},
        "timing": {"this_call_s": time.perf_counter() - started},
        "versions": _versions(),
    }
    (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    return metadata
