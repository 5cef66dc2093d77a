"""A trained model that leaves cnnlab: ONNX (run by onnxruntime, or any ONNX runtime) or TorchScript.

The exported graph takes what a decoder gives: uint8 RGB images, (N, 3, S, S) with any N, decoded as the
checkpoint's preprocessing says (resized to S x S, or its centre crop; bilinear or bicubic). The normalisation and
the mirror-image test-time augmentation (when the run used it) are inside the graph, so its logits are those of
`cnnlab predict`. The class names and the preprocessing travel inside the file: ONNX `metadata_props`
(`cnnlab.classes`, `cnnlab.preprocess`, ... as JSON), TorchScript's extra file `cnnlab.json`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from . import __version__
from .errors import CnnlabError
from .evaluate import as_image_list, load_model, predict_images
from .io import atomic_write, sha256_of
from .preprocess import Preprocess

FORMATS = ("onnx", "torchscript")
INPUT = ("uint8 RGB images (N, 3, S, S), S = preprocess.image_size, decoded as preprocess.crop and "
         "preprocess.interpolation say; normalisation and test-time augmentation are inside the graph")


class Deployable(nn.Module):
    """uint8 images -> logits: the checkpoint's normalisation, its model, and its flip TTA, as one module."""

    def __init__(self, model: nn.Module, pre: Preprocess, tta: bool):
        super().__init__()
        self.model, self.tta = model, tta
        std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1) * 255
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.register_buffer("gain", 1 / std)
        self.register_buffer("offset", -mean / std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * self.gain + self.offset
        logits = self.model(x).float()
        if self.tta:
            logits = (logits + self.model(x.flip(3)).float()) / 2
        return logits


def metadata(loaded: Any, checkpoint: Path) -> dict[str, str]:
    return {"cnnlab.classes": json.dumps(loaded.classes), "cnnlab.preprocess": json.dumps(loaded.pre.to_dict()),
            "cnnlab.tta": json.dumps(bool(loaded.cfg.tta)), "cnnlab.model": loaded.cfg.model,
            "cnnlab.input": INPUT, "cnnlab.checkpoint_sha256": sha256_of(checkpoint),
            "cnnlab.checkpoint_epoch": str(int(loaded.state["epoch"])), "cnnlab.version": __version__}


def export_model(checkpoint: str | Path, out: str | Path | None = None, fmt: str = "onnx") -> Path:
    """Write `checkpoint`'s model as `fmt` (onnx or torchscript) to `out` (default: beside it, model.onnx or
    model.torchscript.pt); returns the path."""
    if fmt not in FORMATS:
        raise CnnlabError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    checkpoint = Path(checkpoint)
    loaded = load_model(checkpoint, torch.device("cpu"))
    module = Deployable(loaded.model.float().to(memory_format=torch.contiguous_format), loaded.pre,
                        loaded.cfg.tta).eval()
    size = loaded.pre.image_size
    example = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    default = checkpoint.parent / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
    path = Path(out) if out else default
    meta = metadata(loaded, checkpoint)
    if fmt == "onnx":
        _export_onnx(module, example, meta, path)
    else:
        extra = {"cnnlab.json": json.dumps(meta)}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is in maintenance: its deprecation notice is not for users
            traced = torch.jit.trace(module, example)
            atomic_write(path, lambda fh: torch.jit.save(traced, fh, _extra_files=extra))
    return path


def check_parity(path: str | Path, checkpoint: str | Path, device: torch.device, images: int = 8, seed: int = 0) -> float:
    """The largest difference between the exported file's logits (onnxruntime on the CPU, or the TorchScript loaded
    back) and the checkpoint's own in PyTorch on `device`, on seeded random images; refused past a tolerance that
    rounding cannot explain (1e-3 of the logits' scale in fp32 on the CPU, 2e-2 on a GPU, whose convolutions may
    use TF32)."""
    path, checkpoint = Path(path), Path(checkpoint)
    loaded = load_model(checkpoint, device)
    size = loaded.pre.image_size
    x = torch.randint(0, 256, (images, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    module = Deployable(loaded.model.float(), loaded.pre, loaded.cfg.tta).to(device).eval()
    with torch.no_grad():
        expected = module(x.to(device)).float().cpu()
    if path.suffix == ".onnx":
        got = torch.from_numpy(OnnxClassifier(path).logits(x.permute(0, 2, 3, 1).numpy()))
    else:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice, as when it was written
            got = torch.jit.load(str(path), map_location="cpu")(x).float()
    difference = float((got - expected).abs().max())
    tolerance = (1e-3 if device.type == "cpu" else 2e-2) * max(1.0, float(expected.abs().max()))
    if not difference <= tolerance:
        raise CnnlabError(f"{path}: its logits differ from {checkpoint}'s in PyTorch on {device} by {difference:.3g} "
                          f"(more than rounding's {tolerance:.1g}): the export is wrong; please report it with the "
                          "checkpoint")
    return difference


def _export_onnx(module: nn.Module, example: torch.Tensor, meta: dict[str, str], path: Path) -> None:
    try:
        import onnx
    except ImportError:
        raise CnnlabError("--format onnx needs the onnx packages: pip install 'cnnlab[onnx]'") from None
    import contextlib
    import io

    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter narrates its steps and warns about its own internals
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), verbose=False)
    proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = f"cnnlab {meta['cnnlab.model']} classifier; input: {INPUT}"
    data = proto.SerializeToString()
    onnx.checker.check_model(onnx.load_from_string(data))
    atomic_write(path, lambda fh: fh.write(data))


class OnnxClassifier:
    """An exported .onnx file run by onnxruntime on the CPU, with the class names and preprocessing it carries."""

    def __init__(self, path: str | Path):
        try:
            import onnxruntime
        except ImportError:
            raise CnnlabError("running an .onnx model needs onnxruntime: pip install 'cnnlab[onnx]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise CnnlabError(f"{self.path} not found: expected a model.onnx that cnnlab export wrote")
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime's own errors (InvalidProtobuf, ...) for a damaged file
            raise CnnlabError(f"{self.path} is not a readable ONNX model ({type(e).__name__}): export it again") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if "cnnlab.classes" not in props:
            raise CnnlabError(f"{self.path} was not written by cnnlab export (no cnnlab.classes in its metadata)")
        self.classes: list[str] = json.loads(props["cnnlab.classes"])
        self.pre = Preprocess.from_dict(json.loads(props["cnnlab.preprocess"]))
        self.metadata = dict(props)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 as the decoder gives them -> (N, classes) float32."""
        x = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 3, 1, 2))
        return self.session.run(["logits"], {"images": x})[0]

    def predict_iter(self, images: Iterable[Any], top: int = 3, batch: int = 64) -> Iterator[dict[str, Any]]:
        """The same entries as `Run.predict_iter`: file, top (class, prob) or error."""
        yield from predict_images(list(images), self.pre, self.classes, self.logits, top, batch)

    def predict(self, images: Any, top: int = 3) -> list[dict[str, Any]]:
        return list(self.predict_iter(as_image_list(images), top))
