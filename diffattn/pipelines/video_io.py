"""Writing and reading mp4 files (imageio-ffmpeg), atomically.

A video is first written to a hidden temporary file next to its destination and renamed into place
only once ffmpeg has finished, so an interrupted run (Ctrl-C, a crash, a killed job) never leaves a
half-written file under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["to_uint8", "write_video", "read_video"]


def _imageio():
    from .._extras import need

    need("imageio_ffmpeg", "video")  # the ffmpeg binary comes with it
    return need("imageio.v2", "video")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """``[F, H, W, 3]`` float in [0, 1] (or uint8) → uint8, rounding to nearest."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise ValueError(f"frames must be [F, H, W, C] with C in (1, 3, 4), got shape {frames.shape}")
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, quality: int = 9) -> Path:
    """Write ``frames`` (``[F, H, W, 3]`` float in [0, 1] or uint8) to ``path`` as H.264 mp4.

    The file appears under ``path`` only when complete; on any error or interrupt the temporary file
    is removed. Odd frame sizes are stored in full-chroma (yuv444p) so no pixel is cropped or padded.

    Returns:
        ``Path(path)``.
    """
    imageio = _imageio()
    path = Path(path)
    frames = to_uint8(frames)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    frames = frames[..., :3]
    _, h, w, _ = frames.shape
    pix_fmt = "yuv420p" if h % 2 == 0 and w % 2 == 0 else "yuv444p"
    path.parent.mkdir(parents=True, exist_ok=True)
    # same folder (so the rename is atomic), ".mp4" suffix (ffmpeg picks the container from it)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial.mp4")
    try:
        writer = imageio.get_writer(
            tmp, format="FFMPEG", fps=fps, codec="libx264", quality=quality, pixelformat=pix_fmt,
            macro_block_size=1, ffmpeg_log_level="error",
        )
        try:
            for frame in frames:
                writer.append_data(frame)
        finally:
            writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode an mp4 to uint8 ``[F, H, W, 3]``."""
    imageio = _imageio()
    reader = imageio.get_reader(Path(path), format="FFMPEG")
    try:
        frames = [np.asarray(f)[..., :3] for f in reader]
    finally:
        reader.close()
    if not frames:
        raise ValueError(f"{path} has no frames")
    return np.stack(frames)
