"""Config: precedence defaults < YAML < overrides, one-line errors naming the key, shipped configs valid."""

from pathlib import Path

import pytest
import yaml

from fer_dist.config import LEAVES, TrainConfig, load_config, parse_overrides
from fer_dist.errors import FerDistError

REPO = Path(__file__).resolve().parents[1]
DATA = {"labelled": [{"dir": "d", "splits": ["train"]}], "unlabelled": [{"dir": "d", "splits": ["train"]}],
        "val": [{"dir": "d", "splits": ["val"]}]}
SMALL = ["model.backbone=small_cnn", f"data={DATA}"]


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_defaults_are_the_papers_values():
    cfg = load_config(None, SMALL)
    m, o = cfg.method, cfg.optim
    assert (m.eps, m.tau, m.alpha, m.replace_fraction, m.stop_window) == (0.1, 0.7, 0.7, 0.1, 5)
    assert (o.lr, o.betas, o.batch_size) == (1e-5, (0.9, 0.999), 32)
    assert (cfg.model.hidden, cfg.model.dropout, cfg.model.trainable) == (128, 0.6, "last_block")
    assert TrainConfig.model_fields["model"].default_factory().backbone == "vggface"


def test_precedence_defaults_yaml_overrides(tmp_path):
    tree = {"model": {"backbone": "small_cnn"}, "data": DATA, "method": {"tau": 0.8, "alpha": 0.9}}
    path = write(tmp_path, tree)
    cfg = load_config(path, ["method.tau=0.65"])
    assert cfg.method.tau == 0.65          # override beats YAML
    assert cfg.method.alpha == 0.9         # YAML beats default
    assert cfg.method.eps == 0.1           # default where neither says


def test_bare_leaf_and_yaml_values():
    overrides = ["tau=0.75", "data.labelled=[{dir: x, splits: [train, val]}]", "betas=[0.8, 0.9]"]
    cfg = load_config(None, SMALL + overrides)
    assert cfg.method.tau == 0.75
    assert cfg.data.labelled[0].splits == ["train", "val"]
    assert cfg.optim.betas == (0.8, 0.9)


def test_leaf_names_are_unique():
    names = [p.rsplit(".", 1)[-1] for p in LEAVES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(("tree", "overrides", "needle"), [
    ({"method": {"tua": 0.7}}, [], "method.tua: unknown key"),
    ({"methods": {}}, [], "methods: unknown key"),
    ({"method": {"tau": 1.5}}, [], "method.tau"),
    ({"optim": {"batch_size": "big"}}, [], "optim.batch_size"),
    ({"run": {"mixed_precision": "fp8"}}, [], "run.mixed_precision"),
    ({"data": {"labelled": [{"dir": "x"}]}}, [], "data.labelled.0.splits"),
    ({}, ["nope=1"], "unknown key 'nope'"),
    ({}, ["method.tau"], "expected key=value"),
    ({"model": {"backbone": "vggface"}}, [], "model.weights"),
    ({"data": {"labelled": DATA["labelled"]}}, [], "data.val: name at least one"),
    ({"data": {"val": DATA["val"], "labelled": DATA["labelled"]}}, [], "data.unlabelled: empty"),
])
def test_errors_are_one_line_and_name_the_key(tmp_path, tree, overrides, needle):
    tree = {"model": {"backbone": "small_cnn"}, "data": DATA} | tree
    with pytest.raises(FerDistError) as e:
        load_config(write(tmp_path, tree), overrides)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: [1, 2\n")
    with pytest.raises(FerDistError, match="bad.yaml"):
        load_config(path)
    with pytest.raises(FerDistError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_no_data_defaults_a_real_run_could_silently_use():
    with pytest.raises(FerDistError, match="data.labelled"):
        load_config(None, ["model.backbone=small_cnn"])
    cfg = load_config(None, SMALL + ["method.use_unlabelled=false", "data.unlabelled=[]"])
    assert cfg.data.unlabelled == [] and cfg.data.test == []


def test_overrides_parse_to_nested_dicts():
    assert parse_overrides(["tau=0.8", "run.name=x"]) == {"method": {"tau": 0.8}, "run": {"name": "x"}}


TRAIN_CONFIGS = sorted((REPO / "launch_configs" / "train").rglob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_training_config_validates(path):
    cfg = load_config(path)
    assert cfg.data.labelled and cfg.data.val


def test_ablation_arms_differ_only_in_their_switches():
    arms = {p.stem: load_config(p).to_dict() for p in (REPO / "launch_configs/train/ablation").glob("*.yaml")}
    assert set(arms) == {"baseline", "label_smoothing", "unlabelled", "both"}
    switches = {k: (a["method"]["label_smoothing"], a["method"]["self_training"]) for k, a in arms.items()}
    assert switches == {"baseline": (False, False), "label_smoothing": (True, False),
                        "unlabelled": (False, True), "both": (True, True)}
    for a in arms.values():
        a["method"].pop("label_smoothing"), a["method"].pop("self_training"), a["run"].pop("name")
    first = next(iter(arms.values()))
    assert all(a == first for a in arms.values())
