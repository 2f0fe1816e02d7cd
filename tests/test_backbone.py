"""The pretrained network: built without torch, numerically right, classifies ImageNet-like fruit."""

from __future__ import annotations

import glob
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from canestra.vision import backbone
from canestra.vision.weights import load_state_dict

# ImageNet-1k indices of fruit/vegetable classes that Fruits-360 also has.
IMAGENET = {"Banana": 954, "Orange": 950, "Lemon": 951, "Strawberry": 949, "Apple Granny Smith": 948,
            "Pomegranate": 957, "Pepper Red": 945, "Cauliflower": 938, "Pineapple": 953}


def _load(folder):
    return [np.asarray(Image.open(f).convert("RGB")) for f in sorted(glob.glob(f"{folder}/*.jpg"))]


def test_weights_read_without_torch_have_expected_shapes():
    sd = load_state_dict(backbone.weights_path())
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_conv_head.weight"].dtype == np.float32


def test_weights_reader_refuses_code_in_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {}):
            pickle.dump(obj, fh)
        pickle.dump({"w": Evil()}, fh)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_state_dict(str(path))


def test_fruit_images_get_their_imagenet_class(sample_dir):
    """Not just 'it loads': real fruit photos land on the right ImageNet class."""
    top1 = top5 = n = 0
    for cls, idx in IMAGENET.items():
        folder = sample_dir / cls
        if not folder.is_dir():
            continue
        images = _load(folder)[::4]
        _, logits = backbone.embed(images, (224,), threads=2, with_logits=True)
        order = np.argsort(-logits, axis=1)
        top1 += int((order[:, 0] == idx).sum())
        top5 += int((order[:, :5] == idx).any(axis=1).sum())
        n += len(images)
    assert n >= 40
    assert top5 / n >= 0.9, f"top-5 ImageNet hit rate {top5 / n:.2f}"
    assert top1 / n >= 0.7, f"top-1 ImageNet hit rate {top1 / n:.2f}"


def test_preprocessing_is_pinned_inside_the_graph():
    """Feeding uint8 pixels is the only way in: the graph does (x-127)/128 itself."""
    import onnx

    model = onnx.load(backbone.default_model_path())
    inp = model.graph.input[0]
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    assert float(inits["mean"]) == 127.0 and abs(float(inits["inv_std"]) - 1 / 128) < 1e-9


def test_embeddings_are_batch_independent_and_size_concatenates(sample_dir):
    images = _load(sample_dir / "Banana")[:5]
    one_by_one = np.concatenate([backbone.embed([im], (100,)) for im in images])
    batched = backbone.embed(images, (100,))
    np.testing.assert_allclose(one_by_one, batched, rtol=1e-4, atol=1e-4)
    both = backbone.embed(images, (100, 224))
    assert both.shape == (5, 2 * backbone.FEATURE_DIM)
    np.testing.assert_allclose(both[:, : backbone.FEATURE_DIM], batched, rtol=1e-4, atol=1e-4)


def test_onnx_graph_matches_the_torch_reference():
    torch = pytest.importorskip("torch")
    effnet = pytest.importorskip("efficientnet_lite_pytorch")
    net = effnet.EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(backbone.weights_path(), map_location="cpu"))
    net.eval()
    x = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    feats, logits = backbone.embed(list(x), (224,), with_logits=True)
    xt = torch.from_numpy(((x.astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2))
    with torch.no_grad():
        ref = net(xt).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-3)


def test_block_table_is_read_from_the_weights():
    assert backbone.blocks_of(load_state_dict(backbone.weights_path())) == [tuple(b) for b in backbone.BLOCKS]


def test_a_deeper_and_wider_lite_builds_and_matches_torch():
    """Lite2 (more blocks per stage, wider layers): the same builder, the block table read from the weights."""
    torch = pytest.importorskip("torch")
    effnet = pytest.importorskip("efficientnet_lite_pytorch")
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = effnet.EfficientNet.from_name("efficientnet-lite2")
    net.eval()
    sd = {k: v.numpy() for k, v in net.state_dict().items()}
    assert [b[0] for b in backbone.blocks_of(sd)] == [1, 3, 3, 4, 4, 5, 1]
    sess = onnxruntime.InferenceSession(backbone.build_onnx(sd).SerializeToString())
    x = np.random.default_rng(0).integers(0, 256, (2, 96, 96, 3), dtype=np.uint8)
    logits, block = sess.run(["logits", "block"], {"image": x})
    inp = torch.from_numpy(((x.astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2))
    with torch.no_grad():
        ref = net(inp).numpy()
        # the block output: the last block's output, before the head convolution, average-pooled
        h = net._swish(net._bn0(net._conv_stem(inp)))
        for b in net._blocks:
            h = b(h)
        ref_block = h.mean(dim=(2, 3)).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-3)
    assert block.shape == (2, sd["_conv_head.weight"].shape[1])  # Lite2's last block: 352 channels
    np.testing.assert_allclose(block, ref_block, atol=1e-3)


def test_int8_graph_is_cached_close_to_fp32_and_still_knows_fruit(sample_dir, tmp_path, monkeypatch):
    """--precision int8: built once from the shipped calibration images, embeddings near fp32."""
    monkeypatch.setenv("CANESTRA_CACHE_DIR", str(tmp_path))
    path = backbone.model_path("int8")
    assert path.startswith(str(tmp_path)) and path.endswith(".onnx") and "int8" in path
    assert backbone.model_path("int8") == path  # cached: no second quantization
    images = [im for cls in IMAGENET for im in _load(sample_dir / cls)[::8] if (sample_dir / cls).is_dir()]
    fp32, logits32 = backbone.embed(images, (160,), backbone.model_path("fp32"), with_logits=True)
    int8, logits8 = backbone.embed(images, (160,), path, with_logits=True)
    cosine = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.mean() > 0.97 and cosine.min() > 0.9, cosine
    assert (logits32.argmax(1) == logits8.argmax(1)).mean() >= 0.8
    with pytest.raises(Exception, match="precision 'fp16' is not one of fp32, int8"):
        backbone.model_path("fp16")


def test_auto_precision_is_int8_only_where_the_cpu_has_vnni(monkeypatch):
    """The default precision: int8 where it is ~2x faster (VNNI), fp32 where int8 is 3-6x slower."""
    monkeypatch.setenv("CANESTRA_INT8_VNNI", "1")
    assert backbone.resolve_precision("auto") == "int8"
    monkeypatch.setenv("CANESTRA_INT8_VNNI", "0")
    assert backbone.resolve_precision("auto") == "fp32"
    assert backbone.resolve_precision("int8") == "int8" and backbone.resolve_precision("fp32") == "fp32"


@pytest.mark.slow
def test_four_processes_build_the_int8_graph_at_once_into_an_empty_cache(tmp_path):
    """The old race: Spark workers quantizing at once deleted each other's temporary file."""
    import subprocess
    import sys

    env = dict(os.environ, CANESTRA_CACHE_DIR=str(tmp_path / "cache"))
    code = "from canestra.vision import backbone; print(backbone.model_path('int8'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1 and os.path.isfile(paths.pop())
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    # The graphs, their build locks and digests (checked on load): no temporary file left behind.
    assert all(n.endswith((".onnx", ".onnx.lock", ".onnx.sha256")) for n in left), left
    assert sum(n.endswith(".onnx.sha256") for n in left) == 2, left  # fp32 and int8
