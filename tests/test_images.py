import torch

from featpipe.images import Preprocessing
from featpipe.loader import normalise


def test_normalise_is_imagenet_standardisation_for_images_and_batches():
    pre = Preprocessing(image_size=7)
    pixels = torch.randint(0, 256, (4, 7, 7, 3), dtype=torch.uint8)
    expected = (pixels.float() / 255 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    torch.testing.assert_close(normalise(pixels, pre), expected)
    torch.testing.assert_close(normalise(pixels[1], pre), expected[1])
    assert pixels.dtype == torch.uint8 and normalise(pixels, pre).dtype == torch.float32


def test_sixteen_bit_grayscale_keeps_its_levels(tmp_path):
    """PIL's own convert clips 16-bit grayscale to white; the levels must survive as 8-bit grey."""
    import numpy as np
    from PIL import Image

    from featpipe.images import load_image

    ramp = np.tile(np.linspace(0, 65535, 40).astype(np.uint16), (30, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I", "I;16")
    got = load_image(tmp_path / "g16.png", Preprocessing(image_size=40))  # resized 40x30 -> 40x40
    assert got[0, 0].tolist() == [0, 0, 0] and got[0, -1].tolist() == [255, 255, 255]
    np.testing.assert_allclose(got[20, :, 0], np.rint(ramp[0] / 257), atol=1)  # a ramp, not a white block
    assert (got[..., 0] == got[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with EXIF Orientation=6 (rotate 90 degrees clockwise to view)."""
    import numpy as np
    from PIL import Image

    from featpipe.images import load_image

    stored = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high as stored
    stored[:, :20] = (255, 0, 0)  # left half red, right half blue
    stored[:, 20:] = (0, 0, 255)
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    got = load_image(tmp_path / "phone.jpg", Preprocessing(image_size=40))
    # viewed upright (rotated 90 clockwise), the stored left half is on top: red above blue
    assert got[5, 20, 0] > 200 and got[5, 20, 2] < 60
    assert got[35, 20, 2] > 200 and got[35, 20, 0] < 60
