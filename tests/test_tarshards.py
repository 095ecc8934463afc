import io
from pathlib import Path

import pytest
from PIL import Image

from launcher.data.tar import DecodeImage, ShardError, open_shards, read_tar
from launcher.tools.tarshards import image_folder_samples, main, write_shards


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
    out = tmp_path / "out"
    assert main([str(tmp_path / "src"), str(out), "--per-shard", "4", "--val-fraction", "0"]) == 0
    paths, sizes, classes = open_shards(tmp_path / "out" / "train")
    assert classes == ["cat", "dog"] and sum(sizes) == 6
    assert sorted(s["label"] for p in paths for s in read_tar(p)) == [0, 0, 0, 1, 1, 1]


def test_a_plain_image_folder_is_split_into_the_train_and_val_the_classify_job_reads(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (4, 4), "red").save(tmp_path / "src" / cls / f"{i}.png")
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--val-fraction", "0.2"]) == 0
    keys = {}
    for part in ("train", "val"):
        paths, _, classes = open_shards(tmp_path / "out" / part)
        keys[part] = {s["key"] for p in paths for s in read_tar(p)}
        assert classes == ["cat", "dog"]
    assert len(keys["val"]) == 4 and len(keys["train"]) == 16 and not keys["train"] & keys["val"]
    assert {k.split("_")[0] for k in keys["val"]} == {"cat", "dog"}  # per class
    # the job reads exactly this layout
    from launcher import config

    job = config.load(Path(__file__).parents[1] / "jobs/classify.yaml", [f"args.data_dir={tmp_path / 'out'}"])
    assert (Path(job.args["data_dir"]) / "train" / "index.json").exists()


def test_missing_index_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="HINT"):
        open_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="class folders"):
        image_folder_samples(tmp_path)


def fake_cifar10(root, per_batch=3):
    """The python CIFAR-10 layout with a few random images (torchvision reads it; checksums patched)."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for n, name in enumerate(names):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(n + i) % 10 for i in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return folder


def test_cifar10_on_disk_becomes_train_and_val_shards(tmp_path, monkeypatch, capsys):
    from torchvision.datasets import cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    src = fake_cifar10(tmp_path / "cifar")
    assert main([str(src), str(tmp_path / "out"), "--format", "cifar10", "--per-shard", "4"]) == 0
    train_paths, train_sizes, classes = open_shards(tmp_path / "out" / "train")
    _, val_sizes, _ = open_shards(tmp_path / "out" / "val")
    assert sum(train_sizes) == 15 and sum(val_sizes) == 3 and len(train_paths) == 4
    assert classes == [f"class{i}" for i in range(10)]
    first = next(read_tar(train_paths[0]))
    image, label = DecodeImage()(first)
    assert image.size == (32, 32) and label == 0


def test_missing_cifar10_says_what_to_point_at(tmp_path, capsys):
    assert main([str(tmp_path), str(tmp_path / "out"), "--format", "cifar10"]) == 2
    assert "cifar-10-batches-py/data_batch_1" in capsys.readouterr().err


def test_any_sample_is_reached_through_the_offsets_and_foreign_shards_can_be_indexed(tmp_path, capsys):
    samples = [(f"{i:03d}", png((i, 0, 0)) * (1 + i % 4), "png", i % 3) for i in range(25)]
    write_shards(iter(samples), tmp_path, per_shard=10)
    paths, sizes, _ = open_shards(tmp_path)
    walked = {p: list(read_tar(p)) for p in paths}
    for p in paths:
        assert Path(f"{p}.offsets").stat().st_size == 8 * len(walked[p])
        for start in range(len(walked[p]) + 1):
            assert list(read_tar(p, start)) == walked[p][start:]
    # shards from elsewhere: no index, no offsets; --index writes both
    for f in [*tmp_path.glob("*.offsets"), tmp_path / "index.json"]:
        f.unlink()
    assert list(read_tar(paths[1], 3)) == walked[paths[1]][3:]  # without offsets: the headers are walked
    assert main([str(tmp_path), "--index"]) == 0
    assert "indexed 25 samples in 3 shards" in capsys.readouterr().out
    assert open_shards(tmp_path)[1] == sizes and all(Path(f"{p}.offsets").exists() for p in paths)
    assert main([str(tmp_path / "empty"), "--index"]) == 2


def test_a_wrong_offsets_file_or_a_truncated_shard_is_named_never_read_silently(tmp_path):
    """Another shard's offsets file used to shift the samples read without a word."""
    samples = [(f"{i:03d}", png((i, 0, 0)) * (1 + i % 4), "png", i % 3) for i in range(20)]
    write_shards(iter(samples), tmp_path, per_shard=10)
    paths, _, _ = open_shards(tmp_path)
    first = Path(f"{paths[0]}.offsets")
    first.write_bytes(Path(f"{paths[1]}.offsets").read_bytes()[::-1])  # garbage of the right length
    with pytest.raises(ShardError, match=r"offsets: sample 4 has offset .* does not belong to"):
        list(read_tar(paths[0], 3))
    Path(f"{paths[1]}.offsets").write_bytes(b"\0" * 8)  # one entry: too short
    with pytest.raises(ShardError, match=r"sample 6 has no entry"):
        list(read_tar(paths[1], 5))
    whole = Path(paths[1]).read_bytes()
    Path(paths[1]).write_bytes(whole[: len(whole) // 2 + 100])  # cut inside a sample
    with pytest.raises(ShardError, match=r"(?s)truncated or corrupt tar shard.*HINT") as e:
        list(read_tar(paths[1]))
    assert paths[1] in str(e.value)
    cut = len(whole) // 2 + 100 - 400  # inside a member's data
    Path(paths[1]).write_bytes(whole[:cut])
    with pytest.raises(ShardError, match=r"(?s)truncated .*the file ends first.*HINT"):
        list(read_tar(paths[1]))
