import pytest

from vlpbench.cli import main

SUBCOMMANDS = ["run", "sweep", "reproduce", "score", "table", "plot", "leaderboard", "compare", "baseline", "synth",
               "demo", "inspect", "models", "tasks", "data", "splits", "pseudo-mask", "finetune-clip"]


def test_top_level_help_lists_every_subcommand_with_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "examples:" in out and "vlpbench run --model g2d" in out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_help_gives_an_example(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "example:" in out and f"vlpbench {name}" in out


def test_models_and_tasks_list_the_registered_entries(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    blocks = {block.split()[0]: block for block in out.strip().split("\n\n")}
    for model in ("g2d", "random", "resnet50", "mgca", "generic", "clip"):
        assert model in blocks
    assert "capabilities: decoder, dense_embed, embed_image, embed_text, features, grounding, zero_shot" in blocks["g2d"]
    assert "capabilities: dense_embed, embed_image, embed_text, features, grounding, zero_shot" in blocks["clip"]
    assert "capabilities: features" in blocks["random"] and "checkpoints:" in blocks["random"]
    assert "plug-in from" not in blocks["g2d"]
    assert main(["tasks"]) == 0
    assert "siim_seg" in capsys.readouterr().out


def test_tasks_verbose_shows_each_tasks_configuration_and_sources(capsys):
    assert main(["tasks", "--verbose"]) == 0
    blocks = {block.split()[0]: block for block in capsys.readouterr().out.strip().split("\n\n")}
    assert "protocol segmentation; dice (higher is better); fractions 0.01, 0.1, 1" in blocks["siim_seg"]
    assert "    batch_size: 16" in blocks["rsna_seg"] and "    betas: [0.9, 0.999]" in blocks["rsna_seg"]
    assert "  sources:" in blocks["siim_seg"]


def test_user_errors_exit_2_with_a_message_and_no_traceback(capsys, tmp_path):
    assert main(["run", "--model", "g2dd", "--task", "siim_seg", "--frac", "0.01"]) == 2
    assert "Did you mean 'g2d'" in capsys.readouterr().err
    assert main(["run", "--model", "random", "--task", "siim_seg", "--frac", "0.5"]) == 2
    assert "allows 0.01, 0.1, 1.0" in capsys.readouterr().err
    assert main(["table", "--results", str(tmp_path)]) == 2
    assert "no result records" in capsys.readouterr().err


def test_inspect_exits_nonzero_on_missing_weights(tmp_path, capsys):
    import torch

    from vlpbench.testing import write_g2d_checkpoint

    good = tmp_path / "g2d_encoder.pth"
    write_g2d_checkpoint(good, layout="encoder", seed=0)
    assert main(["inspect", "--model", "g2d", "--checkpoint", str(good)]) == 0
    assert "318" in capsys.readouterr().out
    state = torch.load(good, weights_only=True)
    del state["layer4.2.conv3.weight"]
    bad = tmp_path / "partial.pth"
    torch.save(state, bad)
    assert main(["inspect", "--model", "g2d", "--checkpoint", str(bad)]) == 1
    assert "layer4.2.conv3.weight" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["run", "--model", "random", "--task", "siim_seg", "--frac", "1"],
                                     ["score", "--task", "siim_seg", "--predictions", "p"],
                                     ["plot", "--out", "o"], ["data", "check", "--dataset", "siim"],
                                     ["splits", "verify", "--dataset", "siim"]])
def test_every_command_with_a_data_folder_takes_data_root_and_the_unlisted_root(command, capsys):
    from vlpbench.cli import _parser

    for option in ("--data-root", "--root"):
        assert _parser().parse_args([*command, option, "/data/siim"]).data_root == "/data/siim"
    assert _parser().parse_args(command).data_root is None
    with pytest.raises(SystemExit):
        main([*command[:2 if command[0] in ("data", "splits") else 1], "--help"])
    out = capsys.readouterr().out
    assert "--data-root" in out and "--root" not in out


def test_sweep_takes_data_root_and_the_unlisted_root():
    from vlpbench.cli import _parser

    args = _parser().parse_args(["sweep", "--data-root", "siim=/a", "--root", "rsna=/b"])
    assert args.data_roots == ["siim=/a", "rsna=/b"]


def test_registry_errors_are_user_errors_and_still_key_errors(capsys):
    from vlpbench.errors import VlpbenchError
    from vlpbench.registry import ADAPTERS, RegistryError

    with pytest.raises(RegistryError) as error:
        ADAPTERS.get("g2dd")
    assert isinstance(error.value, VlpbenchError) and isinstance(error.value, KeyError)
    assert str(error.value).startswith("unknown model 'g2dd'. Did you mean 'g2d'?")
    assert main(["inspect", "--model", "g2dd"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'g2dd'. Did you mean 'g2d'?") and "Traceback" not in err


def test_inspect_passes_model_options_to_the_adapter(g2d_encoder_checkpoint, capsys):
    assert main(["inspect", "--model", "g2d", "--checkpoint", str(g2d_encoder_checkpoint),
                 "--model-option", "heatmap_source=attention_pool"]) == 2
    assert ("option heatmap_source=attention_pool needs the full pre-training checkpoint"
            in capsys.readouterr().err)
    assert main(["inspect", "--model", "g2d", "--checkpoint", str(g2d_encoder_checkpoint),
                 "--model-option", "heatmap_source"]) == 2
    assert "error: --model-option 'heatmap_source': expected KEY=VALUE" in capsys.readouterr().err
