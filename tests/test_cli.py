"""The `cdm` command end to end, in-process, on tiny settings."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cdm.app.cli import app

runner = CliRunner()


def cdm(*args, code=0):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


def test_cli_story(tmp_path):
    st = tmp_path / "s"
    cdm("init", st, "--preset", "tiny", "--slices", "2", "--json")
    r = json.loads(cdm("ingest", st, "--source", "digits", "--builtin", "digits", "--split", "by-class:2",
                       "--json").stdout)
    assert r["added"] == 1497 and r["duplicates"] == 0 and sum(r["compartments"].values()) == 1497
    r = json.loads(cdm("ingest", st, "--source", "digits", "--builtin", "digits", "--split", "by-class:2",
                       "--json").stdout)
    assert (r["added"], r["duplicates"]) == (0, 1497)
    trained = cdm("train", st, "--steps", "6", "--json")
    assert "train digits-0: 100% (6/6 steps)" in trained.stderr  # not a terminal: plain progress lines
    rows = json.loads(trained.stdout)
    assert [x["name"] for x in rows] == ["digits-0", "digits-1", "router"]
    assert all(len(x["digest"]) == 64 for x in rows)
    assert [x["steps"] for x in rows[:2]] == [6, 6]  # --steps is the denoisers' recipe; the router keeps its own
    out = tmp_path / "out"
    r = json.loads(cdm("sample", st, "-n", "3", "--steps", "4", "--subset", "1", "--out", out, "--json").stdout)
    assert all(sorted(x["final"].values()) == [0.0, 1.0] for x in r["samples"])  # one compartment each
    r = json.loads(cdm("sample", st, "-n", "3", "--label", "7", "--steps", "4", "--out", out, "--json").stdout)
    assert len(r["samples"]) == 3 and (out / "grid.png").exists()
    s0 = r["samples"][0]
    assert Image.open(s0["file"]).size == (8, 8)
    assert abs(sum(s0["attribution"].values()) - 1) < 1e-6 and s0["final"]["digits-1"] == 1.0
    st_json = json.loads(cdm("status", st, "--json").stdout)
    assert st_json["router"]["state"] == "ready" and st_json["compartments"]["digits-0"]["model"] == "ready"
    assert "digits-0" in cdm("status", st).stdout
    victim = json.loads(cdm("audit", st, "--json").stdout)[1]["detail"]["items"][0]
    r = json.loads(cdm("forget", st, "--item", victim, "--json").stdout)
    assert r["items"] == [victim] and r["router"] == "retrained"
    names = sorted(x["name"] for x in r["retrained"])  # the victim's compartment and the classifier router
    assert len(names) == 2 and names[0] in ("digits-0", "digits-1") and names[1] == "router"
    kinds = [e["kind"] for e in json.loads(cdm("audit", st, "--json").stdout)]
    assert kinds[:2] == ["init", "ingest"] and "forget" in kinds
    assert "forgotten" in cdm("audit", st).stdout
    r = cdm("forget", st, "--item", "0" * 64, code=2)
    assert "unknown item hash" in r.output
    pol = tmp_path / "policy.toml"
    pol.write_text('[users.alice]\ncompartments = ["digits-1"]\n')
    r = json.loads(cdm("sample", st, "-n", "2", "--label", "7", "--steps", "3", "--user", "alice", "--policy", pol,
                       "--out", out, "--json").stdout)
    assert r["compartments"] == ["digits-1"]
    r = cdm("sample", st, "-n", "2", "--user", "alice", "--policy", pol, "--allow", "digits-0", code=2)
    assert "may not use: digits-0" in r.output
    r = cdm("sample", st, "-n", "2", "--user", "alice", code=2)
    assert "needs --policy" in r.output
    assert "alice: digits-1" in cdm("policy", st, "--set", pol).stdout
    assert json.loads(cdm("status", st, "--json").stdout)["policy"] == {
        "alice": {"compartments": ["digits-1"], "restricted": True}}
    assert "store policy: alice: digits-1" in cdm("status", st).stdout
    ev = json.loads(cdm("eval", st, "--samples", "20", "--steps", "2", "--router", "ito", "--router", "uniform",
                        "--json").stdout)
    assert [(m["name"], m["router"]) for m in ev["results"]] == [("cdm-2", "ito"), ("cdm-2", "uniform")]
    assert ev["features"] == "cdm-features" and ev["floor"] > 0 and 0 <= ev["results"][0]["accuracy"] <= 1
    r = cdm("eval", st, "--real", tmp_path / "nothing-here", code=2)
    assert "nothing-here" in r.output


def test_cli_errors_are_clear_and_exit_2(tmp_path):
    st = tmp_path / "s"
    cdm("init", st)
    r = cdm("ingest", st, "--source", "x", "--folder", tmp_path / "missing", code=2)
    assert "folder not found" in r.output
    r = cdm("ingest", st, "--source", "x", "--builtin", "cifar", code=2)
    assert "unknown builtin dataset 'cifar'" in r.output
    r = cdm("ingest", st, "--source", "x", code=2)
    assert "exactly one of" in r.output
    r = cdm("sample", tmp_path / "nostore", code=2)
    assert "not a cdm store" in r.output
    cdm("ingest", st, "--source", "digits", "--builtin", "digits", "--split", "iid:2")
    r = cdm("sample", st, "-n", "2", code=2)
    assert "not trained" in r.output


def test_demo_writes_a_report(tmp_path):
    out = tmp_path / "demo"
    cdm("demo", "--out", out, "--quick", "--text", "--steps", "4", "--preset", "tiny", "--samples-per-label", "1")
    report = (out / "report.md").read_text()
    text = report.split("## Text-to-image")[1]
    assert "a handwritten three" in text and "R-precision" in text and (out / "text-grid-1.png").exists()
    assert np.asarray(Image.open(out / "text-grid-1.png")).shape[0] >= 10 * 8 * 6  # one row per prompt
    assert "## Attribution" in report and "ito router" in report
    assert "## Evaluation" in report and "| paragon |" in report and "| cdm-4 | uniform |" in report
    for name in ("grid-0.png", "grid-1.png", "weights-ito-4.png"):
        assert (out / name).exists()
    grid = np.asarray(Image.open(out / "grid-1.png"))
    assert grid.shape[0] >= 10 * 8 * 6  # ten label rows, upscaled
    assert "Smoke run (`--quick`)" in report and "attribution accuracy column stays empty" in report
    uniform = report.split("**CDM-4, uniform router**")[1].split("mean largest")[0]
    assert [row.split("|")[3].strip() for row in uniform.splitlines() if row.startswith("| digits-")] == ["0.25"] * 4


def test_training_progress_is_plain_lines_when_not_on_a_terminal():
    """Output to a log or a pipe: a line per job every few percent, with the time left, so a
    long run is never silent (a rich bar draws nothing there)."""
    import io

    from rich.console import Console

    from cdm.app.progress import training_progress

    buf = io.StringIO()
    ctx, cb = training_progress(Console(file=buf, force_terminal=False, width=200))
    with ctx:
        for i in range(1, 101):
            cb("digits-0", i, 100, 0.5)
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("train digits-0: 1% (1/100 steps), loss 0.5000")
    assert lines[-1].startswith("train digits-0: 100% (100/100 steps)") and 20 <= len(lines) <= 22
    assert all("s left" in ln for ln in lines[1:-1])


def test_train_explains_step_counts_that_differ_from_the_recipe(tmp_path, digits):
    """Issue 29 row 19: a compartment whose first slices hold none of its items runs fewer steps
    than its recipe, and `cdm train` says why (and an epoch budget says so too)."""
    from cdm.store.data import assign_slice
    from .conftest import make_store
    late = [it for it in digits if assign_slice(it.hash, 4, 0) >= 2][:6]  # slices 0 and 1 stay empty
    make_store(tmp_path / "s", late, "one", slices=4).close()
    r = CliRunner().invoke(app, ["train", str(tmp_path / "s"), "--steps", "8", "--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)
    assert (row["steps"], row["planned"]) == (4, 8)
    assert row["notes"] == ["SISA stage(s) 0, 1 skipped (4 steps): slice(s) 0-1 hold none of its items yet "
                            "(a stage trains on the slices up to it)"]
    r = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["train", str(tmp_path / "s"), "--steps", "300", "--epochs", "1"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "50 of 100 *" in text and "* digits: 100 steps, not 300: the recipe budgets 1 epoch(s) over its 6 items" in text
    assert "SISA stage(s) 0, 1 skipped (50 steps)" in text
