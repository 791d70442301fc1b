"""`vlprompt.prediction.predictor`: inputs (paths, folders, PIL images, tensors), probabilities against a hand computation,
unreadable files, class lists."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from support import FIXTURES, needs_fixtures

from vlprompt.backbone.transforms import EvalTransform, load_image
from vlprompt.errors import ConfigError, DatasetError
from vlprompt.methods.zeroshot import encode_prompts
from vlprompt.prediction.predictor import Predictor, expand_inputs, parse_classnames, read_classes_file

CLASSES = ["banded", "blotchy", "braided", "bubbly", "bumpy"]


@pytest.fixture(scope="module")
def predictor(clip):
    return Predictor.zero_shot(clip, CLASSES, template="{} texture.", precision="fp32")  # compared with fp32 below


@pytest.fixture(scope="module")
def images() -> list[Path]:
    if not FIXTURES.is_dir():
        pytest.skip("fixtures (../shared) absent")
    return sorted((FIXTURES / "dtd" / "images" / "banded").iterdir())[:3]


def test_probabilities_match_a_hand_computation(clip, predictor, images):
    predictions = predictor.predict(images, top_k=5)
    pixels = torch.stack([EvalTransform(clip.config.image_resolution)(load_image(p)) for p in images])
    with torch.no_grad():
        image = F.normalize(clip.encode_image(pixels).float(), dim=-1)
        text = encode_prompts(clip, [f"{name} texture." for name in CLASSES])
        expected = (clip.logit_scale.exp() * image @ text.t()).softmax(dim=1)
    for prediction, row, path in zip(predictions, expected, images):
        assert prediction.source == str(path)
        order = row.argsort(descending=True).tolist()
        assert list(prediction.labels) == [CLASSES[i] for i in order]
        # fp32 rounding of the text tower's two paths (trimmed batch vs single prompts): ~1e-7 relative
        assert torch.allclose(torch.tensor(prediction.probs), row[order], atol=1e-5)
        assert prediction.label == prediction.labels[0] and prediction.prob == prediction.probs[0]
        assert abs(sum(prediction.probs) - 1.0) < 1e-5


def test_inputs_paths_pil_and_tensors(predictor, images):
    by_path = predictor.predict(images[0], top_k=2)
    by_pil = predictor.predict([Image.open(images[0])], top_k=2)
    assert by_pil[0].source == "<image 0>"
    assert by_pil[0].labels == by_path[0].labels and by_pil[0].probs == by_path[0].probs  # same decoding: exact
    with Image.open(images[0]) as opened:
        tensor = torch.from_numpy(np.asarray(opened.convert("RGB")).copy()).permute(2, 0, 1)  # uint8 [3, H, W]
    by_tensor = predictor.predict(tensor, top_k=2)
    batch = predictor.predict(torch.stack([tensor, tensor]), top_k=2)
    assert len(batch) == 2 and batch[1].source == "<image 1>"
    # the tensor transform differs from PIL's by PIL's uint8 rounding only (<= 1.125/255 per pixel): with a random
    # tiny CLIP that moves probabilities by well under 1e-2
    assert torch.allclose(torch.tensor(by_tensor[0].probs), torch.tensor(by_path[0].probs), atol=1e-2)
    # a batch of two vs one image: another matrix-multiply blocking, fp32 rounding only
    assert torch.allclose(torch.tensor(batch[0].probs), torch.tensor(by_tensor[0].probs), atol=1e-6)
    with pytest.raises(DatasetError, match=r"must be \[3, H, W\]"):
        predictor.predict(torch.zeros(4, 8, 8))
    with pytest.raises(ConfigError, match="cannot predict on a int"):
        predictor.predict([3])
    with pytest.raises(DatasetError, match="no images given"):
        predictor.predict([])
    with pytest.raises(ConfigError, match="top_k"):
        predictor.predict(images[0], top_k=0)


@needs_fixtures
def test_folders_expand_recursively_sorted_without_hidden_files(tmp_path):
    source = FIXTURES / "dtd" / "images" / "banded"
    (tmp_path / "b" / "inner").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for target in ("b/z.jpg", "b/inner/a.jpg", "a.jpg", ".hidden/x.jpg", "b/.dot.jpg"):
        shutil.copy(next(source.iterdir()), tmp_path / target)
    (tmp_path / "notes.txt").write_text("not an image", encoding="utf-8")
    assert expand_inputs(tmp_path) == [str(tmp_path / "a.jpg"), str(tmp_path / "b" / "inner" / "a.jpg"),
                                       str(tmp_path / "b" / "z.jpg")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no image files"):
        expand_inputs([tmp_path / "empty"])


def test_unreadable_images_are_named_or_skipped(predictor, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    with pytest.raises(DatasetError, match=r"1 of 3 images cannot be read: .*broken\.png"):
        predictor.predict([images[0], broken, images[1]])
    report = predictor.predict_report([images[0], broken, images[1]], top_k=1, skip_bad=True)
    assert [p.source for p in report.predictions] == [str(images[0]), str(images[1])]
    assert [source for source, _ in report.skipped] == [str(broken)]
    assert report.to_dict()["skipped"][0]["image"] == str(broken)
    with pytest.raises(DatasetError, match="none of the 1 images"):
        predictor.predict_report([broken], skip_bad=True)


def test_top_k_is_capped_by_the_class_count(clip, images):
    two = Predictor.zero_shot(clip, "cat, dog")
    prediction = two.predict(images[0], top_k=5)[0]
    assert sorted(prediction.labels) == ["cat", "dog"]
    ensemble = Predictor.zero_shot(clip, ["cat", "dog"], templates=["a photo of a {}.", "a drawing of a {}."])
    assert ensemble.method.method_name == "ensemble"
    assert len(ensemble.predict(images[0], top_k=1)[0].labels) == 1


def test_class_lists(tmp_path, clip):
    assert parse_classnames(" cat, dog ,bird ") == ["cat", "dog", "bird"]
    assert parse_classnames(["a", " b "]) == ["a", "b"]
    with pytest.raises(ConfigError, match="class list is empty"):
        parse_classnames(" , ")
    with pytest.raises(ConfigError, match="class list is empty"):
        Predictor.zero_shot(clip, [])
    names = tmp_path / "names.txt"
    names.write_text("# header\ncat\n\n  sea lion  \n", encoding="utf-8")
    assert read_classes_file(names) == ["cat", "sea lion"]
    (tmp_path / "blank.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no class names"):
        read_classes_file(tmp_path / "blank.txt")
    with pytest.raises(ConfigError, match="cannot read"):
        read_classes_file(tmp_path / "absent.txt")
    with pytest.raises(ConfigError, match="Predictor needs a vlprompt method"):
        Predictor(object())


def test_auto_precision_is_resolved_on_construction(clip, tmp_path, monkeypatch):
    import vlprompt.common.precision as prec

    monkeypatch.setenv("VLPROMPT_CACHE", str(tmp_path / "cache"))
    prec.measured_choice("cpu", probe=lambda device: {"fp32_s": 2.0, "bf16_s": 1.0})  # this "machine": bf16 faster
    assert Predictor.zero_shot(clip, CLASSES).precision == "bf16"  # the default is auto, as training and evaluation
    assert Predictor.zero_shot(clip, CLASSES, precision="fp32").precision == "fp32"
    with pytest.raises(ConfigError, match="precision"):
        Predictor.zero_shot(clip, CLASSES, precision="fp64")
