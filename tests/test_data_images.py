"""ImageDataset: decoding in DataLoader workers, each image opened once per epoch, bad files raised or skipped."""

from __future__ import annotations

import traceback

import pytest
import torch
from support import class_folders, truncated_jpeg

from vlprompt.backbone import transforms
from vlprompt.data import BadImage, ImageDataset, Item, UnreadableImageError, find_unreadable
from vlprompt.errors import ConfigError, DatasetError


def _to_tensor(image):
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)


@pytest.fixture
def folder_with_bad_files(tmp_path):
    made = class_folders(tmp_path, {"a": 3, "b": 3})
    truncated_jpeg(tmp_path / "a" / "img001.jpg")
    (tmp_path / "b" / "img002.jpg").write_bytes(b"")
    items = [Item(path, label) for label, paths in enumerate(made.values()) for path in paths]
    return tmp_path, items


def test_each_image_is_opened_once_per_epoch(tmp_path, monkeypatch):
    made = class_folders(tmp_path, {"a": 5, "b": 4})
    items = [Item(path, label) for label, paths in enumerate(made.values()) for path in paths]
    opened: list[str] = []
    real = transforms.load_image

    def counting(path):
        opened.append(str(path))
        return real(path)

    monkeypatch.setattr(transforms, "load_image", counting)
    dataset = ImageDataset(items, tmp_path, transform=_to_tensor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True, collate_fn=dataset.collate_fn,
                                         generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        opened.clear()
        batches = list(loader)
        assert sorted(opened) == sorted(str(tmp_path / item.path) for item in items)
        assert sum(len(b.labels) for b in batches) == 9
        for batch in batches:   # indices map every row back to its item
            assert batch.labels.tolist() == [items[i].label for i in batch.indices.tolist()]


def test_raise_names_the_file_and_points_to_data_check(folder_with_bad_files):
    root, items = folder_with_bad_files
    dataset = ImageDataset(items, root)
    assert dataset[0][1:] == (0, 0)
    with pytest.raises(DatasetError) as info:
        dataset[1]
    assert "img001.jpg" in str(info.value) and "truncated" in str(info.value)
    assert "vlprompt data check" in str(info.value) and "(item 1 of 6)" in str(info.value)
    with pytest.raises(UnreadableImageError) as info:   # a batched fetch names every bad file of the batch
        dataset.__getitems__([0, 1, 2, 3, 4, 5])
    message = str(info.value)
    assert message.startswith("2 unreadable images: image file ") and "(item 1, item 5 of 6)" in message
    assert "img001.jpg" in message and "img002.jpg" in message
    with pytest.raises(ConfigError, match="on_error must be 'raise' or 'skip'"):
        ImageDataset(items, root, on_error="ignore")


def test_skip_drops_bad_files_from_batches_and_reports_them(folder_with_bad_files):
    root, items = folder_with_bad_files
    dataset = ImageDataset(items, root, transform=_to_tensor, on_error="skip")
    assert dataset[5] == BadImage(5, "b/img002.jpg", dataset[5].reason)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=dataset.collate_fn))
    assert [b.indices.tolist() for b in batches] == [[0, 2, 3], [4]]
    assert batches[0].images.shape == (3, 3) and batches[1].labels.tolist() == [1]
    assert [bad.path for b in batches for bad in b.bad] == ["a/img001.jpg", "b/img002.jpg"]


def test_decoding_in_worker_processes_matches_the_main_process(folder_with_bad_files):
    root, items = folder_with_bad_files
    dataset = ImageDataset(items, root, transform=_to_tensor, on_error="skip")
    main = list(torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=dataset.collate_fn))
    workers = list(torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=dataset.collate_fn))
    assert [b.indices.tolist() for b in workers] == [b.indices.tolist() for b in main]
    assert torch.equal(torch.cat([b.images for b in workers]), torch.cat([b.images for b in main]))
    assert [bad for b in workers for bad in b.bad] == [bad for b in main for bad in b.bad]
    raising = ImageDataset(items, root)
    try:
        list(torch.utils.data.DataLoader(raising, batch_size=2, num_workers=1, collate_fn=raising.collate_fn))
    except UnreadableImageError as exc:   # re-raised in the main process with the worker's message only
        message = str(exc)
        # drop the reference cycle through the traceback so the failed loader shuts its worker down now (when the
        # garbage collector finalises it later, torch waits 5 s for the worker)
        traceback.clear_frames(exc.__traceback__)
    assert message.startswith(f"image file {str(root / 'a' / 'img001.jpg')!r} is truncated")
    assert "Traceback" not in message and message.endswith("--skip-bad-images (on_error='skip' from Python).")
    pooled = find_unreadable(root, [item.path for item in items], workers=2, progress=False, chunk_size=2)
    assert pooled == find_unreadable(root, [item.path for item in items], workers=1, progress=False)
    assert [bad.index for bad in pooled] == [1, 5]


class _Doubled(ImageDataset):
    """A subclass that post-processes samples in ``__getitem__`` (as feature extraction does)."""

    def __getitem__(self, index):
        sample = super().__getitem__(index)
        return sample if isinstance(sample, BadImage) else (sample[0] * 2, sample[1], sample[2])


def test_batched_fetch_goes_through_a_subclass_getitem(folder_with_bad_files):
    root, items = folder_with_bad_files
    plain = ImageDataset(items, root, transform=_to_tensor, on_error="skip")
    doubled = _Doubled(items, root, transform=_to_tensor, on_error="skip")
    get = [torch.utils.data.DataLoader(d, batch_size=3, collate_fn=d.collate_fn) for d in (plain, doubled)]
    for base, twice in zip(*get):
        assert torch.equal(twice.images, base.images * 2) and twice.bad == base.bad
