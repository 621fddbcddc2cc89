"""make_gif.py: one frame per grid, in numeric epoch order, with --every and the one-line errors."""
import pytest
from PIL import Image

import make_gif
from torch_utils.images import HEADER


def colour(epoch):
    """A solid colour per epoch, far apart for neighbouring epochs so that GIF quantization keeps them apart."""
    return ((epoch * 37) % 256, (epoch * 91 + 60) % 256, (epoch * 151 + 120) % 256)


def write_grids(folder, epochs, digits=3, size=(68, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    for epoch in epochs:
        Image.new("RGB", size, colour(epoch)).save(folder / f"{epoch:0{digits}d}.png")


def frame_colours(path):
    """The colour of each frame's body (below the caption strip), read back frame by frame."""
    colours = []
    with Image.open(path) as gif:
        for i in range(gif.n_frames):
            gif.seek(i)
            rgb = gif.convert("RGB")
            colours.append(rgb.getpixel((rgb.width // 2, HEADER + (rgb.height - HEADER) // 2)))
    return colours


def close(a, b):
    return all(abs(x - y) <= 8 for x, y in zip(a, b))


def assert_epochs(path, epochs):
    colours = frame_colours(path)
    assert len(colours) == len(epochs)
    for got, epoch in zip(colours, epochs):
        assert close(got, colour(epoch)), f"frame of epoch {epoch}: {got}, expected {colour(epoch)}"


@pytest.mark.parametrize("count", [1, 2, 10, 100])
def test_one_frame_per_grid_in_epoch_order(tmp_path, count):
    write_grids(tmp_path / "output", range(count))
    (tmp_path / "output" / "notes.txt").write_text("not a grid")
    make_gif.main(["--input", str(tmp_path / "output"), "--output", str(tmp_path / "p.gif")])
    assert_epochs(tmp_path / "p.gif", list(range(count)))
    with Image.open(tmp_path / "p.gif") as gif:
        assert gif.info["loop"] == 0


def test_numeric_order_past_999(tmp_path):
    # 998.png, 999.png, 1000.png, 1001.png: a name sort would put 1000 and 1001 first.
    write_grids(tmp_path / "output", [998, 999])
    write_grids(tmp_path / "output", [1000, 1001], digits=4)
    make_gif.main(["--input", str(tmp_path / "output"), "--output", str(tmp_path / "p.gif")])
    assert_epochs(tmp_path / "p.gif", [998, 999, 1000, 1001])


def test_every_keeps_the_last(tmp_path):
    write_grids(tmp_path / "output", range(10))
    make_gif.main(["--input", str(tmp_path / "output"), "--output", str(tmp_path / "p.gif"), "--every", "4"])
    assert_epochs(tmp_path / "p.gif", [0, 4, 8, 9])
    make_gif.main(["--input", str(tmp_path / "output"), "--output", str(tmp_path / "q.gif"), "--every", "3"])
    assert_epochs(tmp_path / "q.gif", [0, 3, 6, 9])


def test_default_keeps_at_most_100_frames(tmp_path):
    grids = [(epoch, f"{epoch:03d}.png") for epoch in range(500)]
    kept = make_gif.keep_every(grids, None)
    assert len(kept) <= 100 and kept[0] == grids[0] and kept[-1] == grids[-1]
    assert make_gif.keep_every(grids[:100], None) == grids[:100]


def test_frames_are_shrunk_and_captioned(tmp_path):
    write_grids(tmp_path / "output", range(3), size=(680, 694))
    make_gif.main(["--input", str(tmp_path / "output"), "--output", str(tmp_path / "p.gif"), "--fps", "5"])
    with Image.open(tmp_path / "p.gif") as gif:
        assert gif.size == (340, 347 + HEADER)
        assert gif.info["duration"] == 200
        gif.seek(0)
        caption = gif.convert("RGB").crop((0, 0, 340, HEADER))
        # The caption strip is white with dark text on it.
        assert min(low for low, _ in caption.getextrema()) < 100


def oversized_grid(folder):
    """A 15,000 x 15,000 grid, past Pillow's limit against decompression bombs (1 bit a pixel: 28 MB to write)."""
    folder.mkdir()
    Image.new("1", (15_000, 15_000)).save(folder / "000.png")


@pytest.mark.parametrize("setup, flags, message", [
    (lambda d: None, [], "is not a folder"),
    (oversized_grid, [], "cannot read grid"),
    (lambda d: d.mkdir(), [], "holds no epoch grids"),
    (lambda d: write_grids(d, [0]), ["--every", "0"], "--every must be at least 1, got 0"),
    (lambda d: write_grids(d, [0]), ["--fps", "100"], "--fps must be"),
])
def test_one_line_errors(tmp_path, capsys, setup, flags, message):
    setup(tmp_path / "output")
    with pytest.raises(SystemExit) as exit:
        make_gif.main(["--input", str(tmp_path / "output"), "--output", str(tmp_path / "p.gif"), *flags])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "p.gif").exists()
