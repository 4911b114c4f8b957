"""The ``guardrail`` command: calibrate, eval, chat and demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from guardrail import GuardedVLM
from guardrail.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_calibrate_keeps_its_result_when_the_store_is_down(
    tiny_path, data, capsys, tmp_path, monkeypatch
):
    """Minutes of calibration are not lost to a store outage: the shift is written to a file,
    and ``guardrail store-put`` stores it once the store is back."""
    _root, images, vlsafe = data
    monkeypatch.chdir(tmp_path)
    down = "redis://127.0.0.1:1/0?retries=0&socket_connect_timeout=0.2"
    args = ["--anchor", str(vlsafe), "--format", "vlsafe", "--images", str(images)]
    assert main(["calibrate", "--model", str(tiny_path), *args, "--store", down]) == 3
    err = capsys.readouterr().err
    kept = next(tmp_path.glob("cmrm-shift-*.safetensors"))
    assert "StoreUnavailableError" in err and f"the shift is kept in {kept.name}" in err
    store = f"file://{tmp_path / 'store'}"
    assert main(["store-put", str(kept), "--store", store]) == 0
    assert "stored calibration" in capsys.readouterr().out
    vlm = GuardedVLM.from_pretrained(str(tiny_path))
    lookup = vlm.use_store(store, anchor_name="vlsafe", compute_on_miss=False)
    assert lookup.vector is not None and kept.name.endswith(
        f"{lookup.vector.meta.calibration_id}.safetensors"
    )


def test_calibrate_then_eval_end_to_end(tiny_path, data, capsys):
    root, images, vlsafe = data
    store = f"file://{root / 'store'}"
    assert (
        main(
            [
                "calibrate",
                "--model",
                str(tiny_path),
                "--anchor",
                str(vlsafe),
                "--format",
                "vlsafe",
                "--images",
                str(images),
                "--store",
                store,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "4 anchors (0 skipped)" in out and "per-layer |shift|" in out
    report, plot = root / "report.json", root / "pca.png"
    assert (
        main(
            [
                "eval",
                "--model",
                str(tiny_path),
                "--data",
                str(vlsafe),
                "--format",
                "vlsafe",
                "--images",
                str(images),
                "--store",
                store,
                "--anchor-name",
                "vlsafe",
                "--alpha",
                "0.5",
                "1.0",
                "--max-new-tokens",
                "4",
                "--json",
                str(report),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "dataset a=0.5" in out and "sample a=1" in out and "cluster separation" in out
    numbers = json.loads(report.read_text())
    labels = [m["label"] for m in numbers["modes"]]
    assert labels == [
        "vlm",
        "text-only",
        "caption",
        "dataset a=0.5",
        "dataset a=1",
        "sample a=0.5",
        "sample a=1",
    ]
    for mode in numbers["modes"]:
        judged = [a for a in mode["answers"] if a["unsafe"] is not None]
        assert mode["n"] == 4 and mode["unsafe"] == sum(a["unsafe"] for a in judged)
        assert mode["unsafe_rate"] == pytest.approx(mode["unsafe"] / len(judged))
    modes_used = {m["label"]: {a["mode_used"] for a in m["answers"]} for m in numbers["modes"]}
    assert modes_used["vlm"] == {"off"} and modes_used["text-only"] == {"text-only"}
    assert modes_used["dataset a=1"] == {"dataset"} and modes_used["sample a=1"] == {"sample"}
    rep = numbers["representation"]
    assert rep["distance_corrected"] < rep["distance_multimodal"]
    assert len(rep["pca"]["corrected"]) == 4
    assert Image.open(plot).size[0] > 300
    assert Image.open(root / "pca-alpha.png").size[0] > 300


def test_eval_takes_the_edited_layers_positions_and_corruption(tiny_path, data, tmp_path):
    _, images, vlsafe = data
    report = tmp_path / "report.json"
    common = ["--model", str(tiny_path), "--data", str(vlsafe), "--format", "vlsafe"]
    args = [*common, "--images", str(images), "--modes", "vlm,sample", "--max-new-tokens", "2"]
    assert main(["eval", *args, "--json", str(report)]) == 0
    default = json.loads(report.read_text())
    edited = ["--layers", "0", "2", "--positions", "text", "--corruption", "noise"]
    assert main(["eval", *args, *edited, "--json", str(report)]) == 0
    numbers = json.loads(report.read_text())
    config = numbers["config"]
    assert config["layers"] == [0, 2] and config["positions"] == "text"
    assert config["corruption"]["kind"] == "noise" and default["config"]["layers"] is None
    sample = numbers["modes"][1]["answers"]
    assert {tuple(a["layers"]) for a in sample} == {(0, 2)}
    assert {tuple(a["layers"]) for a in default["modes"][1]["answers"]} == {(3,)}


def test_eval_reports_bad_data_clearly(tiny_path, data, capsys):
    _, images, vlsafe = data
    vlsafe.write_text(vlsafe.read_text() + '{"image_id": "gone.jpg", "query": "q"}\n')
    command = [
        "eval",
        "--model",
        str(tiny_path),
        "--data",
        str(vlsafe),
        "--format",
        "vlsafe",
        "--images",
        str(images),
        "--modes",
        "vlm",
    ]
    assert main(command) == 2
    assert "vlsafe.jsonl:5: image file" in capsys.readouterr().err
    assert main([*command, "--skip-bad", "--max-new-tokens", "2"]) == 0
    assert "skipped 1 bad row" in capsys.readouterr().err


def _run(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow  # the SmolLM2 fixture, loaded by the command itself
def test_demo_runs_offline_and_says_the_vision_tower_is_untrained(tmp_path):
    out = _run(
        "-m",
        "guardrail.cli",
        "demo",
        "--prompts",
        "1",
        "--max-new-tokens",
        "6",
        "--plot",
        str(tmp_path / "demo.png"),
    )
    assert out.count("UNTRAINED") == 2
    for mode in ("off", "dataset", "sample"):
        assert f'"mode_used":"{mode}"' in out
    assert "cluster separation" in out and Image.open(tmp_path / "demo.png").size[0] > 300


@pytest.mark.slow  # the SmolLM2 fixture
def test_demo_on_a_terminal_prints_a_short_line_per_call(tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    args = ["demo", "--prompts", "1", "--max-new-tokens", "4", "--plot", str(tmp_path / "d.png")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "guard: off, unguarded" in out and "guard: dataset, alpha 1, layers [25]" in out
    assert '"mode_used"' not in out
    assert not [r for r in caplog.records if r.name == "guardrail.decisions"]


def test_chat_prints_one_answer_and_its_decision(tiny_path, data, capsys):
    _, images, _ = data
    assert (
        main(
            [
                "chat",
                "--model",
                str(tiny_path),
                "--image",
                str(images / "000.jpg"),
                "--alpha",
                "0.7",
                "--max-new-tokens",
                "3",
                "What is this?",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    decision = json.loads(captured.err[captured.err.index("{") :])
    assert decision["mode_used"] == "sample" and decision["alpha"] == 0.7
    assert decision["guarded"] and decision["shift_level"] == "sample"
    assert main(["chat", "--model", str(tiny_path), "--image", str(images / "nope.jpg"), "Hi"]) == 2
    assert "InvalidImageError" in capsys.readouterr().err


def test_version(capsys):
    from guardrail import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert (
        done.value.code == 0 and capsys.readouterr().out.strip() == f"cmrm-guardrail {__version__}"
    )
