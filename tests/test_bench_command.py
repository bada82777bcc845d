"""``vfm-adapters bench``: the table's rows are computed, interleaved and written as JSON."""

from __future__ import annotations

import json

import vfm_adapters as va
from vfm_adapters.cli import main


def test_bench_command_tiny_host_rows_ratios_and_json(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", "tiny", "--image-size", "28", "--batch", "2", "--rounds", "2",
                 "--methods", "frozen", "rein", "lora", "--threads", "1", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| method | trainable |" in printed and "| rein |" in printed
    data = json.loads(out.read_text())
    rows = {row["method"]: row for row in data["rows"]}
    assert list(rows) == ["frozen", "rein", "lora"]
    assert data["settings"]["rounds"] == 2 and data["settings"]["threads"] == 1
    frozen = rows["frozen"]
    assert frozen["trainable"] == 0
    assert frozen["infer_vs_frozen"] == frozen["train_vs_frozen"] == frozen["peak_vs_frozen"] == 1.0
    # Trainable counts are the methods' own (the same injection on a fresh tiny host).
    import timm

    host = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28, num_classes=0,
                             depth=2, embed_dim=64, num_heads=2)
    assert rows["rein"]["trainable"] == va.trainable_parameters(va.inject_rein(host))
    for row in rows.values():
        assert row["infer_images_per_s"] > 0 and row["train_images_per_s"] > 0
        assert row["infer_spread"] >= 0 and row["train_spread"] >= 0
        assert row["peak_mib"] is not None and row["peak_mib"] > 0
        assert abs(row["train_vs_frozen"] - row["train_images_per_s"] / frozen["train_images_per_s"]) < 1e-9
