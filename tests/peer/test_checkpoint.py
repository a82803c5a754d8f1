import json

import torch

from shoal.peer.checkpoint import list_checkpoints, load_latest, save_checkpoint


def tensors(value):
    return {"outer/w": torch.full((3, 4), float(value)), "momentum/w": torch.zeros(3, 4)}


def test_round_trip_and_retention(tmp_path):
    for r in range(1, 6):
        save_checkpoint(tmp_path, r, tensors(r), {"run": {"x": 1}})
    assert list_checkpoints(tmp_path) == [3, 4, 5]
    loaded, manifest = load_latest(tmp_path)
    assert manifest["round"] == 5 and manifest["run"] == {"x": 1}
    assert torch.equal(loaded["outer/w"], tensors(5)["outer/w"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_latest_falls_back_to_previous(tmp_path):
    save_checkpoint(tmp_path, 1, tensors(1), {})
    save_checkpoint(tmp_path, 2, tensors(2), {})
    (tmp_path / "round-000002.safetensors").write_bytes(b"torn write")
    loaded, manifest = load_latest(tmp_path)
    assert manifest["round"] == 1 and loaded["outer/w"][0, 0] == 1.0


def test_tensors_without_manifest_are_ignored(tmp_path):
    save_checkpoint(tmp_path, 1, tensors(1), {})
    (tmp_path / "round-000002.safetensors").write_bytes(b"crash before the manifest")
    assert load_latest(tmp_path)[1]["round"] == 1
    assert load_latest(tmp_path / "missing") is None
    assert (
        json.loads((tmp_path / "round-000001.json").read_text())["tensors"]
        == "round-000001.safetensors"
    )
