"""Image files for `bioengine infer`: read TIFF (OME-TIFF, multi-page stacks), PNG and `.npy`,
map the file's axes onto a model input's axes, and write outputs as TIFF or `.npy`.

A file's axes come from the file where it says them (OME-TIFF / ImageJ metadata: `ZYX`, `CYX`),
from its layout otherwise (PNG: `yx` or `yxc`; a 2D array: `yx`), and from `--axes` when a
3D stack could be either channels or z-slices for the model at hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TIFF = (".tif", ".tiff")
PNG = (".png",)
KNOWN = "bczyx"


class ImageFileError(ValueError):
    """A file that cannot be read or mapped; the message names the file and the axis."""


def read_image(path: str | Path) -> tuple[np.ndarray, str | None]:
    """The array in `path` and the axes its metadata states (lower-case letters, or None)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file():
        raise ImageFileError(f"{p}: no such file")
    try:
        if suffix == ".npy":
            return np.load(p, allow_pickle=False), None
        if suffix in TIFF:
            import tifffile

            with tifffile.TiffFile(p) as tif:
                series = tif.series[0]
                arr = series.asarray()
                axes = series.axes.lower().replace("s", "c").replace("i", "?").replace("q", "?")
            return arr, None if "?" in axes else axes
        if suffix in PNG:
            from PIL import Image

            with Image.open(p) as img:
                arr = np.asarray(img)
            return arr, "yx" if arr.ndim == 2 else "yxc"
    except (OSError, ValueError) as exc:
        raise ImageFileError(f"{p}: not a readable {suffix} file ({exc})") from None
    raise ImageFileError(f"{p}: unsupported file type {suffix!r} (use .tif, .png or .npy)")


def map_axes(
    arr: np.ndarray, file_axes: str | None, model_axes: list[str], *, name: str, model: str
) -> np.ndarray:
    """`arr` (with `file_axes`, e.g. 'zyx') rearranged to `model_axes` (e.g. batch, channel, y,
    x): missing batch/channel axes are added with size 1; an axis the model lacks is an error."""
    model_letters = "".join(_letter(a) for a in model_axes)
    if file_axes is None:
        file_axes = _guess(arr, model_letters, name=name, model=model)
    file_axes = file_axes.lower()
    if len(file_axes) != arr.ndim or len(set(file_axes)) != arr.ndim:
        raise ImageFileError(
            f"input '{name}': axes {file_axes!r} do not fit the file's {arr.ndim} dimensions "
            f"{list(arr.shape)}; give --axes with one letter per dimension (b, c, z, y, x)"
        )
    for letter, size in zip(file_axes, arr.shape, strict=True):
        if letter not in model_letters and size != 1:
            raise ImageFileError(
                f"model '{model}' input '{name}' has no axis {letter!r} (its axes: "
                f"{', '.join(model_axes)}), but the file has {size} along it"
            )
    keep = [i for i, letter in enumerate(file_axes) if letter in model_letters]
    arr = arr.squeeze(axis=tuple(i for i in range(arr.ndim) if i not in keep))
    present = "".join(file_axes[i] for i in keep)
    for letter in model_letters:
        if letter not in present:
            if letter in "zyx":
                raise ImageFileError(
                    f"model '{model}' input '{name}' needs axis {letter!r}; the file has "
                    f"{present!r} (give --axes if the file's axes are named differently)"
                )
            arr = arr[..., None]
            present += letter
    return np.ascontiguousarray(np.transpose(arr, [present.index(c) for c in model_letters]))


def _letter(axis: str) -> str:
    axis = axis.lower()
    return {"batch": "b", "channel": "c", "index": "c"}.get(axis, axis[:1])


def _guess(arr: np.ndarray, model_letters: str, *, name: str, model: str) -> str:
    """Axes of a file that does not say them: the trailing ones are y, x; a third is z for a
    3D model, c otherwise; more need --axes."""
    if arr.ndim == len(model_letters):
        return model_letters
    if arr.ndim == 2:
        return "yx"
    if arr.ndim == 3:
        return "zyx" if "z" in model_letters else "cyx"
    raise ImageFileError(
        f"input '{name}': a {arr.ndim}-dimensional file {list(arr.shape)} for model '{model}' "
        f"(axes {model_letters}): give --axes, e.g. --axes czyx"
    )


def write_image(path: str | Path, arr: np.ndarray, model_axes: list[str]) -> None:
    """Save an output: `.npy` as it is; `.tif` with its axes (batch of 1 dropped) in the
    ImageJ/OME metadata tifffile writes."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        np.save(p, arr)
        return
    if suffix not in TIFF:
        raise ImageFileError(f"{p}: write outputs as .tif or .npy")
    import tifffile

    letters = "".join(_letter(a) for a in model_axes)
    if "b" in letters and arr.shape[letters.index("b")] == 1:
        arr = arr.squeeze(axis=letters.index("b"))
        letters = letters.replace("b", "")
    tifffile.imwrite(p, arr, metadata={"axes": letters.upper().replace("B", "T")})


__all__ = ["ImageFileError", "map_axes", "read_image", "write_image"]
