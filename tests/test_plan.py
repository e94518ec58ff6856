"""The plan before renting: jobs.memory against the anchors' GPU measurements, the card table, config.json
from a path or a (loopback) hub, `autodl-run plan` and `check --gpu`, offline and without torch."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from jobfiles import cli, write_job

from client.plan import config as configs
from jobs import cards, memory

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
# Parameter counts as their model cards publish them (billions), biases and norms aside.
PUBLISHED_B = {
    "qwen2.5-0.5b": 0.49, "qwen2.5-7b": 7.61, "qwen2.5-14b": 14.7, "qwen2.5-32b": 32.5, "qwen2.5-72b": 72.7,
    "llama-3-8b": 8.03, "llama-3-70b": 70.6, "glm-4-9b": 9.4,
}  # fmt: skip


def arch(name: str) -> memory.Arch:
    return memory.Arch.from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


@pytest.mark.parametrize("name", sorted(PUBLISHED_B))
def test_the_fixtures_are_the_published_architectures(name: str) -> None:
    assert arch(name).params / 1e9 == pytest.approx(PUBLISHED_B[name], rel=0.02)


def test_chatglm_names_read_like_the_hf_ones() -> None:
    glm = {"hidden_size": 4096, "ffn_hidden_size": 13696, "num_layers": 40, "num_attention_heads": 32,
           "multi_query_group_num": 2, "padded_vocab_size": 151552, "kv_channels": 128, "seq_length": 131072}
    from dataclasses import replace

    assert memory.Arch.from_config(glm) == replace(arch("glm-4-9b"), model_type="", tied=False)
    with pytest.raises(ValueError, match="intermediate_size"):
        memory.Arch.from_config({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "vocab_size": 8})


SHORT = memory.Setup(mean_seq=250)


@pytest.mark.parametrize(
    "name, tokens, ckpt, measured_gb",
    [  # shared/anchors.md §6: one H200 capped by torch's allocator; 7B and 14B, nf4, all-linear r=16, fused loss
        ("qwen2.5-7b", 8192, 0, 42.8),
        ("qwen2.5-7b", 16384, 28, 12.1),
        ("qwen2.5-14b", 16384, 48, 20.7),
    ],
)
def test_peak_memory_is_within_ten_percent_of_the_anchors(name, tokens, ckpt, measured_gb) -> None:
    e = memory.estimate(arch(name), SHORT, memory.Shape(tokens, ckpt))
    assert e.allocated / 1e9 == pytest.approx(measured_gb, rel=0.10)


def test_each_checkpointed_layer_saves_memory_and_costs_speed() -> None:
    a = arch("qwen2.5-7b")
    peaks = [memory.estimate(a, SHORT, memory.Shape(16384, k)).allocated for k in range(1, a.layers + 1)]
    speeds = [memory.tokens_per_s(a, SHORT, memory.Shape(16384, k), 989, 4.8e12) for k in range(1, a.layers + 1)]
    assert peaks == sorted(peaks, reverse=True) and speeds == sorted(speeds, reverse=True)


def test_the_worker_uses_the_whole_card_with_partial_checkpointing() -> None:
    """Anchors §6: 7B rows of ~6k tokens on 40 GB trained in 12 GB of 40 with every layer checkpointed, since
    none needs 46 GB. The plan's choice checkpoints only some layers and uses most of the card."""
    a, long_rows = arch("qwen2.5-7b"), memory.Setup(mean_seq=6000)
    c = memory.choose(a, long_rows, 40e9, 989, 4.8e12, memory.sizes_for(8192))
    assert c.fits and 0 < c.shape.checkpointed < a.layers
    assert 30e9 < c.estimate.allocated <= memory.usable_limit(40e9)
    none = memory.estimate(a, long_rows, memory.Shape(8192, 0)).allocated
    assert none > memory.usable_limit(40e9)  # no checkpointing does not fit, as measured
    assert memory.choose(a, long_rows, 40e9, 989, 4.8e12, [8192], "on").shape.checkpointed == a.layers


def test_a_72b_model_in_16_bits_fits_no_card() -> None:
    c = memory.choose(arch("qwen2.5-72b"), memory.Setup(bits=16), 141e9, 989, 4.8e12, [4096])
    assert not c.fits and c.shape.checkpointed == 80


def test_cards_are_found_by_what_nvidia_smi_reports() -> None:
    table = cards.table()
    assert cards.find("NVIDIA GeForce RTX 4090", table, 25.4).name == "RTX 4090"
    assert cards.find("NVIDIA GeForce RTX 4090", table, 51.0).name == "RTX 4090 48GB"
    assert cards.find("NVIDIA A800 80GB PCIe", table, 85.0).name == "A800 80GB"
    assert cards.find("NVIDIA A100-SXM4-40GB", table).name == "A100 40GB"
    assert cards.find("no such card", table) is None
    odd = cards.measured("Tesla X9", 30.0, table)
    assert odd.memory_gb == 30.0 and odd.price_per_hour is None
    assert all(c.source and c.price_source for c in table)


def test_the_users_cards_file_overrides_and_adds(autodl_home: Path) -> None:
    from client.errors import SpecError
    from client.plan import load_cards

    (autodl_home / "cards.toml").write_text(
        '[cards."RTX 4090"]\nprice_per_hour = 1.23\n[cards."Mine"]\nmemory_gb = 32\nbf16_tflops = 100\n'
        "bandwidth_gbs = 1000\nprice_per_hour = 3\n"
    )
    table = load_cards(autodl_home)
    assert cards.find("RTX 4090", table).price_per_hour == 1.23
    assert cards.find("RTX 4090", table).price_source.endswith("cards.toml")
    assert cards.find("Mine", table).memory_gb == 32
    (autodl_home / "cards.toml").write_text('[cards."Other"]\nmemory_gb = 32\n')
    with pytest.raises(SpecError, match="cards.toml"):
        load_cards(autodl_home)


@pytest.fixture
def hub(tmp_path: Path):
    """A loopback HTTP server laid out like the hub: /{repo}/resolve/main/config.json; `hits` counts GETs."""
    root = tmp_path / "hub" / "Org" / "Model-7B" / "resolve" / "main"
    root.mkdir(parents=True)
    (root / "config.json").write_text((CONFIGS / "qwen2.5-7b.json").read_text())
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path / "hub"), **kw)

        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_a_hub_config_is_fetched_once_then_cached(hub, tmp_path: Path) -> None:
    url, hits = hub
    cache = tmp_path / "cache"
    urls = [f"{url}/Org/Missing/resolve/main/config.json", f"{url}/Org/Model-7B/resolve/main/config.json"]
    cfg = configs.fetch("Org/Model-7B", None, urls, cache, timeout=60)  # a hang guard
    assert memory.Arch.from_config(cfg) == arch("qwen2.5-7b")
    assert len(hits) == 2  # the first URL answered 404, the second the config
    assert configs.fetch("Org/Model-7B", None, urls, cache, timeout=60) == cfg
    assert len(hits) == 2  # from the cache
    with pytest.raises(configs.ConfigError, match="cannot fetch"):
        configs.fetch("Org/Other", None, [f"{url}/Org/Other/resolve/main/config.json"], cache, timeout=60)


def test_hub_urls_try_the_endpoint_the_mirror_and_modelscope(monkeypatch) -> None:
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    urls = configs.hub_urls("Qwen/Qwen2.5-7B-Instruct", None, "http://mirror.example")
    assert urls[0] == "http://mirror.example/Qwen/Qwen2.5-7B-Instruct/resolve/main/config.json"
    assert any("hf-mirror.com" in u for u in urls) and "modelscope.cn" in urls[-1]


def plan_job(tmp_path: Path, *, model: str = "Org/Model-7B", bits: int = 4, rows: int = 64) -> Path:
    instance = {"ssh": "ssh -p 38076 root@region-41.autodl.com"}
    return write_job(tmp_path / "job", model=model, instance=instance, rows=rows, bits=bits,
                     data={"max_length": 2048}, train={"device": "auto", "max_steps": 0, "epochs": 2})  # fmt: skip


def test_plan_prints_every_card_and_the_cheapest_that_fits(tmp_path: Path) -> None:
    job = plan_job(tmp_path)
    out = json.loads(cli("plan", str(job), "--config", str(CONFIGS / "qwen2.5-7b.json"), "--json").stdout)
    names = [c["card"] for c in out["cards"]]
    assert {"RTX 3090", "RTX 4090", "L20", "A800 80GB", "H800"} <= set(names)
    assert all(c["fits"] for c in out["cards"])
    priced = [c for c in out["cards"] if c["cny"] is not None]
    assert out["cheapest"] == min(priced, key=lambda c: c["cny"])["card"]
    assert out["tokens"]["total"] > 0 and out["tokens"]["epochs"] == 2
    text = cli("plan", str(job), "--config", str(CONFIGS / "qwen2.5-7b.json"), "--gpu", "RTX 4090").stdout
    assert "RTX 4090" in text and "cheapest that fits: RTX 4090" in text and "L20" not in text


def test_plan_reads_the_config_from_the_hub_endpoint(tmp_path: Path, hub) -> None:
    url, hits = hub
    job = plan_job(tmp_path)
    text = job.read_text().replace('[instance]\n', f'[instance]\nhf_endpoint = "{url}"\n')
    job.write_text(text)
    out = json.loads(cli("plan", str(job), "--gpu", "L20", "--json").stdout)
    assert out["layers"] == 28 and hits[0] == "/Org/Model-7B/resolve/main/config.json"


def test_when_nothing_fits_the_plan_says_what_to_change(tmp_path: Path) -> None:
    job = plan_job(tmp_path, bits=16)
    out = json.loads(cli("plan", str(job), "--config", str(CONFIGS / "qwen2.5-32b.json"), "--gpu", "RTX 4090",
                         "--gpu", "L20", "--json").stdout)  # fmt: skip
    assert out["cheapest"] is None and not any(c["fits"] for c in out["cards"])
    assert any("quant.bits = 4" in a for a in out["advice"])


def test_check_gpu_refuses_a_run_that_cannot_fit(tmp_path: Path) -> None:
    job = plan_job(tmp_path, bits=16)
    res = cli("check", str(job), "--gpu", "RTX 3090", "--config", str(CONFIGS / "qwen2.5-14b.json"), check=False)
    assert res.returncode == 5, res.stderr
    assert "does not fit" in res.stderr and "quant.bits = 4" in res.stderr
    ok = cli("check", str(job), "--gpu", "RTX 3090", "--config", str(CONFIGS / "qwen2.5-0.5b.json"), "--json")
    assert json.loads(ok.stdout)["plan"]["cards"][0]["fits"] is True


def test_plan_never_imports_torch(tmp_path: Path) -> None:
    job = plan_job(tmp_path)
    code = (
        "import sys\nfrom client.cli import app\n"
        f"app([ 'plan', {str(job)!r}, '--config', {str(CONFIGS / 'qwen2.5-14b.json')!r}, '--json'],"
        " standalone_mode=False)\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip().endswith("NO-TORCH")
    assert json.loads(res.stdout)["layers"] == 48


def test_a_deadline_no_card_meets_leaves_no_cheapest() -> None:
    from client.plan import make_plan
    from jobs.spec import JobSpec

    spec = JobSpec.model_validate({"name": "t", "model": {"name_or_path": "Org/M"}, "data": {"train": "x"},
                                   "instance": {"ssh": "ssh -p 1 root@h"}})  # fmt: skip
    report = {"train_records": 1000, "records_out": 1000, "tokens": {"total": 2_000_000}}
    table = [cards.find("RTX 4090", cards.table()), cards.find("H800", cards.table())]
    now = 1_000_000.0
    soon = make_plan(spec, arch("qwen2.5-7b"), "fixture", report, table, deadline_unix=now + 600, now=now)
    assert all(r.fits and r.meets_deadline is False for r in soon.rows) and soon.cheapest is None
    later = make_plan(spec, arch("qwen2.5-7b"), "fixture", report, table, deadline_unix=now + 86400, now=now)
    assert later.cheapest is not None and later.cheapest.card.name == "RTX 4090"
    h800 = next(r for r in later.rows if r.card.name == "H800")
    assert h800.train_s < later.cheapest.train_s  # faster, dearer
    # the run's time is the epochs over the real token count at the predicted speed
    row = later.rows[0]
    assert row.train_s == pytest.approx(2_000_000 * 3 / row.tokens_per_s)


def _spec(**train):
    from jobs.spec import JobSpec

    return JobSpec.model_validate({"name": "t", "model": {"name_or_path": "Org/M"}, "data": {"train": "x"},
                                   "train": train, "instance": {"ssh": "ssh -p 1 root@h"}})  # fmt: skip


REPORT = {"train_records": 1000, "records_out": 1000, "tokens": {"total": 2_000_000}}


def test_several_gpus_train_data_parallel_where_one_fits_and_fsdp_where_it_does_not() -> None:
    """The plan counts train.gpus as the worker trains them (issue 16): a 32B does not fit one 24 GB card
    but fits two with its weights sharded (at 4,096 tokens, the size the worker predicts under FSDP: 8,192
    ran out of memory on two H200s capped to 24 GB); a 7B on two 24 GB cards is data-parallel and finishes
    sooner."""
    from client.plan import make_plan, spec_gpus

    table = [cards.find("RTX 4090", cards.table())]
    big = make_plan(_spec(gpus=2), arch("qwen2.5-32b"), "fixture", REPORT, table, 2)
    alone = make_plan(_spec(), arch("qwen2.5-32b"), "fixture", REPORT, table, 1)
    assert not alone.any_fits and big.any_fits and big.rows[0].parallel == "fsdp"
    assert big.rows[0].shape == memory.Shape(4096, 64)
    assert not make_plan(_spec(gpus=2, micro_batch_tokens=8192), arch("qwen2.5-32b"), "fixture", REPORT, table,
                         2).any_fits  # fmt: skip
    assert big.rows[0].estimate.weights < alone.rows[0].estimate.weights / 1.5  # each GPU holds about half
    assert any("fit where one does not" in n for n in big.notes)
    small = make_plan(_spec(gpus=2), arch("qwen2.5-7b"), "fixture", REPORT, table, 2)
    one = make_plan(_spec(), arch("qwen2.5-7b"), "fixture", REPORT, table, 1)
    row = small.rows[0]
    assert row.parallel == "ddp" and row.estimate.allocated == one.rows[0].estimate.allocated
    assert row.tokens_per_s == pytest.approx(one.rows[0].tokens_per_s * 2 * 0.9)
    assert any("2 GPUs" in n and "sooner" in n and "not sooner" not in n for n in small.notes)
    forced = make_plan(_spec(gpus=2, distributed="fsdp"), arch("qwen2.5-7b"), "fixture", REPORT, table, 2)
    assert forced.rows[0].parallel == "fsdp"
    assert spec_gpus(_spec(gpus=2)) == 2 and spec_gpus(_spec(gpus="all"), 8) == 8 and spec_gpus(_spec()) == 1


def test_the_fused_mlp_frees_one_product_a_layer_and_the_plan_expects_it_where_the_worker_fuses() -> None:
    from client.plan import setup_of
    from jobs.spec import JobSpec

    q7 = arch("qwen2.5-7b")
    plain, fused = memory.Setup(), memory.Setup(fused_mlp=True)
    for k in (0, 10):
        shape = memory.Shape(4096, k)
        saved = memory.estimate(q7, plain, shape).activations - memory.estimate(q7, fused, shape).activations
        assert saved == pytest.approx((28 - k) * 4096 * 18944 * 2)  # the SwiGLU product, bf16, a kept layer

    def spec(**lora) -> JobSpec:
        return JobSpec.model_validate({"name": "t", "model": {"name_or_path": "x"}, "data": {"train": "x"},
                                       "lora": lora})  # fmt: skip

    assert setup_of(spec(), arch=q7).fused_mlp
    assert not setup_of(spec(dropout=0.05), arch=q7).fused_mlp  # PEFT's path: no fused layers
    assert not setup_of(spec(target_modules=["q_proj", "v_proj"]), arch=q7).fused_mlp
    assert not setup_of(spec(), arch=arch("glm-4-9b")).fused_mlp  # fused gate_up_proj: not this MLP
    assert setup_of(spec(), arch=arch("llama-3-8b")).fused_mlp


def test_fsdp_rows_do_not_count_on_the_fused_mlp() -> None:
    """Under FSDP the worker fuses no LoRA layer (recipe.build_model: its kernels read whole weights), so
    no MLP either: an FSDP row must budget the SwiGLU product, as with train.fused_lora = false."""
    from client.plan import make_plan

    table = [cards.find("RTX 4090", cards.table())]
    for big in ("qwen2.5-32b", "qwen2.5-7b"):
        fsdp = make_plan(_spec(gpus=2, distributed="fsdp"), arch(big), "fixture", REPORT, table, 2).rows[0]
        unfused = make_plan(_spec(gpus=2, distributed="fsdp", fused_lora=False), arch(big), "fixture", REPORT,
                            table, 2).rows[0]  # fmt: skip
        assert fsdp.parallel == unfused.parallel == "fsdp"
        assert (fsdp.shape, fsdp.estimate) == (unfused.shape, unfused.estimate), big


def test_an_fsdp_row_plans_the_shape_the_worker_trains() -> None:
    """Under FSDP the worker measures nothing (a shard cannot run a step alone): it trains
    train.micro_batch_tokens when set, else the size jobs.memory predicts (recipe.fsdp_micro_batch), every
    layer checkpointed unless "off". The plan's row must be that shape; a size set too large for the card
    gets the advice of the one that fits."""
    from client.plan import make_plan

    table = [cards.find("RTX 4090", cards.table())]
    q32 = arch("qwen2.5-32b")
    for train, shape in [
        ({}, memory.Shape(4096, 64)),
        ({"micro_batch_tokens": 8192}, memory.Shape(8192, 64)),
        ({"gradient_checkpointing": "off", "micro_batch_tokens": 4096}, memory.Shape(4096, 0)),
    ]:
        row = make_plan(_spec(gpus=2, distributed="fsdp", **train), q32, "fixture", REPORT, table, 2).rows[0]
        assert (row.parallel, row.shape) == ("fsdp", shape), train
    too_big = make_plan(_spec(gpus=2, micro_batch_tokens=16384), q32, "fixture", REPORT, table, 2)
    assert too_big.rows[0].parallel == "fsdp" and not too_big.rows[0].fits
    assert too_big.advice[0].startswith("train.micro_batch_tokens = 4096"), too_big.advice


def test_auto_parallel_follows_the_workers_rule() -> None:
    """train.distributed = "auto" on several GPUs: the worker trains data-parallel when the base weights take at
    most 60% of a card (remote_worker.distributed.choose), whether a shape fits or not. A 14B with rows of 16k
    tokens on two 4090s (8.5 GB of weights) was planned as FSDP that fits, while the worker goes data-parallel
    and its calibration finds no shape that fits one card."""
    from client.plan import make_plan
    from jobs.spec import JobSpec

    table = [cards.find("RTX 4090", cards.table())]
    spec = JobSpec.model_validate({"name": "t", "model": {"name_or_path": "Org/M"},
                                   "data": {"train": "x", "max_length": 16384}, "train": {"gpus": 2},
                                   "instance": {"ssh": "ssh -p 1 root@h"}})  # fmt: skip
    q14 = arch("qwen2.5-14b")
    assert memory.data_parallel(q14.params, 4, table[0].memory_bytes)
    row = make_plan(spec, q14, "fixture", REPORT, table, 2).rows[0]
    one = make_plan(spec.model_copy(update={"train": spec.train.model_copy(update={"gpus": 1})}), q14, "fixture",
                    REPORT, table, 1).rows[0]  # fmt: skip
    assert row.parallel == "ddp" and row.fits == one.fits is False
    assert not memory.data_parallel(arch("qwen2.5-32b").params, 4, table[0].memory_bytes)


def test_a_small_model_is_held_by_the_cpu_launch_floor_and_a_large_one_is_not() -> None:
    """The 0.5B took 0.17 s a forward+backward at 4,096 and at 16,384 tokens alike on the H200 (the CPU
    queueing kernels, not the GPU): its tokens/s grow with the micro-batch; the 7B's do not."""
    tflops, bandwidth = 989.0, 4.8e12  # the H200 the rows were measured on (jobs.cards)
    setup = memory.Setup()

    def speed(a: memory.Arch, t: int, k: int = 0) -> float:
        return memory.tokens_per_s(a, setup, memory.Shape(t, k), tflops, bandwidth)

    small, large = arch("qwen2.5-0.5b"), arch("qwen2.5-7b")
    assert speed(small, 16384) / speed(small, 4096) == pytest.approx(4.0, rel=0.05)  # the same seconds
    assert speed(small, 4096) == pytest.approx(24_832, rel=0.1)  # measured
    assert speed(small, 4096, 24) == pytest.approx(15_243, rel=0.1)  # the recompute queues more
    assert speed(large, 16384) / speed(large, 4096) < 1.25  # GPU-bound: about the same rate
    shape = memory.Shape(4096, 0)
    assert memory.launch_seconds(large, shape) < memory.gpu_seconds(large, setup, shape, tflops, bandwidth)


@pytest.mark.parametrize("card_gb", [24, 48, 80])
def test_under_fsdp_the_worker_takes_the_micro_batch_the_plan_predicts(card_gb, monkeypatch) -> None:
    """FSDP cannot measure a shape on one shard: the worker asks jobs.memory, as `plan --gpus 2` does, with
    the weights sharded; the two must agree, or the plan prices a run the worker does not train."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    from client.plan import make_plan
    from jobs.spec import JobSpec
    from remote_worker import calibrate, recipe
    from remote_worker.fast import FastPaths

    cfg = AutoConfig.for_model(**json.loads((CONFIGS / "qwen2.5-32b.json").read_text()))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    spec = JobSpec.model_validate({"name": "t", "model": {"name_or_path": "x"}, "data": {"train": "x"},
                                   "train": {"gpus": 2, "distributed": "fsdp", "liger": "on"}})  # fmt: skip
    card = cards.Card(f"test {card_gb}", card_gb, 989, 4800, 1.0, "test", "test")
    monkeypatch.setattr(calibrate, "usable_memory", lambda: int(card_gb * 1e9 - memory.DEFAULT.context_bytes))
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it (no process group here: rank 0's view)
    paths = FastPaths(liger="on (fused_linear_cross_entropy)")
    micro, note = recipe.fsdp_micro_batch(model, spec, paths, unmeasured=16384)
    report = {"records_out": 10_000, "tokens": {"train_total": 5_000_000, "train_mean": 500}}
    planned = make_plan(spec, arch("qwen2.5-32b"), "fixture", report, [card], gpus=2).rows[0]
    assert planned.parallel == "fsdp"
    assert micro == planned.shape.micro_batch_tokens, (note, planned.shape)
    assert "not measured under FSDP" in note and "sharded over 2" in note
    fixed = spec.model_copy(update={"train": spec.train.model_copy(update={"micro_batch_tokens": 4096})})
    assert recipe.fsdp_micro_batch(model, fixed, paths, unmeasured=4096)[0] == 4096  # the spec's own, kept
