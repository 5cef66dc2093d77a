"""What turns an image file into model input: the geometry of the decode (size, crop, interpolation: applied
once, into the cache) and the normalisation (mean, std: applied to every batch). A model's construction returns
one (from its weights' metadata where it has any); every checkpoint stores it, so evaluate, predict and explain
use exactly what training used."""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass
class Preprocess:
    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # 0: the whole image squashed to a square (like the reference Resize((s, s))); c in (0, 1]: the central square
    # of side c * the shorter side, resized to s (ImageNet weights' "resize to s / c, centre crop s")
    crop: float = 0.0
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std), "crop": self.crop,
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]), float(d.get("crop", 0.0)),
                   str(d.get("interpolation", "bilinear")))

    def describe(self) -> str:
        geometry = f"centre crop {self.crop:g}" if self.crop else "squashed to a square"
        mean = ",".join(f"{v:g}" for v in self.mean)
        std = ",".join(f"{v:g}" for v in self.std)
        return f"{self.image_size}px {geometry}, {self.interpolation}, mean {mean}, std {std}"
