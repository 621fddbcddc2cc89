"""The generator's progress as one animation (GIF, WebP or APNG): the per-epoch grids that train_gan.py writes,
in epoch order.

    python make_gif.py                                       # output/NNN.png -> progress.gif
    python make_gif.py --input run1/output --output run1.gif --every 5 --fps 15
    python make_gif.py --output progress.webp                # animated WebP; .png or .apng: animated PNG

Grid NNN.png (NNN the 0-based epoch index, zero-padded to 3 or more digits) becomes a frame captioned
"epoch NNN+1", the count the trainers print. Frames are shrunk to --width pixels, hold their own 256-colour
palette, and are at most 100 unless --every says otherwise, which keeps 500 epochs at a size a browser or a
slide shows (about 10 MB); the GIF loops forever and rests a moment on the last frame.
"""
import argparse
import os

import imageio.v3 as iio
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from torch_utils.cli import UserError, check_range, run_main
from torch_utils.files import atomic_write, output_file
from torch_utils.images import HEADER, epoch_grids

LAST_FRAME_MS = 2000  # time to look at the final grid before the loop starts over
# Generated grids hardly compress (about 120 KB a frame at 340 pixels), so by default 500 epochs become 85
# frames (every 6th), about 10 MB, rather than 60 MB.
MAX_FRAMES = 100
# The animated formats --output may name, by extension, that imageio writes through Pillow (a video such as .mp4
# would need ffmpeg; converting the GIF is one command).
ANIMATIONS = (".gif", ".webp", ".png", ".apng")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default="output", help="folder of the per-epoch grids NNN.png (default: output)")
    parser.add_argument("--output", default="progress.gif",
                        help=f"the animation to write, in the format of its extension: {', '.join(ANIMATIONS)} "
                             "(APNG) (default: progress.gif)")
    parser.add_argument("--fps", type=float, default=10, help="frames per second, at most 50 (default: 10)")
    parser.add_argument("--every", type=int, metavar="K",
                        help="keep every K-th epoch (epochs 1, K+1, 2K+1, ...) and always the last (default: the "
                             f"smallest K that keeps at most {MAX_FRAMES} frames: 1 up to {MAX_FRAMES} epochs, "
                             f"6 for 500)")
    parser.add_argument("--width", type=int, default=340,
                        help="frame width in pixels; wider grids are shrunk to it (default: 340, one pixel per "
                             "image pixel for a 10-column grid of 32x32 images)")
    return parser.parse_args(argv)


def check_args(args):
    extension = os.path.splitext(args.output)[1].lower()
    if extension not in ANIMATIONS:
        raise UserError(f"--output {args.output}: the extension picks the format; make_gif.py writes "
                        f"{', '.join(ANIMATIONS)} (for a video: ffmpeg -i progress.gif progress.mp4)")
    # GIF delays are whole hundredths of a second, and browsers slow anything under 2 of them.
    check_range(args, "fps", 0, 50, low_open=True)
    check_range(args, "every", 1)
    check_range(args, "width", 16, 4096)
    output_file(args.output, "--output")


def keep_every(grids, k):
    """Every k-th grid from the first, plus the last; k=None: the smallest k keeping at most MAX_FRAMES."""
    k = k or max(1, -(-(len(grids) - 1) // (MAX_FRAMES - 1)))
    kept = grids[::k]
    return kept if kept[-1] == grids[-1] else kept + [grids[-1]]


def frame(path, epoch, width):
    """The grid at path, shrunk to width, under a caption strip naming the epoch, as an RGB array."""
    try:
        with Image.open(path) as image:
            grid = image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # what Pillow raises for a bad image
        raise UserError(f"cannot read grid {path}: {e}")
    if grid.width > width:
        grid = grid.resize((width, round(grid.height * width / grid.width)), Image.LANCZOS)
    canvas = Image.new("RGB", (grid.width, grid.height + HEADER), "white")
    canvas.paste(grid, (0, HEADER))
    ImageDraw.Draw(canvas).text((4, 1), f"epoch {epoch + 1}", fill="black", font=ImageFont.load_default())
    return np.asarray(canvas)


def write_gif(frames, path, fps):
    duration = round(1000 / fps)
    durations = [duration] * (len(frames) - 1) + [max(duration, LAST_FRAME_MS)]
    # Pillow, behind imageio, writes the format of the extension; in a GIF each frame has its own adaptive
    # 256-colour palette. An APNG is a PNG to Pillow.
    extension = os.path.splitext(path)[1].lower().replace(".apng", ".png")
    content = iio.imwrite("<bytes>", np.stack(frames), extension=extension, loop=0,
                          duration=durations if len(frames) > 1 else durations[0])
    atomic_write(path, content, hint="choose another --output")


def make_gif(args):
    check_args(args)
    grids = keep_every(epoch_grids(args.input), args.every)
    frames = [frame(path, epoch, args.width) for epoch, path in grids]
    for (epoch, path), image in zip(grids, frames):
        if image.shape != frames[0].shape:
            raise UserError(f"{path} is {image.shape[1]}x{image.shape[0]} pixels, {grids[0][1]} "
                            f"{frames[0].shape[1]}x{frames[0].shape[0]}: grids of one run have one size; is "
                            f"--input {args.input} mixing runs?")
    write_gif(frames, args.output, args.fps)
    size_mb = os.path.getsize(args.output) / 1e6
    print(f"wrote {args.output}: {len(frames)} frames (epochs {grids[0][0] + 1} to {grids[-1][0] + 1}), "
          f"{size_mb:.1f} MB")


def main(argv=None):
    args = parse_args(argv)
    run_main(lambda: make_gif(args))


if __name__ == "__main__":
    main()
