"""TIFA-style scoring (issue 30): the scene grammar's questions, judges trained on real
held-out scenes, and the score with its interval (cdm.evaluation.tifa, bench/scenes.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdm.errors import DataError
from cdm.evaluation.tifa import fit_judge, read_questions, tifa


def _scenes():
    path = Path(__file__).resolve().parents[1] / "bench" / "scenes.py"
    spec = importlib.util.spec_from_file_location("bench_scenes", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_captions_give_the_questions_they_answer():
    s = _scenes()
    scene = s.Scene(s.Group(2, "small", "red", "circle"), s.Group(1, "large", "blue", "square"))
    assert scene.caption() == "two small red circles left of a large blue square"
    qs = {(q["region"], q["attribute"]): q["answer"] for q in scene.questions()}
    assert qs == {("left", "present"): "yes", ("left", "colour"): "red", ("left", "shape"): "circle",
                  ("left", "size"): "small", ("left", "count"): "2", ("right", "present"): "yes",
                  ("right", "colour"): "blue", ("right", "shape"): "square", ("right", "size"): "large",
                  ("right", "count"): "1"}
    alone = s.Scene(None, s.Group(1, "small", "green", "triangle"))
    assert alone.caption() == "a small green triangle on the right"
    assert {q["answer"] for q in alone.questions() if q["region"] == "left"} == {"no"}


def test_a_judge_trained_on_real_scenes_scores_matching_captions_above_mismatched(tmp_path):
    info = _scenes().build(tmp_path, size=16, per_owner=4, public=4, held_out=160)
    held = tmp_path / "held-out"
    assert info["held_out"] == 160 and not ({json.loads(x)["text"] for x in (held / "metadata.jsonl").open()}
                                             & {json.loads(x)["text"] for x in (tmp_path / "fill" / "metadata.jsonl").open()})
    qs = read_questions(held / "questions.jsonl")
    names = sorted(qs)
    images = np.stack([np.asarray(Image.open(held / n).convert("RGB")) for n in names])
    questions = [qs[n] for n in names]
    judge = fit_judge(images, questions, steps=250)
    assert judge.accuracy > 0.75  # on the held-out scenes it did not train on
    own = tifa(judge, images, questions)
    shuffled = tifa(judge, images, [questions[i] for i in np.random.RandomState(0).permutation(len(questions))])
    assert own.score > shuffled.score + 0.25 and own.low <= own.score <= own.high
    assert shuffled.high < own.low and set(own.by_attribute) == {"colour", "count", "present", "shape", "size"}


@pytest.mark.parametrize("line, match", [
    (b"{not json\n", "line 1: not a questions row"),
    (b'{"file_name": "a.png"}\n', "line 1: not a questions row"),
    (b'{"file_name": "a.png", "questions": []}\n{"file_name": "a.png", "questions": []}\n', "line 2: 'a.png' is listed again"),
    (b"\xff\xfe{", "line 1: UTF-16"),
])
def test_bad_question_files_name_the_line(tmp_path, line, match):
    (tmp_path / "questions.jsonl").write_bytes(line)
    with pytest.raises(DataError, match=match):
        read_questions(tmp_path / "questions.jsonl")


def test_cdm_eval_reports_the_tifa_score_when_questions_are_given(tmp_path, monkeypatch):
    """A text store of two owners' scenes, evaluated against a held-out folder with
    questions.jsonl: the report holds the judge's accuracy and each model's score."""
    from typer.testing import CliRunner

    from cdm.app import api
    from cdm.app.cli import app
    from cdm.evaluation import evaluate
    from cdm.ingest.folders import load_folder

    from .conftest import TINY, TINY_ROUTER

    monkeypatch.setattr(evaluate, "JUDGE_STEPS", 100)
    _scenes().build(tmp_path / "scenes", size=16, per_owner=12, public=4, held_out=40)
    s = api.init_store(tmp_path / "s", 16, 3, 0, 2, 16, TINY, TINY_ROUTER)
    for owner in ("fill", "outline"):
        api.ingest(s, owner, load_folder(tmp_path / "scenes" / owner, 16, 3), "one")
    api.set_text(s, None)
    api.train(s, paragon=True)
    r = CliRunner().invoke(app, ["eval", str(tmp_path / "s"), "--real", str(tmp_path / "scenes" / "held-out"),
                                 "--samples", "8", "--steps", "2", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    t = report["tifa"]
    assert 0 <= t["judge_accuracy"] <= 1 and set(t["scores"]) == {"paragon:", "cdm-2:ito"}
    for score in t["scores"].values():
        assert score["low"] <= score["score"] <= score["high"] and score["questions"] >= 8 * 6
    (tmp_path / "scenes" / "fill" / "questions.jsonl").unlink()
    plain = evaluate.evaluate_store(s, cfg=evaluate.EvalConfig.with_sampling(samples=4, steps=2),
                                    real=tmp_path / "scenes" / "fill")  # no questions there: no TIFA
    assert plain.tifa is None and "tifa" not in plain.to_dict()
