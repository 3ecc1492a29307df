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
the tags) that ``AutoModelForCausalLM.from_pretrained`` and the engine load directly, plus
``train_log.jsonl`` (one JSON object per logging step) and ``train_summary.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from multiverse.format import tokenizer as tokenizer_tags
from multiverse.train.collate import MultiverseCollator
from multiverse.train.data import (
    IGNORE_INDEX,
    ConfigError,
    DataReport,
    Example,
    Mode,
    load_examples,
)
from multiverse.train.masks import ATTN_IMPLEMENTATION, Backend, attention_mask_for, resolve_backend

LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"


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
    seed: int = 0
    shuffle: bool = True  # ignored with curriculum (fixed order)
    warmup_ratio: float = 0.05
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


@dataclass(slots=True)
class TrainResult:
    output: Path
    global_step: int
    losses: list[float]  # logged training loss per logging step, in order
    report: DataReport
    log: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------- model and tokenizer


def device_of(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available")
    return dev


def load_model_and_tokenizer(cfg: TrainConfig, attn_implementation: str) -> tuple[Any, Any]:
    """The model and tokenizer of ``cfg``, the tags added to both when missing."""
    if cfg.config is not None:
        from multiverse.train.bpe import build_tokenizer
        from multiverse.train.presets import build_model

        tokenizer = load_pretrained_tokenizer(cfg.tokenizer) if cfg.tokenizer else build_tokenizer()
        tokenizer_tags.add_tags_to_tokenizer(tokenizer)
        model = build_model(cfg.config, tokenizer, attn_implementation, seed=cfg.seed)
    else:
        from transformers import AutoModelForCausalLM

        path = Path(cfg.model)  # type: ignore[arg-type]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {path}")
        tokenizer = load_pretrained_tokenizer(cfg.tokenizer or path)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, attn_implementation=attn_implementation
        )
    rows = model.get_input_embeddings().weight.shape[0]
    ids = tokenizer_tags.add_tags_to_tokenizer(tokenizer)
    if getattr(tokenizer, "multiverse_new_tags", None) or max(ids.values()) >= rows:
        tokenizer_tags.add_tags_to_model(model, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


_PROBE = "What is 9 * 7?\n\nAnswer: 63. Ünïcödé  text\twith 12 + 30 = 42.\n"


def load_pretrained_tokenizer(directory: str | Path) -> Any:
    """The tokenizer saved in ``directory``, loaded faithfully.

    ``AutoTokenizer`` in transformers 5 rebuilds the tokenizer of some model types from its
    own class (for ``qwen2``: Qwen's pre-tokenizer regex and NFC), ignoring a different
    pre-tokenizer stored in ``tokenizer.json``. When that changes how text is encoded, the
    file's own tokenizer is used instead (``PreTrainedTokenizerFast``).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    file = path / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(file))
        if raw.encode(_PROBE, add_special_tokens=False).ids != tokenizer.encode(
            _PROBE, add_special_tokens=False
        ):
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    return tokenizer


def _set_stop_tokens(model: Any, tokenizer: Any) -> None:
    """Generation stops at the chat end-of-turn token as well as at EOS."""
    vocab = tokenizer.get_vocab()
    stops: list[int] = []
    for token in ("<|im_end|>", tokenizer.eos_token):
        if token and token in vocab and vocab[token] not in stops:
            stops.append(vocab[token])
    if model.generation_config is not None and stops:
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        model.generation_config.pad_token_id = tokenizer.pad_token_id


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
                kept = [e for e in _read_log(self.path) if e.get("step", 0) <= state.global_step]
                self.path.write_text("".join(json.dumps(e) + "\n" for e in kept))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            entry = {"step": state.global_step, "epoch": state.epoch, **logs}
            with self.path.open("a") as f:
                f.write(json.dumps(entry) + "\n")

    return MultiverseTrainer, JsonlLogCallback


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, examples: Sequence[Example]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _latest_checkpoint(output: Path) -> str:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(output)) if output.is_dir() else None
    if last is None:
        raise FileNotFoundError(f"--resume: no checkpoint-* directory in {output} to resume from")
    return last


def train(cfg: TrainConfig, callbacks: Sequence[Any] = (), verbose: bool = True) -> TrainResult:
    """Run one training job; see :class:`TrainConfig`. ``callbacks``: extra TrainerCallbacks."""
    from transformers import TrainingArguments, set_seed

    output = Path(cfg.output)
    device = device_of(cfg.device)
    backend = resolve_backend(cfg.attention, device, training=True)
    resume = cfg.resume
    if resume is True:
        resume = _latest_checkpoint(output)
    elif isinstance(resume, str) and not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume: checkpoint directory not found: {resume}")

    set_seed(cfg.seed)
    model, tokenizer = load_model_and_tokenizer(cfg, ATTN_IMPLEMENTATION[backend])
    examples, report = load_examples(
        cfg.data,
        tokenizer,
        cfg.mode,
        cfg.max_length,
        cfg.curriculum,
        cfg.epochs if cfg.curriculum else 1,
    )
    if verbose:
        print(report.summary(), flush=True)
    collator = MultiverseCollator(
        tokenizer_tags.tag_ids(tokenizer),
        tokenizer.pad_token_id,
        pack=cfg.pack,
        pad_to_multiple_of=cfg.block_size if backend == "flex" else 1,
    )
    bf16 = (
        cfg.bf16
        if cfg.bf16 is not None
        else (device.type == "cuda" and torch.cuda.is_bf16_supported())
    )
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
    args = TrainingArguments(
        output_dir=str(output),
        num_train_epochs=1 if cfg.curriculum else cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.lr,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
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
        dataloader_pin_memory=device.type == "cuda",
        **({"activation_checkpointing": True} if cfg.gradient_checkpointing else {}),
        report_to="none",
        disable_tqdm=not cfg.progress,
    )
    trainer_cls, log_cls = _trainer_classes()
    log_path = output / LOG_FILE
    output.mkdir(parents=True, exist_ok=True)
    if not resume and log_path.exists():
        log_path.unlink()
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
    _set_stop_tokens(model, tokenizer)  # after train(): the Trainer re-aligns special tokens
    trainer.save_model(str(output))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(output))
        summary = {
            "config": asdict(cfg),
            "attention": backend,
            "global_step": trainer.state.global_step,
            "data": {
                "records": report.records,
                "examples": report.examples,
                "forms": dict(report.forms),
                "skipped": [{"source": s.source, "reason": s.reason} for s in report.skipped],
            },
        }
        (output / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log = _read_log(log_path)
    losses = [e["loss"] for e in log if "loss" in e]
    return TrainResult(output, trainer.state.global_step, losses, report, log)
