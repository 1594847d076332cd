"""The DINO and CLIP backends preprocess as transformers' image processors do: their features equal those of
transformers' ViTImageProcessor (facebook/dino-vits16's settings) and CLIPImageProcessor followed by the same model,
on images of non-square sizes (so the resize and the crop matter); a weights folder's own preprocessor_config.json
(as transformers writes it, or dino-vits16's legacy file) is followed, a missing one is warned about, and settings
that are not applied are refused. Tiny random-weight models built from configs."""
import numpy as np
import pytest
import torch

from ldm.evaluation.backends import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EvaluationError, get_backend

transformers = pytest.importorskip("transformers")
from transformers.image_utils import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN,  # noqa: E402
                                      OPENAI_CLIP_STD, PILImageResampling)

# facebook/dino-vits16's preprocessor_config.json (ViTFeatureExtractor): resample 2 (bilinear), size 224, ImageNet
# mean/std, no centre crop. At the tiny model's image size:
DINO_PROCESSOR = dict(do_resize=True, size={"height": 32, "width": 32}, resample=PILImageResampling.BILINEAR,
                      do_rescale=True, do_normalize=True, image_mean=list(IMAGENET_DEFAULT_MEAN),
                      image_std=list(IMAGENET_DEFAULT_STD))


def photos():
    """uint8 images of two non-square sizes (landscape, portrait), as a user's files would be."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randint(0, 256, (3, 3, 45, 71), dtype=torch.uint8, generator=g)
    tall = torch.randint(0, 256, (2, 3, 90, 37), dtype=torch.uint8, generator=g)
    return [wide, tall]


def test_protocol_constants_are_transformers():
    assert IMAGENET_MEAN == tuple(IMAGENET_DEFAULT_MEAN) and IMAGENET_STD == tuple(IMAGENET_DEFAULT_STD)
    assert CLIP_MEAN == tuple(OPENAI_CLIP_MEAN) and CLIP_STD == tuple(OPENAI_CLIP_STD)
    clip = transformers.CLIPImageProcessor()  # the defaults of openai/clip-vit-* preprocessor configs
    assert clip.size == {"shortest_edge": 224} and clip.crop_size == {"height": 224, "width": 224}
    assert clip.resample == PILImageResampling.BICUBIC and clip.do_center_crop


def test_dino_features_equal_transformers_processor_and_model(tiny_dino):
    backend = get_backend("dino", str(tiny_dino))
    processor = transformers.ViTImageProcessor(**DINO_PROCESSOR)
    model = transformers.ViTModel.from_pretrained(str(tiny_dino), add_pooling_layer=False).eval()
    for batch in photos():
        pixels = processor(list(batch), return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(backend.preprocess(batch.float() / 255), pixels, rtol=0, atol=1e-5)
        with torch.no_grad():
            expected = model(pixel_values=pixels).last_hidden_state[:, 0]  # the CLS token
        torch.testing.assert_close(backend.image_features(batch.float() / 255), expected, rtol=1e-5, atol=1e-5)


def test_clip_features_equal_transformers_processor_and_model(tiny_clip):
    backend = get_backend("clip", str(tiny_clip))
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model = transformers.CLIPModel.from_pretrained(str(tiny_clip)).eval()
    for batch in photos():
        pixels = processor(list(batch), return_tensors="pt")["pixel_values"]
        assert pixels.shape[-2:] == (32, 32)
        torch.testing.assert_close(backend.preprocess(batch.float() / 255), pixels, rtol=0, atol=1e-5)
        with torch.no_grad():
            expected = model.get_image_features(pixel_values=pixels)
        expected = expected if isinstance(expected, torch.Tensor) else expected.pooler_output
        torch.testing.assert_close(backend.image_features(batch.float() / 255), expected, rtol=1e-5, atol=1e-5)


def test_resize_and_crop_matter(tiny_clip, tiny_dino):
    """The protocols differ from a plain square resize: a centre crop (CLIP) keeps the middle, a squash (DINO) all."""
    clip, dino = get_backend("clip", str(tiny_clip)), get_backend("dino", str(tiny_dino))
    wide = photos()[0].float() / 255
    assert clip.preprocess.resized(45, 71) == (32, 50) and dino.preprocess.resized(45, 71) == (32, 32)
    edges = wide.clone()
    edges[..., :, :10] = 0  # a change in the left margin: cropped away by CLIP, seen by DINO
    torch.testing.assert_close(clip.preprocess(edges), clip.preprocess(wide))
    assert not torch.allclose(dino.preprocess(edges), dino.preprocess(wide))
    assert not np.allclose(clip.image_features(wide).numpy(),
                           clip.image_features(torch.nn.functional.interpolate(wide, size=(32, 32))).numpy())


# ---- the weights folder's own preprocessor_config.json -------------------------------------------------------------
def with_processor(src, dst, processor):
    """A copy of a model folder with `processor`'s preprocessor_config.json, as transformers writes it."""
    import shutil
    shutil.copytree(src, dst)
    processor.save_pretrained(dst)
    return dst


def test_preprocessing_is_read_from_the_weights_folder(tmp_path, tiny_dino, tiny_clip):
    """Settings other than the published weights' (another size, interpolation, crop, mean/std) are followed: the
    features equal transformers' own processor loaded from the same folder, followed by the same model."""
    dino_processor = transformers.ViTImageProcessor(size={"height": 28, "width": 36},
                                                    resample=PILImageResampling.BICUBIC, image_mean=[0.5, 0.4, 0.3],
                                                    image_std=[0.2, 0.3, 0.4])
    clip_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 24},
                                                     resample=PILImageResampling.BILINEAR)
    cases = [("dino", with_processor(tiny_dino, tmp_path / "dino", dino_processor)),
             ("clip", with_processor(tiny_clip, tmp_path / "clip", clip_processor))]
    for name, folder in cases:
        backend, processor = get_backend(name, str(folder)), transformers.AutoImageProcessor.from_pretrained(folder)
        for batch in photos():
            pixels = processor(list(batch), return_tensors="pt")["pixel_values"]
            torch.testing.assert_close(backend.preprocess(batch.float() / 255), pixels, rtol=0, atol=1e-5)
    assert get_backend("dino", str(tmp_path / "dino" / "model.safetensors")).preprocess == \
        get_backend("dino", str(tmp_path / "dino")).preprocess  # a weights file reads the file beside it


def test_legacy_file_missing_file_and_settings_not_applied(tmp_path, tiny_dino, caplog):
    import json
    import shutil
    folder = tmp_path / "dino"
    shutil.copytree(tiny_dino, folder)
    # facebook/dino-vits16's own file, in the legacy feature-extractor format
    legacy = {"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor",
              "image_mean": list(IMAGENET_DEFAULT_MEAN), "image_std": list(IMAGENET_DEFAULT_STD), "resample": 2,
              "size": 32}
    (folder / "preprocessor_config.json").write_text(json.dumps(legacy))
    from_file = get_backend("dino", str(folder)).preprocess
    (folder / "preprocessor_config.json").unlink()
    with caplog.at_level("WARNING"):
        default = get_backend("dino", str(folder)).preprocess
    assert from_file == default  # the default is that file at the model's size
    assert "has no preprocessor_config.json" in caplog.text and str(folder) in caplog.text
    for bad, message in (({**legacy, "resample": 1}, "resample 1 is not supported"),
                         ({**legacy, "do_pad": True}, "asks for do_pad"),
                         ([1, 2], "must hold a JSON object")):
        (folder / "preprocessor_config.json").write_text(json.dumps(bad))
        with pytest.raises(EvaluationError, match=f"'dino' metric's preprocessing: .*{message}"):
            get_backend("dino", str(folder))
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(EvaluationError, match="is not valid JSON"):
        get_backend("dino", str(folder))
