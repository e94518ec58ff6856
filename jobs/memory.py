"""One memory and speed model of a (Q)LoRA training step, shared by `autodl-run plan` (the laptop, before
renting) and the worker's calibration (remote_worker.calibrate: which shapes to measure first, which to
skip). The calibration's measurement on the card stays the final word; this model only predicts.

Units: bytes (decimal GB = 1e9 bytes in what is shown), tokens, seconds, FLOP. Standard library only: the
laptop imports it without torch, the worker without pydantic.

What a step holds at its peak (`estimate`):
- weights: every decoder linear in nf4 with double quantization (0.5 byte a weight, an 8-bit absmax a
  block of 64, an fp32 second-level scale a block of 256 absmaxes: bitsandbytes' layout), or 2 bytes
  at bits = 16; embeddings and an untied lm_head stay 16-bit (2 bytes); norms are negligible.
- LoRA: r·(in + out) parameters a targeted linear, fp32 (peft keeps adapters in fp32): the weight, its
  gradient and AdamW's two moments, 16 bytes a parameter.
- activations: a layer that is not checkpointed keeps `act_h·hidden + act_kv·kv_dim + act_i·intermediate`
  16-bit values a token for its backward (inputs of the norms, q/k/v, the attention output, the
  SwiGLU's gate, up and product; anchors §6 measured 7B at 8k tokens without checkpointing: 42.8 GB;
  with the worker's fused MLP the product is recomputed, not kept: `fused_mlp_i` fewer per intermediate unit);
  a checkpointed one keeps its input only (`ckpt_h·hidden`), and the backward of one layer at a time
  re-materialises a full layer's worth (`transient_layers`).
- the loss head: Liger's fused linear cross-entropy keeps a chunk of logits (`fused_loss_h·hidden` a
  token); unfused, the logits in 16 and 32 bits and their gradient (`unfused_loss_v·vocab` bytes a token;
  the anchors' "about 6·V bytes a token").
- overhead: what the allocator reserves beyond what is allocated (`alloc_frac`) and the CUDA context
  (`context_bytes`), neither counted by torch.cuda.max_memory_allocated.

Speed (`tokens_per_s`, tokens of the micro-batch, padding included): FLOP a token = 4·N for frozen-base
LoRA (forward 2N, input gradients 2N; anchors §1), plus 2·N_layer × `recompute_cost` for each
checkpointed layer's recomputed forward, plus causal attention (6·s·d_attn a layer and 2·s·d_attn a
recompute, s the mean packed sequence length) × `attn_cost`, over the card's dense bf16 rate × `efficiency`;
plus the dequantization of every nf4 weight (read 0.5 byte, write 2) once a forward, once a backward and
once a recompute, at the card's memory bandwidth × `bw_efficiency`; the micro-batch never takes less than
the CPU's time to queue its kernels (`launch_seconds`), which is what bounds a small model.

The constants (`Constants`) are fitted to the GPU measurements of bench/memory_fit.py (`--fit`; the rows
file is named at `Constants`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace

GB = 1e9
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weight + 8-bit absmax per 64 + fp32 scale per 256 blocks
LORA_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight, fp32 gradient, AdamW's two fp32 moments
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What the worker keeps free of the usable memory when it chooses (remote_worker.calibrate uses these).
HEADROOM = 0.06
# Under FSDP the allocator holds more reserved-but-unallocated memory (all-gather buffers of every size):
# the 32B run at 24 GB a GPU failed its second step with 1.66 GB of 22.35 so held (2026-11-30).
FSDP_HEADROOM = 0.12
MIN_HEADROOM_BYTES = 1 << 30
SIZES = (16384, 8192, 4096)  # micro-batch tokens tried when train.micro_batch_tokens = 0
# remote_worker.distributed's rule for train.distributed = "auto" on several GPUs: data-parallel when the base
# weights, as it reckons them (`card_weight_bytes`), take at most this share of one card; else FSDP
DDP_WEIGHT_SHARE = 0.6
UNMEASURED_TOKENS = 16384  # the worker's micro-batch where it measures none (FSDP, the CPU aside): remote_worker.data


@dataclass(frozen=True)
class Constants:
    """Every fitted number of the model, in one place (bench/memory_fit.py --fit prints a new set).

    act_*, ckpt_h, transient_layers, token_h, efficiency, bw_efficiency, recompute_cost and attn_cost are
    `bench/memory_fit.py --fit bench/results/2026-11-30_h200_memory-fit.jsonl` (one H200, Qwen2.5 7B and
    14B architectures, short rows and rows of ~6k tokens; peaks within 2%, tokens/s within 14%), rounded.
    The per-unit split of act_* is loose (the grid's architectures share their proportions); their sum
    a token is what the rows fix. transient_layers fits to 0: token_h absorbs it. launch_* are `--fit` over
    that file and `..._memory-fit-0.5b.jsonl` (the 0.5B's rows, the only ones the launch floor decides);
    the same fit would move act_h to 0 and act_kv to 29.5 without bringing any peak nearer than 3%, so the
    memory constants stay those of the 7B/14B fit (the 0.5B's peaks within 7% with them)."""

    act_h: float = 4.92  # 16-bit values a token a non-checkpointed layer keeps, per hidden unit
    act_kv: float = 10.95  # ... per key/value unit (k and v for the attention kernel)
    act_i: float = 2.98  # ... per intermediate unit (gate, up, their product)
    # ... of which the fused MLP (remote_worker/fast/fused_mlp.py) keeps none: the SwiGLU product, one
    # value per intermediate unit by construction (tests/test_worker_fast.py counts the saved tensors)
    fused_mlp_i: float = 1.0
    ckpt_h: float = 0.43  # a checkpointed layer keeps its input: 16-bit values per hidden unit
    transient_layers: float = 0.0  # full layers of activations alive at once in the backward
    fused_loss_h: float = 4.0  # bytes a token for the fused loss head, per hidden unit
    unfused_loss_v: float = 6.0  # bytes a token for the unfused loss head, per vocabulary entry
    # bytes a token per hidden unit outside the decoder layers, whatever the loss head: the embedding's
    # output and the hidden states' gradients between layers, the final norm, rotary tables (fitted)
    token_h: float = 87.1
    alloc_frac: float = 0.03  # reserved beyond allocated (expandable_segments keeps it small)
    context_bytes: float = 0.5e9  # CUDA context and kernels: memory the allocator never sees
    # achieved / the datasheet's dense bf16 rate (jobs.cards) on the matmuls (989 on an H200's datasheet,
    # 790 measured on an 8192^3 matmul)
    efficiency: float = 0.532
    # achieved / peak bandwidth for the per-pass cost of nf4 layers; low because it lumps in every other
    # fixed cost of a layer pass (launches, norms, small kernels)
    bw_efficiency: float = 0.139
    recompute_cost: float = 0.937  # a recomputed forward costs this many forwards (fitted)
    # attention's cost a FLOP relative to the matmuls' (flash attention runs below the matmul rate, and its
    # backward is 2.5 forwards, not 2): what makes rows of ~6k tokens slower a token than short ones
    attn_cost: float = 1.4
    # CPU seconds to queue one decoder layer's kernels (forward and backward), and one checkpointed layer's
    # recompute: a micro-batch takes at least this, whatever the GPU. It decides for small models: the
    # 0.5B took 0.17 s a forward+backward at 4,096 and at 16,384 tokens alike, 0.27 s with every layer
    # checkpointed (bench/results/2026-11-30_h200_memory-fit-0.5b.jsonl; that machine's CPU, fitted)
    # Under FSDP (fused LoRA off: PEFT's path) the backward of a recomputed layer holds about this many full
    # layers of activations beyond what the fused path keeps: 32B on 2 H200s, every layer checkpointed,
    # measured 20.4 GB a GPU at 8,192 tokens and 28.6 at 16,384 against 18.2 and 24.3 without it
    # (bench/results/2026-11-30_h200x2_fsdp-24gb.jsonl, ..._h200x2_multigpu.jsonl)
    fsdp_transient_layers: float = 1.1
    launch_layer_s: float = 7.3e-3
    launch_recompute_s: float = 3.8e-3

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT = Constants()


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer, as its config.json describes it."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int = 0  # 0: hidden // heads
    max_position: int = 0
    model_type: str = ""

    @classmethod
    def from_config(cls, cfg: dict) -> Arch:
        """From a Hugging Face config.json (Llama, Qwen2, Mistral, GLM-4 "-hf"; ChatGLM's own names too).

        Raises ValueError naming the missing key."""
        if "text_config" in cfg and "hidden_size" not in cfg:
            cfg = {**cfg["text_config"], "model_type": cfg.get("model_type", "")}

        def get(*names: str, default: int | None = None) -> int:
            for n in names:
                if cfg.get(n) is not None:
                    return int(cfg[n])
            if default is None:
                raise ValueError(f"config.json has none of {', '.join(names)}")
            return default

        heads = get("num_attention_heads", "n_head")
        return cls(
            hidden=get("hidden_size", "n_embd"),
            intermediate=get("intermediate_size", "ffn_hidden_size"),
            layers=get("num_hidden_layers", "num_layers", "n_layer"),
            heads=heads,
            kv_heads=get("num_key_value_heads", "multi_query_group_num", default=heads),
            vocab=get("vocab_size", "padded_vocab_size"),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=int(cfg.get("head_dim") or cfg.get("kv_channels") or 0),
            max_position=int(cfg.get("max_position_embeddings") or cfg.get("seq_length") or 0),
            model_type=str(cfg.get("model_type", "")),
        )

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.dim

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, in, out) of each linear of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return [
            ("q_proj", h, self.q_dim), ("k_proj", h, self.kv_dim), ("v_proj", h, self.kv_dim),
            ("o_proj", self.q_dim, h), ("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h),
        ]  # fmt: skip

    @property
    def layer_params(self) -> int:
        return sum(a * b for _, a, b in self.linears())

    @property
    def embed_params(self) -> int:
        """The input embedding and, when untied, the lm_head."""
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embed_params

    @property
    def matmul_params(self) -> int:
        """Parameters a token multiplies through: the decoder's linears and the lm_head (not the lookup)."""
        return self.layers * self.layer_params + self.vocab * self.hidden


def lora_params(arch: Arch, r: int, targets: str | Sequence[str] = "all-linear") -> int:
    names = set(ALL_LINEAR if targets == "all-linear" else targets)
    return arch.layers * sum(r * (a + b) for n, a, b in arch.linears() if n in names)


@dataclass(frozen=True)
class Setup:
    """What the job and the card fix, besides the shape."""

    bits: int = 4  # 4: nf4 + double quant; 16: plain LoRA on the 16-bit model
    r: int = 16
    targets: str | tuple[str, ...] = "all-linear"
    fused_loss: bool = True  # Liger's fused linear cross-entropy
    dtype_bytes: int = 2  # bf16/fp16 activations and unquantized weights
    mean_seq: float = 512.0  # mean packed sequence length (attention FLOP grow with it)
    fused_mlp: bool = False  # the worker's fused SwiGLU MLP: the product is recomputed, not kept
    fsdp: bool = False  # trained under FSDP: a transient layer more, and a larger headroom (FSDP_HEADROOM)


# Model types whose MLP is gate_proj/up_proj/down_proj with SiLU, the shape remote_worker/fast/fused_mlp.py
# fuses (GLM-4's fused gate_up_proj is not among them).
FUSED_MLP_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def fused_mlp_expected(arch: Arch, fused_lora: bool, targets: str | Sequence[str], dropout: float) -> bool:
    """Whether the worker will fuse the MLPs (what `plan` assumes before renting): fused LoRA on, no LoRA
    dropout, LoRA on all three MLP linears, a gate/up/down SiLU MLP. The worker's check decides there."""
    names = set(ALL_LINEAR if targets == "all-linear" else targets)
    mlp = {"gate_proj", "up_proj", "down_proj"} <= names
    return fused_lora and dropout == 0 and mlp and arch.model_type in FUSED_MLP_MODEL_TYPES


@dataclass(frozen=True)
class Shape:
    micro_batch_tokens: int
    checkpointed: int  # decoder layers checkpointed, 0..layers


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes of one training step at its peak, by part."""

    weights: float
    lora: float  # LoRA weights, gradients and AdamW state
    activations: float
    loss_head: float  # and the per-token buffers outside the decoder layers (token_h)
    overhead: float  # allocator reserve and CUDA context, outside torch's allocated count

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated plus the optimizer state would show (the calibration's number)."""
        return self.weights + self.lora + self.activations + self.loss_head

    @property
    def peak(self) -> float:
        return self.allocated + self.overhead

    def as_dict(self) -> dict:
        return {**asdict(self), "allocated": self.allocated, "peak": self.peak}


def weight_bytes(arch: Arch, setup: Setup) -> float:
    per = NF4_BYTES if setup.bits == 4 else setup.dtype_bytes
    return arch.layers * arch.layer_params * per + arch.embed_params * setup.dtype_bytes


def layer_activation_bytes(
    arch: Arch, tokens: int, c: Constants = DEFAULT, dtype_bytes: int = 2, fused_mlp: bool = False
) -> float:
    """Bytes a non-checkpointed decoder layer keeps for its backward."""
    act_i = c.act_i - (c.fused_mlp_i if fused_mlp else 0.0)
    per_token = c.act_h * arch.hidden + c.act_kv * arch.kv_dim + act_i * arch.intermediate
    return tokens * per_token * dtype_bytes


def estimate(arch: Arch, setup: Setup, shape: Shape, c: Constants = DEFAULT) -> Estimate:
    t, k = shape.micro_batch_tokens, max(0, min(shape.checkpointed, arch.layers))
    full = layer_activation_bytes(arch, t, c, setup.dtype_bytes, setup.fused_mlp)
    kept = t * c.ckpt_h * arch.hidden * setup.dtype_bytes
    transient = c.transient_layers + (c.fsdp_transient_layers if setup.fsdp else 0.0)
    acts = (arch.layers - k) * full + k * kept + (transient * full if k else 0.0)
    loss = t * (c.fused_loss_h * arch.hidden if setup.fused_loss else c.unfused_loss_v * arch.vocab)
    loss += t * c.token_h * arch.hidden
    weights = weight_bytes(arch, setup)
    lora = lora_params(arch, setup.r, setup.targets) * LORA_BYTES_PER_PARAM
    allocated = weights + lora + acts + loss
    return Estimate(weights, lora, acts, loss, allocated * c.alloc_frac + c.context_bytes)


def fsdp_spared_bytes(arch: Arch, setup: Setup, gpus: int) -> float:
    """Weight bytes a GPU does not hold when FSDP shards the 4-bit weights over `gpus`: all but its own
    1/gpus, less the one layer it gathers at a time (what `plan` and the worker under FSDP add to a card's
    memory before asking `choose`)."""
    if gpus <= 1:
        return 0.0
    weights = weight_bytes(arch, setup)
    return max(0.0, weights * (1 - 1 / gpus) - weights / max(1, arch.layers))


def usable_limit(card_bytes: float, c: Constants = DEFAULT, headroom: float = HEADROOM) -> float:
    """The allocated bytes a card of `card_bytes` leaves for a step: minus the CUDA context, minus the
    headroom the worker keeps when it chooses (remote_worker.calibrate; FSDP_HEADROOM under FSDP)."""
    usable = card_bytes - c.context_bytes
    return usable - max(MIN_HEADROOM_BYTES, usable * headroom)


def fits(arch: Arch, setup: Setup, shape: Shape, card_bytes: float, c: Constants = DEFAULT) -> bool:
    """What the calibration accepts: allocated bytes (weights, LoRA state, activations, loss head) within
    the usable memory less the headroom."""
    headroom = FSDP_HEADROOM if setup.fsdp else HEADROOM
    return estimate(arch, setup, shape, c).allocated <= usable_limit(card_bytes, c, headroom)


# --- speed ---------------------------------------------------------------------------------------


def attention_flops(arch: Arch, setup: Setup, shape: Shape) -> float:
    """Causal attention FLOP a token over all layers, forward (QK^T and PV over a causal half: 2·s·d a
    layer), backward (twice that) and the recomputed forward of checkpointed layers; s is the mean packed
    sequence length, the attention span of a token under a block-diagonal (varlen) mask."""
    k = max(0, min(shape.checkpointed, arch.layers))
    seq = max(1.0, min(setup.mean_seq, shape.micro_batch_tokens))
    return 2.0 * seq * arch.q_dim * (3 * arch.layers + k)


def flops_per_token(arch: Arch, setup: Setup, shape: Shape, c: Constants = DEFAULT) -> float:
    """FLOP a trained token costs, at the matmuls' rate: 4·N (forward and input gradients; frozen base
    weights get no gradient), the recomputed forwards of checkpointed layers, LoRA's own small matmuls,
    and causal attention weighted by `attn_cost`."""
    k = max(0, min(shape.checkpointed, arch.layers))
    lora = 6.0 * lora_params(arch, setup.r, setup.targets)  # fwd, input and weight gradients
    base = 4.0 * arch.matmul_params + lora
    return base + k * 2.0 * arch.layer_params * c.recompute_cost + c.attn_cost * attention_flops(arch, setup, shape)


def dequant_seconds(arch: Arch, setup: Setup, shape: Shape, bandwidth: float, c: Constants = DEFAULT) -> float:
    """Seconds a micro-batch spends dequantizing nf4 weights (zero at bits = 16)."""
    if setup.bits != 4:
        return 0.0
    k = max(0, min(shape.checkpointed, arch.layers))
    passes = 2 * arch.layers + k  # forward, backward, and the recompute of checkpointed layers
    return passes * arch.layer_params * (NF4_BYTES + 2) / (bandwidth * c.bw_efficiency)


def gpu_seconds(arch: Arch, setup: Setup, shape: Shape, tflops: float, bandwidth: float, c: Constants = DEFAULT) -> float:
    """Seconds of GPU work in a micro-batch's forward and backward: matmuls and attention at the card's rate,
    dequantization at its bandwidth."""
    t = shape.micro_batch_tokens
    seconds = t * flops_per_token(arch, setup, shape, c) / (tflops * 1e12 * c.efficiency)
    return seconds + dequant_seconds(arch, setup, shape, bandwidth, c)


def launch_seconds(arch: Arch, shape: Shape, c: Constants = DEFAULT) -> float:
    """The CPU's floor under a micro-batch: queueing every layer's kernels (and the recomputed ones')."""
    k = max(0, min(shape.checkpointed, arch.layers))
    return arch.layers * c.launch_layer_s + k * c.launch_recompute_s


def tokens_per_s(
    arch: Arch, setup: Setup, shape: Shape, tflops: float, bandwidth: float, c: Constants = DEFAULT
) -> float:
    """Predicted trained tokens a second on a card of `tflops` dense bf16 TFLOP/s and `bandwidth` bytes/s:
    the micro-batch over the longer of its GPU work and the CPU's launch floor (kernels queue
    asynchronously, so the two overlap)."""
    seconds = max(gpu_seconds(arch, setup, shape, tflops, bandwidth, c), launch_seconds(arch, shape, c))
    return shape.micro_batch_tokens / seconds


# --- the shape the worker would choose --------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    shape: Shape
    estimate: Estimate
    tokens_per_s: float
    fits: bool


def sizes_for(max_length: int, micro_batch_tokens: int = 0) -> list[int]:
    if micro_batch_tokens:
        return [micro_batch_tokens]
    return [t for t in SIZES if t >= max_length] or [max_length]


def card_weight_bytes(params: int, bits: int) -> float:
    """The base model's weights on one card as the worker reckons them before loading: nf4 with double
    quantization about 0.53 bytes a parameter (4 bits plus absmax and the 16-bit embeddings/head, measured on
    Qwen2.5-7B: 5.4 GB), 2 bytes at bits = 16; 8% over for what loading adds."""
    return params * (0.53 if bits == 4 else 2.0) * 1.08


def data_parallel(params: int, bits: int, card_bytes: float) -> bool:
    """train.distributed = "auto" on several GPUs: data-parallel (else FSDP), the worker's rule."""
    return card_weight_bytes(params, bits) <= DDP_WEIGHT_SHARE * card_bytes


def rank_accum(single_accum: int, world_size: int) -> int:
    """Micro-batches each of `world_size` processes takes a step for a global batch of `single_accum`
    micro-batches (the worker's rule, remote_worker.recipe.step_accum; `plan` counts a step's micro-batches
    with it): the global batch shared, rounded, at least one each, so a step trains world_size x this."""
    return max(1, round(single_accum / world_size)) if single_accum > 1 else 1


def unmeasured_tokens(max_length: int, micro_batch_tokens: int = 0) -> int:
    """The micro-batch the worker trains on CUDA without measuring (remote_worker.data.batch_shape)."""
    return micro_batch_tokens or max(max_length, UNMEASURED_TOKENS)


def layer_options(arch: Arch, mode: str) -> list[int]:
    """Checkpointed-layer counts `train.gradient_checkpointing` allows: on = all, off = none, auto = any."""
    return {"on": [arch.layers], "off": [0]}.get(mode, list(range(arch.layers + 1)))


def fewest_checkpointed(
    arch: Arch, setup: Setup, tokens: int, card_bytes: float, options: Iterable[int], c: Constants = DEFAULT
) -> int | None:
    """The fewest checkpointed layers among `options` with which `tokens` fit (fewer recompute less)."""
    for k in sorted(options):
        if fits(arch, setup, Shape(tokens, k), card_bytes, c):
            return k
    return None


def candidates(
    arch: Arch, setup: Setup, card_bytes: float, sizes: Sequence[int], mode: str = "auto", c: Constants = DEFAULT
) -> list[Shape]:
    """Shapes predicted to fit, one per size (its fewest checkpointed layers), fastest first by prediction
    with a unit rate (the card's rate scales every shape alike; only dequantization differs)."""
    found = []
    for t in sizes:
        k = fewest_checkpointed(arch, setup, t, card_bytes, layer_options(arch, mode), c)
        if k is not None:
            found.append(Shape(t, k))
    return sorted(found, key=lambda s: -tokens_per_s(arch, setup, s, 1000.0, 4e12, c))


def choose(
    arch: Arch,
    setup: Setup,
    card_bytes: float,
    tflops: float,
    bandwidth: float,
    sizes: Sequence[int],
    mode: str = "auto",
    c: Constants = DEFAULT,
) -> Choice:
    """The shape the worker's calibration is predicted to pick on this card: the fastest predicted to fit.
    When none fits, the least-memory shape allowed, with fits = False."""
    best: Choice | None = None
    for t in sizes:
        k = fewest_checkpointed(arch, setup, t, card_bytes, layer_options(arch, mode), c)
        if k is None:
            continue
        shape = Shape(t, k)
        speed = tokens_per_s(arch, setup, shape, tflops, bandwidth, c)
        if best is None or speed > best.tokens_per_s:
            best = Choice(shape, estimate(arch, setup, shape, c), speed, True)
    if best is not None:
        return best
    shape = Shape(min(sizes), max(layer_options(arch, mode)))
    return Choice(shape, estimate(arch, setup, shape, c), tokens_per_s(arch, setup, shape, tflops, bandwidth, c), False)


def with_constants(values: dict) -> Constants:
    """Constants from a dict (a fit's output); unknown keys are ignored."""
    known = {f for f in Constants.__dataclass_fields__}
    return replace(DEFAULT, **{k: float(v) for k, v in values.items() if k in known})


def gb(n: float) -> float:
    return math.floor(n / GB * 10 + 0.5) / 10


__all__ = [
    "Arch", "Setup", "Shape", "Estimate", "Constants", "Choice", "DEFAULT", "estimate", "fits", "tokens_per_s",
    "choose", "candidates", "lora_params", "usable_limit", "flops_per_token", "attention_flops", "with_constants",
]  # fmt: skip
