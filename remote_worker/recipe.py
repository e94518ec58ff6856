"""The recipe: QLoRA (or plain LoRA) on transformers' Trainer + peft, read top to bottom.

    probe → tokenizer → data → model → LoRA → Trainer → train → save the adapter → `done`

Choices, each from a measurement (shared/anchors.md):
- CUDA, quant.bits = 4: nf4 with double quantization, computing in the training dtype
  (bf16 where the GPU has it, else fp16). CPU: fp32, and bits = 4 still goes through
  bitsandbytes, which runs nf4 on the CPU. bits = 16: plain LoRA on the unquantized model.
- The micro-batch size and gradient checkpointing (non-reentrant): on CUDA, what the spec leaves
  open (micro_batch_tokens = 0, gradient_checkpointing = "auto") is measured on the card before
  training, and the fastest shape that fits is used (remote_worker.calibrate), checkpointing only
  as many decoder layers as memory requires (partial checkpointing, guided by jobs.memory). A resumed
  run with a partial shape checkpoints every layer (its checkpoint records on/off only). On the CPU:
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

import dataclasses
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

from jobs import autodl, memory
from jobs.events import Done, EventWriter, Phase
from jobs.layout import JobPaths
from jobs.manifest import write_manifest
from jobs.spec import JobSpec, WorkerJob
from remote_worker import (
    DataError,
    ModelNotFound,
    WorkerError,
    calibrate,
    checkpoints,
    data,
    distributed,
    fast,
    prefetch,
    stopping,
)
from remote_worker import callbacks as tracking
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
    rank = distributed.init(spec.train.device)  # under torchrun: join the others (remote_worker.distributed)
    checkpoint_root = Path(JobPaths(str(job_dir)).checkpoints)
    if rank.local_main:
        checkpoints.remove_partials(checkpoint_root)
    distributed.barrier()
    damaged: list[str] = []
    resume_from = _agreed_checkpoint(checkpoint_root, damaged)
    if rank.main:
        checkpoints.make_reserve(job_dir)

    # 1. Where we run.
    machine = probe(spec.train.device)
    phase("setup", f"{machine.device_name}, {machine.dtype}, attention {machine.attention}")  # a run's first event
    for note in damaged:
        phase("resuming", note)

    # 2. Tokenizer, then the data: a bad dataset fails before minutes go into loading the model.
    phase("loading tokenizer")
    # the folder the model download put it in (ModelScope's or HF_HOME's), else the name as given
    model_path = prefetch.downloaded_model(str(job_dir)) or resolve_model_path(spec.model.name_or_path)
    tokenizer = load_tokenizer(model_path, spec)

    phase("tokenizing")
    template_text = spec.data.train_template_text
    train_split = data.load_split(job.data_dir, "train", tokenizer, spec.data.max_length, spec.data.overlong,
                                  template_text)
    eval_split = data.load_split(job.data_dir, "eval", tokenizer, spec.data.max_length, spec.data.overlong,
                                 template_text)
    data.adopt_chat_template(job.data_dir, tokenizer)  # after tokenizing: the fingerprint is the model's own
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
    mode = distributed.choose(spec.train.distributed, rank, _param_count(model_path, spec), spec.quant.bits,
                              _card_bytes(machine))  # fmt: skip
    if rank.multi:
        phase("loading model", f"{rank.size} processes, {mode}")
    model, checkpointing = build_model(model_path, spec, machine, paths, mode)
    trainable_params, all_params = model.get_nb_trainable_parameters()

    # 4. The micro-batch shape: measured on the GPU (remote_worker.calibrate), kept on a resume.
    pad_id = tokenizer.pad_token_id
    micro_batch_tokens, checkpointing, calibration = choose_batch_shape(
        model, spec, machine, checkpointing, train_split.sequences, resume_from, paths, pad_id, phase, mode
    )
    checkpointed_layers = calibrate.checkpointed_layers(model)  # partial checkpointing: saved with checkpoints
    grad_accum = step_accum(spec, micro_batch_tokens, rank.size, resume_from, data.mean_tokens(train_split))
    # On CUDA, packed rows are filled to a few lengths (data.PAD_MULTIPLE): steady step times (data.py).
    pad_to = micro_batch_tokens if machine.device == "cuda" else 0
    packer = checkpoints.saved_packer(resume_from)  # a resume packs as its checkpoint's run did
    batching = functools.partial(
        data.MicroBatches, micro_batch_tokens=micro_batch_tokens, packing=spec.train.packing, pad_to=pad_to,
        pad_multiple=data.PAD_MULTIPLE, packer=packer,
    )
    # Whole global batches of micro-batches, the last one filled up (data.py): every token once an epoch
    train_set = batching(train_split.sequences, pad_id=pad_id, seed=spec.train.seed,
                         multiple=rank.size * grad_accum)  # fmt: skip
    eval_set = None
    if eval_split.sequences:
        eval_set = batching(eval_split.sequences, pad_id=pad_id)
    paths.configure(train_set, eval_set)
    phase(
        "batching",
        f"{len(train_set):,} micro-batches of <= {micro_batch_tokens:,} tokens x {grad_accum} a step, "
        f"gradient checkpointing {'on' if checkpointing else 'off'}"
        + (f", on {rank.size} processes ({mode}): {rank.size * grad_accum} a step" if rank.multi else ""),
    )

    # 5. The Trainer, fed our micro-batches one at a time.
    args = training_arguments(spec, job_dir, machine, grad_accum, has_eval=eval_set is not None, mode=mode,
                              layer_classes=_layer_classes(model))  # fmt: skip
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
            "world_size": rank.size,
            "distributed": mode,
            **paths.started_fields(),  # attention as resolved, liger, fused_lora
        },
        save_every_minutes=spec.train.save_every_minutes,
        stopper=stopper,
        batch_shape=(micro_batch_tokens, checkpointing, rank.size, grad_accum, checkpointed_layers, packer),
        job_dir=job_dir,
    )
    trainer = RecipeTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=data.first,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    tracking.guard_trackers(trainer, events, spec, job.job_id, str(job_dir))  # model loaded: trackers may use the proxy
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
        manifest_sha = save_adapter(model, tokenizer, adapter_dir, trainer if rank.multi else None)
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


def load_model(model_path: str, spec: JobSpec, machine: Probe, paths: fast.FastPaths | None = None,
               mode: str = "none"):
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
            # FSDP shards flat tensors of one dtype: the 4-bit weights go into a 16-bit container
            **({"bnb_4bit_quant_storage": machine.torch_dtype} if mode == distributed.FSDP else {}),
        )
    # FSDP: accelerate loads on rank 0 and hands out shards (cpu_ram_efficient_loading), no device map
    distributed.prepare_loading(mode)
    placement = {} if mode == distributed.FSDP else {"device_map": {"": distributed.device_of(machine.device)}}
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        revision=spec.model.revision,
        trust_remote_code=spec.model.trust_remote_code,
        dtype=machine.torch_dtype,
        quantization_config=quantization,
        attn_implementation=paths.attn_implementation,
        **placement,
    )
    model.config.use_cache = False  # a cache disables the packed-sequence mask (see the docstring)
    if spec.quant.bits == 4 and machine.device == "cpu":
        # In eval mode bnb repacks 4-bit weights for CPU inference and never unpacks them for
        # training (anchors §5); an evaluation between steps would do that. Keep the training layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def build_model(model_path: str, spec: JobSpec, machine: Probe, paths: fast.FastPaths, mode: str = "none"):
    """The model to train, LoRA adapters on, and whether checkpointing is on: load, freeze and set
    up checkpointing, add the adapters, fuse them (remote_worker.fast). The bench builds "ours" with it.
    FSDP: checkpointing on, no fused LoRA (its kernels read whole weights, FSDP holds shards)."""
    model = load_model(model_path, spec, machine, paths, mode)
    checkpointing = use_gradient_checkpointing(spec.train.gradient_checkpointing, machine.device, model.num_parameters())
    if mode == distributed.FSDP and spec.train.gradient_checkpointing == "auto":
        checkpointing = True
    model = prepare_for_training(model, spec, machine, checkpointing)
    model = get_peft_model(model, lora_config(spec))
    if mode != distributed.FSDP:
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
                       pad_id: int, phase, mode: str = "none") -> tuple[int, bool, str]:
    """(micro_batch_tokens, gradient checkpointing, how it was chosen), and the model set up for it.

    A resumed run keeps the shape of its checkpoint (its checkpointed layers too), so the data order goes
    on where it stopped and the memory it measured still holds.
    On CUDA the shape is measured (remote_worker.calibrate); on the CPU it is the spec's, or
    max_length tokens, with checkpointing by the `auto` rule.
    """
    unmeasured, _ = data.batch_shape(spec.train, spec.data.max_length, machine.device)
    if resume_from is not None:
        # A checkpoint from before shapes were saved with it was trained with the unmeasured shape.
        saved = checkpoints.read_saved_shape(resume_from)
        micro, on = (saved.micro_batch_tokens, saved.gradient_checkpointing) if saved else (unmeasured, checkpointing)
        layers = saved.checkpointed_layers if saved and on else None
        if on != checkpointing or layers is not None:
            calibrate.set_checkpointing(model, on, layers)
        return micro, on, f"kept from {resume_from.name}"
    if machine.device != "cuda":
        return unmeasured, checkpointing, "not measured on the CPU"
    if mode == distributed.FSDP:  # a shard cannot run a step alone: predicted, not measured
        micro, note = fsdp_micro_batch(model, spec, paths, unmeasured, checkpointing)
        return micro, checkpointing, note
    shapes = calibrate.candidates(spec.train, spec.data.max_length)
    phase("calibrating", f"measuring {len(shapes)} micro-batch shape(s) on the GPU: memory and speed")

    def build_row(seqs, tokens):  # as the training rows are built on CUDA: filled to the micro-batch
        return data.micro_batch(seqs, spec.train.packing, pad_id, pad_to=tokens, varlen=paths.varlen_batches)

    choice = calibrate.calibrate(model, shapes, sequences, build_row, machine.torch_dtype,
                                 setup=memory_setup(spec, paths), mode=spec.train.gradient_checkpointing)
    # Every rank measured its own card; all take rank 0's shape (a rank's OOM still shows as a failure).
    mine = (choice.shape.micro_batch_tokens, choice.shape.checkpointing, choice.shape.layers, choice.note)
    micro, on, layers, note = distributed.agree(mine)
    if (on, layers) != (choice.shape.checkpointing, choice.shape.layers):
        calibrate.set_checkpointing(model, on, layers)
    phase("calibrating", note)
    return micro, on, note


def fsdp_micro_batch(model, spec: JobSpec, paths, unmeasured: int, checkpointing: bool = True) -> tuple[int, str]:
    """(micro_batch_tokens, how it was chosen) under FSDP: with train.micro_batch_tokens = 0, the fastest of
    the calibration's sizes that jobs.memory predicts to fit the smallest rank's GPU with the weights
    sharded over the ranks, every layer checkpointed or none (FSDP's "auto" is every layer); else the
    spec's size.

    Not measured: a shard cannot run a step alone, and a trial that ran out of memory on one rank only
    would leave the others waiting in a collective. A prediction that is wrong shows as an out-of-memory
    failure on the first step, with the settings to change."""
    arch = calibrate.arch_of(model)
    if spec.train.micro_batch_tokens or arch is None:
        return unmeasured, "the spec's micro-batch, not measured under FSDP"
    usable = min(distributed.gather(float(calibrate.usable_memory() or 0)))
    gpus = distributed.world().size
    setup = dataclasses.replace(memory_setup(spec, paths), fused_mlp=False, fsdp=True)  # no fused LoRA
    card = usable + memory.DEFAULT.context_bytes + memory.fsdp_spared_bytes(arch, setup, gpus)
    sizes = memory.sizes_for(spec.data.max_length, 0)
    choice = memory.choose(arch, setup, card, 1000.0, 4e12, sizes, "on" if checkpointing else "off")
    micro = distributed.agree(choice.shape.micro_batch_tokens)
    fits = "predicted to fit" if choice.fits else "the smallest; none is predicted to fit"
    layers = "every layer checkpointed" if checkpointing else "no checkpointing"
    return micro, (f"{micro:,} tokens, {layers}: {fits} {usable / 1e9:.1f} GB a GPU with the weights sharded "
                   f"over {gpus} (jobs.memory; not measured under FSDP)")


def memory_setup(spec: JobSpec, paths) -> memory.Setup:
    """The job as jobs.memory sees it, for the calibration's guess of which shapes fit (the fused loss head
    is on when Liger's patches are, the fused MLP when its check passed)."""
    targets = spec.lora.target_modules
    return memory.Setup(
        bits=spec.quant.bits, r=spec.lora.r, targets=targets if isinstance(targets, str) else tuple(targets),
        fused_loss=str(getattr(paths, "liger", "off")).startswith("on"),
        fused_mlp=bool(getattr(paths, "fused_mlp", False)),
    )


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


def training_arguments(spec: JobSpec, job_dir: Path, machine: Probe, grad_accum: int, has_eval: bool,
                       mode: str = "none", layer_classes: list[str] | None = None):
    t = spec.train
    return TrainingArguments(
        **distributed.trainer_arguments(mode, layer_classes or [], machine.device),
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
        # TensorBoard always (its folder is set by callbacks.guard_trackers), and [track] report_to; each wrapped
        # so that a tracker that fails only warns
        report_to=tracking.trackers(spec)[0],
        run_name=job_dir.name,
    )


class RecipeTrainer(Trainer):
    """The Trainer, with an evaluation that gives every process count the eval loss of one process.

    average_tokens_across_devices (on: a training step's loss is divided by the labels of the whole step,
    over all ranks) also reached evaluation, where each rank's eval micro-batch was divided by the labels of
    every rank's micro-batch that round, the one accelerate repeats to even the ranks out included: two
    processes reported 5.07 where one reported 6.00 for the same weights (tests/test_breaker_multigpu.py).
    Off while evaluating, each micro-batch's loss is its own mean, gathered once (the repeat dropped)."""

    def evaluate(self, *args, **kwargs):
        before = self.args.average_tokens_across_devices
        self.args.average_tokens_across_devices = False
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.args.average_tokens_across_devices = before


def _evaluated_at(trainer: Trainer, step: int) -> bool:
    return any("eval_loss" in log and log.get("step") == step for log in trainer.state.log_history)


def save_adapter(model, tokenizer, adapter_dir: Path, trainer: Trainer | None = None) -> str:
    """Write the adapter (and tokenizer) to a temp folder, add the manifest, rename into place.

    With a trainer (more than one process), every rank takes part in gathering the adapter
    (FSDP holds it in shards) and rank 0 writes; the manifest sha256 is rank 0's, on every rank.
    """
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    if trainer is not None:
        if trainer.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)
        distributed.barrier()
        trainer.save_model(str(tmp))
        sha = None
        if trainer.is_world_process_zero():
            sha = _finish_adapter(tokenizer, tmp, adapter_dir)
        return distributed.agree(sha)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half an adapter (a full disk needs the room)
        raise
    return _finish_adapter(tokenizer, tmp, adapter_dir)


def _finish_adapter(tokenizer, tmp: Path, adapter_dir: Path) -> str:
    try:
        tokenizer.save_pretrained(tmp)
        checkpoints.make_portable(tmp)  # a base the laptop resolves; the instance path in base_model.json
        sha = write_manifest(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if adapter_dir.exists():  # a rerun of the same job: replace the old one
        old = adapter_dir.with_name(adapter_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        adapter_dir.rename(old)
        shutil.rmtree(old)
    tmp.rename(adapter_dir)
    return sha


# --- more than one process (remote_worker.distributed) --------------------------------------------------


def _agreed_checkpoint(root: Path, damaged: list[str]) -> Path | None:
    """Rank 0's newest verified checkpoint, on every rank; a rank whose disk lacks it (another node
    without a shared disk) fails with what to do, rather than training from another step."""
    mine = checkpoints.latest_verified(root, log=damaged.append) if distributed.world().main else None
    name = distributed.agree(mine.name if mine else None)
    if name is None:
        return None
    path = root / name
    if not path.is_dir():
        raise WorkerError(
            f"{path} is not on this node (rank {distributed.world().rank}): the run resumes from it on rank 0",
            hint="put the job folder's checkpoints on every node (a shared disk), or resume on one node",
        )
    return path


def step_accum(
    spec: JobSpec, micro_batch_tokens: int, world_size: int, resume_from: Path | None, mean_tokens: float | None = None
) -> int:
    """Micro-batches per rank and optimizer step: the global batch (train.global_batch_tokens, or
    global_batch_sequences x `mean_tokens`) shared by the ranks, or a checkpoint's global batch kept
    (checkpoints.resumed_grad_accum)."""
    single = data.grad_accum(spec.train, micro_batch_tokens, mean_tokens)
    if resume_from is not None:
        saved = checkpoints.read_saved_shape(resume_from)
        return checkpoints.resumed_grad_accum(resume_from, saved, single, world_size)
    return memory.rank_accum(single, world_size)


def _param_count(model_path: str, spec: JobSpec) -> int:
    """The base model's parameters from its config, built on the meta device (no memory, no weights)."""
    if not spec.train.multi_process or spec.train.distributed != "auto":
        return 0
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path, revision=spec.model.revision,
                                        trust_remote_code=spec.model.trust_remote_code)  # fmt: skip
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code).num_parameters()


def _card_bytes(machine: Probe) -> int | None:
    if machine.device != "cuda":
        return None
    import torch

    total = torch.cuda.mem_get_info()[1]
    return min(total, distributed.cap_bytes() or total)


def _layer_classes(model) -> list[str]:
    """The decoder layer class(es) FSDP wraps one by one: the model's own `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(getattr(base, "_no_split_modules", None) or [])
