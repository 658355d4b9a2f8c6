"""``flowar circuit`` and ``flowar precision`` on a preset and on a user-written config file."""

from __future__ import annotations

import json

import pytest

from flowar.cli.main import main
from flowar.config import FlowARConfig, FlowHeadConfig, to_dict


@pytest.fixture
def user_config(tmp_path):
    config = FlowARConfig(
        scales=(1, 2, 4), channels=1, num_classes=3, width=8, encoder_depth=1,
        decoder_depth=1, num_heads=2,
        flow=FlowHeadConfig(width=8, depth=1, num_heads=2, time_embed_dim=8),
    )
    path = tmp_path / "my_model.json"
    path.write_text(json.dumps(to_dict(config)))
    return path


def test_circuit_json_and_plot_from_a_user_config(user_config, tmp_path, capsys):
    plot = tmp_path / "size.png"
    code = main(["circuit", "--config", str(user_config), "--n", "4", "8", "--steps", "1",
                 "--json", "--plot", str(plot)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["n"] for p in report["points"]] == [4, 8]
    assert report["points"][0]["depth"] == report["points"][1]["depth"]
    assert report["points"][0]["scales"] == [1, 2, 4]
    assert report["tc0"] is True
    assert plot.stat().st_size > 1000


def test_circuit_table_on_a_preset_with_the_double_rule(capsys):
    code = main(["circuit", "--config", "tiny", "--n", "4", "8", "--steps", "1",
                 "--scale-rule", "double"])
    assert code == 0
    out = capsys.readouterr().out
    assert "scales-grow" in out and "NOT shown to be in TC0" in out


def test_precision_json_from_a_user_config(user_config, tmp_path, capsys):
    plot = tmp_path / "precision.png"
    code = main(["precision", "--config", str(user_config), "--n", "4", "--p", "8", "52",
                 "--steps", "1", "--json", "--plot", str(plot)])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["points"][0]["rows"]
    assert [r["p"] for r in rows] == [8, 52]
    assert rows[1]["rel_error"] == 0.0 and rows[0]["rel_error"] > 0
    assert plot.stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, message",
    [
        (["circuit", "--config", "no-such-thing", "--n", "4", "8"], "neither a preset"),
        (["circuit", "--config", "tiny", "--n", "6", "8"], "whole number"),
        (["circuit", "--config", "tiny", "--n", "8"], "at least two"),
        (["precision", "--config", "tiny", "--n", "4", "--target", "2"], "--target"),
    ],
)
def test_bad_input_exits_with_code_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_p_out_of_range_is_rejected_by_the_parser():
    with pytest.raises(SystemExit) as info:
        main(["precision", "--config", "tiny", "--p", "60"])
    assert info.value.code == 2


@pytest.mark.slow
def test_both_commands_accept_a_checkpoint_folder(tmp_path, capsys):
    from flowar.analysis.targets import build_model
    from flowar.io.checkpoint import save_checkpoint

    config = FlowARConfig(
        scales=(1, 2, 4), channels=1, num_classes=3, width=8, encoder_depth=1,
        decoder_depth=1, num_heads=2,
        flow=FlowHeadConfig(width=8, depth=1, num_heads=2, time_embed_dim=8),
    )
    folder = save_checkpoint(tmp_path / "ckpt", config, build_model(config).state_dict())
    assert main(["precision", "--config", str(folder), "--p", "10", "52", "--steps", "1",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["n"] for p in report["points"]] == [4]  # a checkpoint runs at its own size
    assert report["points"][0]["meta"]["checkpoint"] == str(folder)
    assert report["points"][0]["rows"][0]["rel_error"] > 0
    assert main(["precision", "--config", str(folder), "--n", "8"]) == 2
    assert "own size" in capsys.readouterr().err
    assert main(["circuit", "--config", str(folder), "--n", "4", "8", "--steps", "1"]) == 0
    assert "consistent with TC0" in capsys.readouterr().out
