"""The GPUs a plan considers: memory, dense bf16 rate, memory bandwidth and a default price, each cited.

AutoDL publishes no price list. The default CNY/hour figures are third-party observations gathered in
shared/anchors.md (§4, §7; unverified, 2026), the middle of the range given; a card without such a figure
has no default price and is priced only from the user's file. Hardware figures are NVIDIA's datasheets
and architecture whitepapers (dense, without sparsity; BF16 tensor with FP32 accumulate).

The user's file `$AUTODL_RUN_HOME/cards.toml` (read by client.plan) overrides or adds cards:

    [cards."RTX 4090"]
    price_per_hour = 1.88            # what the console shows you today

    [cards."My card"]                # a card of its own: every figure is needed
    memory_gb = 32
    bf16_tflops = 100
    bandwidth_gbs = 1000
    price_per_hour = 3.0
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field

ANCHORS = "shared/anchors.md §7 (third-party AutoDL prices, unverified, 2026)"
GA102 = "NVIDIA Ampere GA102 whitepaper (RTX 3090: 71 TFLOPS BF16 tensor dense, 936 GB/s)"
AD102 = "NVIDIA Ada Lovelace whitepaper (RTX 4090: 165.2 TFLOPS BF16 tensor dense, 1,008 GB/s)"
A100 = "NVIDIA A100 datasheet (312 TFLOPS BF16 dense; 40 GB 1,555 GB/s, 80 GB PCIe 1,935 GB/s)"
H100 = "NVIDIA H100/H800 SXM datasheet (989 TFLOPS BF16 dense, 3.35 TB/s)"
H200 = "NVIDIA H200 datasheet (989 TFLOPS BF16 dense, 4.8 TB/s)"
L20 = "NVIDIA L20 product brief as resold in China (119.5 TFLOPS FP16/BF16 dense, 864 GB/s)"
H20 = "NVIDIA H20 figures as reported by resellers (148 TFLOPS BF16 dense, 4.0 TB/s)"
NO_PRICE = "no third-party figure found: set price_per_hour in $AUTODL_RUN_HOME/cards.toml"
USER = "$AUTODL_RUN_HOME/cards.toml"


@dataclass(frozen=True)
class Card:
    name: str
    memory_gb: float
    bf16_tflops: float  # dense
    bandwidth_gbs: float  # GB/s
    price_per_hour: float | None  # CNY
    source: str  # of the hardware figures
    price_source: str
    aliases: tuple[str, ...] = ()  # what nvidia-smi / torch call it, lower case, without "nvidia"
    family: str = ""  # cards of one family differ by memory only (a 24 or 48 GB 4090)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9

    @property
    def bandwidth(self) -> float:
        return self.bandwidth_gbs * 1e9


CARDS: tuple[Card, ...] = (
    Card("RTX 3090", 24, 71, 936, 1.5, GA102, f"{ANCHORS}: 1.3-1.7", ("geforce rtx 3090", "rtx 3090", "3090"), family="3090"),
    Card("RTX 4090", 24, 165.2, 1008, 2.0, AD102, f"{ANCHORS}: 2.0-2.2; §4: 1.9-2.0",
         ("geforce rtx 4090", "rtx 4090", "4090"), family="4090"),
    Card("RTX 4090 48GB", 48, 165.2, 1008, None, f"{AD102}; 48 GB: modified boards rented in China", NO_PRICE,
         ("geforce rtx 4090 48gb", "rtx 4090 48gb", "4090 48gb"), family="4090"),
    Card("L20", 48, 119.5, 864, 2.9, L20, f"{ANCHORS}: 2.9", ("l20",)),
    Card("A100 40GB", 40, 312, 1555, None, A100, NO_PRICE, ("a100-pcie-40gb", "a100-sxm4-40gb", "a100 40gb"), family="a100"),
    Card("A100 80GB", 80, 312, 1935, None, A100, NO_PRICE,
         ("a100-pcie-80gb", "a100-sxm4-80gb", "a100 80gb", "a100 80gb pcie"), family="a100"),
    Card("A800 40GB", 40, 312, 1555, None, f"{A100}; A800: A100 compute, slower NVLink", NO_PRICE,
         ("a800-pcie-40gb", "a800 40gb"), family="a800"),
    Card("A800 80GB", 80, 312, 1935, 5.0, f"{A100}; A800: A100 compute, slower NVLink", f"{ANCHORS}: 5.0",
         ("a800-sxm4-80gb", "a800 80gb pcie", "a800-pcie-80gb", "a800 80gb", "a800"), family="a800"),
    Card("H20", 96, 148, 4000, None, H20, NO_PRICE, ("h20",)),
    Card("H800", 80, 989, 3350, 10.5, H100, f"{ANCHORS}: 10.5", ("h800", "h800 pcie")),
    Card("H200", 141, 989, 4800, None, H200, "not rented on AutoDL as far as known; the benches' card", ("h200",)),
)


class CardOverride(BaseModel):
    """One card in the user's cards.toml: any figure; a new card needs memory, rate and bandwidth."""

    model_config = ConfigDict(extra="forbid")
    memory_gb: float | None = Field(None, gt=0)
    bf16_tflops: float | None = Field(None, gt=0)
    bandwidth_gbs: float | None = Field(None, gt=0)
    price_per_hour: float | None = Field(None, ge=0)


class CardsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cards: dict[str, CardOverride] = Field(default_factory=dict)


def _key(name: str) -> str:
    s = re.sub(r"^nvidia\s+", "", name.strip().lower())
    return re.sub(r"\s+", " ", s)


def table(overrides: CardsFile | None = None) -> list[Card]:
    """The built-in cards with the user's figures applied, and the user's own cards after them.

    Raises ValueError for a new card that lacks a figure."""
    cards = list(CARDS)
    for name, o in (overrides.cards if overrides else {}).items():
        set_ = {k: v for k, v in o.model_dump().items() if v is not None}
        i = next((j for j, c in enumerate(cards) if _key(c.name) == _key(name)), None)
        if i is not None:
            card = replace(cards[i], **set_)
            if "price_per_hour" in set_:
                card = replace(card, price_source=USER)
            if set_.keys() - {"price_per_hour"}:
                card = replace(card, source=USER)
            cards[i] = card
            continue
        missing = [f for f in ("memory_gb", "bf16_tflops", "bandwidth_gbs") if f not in set_]
        if missing:
            raise ValueError(f'cards."{name}": a card of your own needs {", ".join(missing)}')
        cards.append(Card(name, set_["memory_gb"], set_["bf16_tflops"], set_["bandwidth_gbs"],
                          set_.get("price_per_hour"), USER, USER if "price_per_hour" in set_ else NO_PRICE))  # fmt: skip
    return cards


def find(name: str, cards: list[Card], memory_gb: float | None = None) -> Card | None:
    """The card called `name` (our name, an alias, or what nvidia-smi reports, e.g. "NVIDIA GeForce RTX
    4090"); with `memory_gb`, the variant of that much memory (24 or 48 GB 4090s, 40 or 80 GB A100s)."""
    key = _key(name)
    hits = [c for c in cards if key == _key(c.name) or key in c.aliases]
    if not hits:
        hits = [c for c in cards if any(a in key for a in c.aliases) or _key(c.name) in key]
    if memory_gb is not None and hits:
        families = {c.family for c in hits if c.family}
        hits += [c for c in cards if c.family in families and c not in hits]
        return min(hits, key=lambda c: abs(c.memory_gb - memory_gb))
    if not hits:
        return None
    return min(hits, key=lambda c: c.memory_gb)


def measured(name: str, memory_gb: float, cards: list[Card]) -> Card:
    """The card an instance reports: its table entry with the memory it really has, or, for a card not
    in the table, an entry with that memory and no rate (the plan then checks memory only)."""
    card = find(name, cards, memory_gb)
    if card is None:
        return Card(name, memory_gb, 0.0, 0.0, None, "reported by the instance", NO_PRICE)
    return replace(card, memory_gb=memory_gb)
