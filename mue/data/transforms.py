"""Image preprocessing as OFA does it: RGB, square bicubic resize, tensor, normalise with mean = std = 0.5."""
from torchvision import transforms as T

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def to_rgb(img):
    """Convert a PIL image to RGB (a named function, so the transform pickles for DataLoader workers)."""
    return img.convert("RGB")


def image_transform(patch_image_size: int, train: bool = False, augment: bool = False) -> T.Compose:
    """PIL image -> FloatTensor[3, s, s] in [-1, 1].

    OFA applies no augmentation for SNLI-VE or caption fine-tuning, so by default train and evaluation
    transforms are the same. ``train and augment`` adds a light random shift (up to 5 % of the side):
    no flips and no colour changes, because captions and hypotheses name left/right and colours.
    """
    steps = [
        T.Lambda(to_rgb),
        T.Resize((patch_image_size, patch_image_size), interpolation=T.InterpolationMode.BICUBIC),
    ]
    if train and augment:
        steps.append(T.RandomAffine(degrees=0, translate=(0.05, 0.05), fill=127))
    steps += [T.ToTensor(), T.Normalize(mean=MEAN, std=STD)]
    return T.Compose(steps)
