from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from pipelines.config import DEFAULT_CONFIG, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def base() -> dict:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


@pytest.mark.parametrize("config", sorted((REPO / "ray_configs" / "pipelines").glob("*.yaml")))
def test_every_shipped_config_loads(config):
    assert load_config(config).pretrain.mask_ratio == pytest.approx(0.5)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c["pretrain"].update(mask_ratio=1.2), r"pretrain\.mask_ratio: mask_ratio must lie strictly between 0 and 1"),
        (lambda c: c["pretrain"].update(img_size=100), r"pretrain\.img_size: img_size must be a multiple of the encoder stride 32"),
        (lambda c: c["pretrain"].update(batch_size=18), r"pretrain: .*micro-batch \(9 .*must be even"),
        (lambda c: c["pretrain"].update(batch_size=15), r"pretrain: batch_size 15 must divide evenly over num_workers"),
        (lambda c: c["pretrain"].update(epochs="many"), r"pretrain\.epochs: Input should be a valid number"),
        (lambda c: c["pretrain"].update(mask_ration=0.5), r"pretrain\.mask_ration: Extra inputs are not permitted"),
        (lambda c: c["pretrain"].update(model="resnet50"), r"pretrain\.model: unknown model 'resnet50'"),
        (lambda c: c["stages"]["coco"].update(task="detection"), r"stages\.coco: Input tag 'detection'"),
        (lambda c: c["stages"]["inat2018"].update(mode="probe"), r"stages\.inat2018\.mode: Input should be 'finetune' or 'linear_probe'"),
        (lambda c: c.pop("synthetic"), r"reads synthetic:pretrain but the config has no 'synthetic' section"),
        (lambda c: c["stages"].update({"pretrain": c["stages"]["inat2018"]}), r"stage name 'pretrain'"),
        (lambda c: c["pretrain"].update(method="bert"), r"pretrain\.method: Input should be 'mixmae', 'simmim', 'mae' or 'beit'"),
        (lambda c: c["pretrain"].update(method="mae"), r"pretrain: MAE pretrains a plain ViT .* got 'mixmae_swin_micro_w8'"),
        (lambda c: c["pretrain"].update(model="mae_vit_micro_p8"), r"pretrain: MixMAE pretrains a hierarchical encoder"),
        (lambda c: c["pretrain"].update(mask_ratio=0.1), r"pretrain: mask_ratio 0.1 hides 0 of the 2x2 mask units"),
        (lambda c: c["pretrain"].update(model="mixmae_pvt_v2_micro", model_overrides={"sr_ratios": [16, 4, 2, 1]}),
         r"pretrain: stage 1: keys reduced over 16x16 tokens .* do not divide the 32-px mask units"),
        (lambda c: c["pretrain"].update(img_size=96, model="mixmae_swin_tiny_w14"),
         r"pretrain: stage 1 has a 24x24 token map at img_size \(96, 96\), which window 14 does not tile"),
        (lambda c: c["pretrain"].update(method="mae", model="mae_vit_micro_p8"),
         r"stage \w+: (detection|segmentation) needs an encoder with four levels .* mae_vit_micro_p8 is a plain ViT"),
        (lambda c: c["stages"]["inat2018"].update(model="mixmae_twins_svt_micro"),
         r"stage inat2018: init: pretrained starts from the pretraining stage's mixmae_swin_micro_w8 encoder"),
    ],
)
def test_bad_configs_fail_at_load_naming_the_field(tmp_path, edit, message):
    config = base()
    edit(config)
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, config))


def test_set_overrides_any_field_and_are_validated(tmp_path):
    path = write(tmp_path, base())
    overrides = ["pretrain.mask_ratio=0.75", "stages.coco.scaling.num_workers=2", "stage_groups=[]", "name=other"]
    config = load_config(path, overrides)
    assert config.pretrain.mask_ratio == 0.75 and config.stages["coco"].scaling.num_workers == 2
    assert config.stage_groups == []
    with pytest.raises(ConfigError, match="pretrain.mask_ratio"):
        load_config(path, ["pretrain.mask_ratio=0"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(path, ["pretrain.mask_ratio"])


def test_an_override_of_one_stage_leaves_the_stages_sharing_its_yaml_anchor_alone():
    """The quickstart's classification stages merge one anchored section (``<<: *classify``),
    whose nested mappings YAML shares between them."""
    config = load_config(None, ["stage_groups=[]", "stages.inat2018.scaling.num_workers=2", "stages.inat2018.epochs=7"])
    assert (config.stages["inat2018"].scaling.num_workers, config.stages["inat2018"].epochs) == (2, 7)
    assert all(config.stages[name].scaling.num_workers == 1 and config.stages[name].epochs != 7
               for name in ("inat2019", "places205", "places365"))


def test_missing_and_malformed_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_has_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resolved = load_config().resolved()
    assert Path(resolved.storage).is_absolute() and Path(resolved.synthetic.root).is_absolute()
    assert Path(resolved.storage).parent == tmp_path


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path):
    config = base()
    config["pretrain"]["mask_ratio"] = 0.0
    result = CliRunner().invoke(app, ["pretrain", str(write(tmp_path, config))])
    assert result.exit_code == 2
    assert "pretrain.mask_ratio: mask_ratio must lie strictly between 0 and 1" in result.output
    assert "Traceback" not in result.output


def test_a_method_takes_its_papers_recipe_where_the_config_is_silent():
    config = load_config(DEFAULT_CONFIG, ["pretrain.method=simmim"])
    assert (config.pretrain.mask_ratio, config.pretrain.betas) == (0.6, (0.9, 0.999))  # SimMIM's
    assert (config.pretrain.epochs, config.pretrain.base_lr) == (10, 1.5e-3)  # the quickstart's own


def test_an_init_checkpoint_of_another_encoder_is_refused_at_load(tmp_path):
    from safetensors.torch import save_file
    import torch

    checkpoint = tmp_path / "encoder.safetensors"
    save_file({"w": torch.zeros(1)}, str(checkpoint), metadata={"model": "mae_vit_micro_p8", "method": "mae"})
    config = base()
    config["stages"]["inat2018"]["init"] = str(checkpoint)
    with pytest.raises(ConfigError, match=r"holds a mae_vit_micro_p8 encoder pretrained with mae; this stage builds mixmae_swin_micro_w8"):
        load_config(write(tmp_path, config))
    config["stages"]["inat2018"]["model"] = "mae_vit_micro_p8"
    assert load_config(write(tmp_path, config)).stages["inat2018"].model == "mae_vit_micro_p8"
