"""`autodl-run plan`: which card, how much memory, how long and how many CNY, before anything is rented.

Offline and fast: no torch. Inputs are the job spec, the model's config.json (client.plan.config), the
prepared dataset's real token counts (client.dataset.prepare, cached) and the card table (jobs.cards, with
the user's `$AUTODL_RUN_HOME/cards.toml`). The memory and speed model is jobs.memory, the one the worker's
calibration uses to order its candidate shapes; on the card the calibration's measurement decides.

    config  the model's config.json: a local path, the cache, or a small GET from the hub/mirror/ModelScope
    core    (this module) the plan of each card, the cheapest that fits, and what to change when none does
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import tomllib

from client.errors import AutodlRunError, RemoteEnvError, SpecError
from jobs import cards as cardtable
from jobs import memory
from jobs.spec import JobSpec

# Time a run pays for besides training (seconds; assumptions, documented in docs/plan.md).
SETUP_S = 300.0  # a fresh image: pip-installing the worker's packages (nothing when already set up)
DOWNLOAD_BPS = 50e6  # shared/anchors.md §7: ModelScope, about 5 minutes for 15 GB on AutoDL
LOAD_BPS = 1e9  # reading and quantizing the 16-bit checkpoint
CALIBRATE_S = 90.0  # remote_worker.calibrate's budget
SAVE_S = 30.0
DEFAULT_PACKING = 0.95  # packed-row efficiency when the dataset report has none
CONFIGS = "configs"  # the fetched config.json cache under $AUTODL_RUN_HOME
CARDS_FILE = "cards.toml"


class DoesNotFit(RemoteEnvError):
    """The plan says the job cannot fit the card(s) asked about (exit 5: the instance lacks memory)."""


@dataclass(frozen=True)
class RunTokens:
    total: int  # tokens of the training set (prompt and answer: every one goes through the model)
    records: int
    source: str  # "tokenizer" or "estimated from bytes (no tokenizer on the laptop)"
    packing: float  # real tokens / micro-batch capacity
    epochs: float
    max_steps: int

    @property
    def mean_seq(self) -> float:
        return self.total / self.records if self.records else 512.0


DDP_SCALING = 0.9  # per GPU: 2 H200s ran 7B data-parallel at 1.815x one (docs/benchmarks.md, issue 16)


@dataclass
class CardPlan:
    card: cardtable.Card
    gpus: int
    shape: memory.Shape
    estimate: memory.Estimate
    fits: bool
    tokens_per_s: float  # real (non-pad) tokens a second, all GPUs
    train_s: float
    total_s: float  # set-up, download, load, calibration, training, saving, the guard's idle grace
    cny: float | None
    meets_deadline: bool | None = None
    parallel: str = ""  # with gpus > 1: "ddp" (each GPU holds the model) or "fsdp" (the weights sharded)

    def as_dict(self) -> dict:
        return {
            "card": self.card.name, "gpus": self.gpus, "memory_gb": self.card.memory_gb,
            "micro_batch_tokens": self.shape.micro_batch_tokens, "checkpointed_layers": self.shape.checkpointed,
            "peak_gb": round(self.estimate.peak / 1e9, 2), "allocated_gb": round(self.estimate.allocated / 1e9, 2),
            "breakdown_gb": {k: round(v / 1e9, 3) for k, v in self.estimate.as_dict().items()},
            "fits": self.fits, "tokens_per_s": round(self.tokens_per_s), "train_s": round(self.train_s),
            "total_s": round(self.total_s), "cny": None if self.cny is None else round(self.cny, 2),
            "price_per_hour": self.card.price_per_hour, "price_source": self.card.price_source,
            "meets_deadline": self.meets_deadline, "parallel": self.parallel,
        }  # fmt: skip


@dataclass
class Plan:
    model: str
    config_from: str
    arch: memory.Arch
    setup: memory.Setup
    tokens: RunTokens
    rows: list[CardPlan]
    overhead_s: dict[str, float]
    deadline_unix: float | None = None
    advice: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def cheapest(self) -> CardPlan | None:
        ok = [r for r in self.rows if r.fits and r.meets_deadline is not False and r.cny is not None]
        return min(ok, key=lambda r: r.cny or 0.0) if ok else None

    @property
    def any_fits(self) -> bool:
        return any(r.fits for r in self.rows)

    def as_dict(self) -> dict:
        best = self.cheapest
        return {
            "model": self.model, "config_from": self.config_from,
            "params": self.arch.params, "layers": self.arch.layers,
            "bits": self.setup.bits, "r": self.setup.r, "fused_loss": self.setup.fused_loss,
            "tokens": {"total": self.tokens.total, "source": self.tokens.source, "packing": self.tokens.packing,
                       "epochs": self.tokens.epochs, "max_steps": self.tokens.max_steps},
            "overhead_s": {k: round(v) for k, v in self.overhead_s.items()},
            "deadline_unix": self.deadline_unix,
            "cards": [r.as_dict() for r in self.rows],
            "cheapest": best.card.name if best else None,
            "advice": self.advice, "notes": self.notes,
            "constants": memory.DEFAULT.as_dict(),
        }  # fmt: skip


def setup_of(spec: JobSpec, mean_seq: float = 512.0, arch: memory.Arch | None = None) -> memory.Setup:
    targets = spec.lora.target_modules
    fused_mlp = arch is not None and memory.fused_mlp_expected(arch, spec.train.fused_lora, targets, spec.lora.dropout)
    return memory.Setup(
        bits=spec.quant.bits, r=spec.lora.r,
        targets=targets if isinstance(targets, str) else tuple(targets),
        fused_loss=spec.train.liger != "off", mean_seq=mean_seq, fused_mlp=fused_mlp,
    )  # fmt: skip


def sizes_of(spec: JobSpec) -> list[int]:
    return memory.sizes_for(spec.data.max_length, spec.train.micro_batch_tokens)


def plan_card(arch: memory.Arch, setup: memory.Setup, spec: JobSpec, card: cardtable.Card, gpus: int,
              tokens: RunTokens, overhead_s: float, deadline_unix: float | None, now: float) -> CardPlan:
    """One card: the shape the calibration is predicted to choose there, its memory, speed, time and price.

    Several GPUs (train.gpus, or `plan --gpus`), as remote_worker.distributed trains them: data-parallel
    when the weights take at most DDP_WEIGHT_SHARE of one (memory per GPU unchanged), else FSDP, the weights sharded
    (each GPU holds 1/gpus of them plus one gathered layer; train.distributed forces either). Both are priced
    at DDP_SCALING per GPU: 7B data-parallel on 2 H200s measured 1.815x one (docs/benchmarks.md); FSDP's
    scaling was not measured against one GPU."""
    c = memory.DEFAULT
    sizes, mode = sizes_of(spec), spec.train.gradient_checkpointing
    tflops, bandwidth = card.bf16_tflops or 1.0, card.bandwidth or 1e12
    choice = memory.choose(arch, setup, card.memory_bytes, tflops, bandwidth, sizes, mode, c)
    parallel = ""
    if gpus > 1:
        forced = spec.train.distributed
        auto_ddp = forced == "auto" and memory.data_parallel(arch.params, setup.bits, card.memory_bytes)
        parallel = "ddp" if forced == "ddp" or auto_ddp else "fsdp"
        if parallel == "fsdp":  # the same estimate on a card that holds the other shards' weights for free
            spared = memory.fsdp_spared_bytes(arch, setup, gpus)
            fsdp_mode = "on" if mode == "auto" else mode  # the worker checkpoints every layer under FSDP
            sharded = replace(setup, fsdp=True, fused_mlp=False)  # no fused LoRA under FSDP
            choice = memory.choose(arch, sharded, card.memory_bytes + spared, tflops, bandwidth, sizes, fsdp_mode, c)
            choice = replace(choice, estimate=replace(choice.estimate, weights=choice.estimate.weights - spared))
    scale = gpus * (DDP_SCALING if gpus > 1 else 1.0)
    real_tps = choice.tokens_per_s * tokens.packing * scale if card.bf16_tflops else 0.0
    if tokens.max_steps:
        global_tokens = spec.train.global_batch_tokens or round(spec.train.global_batch_sequences * tokens.mean_seq)
        single = max(1, round(global_tokens / choice.shape.micro_batch_tokens)) if global_tokens else 1
        ga = gpus * memory.rank_accum(single, gpus)  # a step's micro-batches over all GPUs, as the worker trains them
        run_tokens = tokens.max_steps * ga * choice.shape.micro_batch_tokens * tokens.packing
    else:
        run_tokens = tokens.total * tokens.epochs
    train_s = run_tokens / real_tps if real_tps else math.inf
    total_s = train_s + overhead_s
    cny = None if card.price_per_hour is None or not math.isfinite(total_s) else card.price_per_hour * gpus * total_s / 3600
    meets = None if deadline_unix is None else now + total_s <= deadline_unix
    return CardPlan(card, gpus, choice.shape, choice.estimate, choice.fits, real_tps, train_s, total_s, cny, meets,
                    parallel)


def overheads(spec: JobSpec, arch: memory.Arch) -> dict[str, float]:
    ckpt_bytes = arch.params * 2  # the hub's 16-bit checkpoint
    policy = spec.instance.shutdown_policy
    return {
        "setup": SETUP_S,
        "download": ckpt_bytes / DOWNLOAD_BPS if not spec.instance.is_local else 0.0,
        "load": ckpt_bytes / LOAD_BPS,
        "calibrate": CALIBRATE_S,
        "save": SAVE_S,
        "idle_grace": spec.instance.idle_grace_minutes * 60 if policy == "fetched" else 0.0,
    }


def advise(arch: memory.Arch, setup: memory.Setup, spec: JobSpec, cards: list[cardtable.Card]) -> list[str]:
    """When no card fits: single changes that make the largest card of the list fit, each said as a setting."""
    if not cards:
        return []
    big = max(cards, key=lambda k: k.memory_gb)

    def fits(s: memory.Setup, sizes: list[int], mode: str) -> bool:
        return memory.choose(arch, s, big.memory_bytes, 1.0, 1e12, sizes, mode).fits

    out = []
    mode = spec.train.gradient_checkpointing
    if mode != "auto" and fits(setup, sizes_of(spec), "auto"):
        out.append('train.gradient_checkpointing = "auto" (checkpoint as many layers as memory needs)')
    if spec.train.micro_batch_tokens and fits(setup, memory.sizes_for(spec.data.max_length), mode):
        out.append("train.micro_batch_tokens = 0 (let the worker choose)")
    ml = spec.data.max_length
    for smaller in (ml // 2, ml // 4):
        if smaller >= 512 and fits(setup, memory.sizes_for(smaller, spec.train.micro_batch_tokens), mode):
            out.append(f"data.max_length = {smaller}")
            break
    if not setup.fused_loss and fits(replace(setup, fused_loss=True), sizes_of(spec), mode):
        out.append('train.liger = "auto" with liger-kernel installed (fused loss head)')
    if setup.bits == 16 and fits(replace(setup, bits=4), sizes_of(spec), mode):
        out.append("quant.bits = 4 (QLoRA)")
    if setup.r > 8 and fits(replace(setup, r=8), sizes_of(spec), mode):
        out.append("lora.r = 8")
    bigger = [k for k in cardtable.CARDS if k.memory_gb > big.memory_gb
              and memory.choose(arch, setup, k.memory_bytes, 1.0, 1e12, sizes_of(spec), mode).fits]  # fmt: skip
    if bigger:
        out.append(f"a card with more memory: {', '.join(k.name for k in bigger)}")
    else:
        out.append("more GPUs a card: train.gpus = N shards the 4-bit weights over them (FSDP; `plan --gpus N`)")
    return out


def fsdp_advice(arch: memory.Arch, setup: memory.Setup, spec: JobSpec, cards: list[cardtable.Card], gpus: int,
                tokens: RunTokens, now: float) -> list[str]:
    """Under FSDP the worker trains the micro-batch it is given, unmeasured: the largest smaller one that
    makes the largest card's row fit, as a setting."""
    if gpus < 2 or not cards:
        return []
    big = max(cards, key=lambda k: k.memory_gb)
    current = memory.unmeasured_tokens(spec.data.max_length, spec.train.micro_batch_tokens)
    for t in memory.SIZES:
        if spec.data.max_length <= t < current:
            trial = spec.model_copy(update={"train": spec.train.model_copy(update={"micro_batch_tokens": t})})
            row = plan_card(arch, setup, trial, big, gpus, tokens, 0.0, None, now)
            if row.fits and row.parallel == "fsdp":
                return [f"train.micro_batch_tokens = {t} (FSDP trains the micro-batch it is given, unmeasured)"]
    return []


def load_cards(home: Path | None) -> list[cardtable.Card]:
    """The card table with `$AUTODL_RUN_HOME/cards.toml` applied (when present)."""
    f = home / CARDS_FILE if home else None
    if f is None or not f.is_file():
        return cardtable.table()
    try:
        parsed = cardtable.CardsFile.model_validate(tomllib.loads(f.read_text(encoding="utf-8")))
        return cardtable.table(parsed)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise SpecError(f"{f} is not a valid cards file", [], hint=str(exc).splitlines()[0]) from exc


def pick_cards(names: list[str], table: list[cardtable.Card]) -> list[cardtable.Card]:
    if not names:
        return [c for c in table if c.price_per_hour is not None or c.name != "H200"]
    out = []
    for n in names:
        c = cardtable.find(n, table)
        if c is None:
            raise AutodlRunError(
                f"--gpu {n}: no such card in the table",
                hint=f"one of: {', '.join(k.name for k in table)}; or add it to $AUTODL_RUN_HOME/{CARDS_FILE}",
            )
        out.append(c)
    return out


def run_tokens(report: dict, spec: JobSpec) -> RunTokens:
    tok = report.get("tokens") or {}
    records = int(report.get("train_records") or report.get("records_out") or 0)
    if tok.get("total"):
        total, source = int(tok["total"]), "tokenizer"
        packing = float(tok.get("packing_efficiency_gpu") or DEFAULT_PACKING)
    else:
        est = (report.get("chars") or {}).get("est_tokens_total") or 0
        frac = records / max(1, int(report.get("records_out") or records or 1))
        total, source, packing = int(est * frac), "estimated from bytes (no tokenizer on this laptop)", DEFAULT_PACKING
    return RunTokens(total, records, source, packing, spec.train.epochs, spec.train.max_steps)


def make_plan(spec: JobSpec, arch: memory.Arch, config_from: str, report: dict, cards: list[cardtable.Card],
              gpus: int = 1, deadline_unix: float | None = None, now: float | None = None) -> Plan:
    now = time.time() if now is None else now
    tokens = run_tokens(report, spec)
    setup = setup_of(spec, tokens.mean_seq, arch)
    over = overheads(spec, arch)
    rows = [plan_card(arch, setup, spec, c, gpus, tokens, sum(over.values()), deadline_unix, now) for c in cards]
    plan = Plan(spec.model.name_or_path, config_from, arch, setup, tokens, rows, over, deadline_unix)
    if not plan.any_fits:
        plan.advice = fsdp_advice(arch, setup, spec, cards, gpus, tokens, now) + advise(arch, setup, spec, cards)
    if setup.fused_loss:
        plan.notes.append("assumes the fused loss head (liger-kernel on the instance); without it the "
                          f"loss head needs about {memory.DEFAULT.unfused_loss_v * arch.vocab / 1e6:.1f} MB a token")
    if gpus > 1:
        plan.notes.append(f"{gpus} GPUs a card: data-parallel where the 4-bit weights take at most "
                          f"{memory.DDP_WEIGHT_SHARE:.0%} of one, else FSDP (weights "
                          f"sharded), each at {DDP_SCALING:.0%} of a GPU (measured 91% for 2 H200s, data-parallel)")
        alone = {r.card.name: plan_card(arch, setup, spec, r.card, 1, tokens, sum(over.values()), deadline_unix, now)
                 for r in rows}  # fmt: skip
        plan.notes += [versus_one(r, alone[r.card.name]) for r in rows if r.fits]
    if any(r.card.price_per_hour is None for r in rows):
        plan.notes.append(f"cards without a price: set price_per_hour in $AUTODL_RUN_HOME/{CARDS_FILE}")
    return plan


def versus_one(several: CardPlan, one: CardPlan) -> str:
    """Whether `several` GPUs of a card finish sooner or cheaper than `one` of it, in words."""
    name = several.card.name
    if not one.fits:
        return f"{name}: {several.gpus} GPUs ({several.parallel}) fit where one does not"
    sooner = several.total_s < one.total_s
    cheaper = None if several.cny is None or one.cny is None else several.cny < one.cny
    money = "" if cheaper is None else (", cheaper" if cheaper else ", not cheaper")
    return (f"{name}: {several.gpus} GPUs {_hms(several.total_s)} against one's {_hms(one.total_s)}: "
            f"{'sooner' if sooner else 'not sooner'}{money}")


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "never"
    h, m = divmod(round(seconds / 60), 60)
    return f"{h}h{m:02d}m" if h else f"{m}m"


def refusal(plan: Plan, where: str) -> DoesNotFit:
    """The error `check --gpu` and `submit` raise for a plan where nothing fits."""
    row = min(plan.rows, key=lambda r: r.estimate.allocated)
    need = row.estimate.allocated / 1e9
    usable = memory.usable_limit(row.card.memory_bytes) / 1e9
    return DoesNotFit(
        f"{plan.model} does not fit {where} ({row.card.name}, {row.card.memory_gb:g} GB): the smallest shape "
        f"({row.shape.micro_batch_tokens:,} tokens, {row.shape.checkpointed} of {plan.arch.layers} layers "
        f"checkpointed) needs about {need:.1f} GB, {usable:.1f} GB usable",
        hint="change " + "; or ".join(plan.advice) if plan.advice else "rent a card with more memory",
    )


def plan_job(job_file: Path, gpu_names: list[str] | None = None, gpus: int | None = None, deadline_unix: float | None = None,
             config: str | None = None, timeout: float | None = None) -> Plan:
    """The plan of JOB.toml: its spec, the prepared dataset's token counts (prepared now, or the cached
    copy), the model's config.json (`config`, or `model.name_or_path`), each card of `gpu_names` (default:
    the whole table)."""
    from client import dataset
    from client.home import home, prepared_dir
    from client.specfile import load_spec

    job_file = Path(job_file).resolve()
    spec = load_spec(job_file)
    chosen = pick_cards(gpu_names or [], load_cards(home()))
    arch, where = _arch_of(spec, job_file, config, timeout)
    prepared = dataset.prepare(spec, job_file, prepared_dir())
    return make_plan(spec, arch, where, prepared.report, chosen, gpus or spec_gpus(spec), deadline_unix)


def spec_gpus(spec: JobSpec, found: int | None = None) -> int:
    """GPUs a node of the job trains on: train.gpus, or for "all" the `found` count (1 when unknown)."""
    return spec.train.gpus if isinstance(spec.train.gpus, int) else max(1, found or 1)


def _arch_of(spec: JobSpec, job_file: Path, config: str | None, timeout: float | None = None) -> tuple[memory.Arch, str]:
    from client.home import home
    from client.plan import config as configs

    kwargs = {"timeout": timeout} if timeout else {}
    cfg, where = configs.load(config or spec.model.name_or_path, revision=spec.model.revision,
                              hf_endpoint=spec.instance.hf_endpoint, cache=home() / CONFIGS,
                              base=job_file.parent if config else None, **kwargs)  # fmt: skip
    return configs.arch(cfg, where), where


def check_fits(spec: JobSpec, job_file: Path, report: dict, gpu_names: list[str], config: str | None = None) -> Plan:
    """`check --gpu NAME`: the plan for those cards from `check`'s report (tokens estimated from bytes);
    DoesNotFit when none of them fits."""
    from client.home import home

    chosen = pick_cards(gpu_names, load_cards(home()))
    arch, where = _arch_of(spec, job_file, config)
    result = make_plan(spec, arch, where, report, chosen)
    if not result.any_fits:
        raise refusal(result, "--gpu " + ", ".join(gpu_names))
    return result
