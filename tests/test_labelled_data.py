"""Labelled class folders for fine-tuning and linear probing (beit_fast.data.labelled): read through the same
safe scanner as pretraining's image folders - symlink loops end, FIFOs are never opened, pixel bombs are
skipped - and an unreadable image is replaced by the next readable one with that image's label."""
import os
import warnings

import pytest
from PIL import Image

from beit_fast.finetune import main as finetune_main
from beit_fast.data.labelled import LabelledImageFolder, count_class_folders
from test_data import _in_child, save_png


def make_classes(root, counts=(("cat", 3), ("dog", 2))):
    for name, n in counts:
        for i in range(n):
            save_png(str(root / name / f"{i}.png"), color=(40 * i, 0, 0))
    return root


def _labels(root):
    ds = LabelledImageFolder(root)
    return ds.classes, [(ds.images.relpath(i), ds[i][1]) for i in range(len(ds))]


def test_class_folders_in_torchvision_order_with_labels(tmp_path):
    root = make_classes(tmp_path / "train")
    ds = LabelledImageFolder(root, transform=lambda im: im.size)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    assert [ds[i] for i in range(len(ds))] == [((40, 30), 0)] * 3 + [((40, 30), 1)] * 2
    assert count_class_folders(root) == 2
    save_png(str(root / "loose.png"))
    with pytest.raises(ValueError, match="class folders"):
        LabelledImageFolder(root)
    with pytest.raises(FileNotFoundError):
        LabelledImageFolder(tmp_path / "missing")


def test_symlink_loops_in_class_folders_end_and_count_each_image_once(tmp_path):
    root = make_classes(tmp_path / "train")
    os.symlink(".", root / "cat" / "loop")  # cat/loop -> cat
    os.symlink("..", root / "dog" / "up")  # dog/up -> train: a loop through the root
    os.symlink(root / "dog", root / "cat" / "dogs_again")  # dog's folder a second time, under cat
    classes, labels = _in_child(_labels, root)
    assert classes == ["cat", "dog"]
    assert labels == [(f"cat/{i}.png", 0) for i in range(3)] + [(f"dog/{i}.png", 1) for i in range(2)]


def _fifo_item(root):
    ds = LabelledImageFolder(root, transform=lambda im: im.size)
    names = [ds.images.relpath(i) for i in range(len(ds))]
    os.unlink(os.path.join(root, "cat", "2.png"))  # replaced by a FIFO after the scan: skipped, never waited on
    os.mkfifo(os.path.join(root, "cat", "2.png"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return names, ds[names.index("cat/2.png")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_named_like_an_image_never_blocks_and_the_label_follows_the_image(tmp_path):
    root = make_classes(tmp_path / "train")
    save_png(str(root / "dog" / "1.png"), size=(20, 10))
    os.mkfifo(root / "cat" / "x.png")  # only regular files are images
    names, item = _in_child(_fifo_item, str(root))
    assert names == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png"]
    # cat/2.png is skipped: the next readable image is dog/0.png, and its label is dog's
    assert item == ((40, 30), 1)


def test_unreadable_and_oversized_images_are_replaced_with_their_own_label(tmp_path):
    root = make_classes(tmp_path / "train", (("a", 1), ("b", 1)))
    (root / "a" / "0.png").write_bytes(b"not a png")
    ds = LabelledImageFolder(root, transform=lambda im: im.size)
    with pytest.warns(UserWarning, match="0.png"):
        assert ds[0] == ((40, 30), 1)
    Image.new("1", (3000, 3000)).save(root / "b" / "big.png")
    tight = LabelledImageFolder(root, transform=lambda im: im.size, max_image_pixels=2000)
    with pytest.warns(UserWarning, match="max_image_pixels"):
        assert tight[2] == ((40, 30), 1)  # b/big.png over the limit: the next readable image (wraps to b/0.png)


def test_finetune_cli_trains_on_class_folders(tmp_path, capsys):
    data = tmp_path / "data"
    for split, n in (("train", 6), ("val", 2)):
        make_classes(data / split, (("cat", n), ("dog", n)))
    os.symlink(".", data / "train" / "cat" / "loop")
    res = finetune_main(["--data_path", str(data), "--model", "tiny", "--input_size", "16", "--patch_size", "8",
                         "--epochs", "1", "--batch_size", "4", "--aa", "none", "--reprob", "0", "--mixup", "0",
                         "--cutmix", "0", "--no_progress", "--output_dir", str(tmp_path / "out")])
    assert len(res["history"]) == 1 and 0 <= res["final_top1"] <= 1
    (data / "val" / "dog" / "0.png").unlink()
    (data / "val" / "dog" / "1.png").unlink()
    with pytest.raises(SystemExit, match="different class folders|classes"):
        finetune_main(["--data_path", str(data), "--model", "tiny", "--input_size", "16", "--patch_size", "8",
                       "--epochs", "1", "--no_progress", "--output_dir", str(tmp_path / "out2")])
