"""What the registry knows about a built-in dataset, and what its reader gets to work with."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlprompt.common.paths import cache_dir
from vlprompt.data.listing import require_dir
from vlprompt.data.splitfile import LabelledSplits
from vlprompt.data.types import SplitCounts
from vlprompt.errors import DatasetError

def default_cache_dir() -> Path:
    """Where split files created for read-only datasets go: ``$VLPROMPT_CACHE/splits`` or the user cache folder."""
    return cache_dir("splits")


@dataclass(frozen=True)
class ReadContext:
    """Where a reader is: the data root (for shared files such as ImageNet's classnames.txt) and the cache folder."""

    root: Path
    cache_dir: Path

    def split_cache_folder(self, dataset_dir: Path) -> Path:
        """Cache folder for created splits of ``dataset_dir`` when that folder is read-only (one per absolute path)."""
        digest = hashlib.sha1(str(dataset_dir.resolve()).encode("utf-8")).hexdigest()[:12]
        return self.cache_dir / "splits" / f"{dataset_dir.name}-{digest}"


# reader(info, context) -> the dataset's splits with raw class names
Reader = Callable[["DatasetInfo", ReadContext], LabelledSplits]


@dataclass(frozen=True)
class DatasetInfo:
    """A built-in dataset: names, on-disk layout, expected counts (CoOp's Table / the split files), template, reader.

    ``image_subdir`` is the image folder relative to ``<root>/<folder>`` that item paths are relative to ("" = the
    dataset folder itself). ``split_file`` is the standard split file name (``split_zhou_<Name>.json``) or None where
    the reference reads official lists instead (ImageNet family, FGVCAircraft).
    """

    key: str
    title: str                 # the papers' name, e.g. "Flowers102"
    reference_name: str        # the reference code's class name, e.g. "OxfordFlowers"
    folder: str                # folder name under the data root, e.g. "oxford_flowers"
    image_subdir: str          # e.g. "jpg"
    template: str              # hand-crafted CLIP/CoOp prompt template, e.g. "a photo of a {}, a type of flower."
    expected: SplitCounts
    reader: Reader
    split_file: str | None = None
    aliases: tuple[str, ...] = ()
    test_only: bool = False

    def dataset_dir(self, root: Path) -> Path:
        """``<root>/<folder>``."""
        return root / self.folder

    def image_dir(self, root: Path) -> Path:
        """The folder item paths are relative to."""
        return self.images_in(self.dataset_dir(root))

    def images_in(self, dataset_dir: Path) -> Path:
        """The image folder inside ``dataset_dir``."""
        return dataset_dir / self.image_subdir if self.image_subdir else dataset_dir

    def require_dirs(self, root: Path) -> tuple[Path, Path]:
        """``(dataset folder, image folder)`` under ``root``, or a :class:`DatasetError` saying what is missing."""
        require_dir(root, "data root", "Pass --root as the folder that holds the dataset folders.")
        dataset_dir = self.dataset_dir(root)
        if not dataset_dir.is_dir():
            layout = f"{root}/{self.folder}/{self.image_subdir + '/' if self.image_subdir else ''}..."
            hint = f"{self.title} is expected at {layout} (the standard folder name is {self.folder!r})."
            if root.name == self.folder or (self.image_subdir and (root / self.image_subdir).is_dir()):
                hint += f" --root seems to be the dataset folder itself: pass its parent {root.parent} instead."
            raise DatasetError(f"dataset folder {dataset_dir} does not exist. {hint}")
        image_dir = self.images_in(dataset_dir)
        require_dir(image_dir, f"{self.title} image folder",
                    f"Extract the images so that they are under {image_dir} (the reference layout).")
        return dataset_dir, image_dir

    @property
    def created_split_file(self) -> str:
        """Name of the split file vlprompt writes when it creates a split: ``split_vlprompt_<Name>.json``."""
        return f"split_vlprompt_{self.reference_name}.json"
