import io

import pytest
from PIL import Image

from launcher.tarshards import DecodeImage, image_folder_samples, main, open_shards, read_tar, write_shards


def png(color):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return buf.getvalue()


def test_round_trip_and_index(tmp_path):
    samples = [(f"{i:03d}", png((i, 0, 0)), "png", i % 3) for i in range(10)]
    write_shards(iter(samples), tmp_path, per_shard=4, classes=["a", "b", "c"])
    paths, sizes, classes = open_shards(tmp_path)
    assert sizes == [4, 4, 2] and classes == ["a", "b", "c"]
    got = [s for p in paths for s in read_tar(p)]
    assert [(s["key"], s["label"]) for s in got] == [(k, lab) for k, _, _, lab in samples]
    image, label = DecodeImage()(got[5])
    assert image.getpixel((0, 0)) == (5, 0, 0) and label == 2
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_image_folder_conversion(tmp_path, capsys):
    for cls, color in (("cat", "red"), ("dog", "blue")):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (4, 4), color).save(tmp_path / "src" / cls / f"{i}.png")
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--per-shard", "4"]) == 0
    paths, sizes, classes = open_shards(tmp_path / "out")
    assert classes == ["cat", "dog"] and sum(sizes) == 6
    assert sorted(s["label"] for p in paths for s in read_tar(p)) == [0, 0, 0, 1, 1, 1]


def test_missing_index_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="HINT"):
        open_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="class folders"):
        image_folder_samples(tmp_path)
