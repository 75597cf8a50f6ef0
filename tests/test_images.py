"""Every image a user or a dataset hands us is read the same way: each Pillow mode right
(16-bit scaled, not clipped; transparency on white, or black for masks) and EXIF-upright."""

import numpy as np
import pytest
from PIL import Image

from data.datasets import read_image as read_training_image
from data.images import BLACK, load_image
from data.video import MediaReadError

GRADIENT16 = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (24, 1))
TWIN8 = np.round(GRADIENT16 / 257).astype(np.uint8)


def sixteen_bit(path, big_endian: bool = False):
    """The gradient as a 16-bit greyscale file (PNG: I;16, TIFF: I;16B)."""
    if big_endian:
        image = Image.frombytes("I;16B", (64, 24), GRADIENT16.astype(">u2").tobytes())
    else:
        image = Image.fromarray(GRADIENT16)
    image.save(path)
    return path


@pytest.mark.parametrize("name, big_endian", [("g16.png", False), ("g16.tif", True)])
def test_a_16_bit_reference_reads_as_its_8_bit_twin(tmp_path, name, big_endian):
    from data.media import read_image

    Image.fromarray(TWIN8).save(tmp_path / "g8.png")
    path = sixteen_bit(tmp_path / name, big_endian)
    assert Image.open(path).mode in ("I;16", "I;16B", "I")
    for read in (load_image, read_image):
        wide, narrow = read(path).astype(int), read(tmp_path / "g8.png").astype(int)
        assert wide.shape == (24, 64, 3) and np.abs(wide - narrow).mean() <= 1
        assert wide.min() == 0 and wide.max() == 255  # scaled by the range, not clipped
    training = read_training_image(path, (24, 64))
    twin = read_training_image(tmp_path / "g8.png", (24, 64))
    assert (training - twin).abs().mean() * 127.5 <= 1


def test_32_bit_and_float_images_scale_by_their_range(tmp_path):
    Image.fromarray(GRADIENT16.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I
    assert np.abs(load_image(tmp_path / "i32.tif", "L").astype(int) - TWIN8).max() <= 1
    unit = GRADIENT16.astype(np.float32) / 65535
    Image.fromarray(unit).save(tmp_path / "unit.tif")  # mode F in [0, 1]: as is
    assert np.abs(load_image(tmp_path / "unit.tif", "L").astype(int) - TWIN8).max() <= 1
    Image.fromarray(unit * 40 + 3).save(tmp_path / "metres.tif")  # F elsewhere: its range
    assert np.abs(load_image(tmp_path / "metres.tif", "L").astype(int) - TWIN8).max() <= 1
    exact = load_image(tmp_path / "unit.tif", "L", exact=True)
    assert exact.dtype == np.float32 and np.abs(exact - unit).max() < 1e-6


def modes():
    """(mode, image, expected RGB uint8 on white) for every mode a user can hand in."""
    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :3] = (200, 40, 10)
    rgb[:, 3:] = (0, 90, 250)
    clear = Image.fromarray(np.dstack([rgb, np.full((4, 6), 255, np.uint8)]))
    clear.putpixel((0, 0), (200, 40, 10, 0))  # one fully transparent pixel
    expected = rgb.copy()
    expected[0, 0] = 255
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    palette.info["transparency"] = palette.getpixel((0, 0))  # the top-left colour: clear
    on_white = np.where((rgb == rgb[0, 0]).all(-1, keepdims=True), 255, rgb)
    bits = Image.fromarray(grey > 100)
    cmyk = Image.new("CMYK", (6, 4), (0, 255, 255, 0))
    return {
        "RGB": (Image.fromarray(rgb), rgb),
        "RGBA": (clear, expected),
        "L": (Image.fromarray(grey), np.repeat(grey[..., None], 3, -1)),
        "LA": (clear.convert("LA"), np.repeat(np.asarray(clear.convert("LA"))[..., :1], 3, -1)),
        "P": (palette, on_white),
        "1": (bits, np.repeat(np.where(grey > 100, 255, 0)[..., None], 3, -1).astype(np.uint8)),
        "CMYK": (cmyk, np.broadcast_to(np.uint8([255, 0, 0]), (4, 6, 3))),
    }


@pytest.mark.parametrize("mode", list(modes()))
def test_every_mode_reads_as_its_picture(tmp_path, mode):
    image, expected = modes()[mode]
    suffix = ".tif" if mode == "CMYK" else ".png"
    image.save(tmp_path / f"image{suffix}")
    with Image.open(tmp_path / f"image{suffix}") as saved:
        assert saved.mode == mode
    got = load_image(tmp_path / f"image{suffix}")
    if mode == "LA":  # grey with a clear pixel: white there
        expected = expected.copy()
        expected[0, 0] = 255
    assert got.shape == (4, 6, 3) and np.abs(got.astype(int) - expected).max() <= 1


def test_masks_read_transparency_as_black_pictures_as_white(tmp_path):
    painted = np.zeros((4, 6, 4), np.uint8)
    painted[:, :3] = 255  # opaque white on the left, transparent on the right
    Image.fromarray(painted).save(tmp_path / "layer.png")
    assert (load_image(tmp_path / "layer.png", "L", background=BLACK)[:, 3:] == 0).all()
    assert (load_image(tmp_path / "layer.png", "L")[:, 3:] == 255).all()
    assert (load_image(tmp_path / "layer.png", "L", background=BLACK)[:, :3] == 255).all()


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    """Orientation 6: the stored picture is shown turned 90 degrees clockwise."""
    stored = np.full((32, 48, 3), 30, np.uint8)
    stored[:8, :8] = 250  # top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / f"photo{suffix}", exif=exif, quality=95)
    shown = load_image(tmp_path / f"photo{suffix}")
    assert shown.shape == (48, 32, 3)
    assert shown[:6, -6:].mean() > 230 and shown[:6, :6].mean() < 60  # now top right


def test_unreadable_images_are_classified(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(MediaReadError) as caught:
        load_image(tmp_path / "notes.png")
    assert caught.value.reason == "unreadable"
    with pytest.raises(MediaReadError, match="missing"):
        load_image(tmp_path / "none.png")


def test_masks_and_depth_images_go_through_the_same_reader(tmp_path):
    from data.media import SourceVideo, read_depth, read_mask

    source = SourceVideo("in.mp4", 3, 12.0, 24, 64, False)
    half = np.zeros((24, 64), np.uint16)
    half[:, :32] = 65535
    Image.fromarray(half).save(tmp_path / "mask16.png")
    mask = read_mask(tmp_path / "mask16.png", source, [0, 1, 2], (24, 64))
    assert mask.shape == (1, 1, 1, 24, 64)
    assert (mask[..., :31] == 1).all() and (mask[..., 33:] == 0).all()
    sixteen_bit(tmp_path / "depth16.png")
    depth = read_depth(tmp_path / "depth16.png", source, [0, 2], (24, 64))
    assert depth.shape == (1, 2, 1, 24, 64)  # one map for every frame, near = bright
    expected = GRADIENT16.astype(np.float64) / 65535 * 2 - 1
    assert np.abs(depth[0, 1, 0].double().numpy() - expected).max() < 1e-5  # 16 bits kept
