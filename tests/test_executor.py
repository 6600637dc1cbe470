"""Executors: Ray (a local 2-CPU instance) gives the local executor's weights bit for bit,
reports progress and failures per model, and leaves the registry to the driver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

from cdm.app import api
from cdm.training.executor import LocalExecutor, RayExecutor, make_executor
from cdm.training.forget import forget

from .conftest import digests, make_store

ray = pytest.importorskip("ray")


def _ckpt_bytes(store) -> dict[str, bytes]:
    root = store.root / "checkpoints"
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(root.glob("*/*"))}


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module (the executor then uses the caller's session)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


def test_ray_train_and_forget_match_local(tmp_path, digits, cluster):
    items = digits[:120]
    a = make_store(tmp_path / "a", items, "iid:3", slices=2)
    b = make_store(tmp_path / "b", items, "iid:3", slices=2)
    api.train(a, paragon=True, executor=LocalExecutor(threads=1))
    seen: list[tuple] = []
    res = api.train(b, paragon=True, executor=RayExecutor(threads=1), progress=lambda *x: seen.append(x))
    assert digests(a) == digests(b) and len(digests(b)) == 5  # 3 compartments, paragon, router
    assert _ckpt_bytes(a) == _ckpt_bytes(b)  # slice checkpoints came back from the workers intact
    assert {r.name for r in res} == set(digests(b))
    assert {x[0] for x in seen} == set(digests(b))  # progress came back from every job
    last = {}
    for name, step, total, _ in seen:
        last[name] = (step, total)
    assert all(step == total for step, total in last.values())  # every job reported its end
    installs = [e for e in b.events() if e["kind"] == "train"]
    assert len(installs) == 5 and {e["detail"]["executor"] for e in installs} == {"ray"}
    assert all(b.model(n).info["threads"] == 1 for n in digests(b))

    # forgetting through Ray: resumes from the shipped slice checkpoint, same result as local
    victim = next(r for r in b.items() if r.slice == 1)
    fr = forget(b, items=[victim.hash], executor=RayExecutor(threads=1))
    forget(a, items=[victim.hash], executor=LocalExecutor(threads=1))
    assert digests(a) == digests(b) and _ckpt_bytes(a) == _ckpt_bytes(b)
    assert {x["name"]: x["resumed_from"] for x in fr.retrained}[victim.compartment] == "stage 0"
    ref = make_store(tmp_path / "ref", [d for d in items if d.hash != victim.hash], "iid:3", slices=2)
    api.train(ref, paragon=True, executor=LocalExecutor(threads=1))
    assert digests(ref) == digests(b)


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_failures_are_reported_per_model(tmp_path, digits, kind, request):
    if kind == "ray":
        request.getfixturevalue("cluster")
    s = make_store(tmp_path / "s", digits[:90], "iid:2", slices=2)
    api.train(s, paragon=True, executor=LocalExecutor(threads=1))
    victim = next(r for r in s.items() if r.slice == 1 and r.compartment == "digits-1")
    forget(s, items=[victim.hash], retrain=False)
    (ckpt,) = (s.root / "checkpoints" / "digits-1").glob("stage-0-*")
    ckpt.write_bytes(b"not a checkpoint")  # the one digits-1 resumes from
    before = set(s.models())
    with pytest.raises(api.TrainError) as e:
        api.train(s, paragon=True, executor=make_executor(kind, threads=1))
    assert set(e.value.failed) == {"digits-1"} and "digits-1" in str(e.value)
    assert set(s.models()) == before | {"paragon", "router"}  # the others were installed
    assert api.model_state(s, "digits-1") == "missing"
    assert not [p for p in (s.root / "models").glob("*/.tmp-*")]  # no half-written model folder


def test_cli_ray_starts_and_stops_its_own_instance(tmp_path, digits):
    a = make_store(tmp_path / "a", digits[:60], "iid:2", slices=2)
    b = make_store(tmp_path / "b", digits[:60], "iid:2", slices=2)
    api.train(a, executor=LocalExecutor(threads=1))
    short = tempfile.mkdtemp(prefix="t", dir="/tmp")  # Ray's socket paths must stay short
    env = dict(os.environ, TMPDIR=short)
    r = subprocess.run([sys.executable, "-m", "cdm.app.cli", "train", str(b.root), "--executor", "ray", "--threads", "1",
                        "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert {x["name"] for x in json.loads(r.stdout)} == {"digits-0", "digits-1", "router"}
    b2 = api.Store.open(b.root)
    assert digests(a) == digests(b2)
    assert not os.listdir(short)  # its temporary directory is gone
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert short not in ps  # no Ray process of that instance is left running
    os.rmdir(short)


def test_executor_options_are_checked():
    with pytest.raises(ValueError, match="--executor ray"):
        make_executor("local", address="auto")
    with pytest.raises(ValueError, match="gpus-per-job"):
        make_executor("ray", device="cuda")
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("slurm")


def test_a_jobs_thread_count_is_its_own_and_the_callers_comes_back():
    """`--threads N` trains each job on N threads (same threads => bit-identical weights) and
    leaves the calling process's count as it was, also when the job fails."""
    from cdm.training.executor import _threads

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with _threads(other) as n:
        assert n == other == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), _threads(other):
        raise RuntimeError("a failing job")
    assert torch.get_num_threads() == before
    with _threads(None) as n:  # no --threads: the process's own count
        assert n == before


def test_ray_ships_the_base_of_adapter_compartments(tmp_path, digits, cluster):
    pytest.importorskip("peft")

    def build(path):
        s = make_store(path, digits[:40], "one", source="public")
        api.ingest(s, "private", digits[40:100], "iid:2")
        api.set_adapters(s, public=["public"])
        return s

    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    api.train(a, executor=LocalExecutor(threads=1))
    res = api.train(b, executor=RayExecutor(threads=1))
    assert [r.name for r in res][0] == "base"  # the base first, then the adapters on it
    assert digests(a) == digests(b) and b.model("private-0").info["adapter"]["base"] == b.model("base").digest


def test_ray_ships_the_text_encoder_and_vae_of_a_stable_diffusion_store(tmp_path, cluster):
    pytest.importorskip("peft")
    from .test_sd import SD_TRAIN, squares, tiny_sd_folder

    sd = tiny_sd_folder(tmp_path / "sd")

    def build(path):
        s = api.init_store(path, 16, 3, 0, 2, 16, SD_TRAIN)
        api.ingest(s, "ann", squares(0, 10), "one")
        api.ingest(s, "bob", squares(1, 10), "one")
        api.set_adapters(s, base_from=sd)
        return s

    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    api.train(a, executor=LocalExecutor(threads=1), router=False)
    api.train(b, executor=RayExecutor(threads=1), router=False)
    assert digests(a) == digests(b) and set(digests(b)) == {"ann", "bob", "base"}


def test_ray_trains_an_encoder_on_public_sources_and_ships_its_folder(tmp_path, digits, cluster):
    from .test_encoder import RECIPE
    from .test_text import captioned

    def build(path):
        s = make_store(path, captioned(digits[:30], "a digit"), "one", source="ann")
        api.ingest(s, "pub", captioned(digits[30:60], "a public digit"), "one")
        api.set_text(s, train_on=["pub"], recipe=RECIPE)
        return s

    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    api.train(a, executor=LocalExecutor(threads=1), router=False)
    res = api.train(b, executor=RayExecutor(threads=1), router=False)
    assert [r.name for r in res][0] == "encoder"  # its folder (text_encoder/, tokenizer/) came back whole
    assert digests(a) == digests(b) and set(digests(b)) == {"encoder", "ann", "pub"}
    assert a.model("encoder").info["text_digest"] == b.model("encoder").info["text_digest"]
