"""Images the API and the command line accept: PIL images, file paths, raw bytes; folders and globs.

Each input becomes an ``ImageInput``: a name for messages and results, a key (equal for equal images,
so rows about one image share its image stream, mue.models.image_reuse) and a loader that decodes it
when its batch is built. Decoding goes through the readers' decoder (mue.data.readers), so a missing,
corrupt or oversized image is a DataError naming the file.
"""
import glob
import hashlib
import io
import os
from dataclasses import dataclass
from typing import Callable, List, Sequence

from PIL import Image

from mue.data.readers import DataError, _open_rgb
from mue.errors import OptionError

#: what a folder given on the command line is searched for
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageInput:
    name: str
    key: str
    loader: Callable[[], Image.Image]

    def load(self) -> Image.Image:
        """The image as PIL RGB; DataError naming the input if it cannot be decoded."""
        return self.loader()


def image_input(obj, index: int) -> ImageInput:
    """``obj`` (a PIL image, a path, or bytes) as an ImageInput; ``index`` names in-memory inputs."""
    if isinstance(obj, ImageInput):
        return obj
    if isinstance(obj, Image.Image):
        digest = hashlib.sha1(f"{obj.mode}{obj.size}".encode() + obj.tobytes()).hexdigest()
        return ImageInput(f"<image {index}>", "pil:" + digest, lambda: obj.convert("RGB"))
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        name = f"<bytes {index}>"
        return ImageInput(name, "bytes:" + hashlib.sha1(data).hexdigest(),
                          lambda: _open_rgb(io.BytesIO(data), name, "the image", f"{name}: cannot decode the image"))
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        if not os.path.isfile(path):
            raise DataError(f"{path}: image file not found")
        stat = os.stat(path)
        key = f"file:{os.path.realpath(path)}:{stat.st_size}:{stat.st_mtime_ns}"
        return ImageInput(path, key, lambda: _open_rgb(path, path, "the image", f"{path}: cannot read the image"))
    raise OptionError(f"an image must be a PIL image, a file path or bytes; got {type(obj).__name__}")


def image_inputs(images) -> List[ImageInput]:
    """One input or a sequence of them (a single PIL image, path or bytes object counts as one)."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, ImageInput)):
        images = [images]
    return [image_input(obj, i) for i, obj in enumerate(images)]


def expand_paths(patterns: Sequence[str]) -> List[str]:
    """Command-line image arguments -> files: a file as given, a folder's image files (by extension,
    sorted), a glob's matches (sorted). Anything that names no image is a DataError."""
    files = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(pattern, f)))
            if not found:
                raise DataError(f"{pattern}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif glob.has_magic(pattern):
            found = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
            if not found:
                raise DataError(f"{pattern}: no file matches")
            files += found
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise DataError(f"{pattern}: image file not found")
    return files
