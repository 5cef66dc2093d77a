"""Data, in the order it flows: a folder scan and the stratified split (`folders`), the decode-once cache
(`cache`, decoding in `decode` / `decode_gpu`), batches drawn from the cache on the device (`batches`), and the
batch transform that normalises and augments them there (`transform`). `demo` writes a synthetic set and
`download` fetches a real one."""

from .batches import Batches, DeviceCache
from .cache import CachedImages, cache_key, load_images, write_bad_file_report
from .folders import (
    STRONG_IMBALANCE,
    classes_without_images,
    imbalance_ratio,
    list_classes,
    save_split,
    saved_split,
    scan_folder,
    stratified_split,
    strongly_unbalanced,
)
from .transform import ImageTransform

__all__ = ["Batches", "DeviceCache", "CachedImages", "cache_key", "load_images", "write_bad_file_report",
           "classes_without_images", "list_classes", "save_split", "saved_split", "scan_folder", "stratified_split",
           "ImageTransform", "STRONG_IMBALANCE", "imbalance_ratio", "strongly_unbalanced"]
