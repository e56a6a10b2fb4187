"""Model cards: every pre-trained family has one, `models --verbose` prints it, records flag overlap."""

from __future__ import annotations

import pytest

from vlpbench import api
from vlpbench.adapters import adapter_names, get_adapter
from vlpbench.adapters.base import ModelCard
from vlpbench.cli import main
from vlpbench.registry import DATASETS

# Plain backbones: no paper, no pre-training on chest X-rays.
BACKBONES = {"generic", "random", "resnet50"}


# The package's own adapters: test modules collected earlier register models of their own.
@pytest.mark.parametrize("name", [n for n in adapter_names() if n not in BACKBONES
                                  and get_adapter(n).__module__.startswith("vlpbench.adapters")])
def test_every_pretrained_family_has_a_card_naming_known_datasets(name):
    card = get_adapter(name).card
    assert isinstance(card, ModelCard)
    assert card.paper and card.repository and card.checkpoints
    assert set(card.pretraining_data) <= set(DATASETS.names())
    # A family pre-trained on no vlpbench dataset (BiomedCLIP: PMC-15M) names its data in the notes instead.
    assert card.pretraining_data or card.notes


def test_models_verbose_prints_the_card_and_the_input_contract(capsys):
    assert main(["models", "--verbose"]) == 0
    out = capsys.readouterr().out
    block = out.split("\n\nmgca ")[1].split("\n\n")[0]
    assert "paper:        Wang et al., Multi-Granularity" in block
    assert "pre-trained:  mimic_cxr" in block
    assert "input:        224² px, 3 channel(s), mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in block
    assert main(["models"]) == 0
    assert "paper:" not in capsys.readouterr().out


class _Adapter:
    card = ModelCard("p", "r", ("f",), ("mimic_cxr", "chexpert"))


@pytest.mark.parametrize(("dataset", "overlap"), [
    ("ms_cxr", "mimic_cxr"), ("mimic_cxr", "mimic_cxr"), ("mimic5x200", "mimic_cxr"), ("chexpert5x200", "chexpert"),
    ("chexpert", "chexpert"),
    ("siim", None), ("rsna", None)])
def test_pretraining_overlap_follows_where_the_test_images_come_from(dataset, overlap):
    assert api.pretraining_overlap(_Adapter(), dataset) == overlap
    assert api.pretraining_overlap(object(), dataset) is None
