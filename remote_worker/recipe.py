"""The recipe: QLoRA (or plain LoRA) on transformers' Trainer + peft, read top to bottom.

    probe → tokenizer → data → model → LoRA → Trainer → train → save the adapter → `done`

Choices, each from a measurement (shared/anchors.md):
- CUDA, quant.bits = 4: nf4 with double quantization, computing in the training dtype
  (bf16 where the GPU has it, else fp16). CPU: fp32, and bits = 4 still goes through
  bitsandbytes, which runs nf4 on the CPU. bits = 16: plain LoRA on the unquantized model.
- The micro-batch size and gradient checkpointing (non-reentrant): on CUDA, what the spec leaves
  open (micro_batch_tokens = 0, gradient_checkpointing = "auto") is measured on the card before
  training, and the fastest shape that fits is used (remote_worker.calibrate). On the CPU:
  max_length tokens, and "auto" checkpointing is off.
- Padding-free packing (remote_worker.data) with `use_cache` off: a KV cache, which the model
  makes by default even in training, turns off the packed-sequence mask in transformers 5 and
  lets packed sequences attend to each other (measured; tests/test_worker_data.py).
- On CUDA, packed rows are filled to exactly micro_batch_tokens: constant shapes ran a 7B
  nf4 step 9% faster on an H100 (4,100 against 3,770 real tokens/s; remote_worker/data.py).
- CPU and bits = 4: bnb's repacking for inference in eval mode is switched off, so an
  evaluation between training steps cannot leave the 4-bit weights in that layout (anchors
  §5: training then learns nothing; measured here with Qwen2's biases: it raised).
- LoRA dropout 0 by default: dropout costs about 20% of the speed.

Never losing the work (remote_worker.checkpoints, remote_worker.stopping):
- a run resumes from the newest complete, verified checkpoint in its job folder, if any (the
  client puts one there for `autodl-run resume`): global step, optimizer, LR schedule, data
  order (the Trainer skips the batches already seen) and RNG states continue;
- a checkpoint on `save_steps` and every `save_every_minutes`; on SIGTERM/SIGINT a checkpoint,
  then the job stops (resumable); before the deadline or max_hours, a checkpoint and the final
  adapter, then `done` with `stopped` set;
- a full disk: the half-written checkpoint is removed, the ballast freed, and the job fails
  with `DiskFull`, naming the last good checkpoint.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from pathlib import Path

from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    Trainer,
    TrainingArguments,
    set_seed,
)

from jobs import autodl
from jobs.events import Done, EventWriter, Phase
from jobs.layout import JobPaths
from jobs.manifest import write_manifest
from jobs.spec import JobSpec, WorkerJob
from remote_worker import DataError, ModelNotFound, calibrate, checkpoints, data, fast, stopping
from remote_worker.callbacks import EventCallback
from remote_worker.probe import Probe, probe

AUTO_CHECKPOINTING_PARAMS = 1_000_000_000
EVAL_EVERY = 0.2  # without save_steps, evaluate every fifth of the run (a Trainer ratio), and at the end


def run(job: WorkerJob, events: EventWriter) -> Done:
    spec = job.spec
    job_dir = Path(job.job_dir)
    t0, started_unix = time.monotonic(), time.time()

    def phase(name: str, message: str = "") -> None:
        events.emit(Phase(phase=name, message=message))

    # 0. What an earlier run of this job left: half-written checkpoints go; the newest complete one is resumed.
    set_seed(spec.train.seed)  # LoRA's initial weights too: every run of a job starts the same
    checkpoint_root = Path(JobPaths(str(job_dir)).checkpoints)
    checkpoints.remove_partials(checkpoint_root)
    damaged: list[str] = []
    resume_from = checkpoints.latest_verified(checkpoint_root, log=damaged.append)
    checkpoints.make_reserve(job_dir)

    # 1. Where we run.
    machine = probe(spec.train.device)
    phase("setup", f"{machine.device_name}, {machine.dtype}, attention {machine.attention}")  # a run's first event
    for note in damaged:
        phase("resuming", note)

    # 2. Tokenizer, then the data: a bad dataset fails before minutes go into loading the model.
    phase("loading tokenizer")
    model_path = resolve_model_path(spec.model.name_or_path)
    tokenizer = load_tokenizer(model_path, spec)

    phase("tokenizing")
    train_split = data.load_split(job.data_dir, "train", tokenizer, spec.data.max_length, spec.data.overlong)
    eval_split = data.load_split(job.data_dir, "eval", tokenizer, spec.data.max_length, spec.data.overlong)
    if not train_split.sequences:
        raise DataError(
            f"no trainable sequences in {job.data_dir}/train.jsonl",
            hint="every record was empty, over data.max_length, or had no assistant tokens; check the dataset",
        )
    phase(
        "tokenizing",
        f"{len(train_split.sequences):,} train sequences ({train_split.source}, {train_split.tokens:,} tokens); "
        f"{len(eval_split.sequences):,} eval; {train_split.dropped:,} dropped (over max_length or nothing to train)",
    )

    # 3. The model, quantized or not, with LoRA adapters on top.
    phase("loading model", spec.model.name_or_path)
    paths = fast.choose(model_path, spec, machine)  # attention self-check, Liger patches: before loading
    phase("loading model", paths.describe())
    model, checkpointing = build_model(model_path, spec, machine, paths)
    trainable_params, all_params = model.get_nb_trainable_parameters()

    # 4. The micro-batch shape: measured on the GPU (remote_worker.calibrate), kept on a resume.
    pad_id = tokenizer.pad_token_id
    micro_batch_tokens, checkpointing, calibration = choose_batch_shape(
        model, spec, machine, checkpointing, train_split.sequences, resume_from, paths, pad_id, phase
    )
    grad_accum = data.grad_accum(spec.train, micro_batch_tokens, data.mean_tokens(train_split))
    # On CUDA, packed rows are filled to a constant length: same-shape steps run faster (data.py).
    pad_to = micro_batch_tokens if machine.device == "cuda" else 0
    batching = functools.partial(
        data.MicroBatches, micro_batch_tokens=micro_batch_tokens, packing=spec.train.packing, pad_to=pad_to
    )
    train_set = batching(train_split.sequences, pad_id=pad_id, seed=spec.train.seed)
    eval_set = None
    if eval_split.sequences:
        eval_set = batching(eval_split.sequences, pad_id=pad_id)
    paths.configure(train_set, eval_set)
    phase(
        "batching",
        f"{len(train_set):,} micro-batches of <= {micro_batch_tokens:,} tokens x {grad_accum} a step, "
        f"gradient checkpointing {'on' if checkpointing else 'off'}",
    )

    # 5. The Trainer, fed our micro-batches one at a time.
    args = training_arguments(spec, job_dir, machine, grad_accum, has_eval=eval_set is not None)
    stopper = stopping.Stopper(
        deadline_unix=job.deadline_unix,
        max_hours=spec.instance.max_hours,
        started_unix=started_unix,
        job_dir=job_dir,
        adapter_bytes=sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
    )
    callback = EventCallback(
        events,
        started={
            "device": machine.device_name,
            "dtype": machine.dtype,
            "quant": "nf4" if spec.quant.bits == 4 else "none",
            "trainable_params": trainable_params,
            "total_params": all_params,
            "train_sequences": len(train_split.sequences),
            "train_tokens": train_split.tokens,
            "micro_batch_tokens": micro_batch_tokens,
            "grad_accum": grad_accum,
            "gradient_checkpointing": checkpointing,
            "calibration": calibration,
            **paths.started_fields(),  # attention as resolved, liger, fused_lora
        },
        save_every_minutes=spec.train.save_every_minutes,
        stopper=stopper,
        batch_shape=(micro_batch_tokens, checkpointing),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=data.first,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    if resume_from is not None:
        phase(
            "resuming",
            f"from {resume_from.name}: the global step, optimizer, LR schedule, data order and RNG continue",
        )
    phase("training")
    adapter_dir = Path(JobPaths(str(job_dir)).adapter)
    try:
        stopping.arm()  # from here a first SIGTERM/SIGINT saves a checkpoint and stops
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
        stopping.disarm()
        if callback.stop_reason == "signal":
            saved = callback.last_checkpoint
            raise stopping.Interrupted(
                stopper.describe("signal", trainer.state.global_step)
                + (f"; checkpoint {saved.path.name} saved" if saved else "")
            )
        if (
            eval_set is not None
            and callback.stop_reason is None
            and not _evaluated_at(trainer, trainer.state.global_step)
        ):
            trainer.evaluate()

        # 6. The adapter, complete or absent, with a sha256 of every file.
        phase("saving")
        manifest_sha = save_adapter(model, tokenizer, adapter_dir)
    except Exception as exc:
        if checkpoints.is_disk_full(exc, job_dir):
            raise checkpoints.disk_full_error(job_dir, job.job_id, checkpoint_root) from exc
        raise
    finally:
        stopping.disarm()
    done = Done(
        adapter_path=str(adapter_dir),
        manifest_sha256=manifest_sha,
        final_loss=callback.last_loss,
        steps=trainer.state.global_step,
        elapsed_s=time.monotonic() - t0,
        total_steps=trainer.state.max_steps,
        stopped=callback.stop_reason or "",
    )
    events.emit(done)
    return done


# --- the steps, in the order run() takes them --------------------------------------------------


def resolve_model_path(name_or_path: str) -> str:
    """Expand `~`; a path-like name that does not exist is an error now, not a hub lookup later."""
    expanded = os.path.expanduser(name_or_path)
    looks_like_path = expanded.startswith(("/", "./", "../")) or name_or_path.startswith("~")
    if looks_like_path and not Path(expanded).exists():
        raise ModelNotFound(
            f"model folder {expanded} does not exist on the instance",
            hint=f"set model.name_or_path to a folder on the instance (e.g. under {autodl.DATA_DISK}) or a hub id",
        )
    return expanded


def load_tokenizer(model_path: str, spec: JobSpec):
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code
        )
    except OSError as exc:
        raise ModelNotFound(
            f"cannot load the tokenizer of {model_path}: {exc}",
            hint="check model.name_or_path; for a hub id without a proxy set instance.hf_endpoint "
            f'(e.g. "{autodl.HF_MIRROR}")',
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_path: str, spec: JobSpec, machine: Probe, paths: fast.FastPaths | None = None):
    """The base model, quantized or not, with the attention of `paths` (fast.choose decides it and
    applies Liger's patches, which must come before the model is built; chosen here if not given)."""
    if paths is None:
        paths = fast.choose(model_path, spec, machine)
    quantization = None
    if spec.quant.bits == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=machine.torch_dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        revision=spec.model.revision,
        trust_remote_code=spec.model.trust_remote_code,
        dtype=machine.torch_dtype,
        quantization_config=quantization,
        device_map={"": machine.device},
        attn_implementation=paths.attn_implementation,
    )
    model.config.use_cache = False  # a cache disables the packed-sequence mask (see the docstring)
    if spec.quant.bits == 4 and machine.device == "cpu":
        # In eval mode bnb repacks 4-bit weights for CPU inference and never unpacks them for
        # training (anchors §5); an evaluation between steps would do that. Keep the training layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def build_model(model_path: str, spec: JobSpec, machine: Probe, paths: fast.FastPaths):
    """The model to train, LoRA adapters on, and whether checkpointing is on: load, freeze and set
    up checkpointing, add the adapters, fuse them (remote_worker.fast). The bench builds "ours" with it."""
    model = load_model(model_path, spec, machine, paths)
    checkpointing = use_gradient_checkpointing(spec.train.gradient_checkpointing, machine.device, model.num_parameters())
    model = prepare_for_training(model, spec, machine, checkpointing)
    model = get_peft_model(model, lora_config(spec))
    paths.enable_fused_lora(model, spec)
    model.train()  # before any forward: bnb 4-bit run in eval mode first trains nothing (anchors §5)
    return model, checkpointing


def prepare_for_training(model, spec: JobSpec, machine: Probe, checkpointing: bool):
    """Freeze the base and set up checkpointing, before the LoRA adapters are added.

    CUDA: no `prepare_model_for_kbit_training`. It upcasts the embeddings, norms and lm_head to
    fp32; in the reference stack's H100 profile the resulting fp32 copies and adds were one of
    four items of "other" kernel time, 854 ms of an 1,800 ms step (docs/benchmarks.md; not
    isolated). The measured recipe "ours" kept them in bf16. Here: every base parameter frozen,
    non-reentrant checkpointing with input grads, train mode. CPU (fp32, nothing to upcast):
    peft's function, as before.
    """
    if spec.quant.bits == 4 and machine.device != "cuda":
        return prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    for param in model.parameters():
        param.requires_grad_(False)
    if checkpointing:
        calibrate.set_checkpointing(model, True)
    model.train()
    return model


def choose_batch_shape(model, spec: JobSpec, machine: Probe, checkpointing: bool, sequences, resume_from, paths,
                       pad_id: int, phase) -> tuple[int, bool, str]:
    """(micro_batch_tokens, gradient checkpointing, how it was chosen), and the model set up for it.

    A resumed run keeps the shape of its checkpoint, so the data order goes on where it stopped.
    On CUDA the shape is measured (remote_worker.calibrate); on the CPU it is the spec's, or
    max_length tokens, with checkpointing by the `auto` rule.
    """
    unmeasured, _ = data.batch_shape(spec.train, spec.data.max_length, machine.device)
    if resume_from is not None:
        # A checkpoint from before shapes were saved with it was trained with the unmeasured shape.
        micro, on = checkpoints.read_batch_shape(resume_from) or (unmeasured, checkpointing)
        if on != checkpointing:
            calibrate.set_checkpointing(model, on)
        return micro, on, f"kept from {resume_from.name}"
    if machine.device != "cuda":
        return unmeasured, checkpointing, "not measured on the CPU"
    shapes = calibrate.candidates(spec.train, spec.data.max_length)
    phase("calibrating", f"measuring {len(shapes)} micro-batch shape(s) on the GPU: memory and speed")

    def build_row(seqs, tokens):  # as the training rows are built on CUDA: filled to the micro-batch
        return data.micro_batch(seqs, spec.train.packing, pad_id, pad_to=tokens, varlen=paths.varlen_batches)

    choice = calibrate.calibrate(model, shapes, sequences, build_row, machine.torch_dtype)
    phase("calibrating", choice.note)
    return choice.shape.micro_batch_tokens, choice.shape.checkpointing, choice.note


def use_gradient_checkpointing(setting: str, device: str, params: int) -> bool:
    if setting == "auto":
        return device == "cuda" and params >= AUTO_CHECKPOINTING_PARAMS
    return setting == "on"


def lora_config(spec: JobSpec) -> LoraConfig:
    return LoraConfig(
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
        task_type="CAUSAL_LM",
    )


def training_arguments(spec: JobSpec, job_dir: Path, machine: Probe, grad_accum: int, has_eval: bool):
    t = spec.train
    return TrainingArguments(
        output_dir=JobPaths(str(job_dir)).checkpoints,
        per_device_train_batch_size=1,  # an item is a whole micro-batch already
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps > 0 else -1,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        bf16=machine.dtype == "bfloat16",
        fp16=machine.dtype == "float16",
        use_cpu=machine.device == "cpu",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",  # the callback adds the timer's, deadline's and signal's
        save_steps=t.save_steps or 500,
        save_total_limit=None,  # the callback keeps the newest complete ones (remote_worker.checkpoints)
        ignore_data_skip=False,  # on resume, skip the batches already trained on: the data order continues
        eval_strategy="steps" if has_eval else "no",
        eval_steps=(t.save_steps or EVAL_EVERY) if has_eval else None,
        prediction_loss_only=True,  # never keep the logits of a whole eval set
        remove_unused_columns=False,
        # Tokens seen: attention_mask.sum() for padded rows; for packed rows, ids != pad id
        # (a real token equal to the pad token, e.g. a base model's EOS, is not counted).
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=machine.device == "cuda",
        disable_tqdm=True,
        report_to=[],
    )


def _evaluated_at(trainer: Trainer, step: int) -> bool:
    return any("eval_loss" in log and log.get("step") == step for log in trainer.state.log_history)


def save_adapter(model, tokenizer, adapter_dir: Path) -> str:
    """Write the adapter (and tokenizer) to a temp folder, add the manifest, rename into place."""
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sha = write_manifest(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half an adapter (a full disk needs the room)
        raise
    if adapter_dir.exists():  # a rerun of the same job: replace the old one
        old = adapter_dir.with_name(adapter_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        adapter_dir.rename(old)
        shutil.rmtree(old)
    tmp.rename(adapter_dir)
    return sha
