"""Every shipped experiment config loads, names its dataset, and pairs an ID-only file with a
+FedMR twin that differs only by the fusion module (and the names that say so)."""

from pathlib import Path

import pytest

from pipeline.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BACKBONES = ("fedavg", "fcf", "fedncf", "pfedrec", "fedrap")


@pytest.mark.parametrize("dataset", ["ku", "movielens", "synthetic"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_id_and_fedmr_configs_are_twins(dataset, backbone):
    plain = load_config(CONFIGS / dataset / f"{backbone}.yaml")
    fedmr = load_config(CONFIGS / dataset / f"{backbone}_fedmr.yaml")
    assert plain.model.backbone == fedmr.model.backbone == backbone
    assert plain.model.fusion is None and fedmr.model.fusion is not None
    assert plain.data.name == fedmr.data.name == dataset
    assert fedmr.name == f"{plain.name}-fedmr"
    assert plain.train.protocol == fedmr.train.protocol
    assert plain.runtime.out != fedmr.runtime.out


def test_the_own_data_template_reads_generic_data_with_the_default_preparation():
    from pipeline.data.prepare import PrepareConfig

    config = load_config(CONFIGS / "own_data" / "fcf_fedmr.yaml")
    assert (config.data.format, config.data.name) == ("generic", "mydata")  # the folder's name
    assert load_config(CONFIGS / "own_data" / "fcf_fedmr.yaml", ["data.path=x/shop"]).data.name == "shop"
    assert config.data.features is not None and config.model.fusion is not None
    # its comment says the protocol block spells out the defaults: it must stay true
    assert config.data.effective_protocol() == PrepareConfig()
    assert config.data.protocol.model_fields_set >= {"min_user", "min_item", "rating_threshold", "tie_rule"}
    # the ID-only template is its twin: the same data and protocol, no features, no fusion module
    plain = load_config(CONFIGS / "own_data" / "fcf.yaml")
    assert plain.model.fusion is None and plain.data.features is None
    assert plain.data.model_dump(exclude={"features"}) == config.data.model_dump(exclude={"features"})
    assert config.name == f"{plain.name}-fedmr" and plain.runtime.out != config.runtime.out
