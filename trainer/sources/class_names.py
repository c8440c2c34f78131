"""Class names and prompt templates of the CLIP few-shot benchmark, following CoOp's conventions.

CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models") fixed the class-name spelling and
one hand-written prompt per dataset; CLIP-LoRA and Block-LoRA report their numbers with them. Raw names
come from the dataset (torchvision ``classes``, folder names); ``coop_class_names`` turns them into the
spelling CoOp uses, or ``None`` for a class CoOp leaves out.
"""
from __future__ import annotations

GENERIC_TEMPLATE = "a photo of a {}."  # CLIP-LoRA's training prompt, and the template of unlisted datasets

TEMPLATES: dict[str, str] = {
    "imagenet": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "oxford_pets": "a photo of a {}, a type of pet.",
    "stanford_cars": "a photo of a {}.",
    "flowers102": "a photo of a {}, a type of flower.",
    "food101": "a photo of {}, a type of food.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "sun397": "a photo of a {}.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "ucf101": "a photo of a person doing {}.",
}

# the 11 datasets of the CoOp / CLIP-LoRA few-shot benchmark (the grid's average is over these)
BENCHMARK = tuple(TEMPLATES)

FASHION_MNIST = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]

_CALTECH_LEFT_OUT = {"BACKGROUND_Google", "Faces_easy"}
_CALTECH_RENAMED = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
_EUROSAT_RENAMED = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "River": "River",
    "SeaLake": "Sea or Lake",
}


def _year_first(name: str) -> str:
    """Stanford Cars: 'AM General Hummer SUV 2000' -> '2000 AM General Hummer SUV'."""
    words = name.split(" ")
    return " ".join([words[-1], *words[:-1]])


def _sun397(name: str) -> str:
    """SUN397: 'apartment_building/outdoor' (or '/a/apartment_building/outdoor') -> 'outdoor apartment_building'."""
    parts = [p for p in name.split("/") if p]
    if len(parts) > 1 and len(parts[0]) == 1:  # the leading letter directory
        parts = parts[1:]
    return " ".join(reversed(parts))


def coop_class_names(dataset: str, raw: list[str]) -> list[str | None]:
    """CoOp's spelling of each raw class name (underscores become spaces), ``None`` for a left-out class."""
    if dataset == "caltech101":
        names = [None if n in _CALTECH_LEFT_OUT else _CALTECH_RENAMED.get(n, n) for n in raw]
    elif dataset == "oxford_pets":
        names = [n.lower() for n in raw]
    elif dataset == "stanford_cars":
        names = [_year_first(n) for n in raw]
    elif dataset == "sun397":
        names = [_sun397(n) for n in raw]
    elif dataset == "eurosat":
        names = [_EUROSAT_RENAMED.get(n, n) for n in raw]
    else:
        names = list(raw)
    return [None if n is None else n.replace("_", " ").strip() for n in names]


def template_for(dataset: str) -> str:
    """The dataset's CoOp evaluation template; unlisted datasets get the generic one."""
    return TEMPLATES.get(dataset, GENERIC_TEMPLATE)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in wnid order, as torchvision ships them (not CLIP's curated list;
    pass CoOp's ``classnames.txt`` as ``data.class_names_file`` for that)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)
