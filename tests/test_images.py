import torch

from featpipe.backbones import Preprocessing
from featpipe.images import normalise


def test_normalise_is_imagenet_standardisation_for_images_and_batches():
    pre = Preprocessing(image_size=7)
    pixels = torch.randint(0, 256, (4, 7, 7, 3), dtype=torch.uint8)
    expected = (pixels.float() / 255 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    torch.testing.assert_close(normalise(pixels, pre), expected)
    torch.testing.assert_close(normalise(pixels[1], pre), expected[1])
    assert pixels.dtype == torch.uint8 and normalise(pixels, pre).dtype == torch.float32
