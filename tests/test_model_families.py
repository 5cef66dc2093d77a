"""The model-family registry (models.registry): each name has one family, which checks the configs naming it,
builds the model with its own preprocessing (image_size 0: the model's own size; any other size exactly as asked,
224 included) and cuts it into stages."""

from __future__ import annotations

import pytest

from cnnlab.config import ConfigError, make_config
from cnnlab.models import FAMILIES, check_config, create_model, default_freeze_stages, family_of, model_names, stages


def test_every_listed_name_has_exactly_one_family():
    names = model_names()
    assert names[0] == "smallcnn" and "resnet50" in names
    for name in names[:200:7]:
        assert sum(f.owns(name) for f in FAMILIES) == 1, name
    assert [family_of(n).name for n in ("smallcnn", "resnet50", "timm/resnet18")] == ["smallcnn", "torchvision", "timm"]
    assert not family_of("smallcnn").pretrained and family_of("resnet50").pretrained and family_of("timm/resnet18").pretrained


@pytest.mark.parametrize("model, own", [("smallcnn", 224), ("inception_v3", 299), ("resnet18", 224),
                                        ("timm/efficientnet_b3", 288)])
def test_image_size_0_is_the_models_own_and_224_can_be_asked_for(model, own):
    """224 was the config's default and also meant 'not given': asking Inception v3 (or a timm model built for
    288 px) for 224 px images gave 299 (288) instead."""
    if model.startswith("timm/"):
        import timm  # noqa: F401 - declared in dev: an import error fails, never skips
    default = create_model(make_config({"model": model}), 3).preprocess.image_size
    asked = create_model(make_config({"model": model, "image_size": 224}), 3).preprocess.image_size
    assert (default, asked) == (own, 224)
    if model == "smallcnn":  # resolved with the config's other rules, so the saved config names the size it trained at
        assert check_config(make_config({})).image_size == 224 and check_config(make_config({})).first_stride() == 2


def test_partial_fine_tuning_freezes_all_but_the_last_stage_of_any_model():
    """The whole job froze 3 stages 'for ResNet50' whatever the model; now the count is the model's own."""
    assert default_freeze_stages("resnet50") == 3  # the stem and layer1-3, as the assignment asks
    for name in ("mobilenet_v3_small", "squeezenet1_0"):
        parts = create_model(make_config({"model": name, "image_size": 64}), 2)
        body = stages(name, parts.module, parts.head_module())
        assert default_freeze_stages(name) == len(body) - 2  # the stem and every stage but the last
        check_config(make_config({"model": name, "weights": "random", "finetune": "partial",
                                  "freeze_stages": default_freeze_stages(name)}))


@pytest.mark.parametrize("values, needle", [
    ({"model": "smallcnn", "finetune": "head"}, "needs a pretrained model"),
    ({"model": "smallcnn", "weights": "DEFAULT"}, "smallcnn has no pretrained weights"),
    ({"model": "resnet18", "finetune": "head"}, "needs pretrained weights"),
    ({"model": "timm/resnet18", "weights": "DEFAULT"}, "finetune=none trains from scratch"),
    ({"model": "resnet_fifty"}, "expected smallcnn, a torchvision classifier or timm/<name>"),
    ({"image_size": 40, "conv1_stride": 2}, "needs at least 64"),
])
def test_each_family_refuses_what_it_cannot_build_in_one_line(values, needle):
    if str(values.get("model", "")).startswith("timm/"):
        import timm  # noqa: F401 - declared in dev: an import error fails, never skips
    with pytest.raises(ConfigError) as e:
        check_config(make_config(values))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_run_resumed_at_another_input_than_it_trained_on_is_refused(tiny_cfg):
    """A run folder's config.yaml that no longer gives the input its last.pt trained on (a pretrained run saved
    with image_size 224 when 224 stood for the model's own size) would silently go on at another size."""
    import yaml

    import cnnlab

    run = cnnlab.train(tiny_cfg(epochs=1, image_size=32), progress=False, log=None)
    config = run.folder / "config.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), "image_size": 40}))
    with pytest.raises(cnnlab.CnnlabError, match=r"trained on 32px .*set image_size: 32 there to resume it"):
        cnnlab.train(resume=run.folder, epochs=2, progress=False, log=None)
