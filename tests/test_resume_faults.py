"""Damage a run folder by hand between two fit() calls (a byte of a checkpoint, best.json, a log's last row, ...):
the next start resumes without losing a step, says what it found, and leaves the checkpoints intact."""
import json
import logging

import pytest

from conftest import blobs, tiny_classifier
from trainer.checkpoint import list_checkpoints


def _fit(run_dir, steps, **options):
    trainer = tiny_classifier(run_dir=run_dir, **options)
    trainer.fit(blobs(), blobs(), steps=steps)
    return trainer


def test_a_damaged_byte_in_the_callbacks_state_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    _fit(tmp_path, 10)  # ckpt-5, ckpt-10
    data = next((tmp_path / "checkpoints").glob("ckpt-10.data-*"))
    raw = bytearray(data.read_bytes())
    at = raw.find(b"Checkpointing")  # inside the callbacks' py_state tensor (their state_dict()s as JSON)
    assert at >= 0
    raw[at] ^= 0xFF
    data.write_bytes(bytes(raw))
    caplog.set_level(logging.INFO, logger="trainer")
    trainer = _fit(tmp_path, 15)
    assert "ckpt-10 is unreadable" in caplog.text and "Checksum" in caplog.text
    assert "Resumed from an older checkpoint (step 5)" in caplog.text
    assert int(trainer.step.numpy()) == 15
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")][0] == 15


@pytest.mark.parametrize("damage", ["", '[\n {\n  "step": 1'])  # emptied, or cut short
def test_a_damaged_best_record_is_rebuilt_from_the_best_copies_and_no_step_is_lost(tmp_path, caplog, damage):
    _fit(tmp_path, 10, best_metric="loss", best_mode="min")
    best = tmp_path / "checkpoints" / "best"
    (step, value), = [(e["step"], e["loss"]) for e in json.loads((best / "best.json").read_text())]
    (best / "best.json").write_text(damage)
    caplog.set_level(logging.INFO, logger="trainer")
    trainer = _fit(tmp_path, 20, best_metric="loss", best_mode="min")
    assert int(trainer.step.numpy()) == 20
    assert f"{best / 'best.json'} is unreadable" in caplog.text and f"steps [{step}], loss={value:g}" in caplog.text
    ranked = json.loads((best / "best.json").read_text())
    assert len(ranked) == 1 and ranked[0]["loss"] <= value  # the copy kept by its recorded value, or a better one
    assert sorted(p.name for p in best.glob("*.index")) == [f"ckpt-{ranked[0]['step']}.index"]
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")][0] == 20
