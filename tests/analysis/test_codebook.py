"""The redundancy codebook build: a map over images into shards, then a merge; resumable and
shardable; the file it writes is what optimize(prune="codebook") loads."""

import os

import pytest
import torch
from device_guard import factories_without_device

import redlens_compile as rc
from redlens_compile.analysis.codebook import (
    CodebookSettings, build_codebook, dpc_knn, merge_shards, neighbourhoods, restricted_jsd, write_shards,
)
from redlens_compile.analysis.codebook_file import Codebook
from redlens_compile.cli import main as cli_main
from redlens_compile.models.demo import build_llava, make_tokenizer, save_model_dir
from redlens_compile.models.evaluate import encode_questions
from redlens_compile.models.shapes_task import sample, vocabulary

# Loose thresholds: on a random-weight model every token is a candidate, so the test exercises
# the clustering and the merge (threshold choice is the proof script's business).
SETTINGS = CodebookSettings(prompt="USER: what colour is the object ?\n{image}\nASSISTANT:", top1_threshold=1.0,
                            jsd_threshold=10.0, clusters_per_image=3, min_cluster_size=2, global_clusters=4,
                            min_image_share=0.5, batch_size=32)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """The proof model's architecture at 32x32 pixels (16 visual tokens), saved with its processor."""
    directory = tmp_path_factory.mktemp("cb_model")
    model, processor = build_llava(make_tokenizer(vocabulary()), seed=3, image_size=32)
    save_model_dir(model.eval(), processor, directory / "model", {"weights": "random"})
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = directory / "model"
    return path, AutoModelForImageTextToText.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def write_images(folder, indices):
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        item, seed = sample("train", i)
        item.image(seed).resize((32, 32)).save(folder / f"img{i:03d}.png")
    return folder


def test_build_save_load_and_prune_with_it(small_model, tmp_path):
    path, model, processor = small_model
    images = write_images(tmp_path / "images", range(6))
    with factories_without_device() as sites:  # the ablations' tensors beside the model's (any device)
        codebook = build_codebook(model, processor, images, tmp_path / "shards", SETTINGS, progress=False)
    assert sites == []
    saved = codebook.save(tmp_path / "cb.safetensors")
    loaded = Codebook.load(saved)
    assert torch.equal(loaded.prototypes, codebook.prototypes)
    meta = loaded.metadata
    assert meta["model_type"] == "llava" and meta["hidden_size"] == 128 and meta["images"] == 6
    assert meta["settings"]["jsd_threshold"] == 10.0 and meta["settings"]["top1_threshold"] == 1.0
    assert meta["visual_tokens"] == 6 * 16 and meta["candidates"] == 6 * 16  # every token passes these thresholds
    assert meta["prototypes"] == loaded.prototypes.shape[0] >= 1
    item, seed = sample("test", 0)
    example = encode_questions(processor, [item.image(seed).resize((32, 32))], ["what colour is the object ?"])
    opt = rc.optimize(model, example, config=rc.RedLensConfig(prune="codebook", codebook=str(saved), prune_keep=4,
                                                                flops_budget=1.0))
    assert opt.report.pruning["visual_after"] == [4]
    assert opt.report.pruning["prototypes"] == loaded.prototypes.shape[0]


def test_an_interrupted_build_resumes_to_the_same_codebook(small_model, tmp_path):
    _, model, processor = small_model
    images = write_images(tmp_path / "images", range(5))
    whole = build_codebook(model, processor, images, tmp_path / "whole", SETTINGS, progress=False)

    done = []

    def stop_after_two(key):
        done.append(key)
        if len(done) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_codebook(model, processor, images, tmp_path / "part", SETTINGS, on_image_done=stop_after_two,
                       progress=False)
    assert len(list((tmp_path / "part").glob("*.safetensors"))) == 2
    assert not [p for p in os.listdir(tmp_path / "part") if p.endswith(".tmp")]  # no half-written shard
    resumed_keys = []
    resumed = build_codebook(model, processor, images, tmp_path / "part", SETTINGS, on_image_done=resumed_keys.append,
                             progress=False)
    assert len(resumed_keys) == 3  # only the images without a shard were ablated again
    assert torch.equal(resumed.prototypes, whole.prototypes)
    assert resumed.metadata == whole.metadata


def test_two_shard_folders_merge_into_the_codebook_of_one_build(small_model, tmp_path):
    _, model, processor = small_model
    everything = write_images(tmp_path / "all", range(6))
    first = write_images(tmp_path / "first", range(3))
    second = write_images(tmp_path / "second", range(3, 6))
    whole = build_codebook(model, processor, everything, tmp_path / "shards_all", SETTINGS, progress=False)
    from redlens_compile.analysis.codebook import list_images

    write_shards(model, processor, list_images(first), tmp_path / "a", SETTINGS, progress=False)
    write_shards(model, processor, list_images(second), tmp_path / "b", SETTINGS, progress=False)
    merged = merge_shards([tmp_path / "a", tmp_path / "b"], SETTINGS)
    assert torch.equal(merged.prototypes, whole.prototypes)
    assert merged.metadata == whole.metadata


def test_codebook_cli_builds_and_refuses_bad_input_before_any_work(small_model, tmp_path, capsys):
    path, _, _ = small_model
    images = write_images(tmp_path / "images", range(4))
    args = [str(path), "--images", str(images), "--prompt", SETTINGS.prompt, "--top1-threshold", "1.0",
            "--jsd-threshold", "10", "--clusters-per-image", "3", "--min-cluster-size", "2", "--global-clusters", "4",
            "--min-image-share", "0.5"]
    out = tmp_path / "cb.safetensors"
    assert cli_main(["codebook", *args, "--out", str(out)]) == 0
    assert Codebook.load(out).metadata["images"] == 4

    empty = tmp_path / "empty"
    empty.mkdir()
    bad = write_images(tmp_path / "bad", range(2))
    (bad / "notes.png").write_text("not an image")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    cases = [
        (["--images", str(empty), "--out", str(tmp_path / "x1.safetensors")], "the folder is empty"),
        (["--images", str(bad), "--out", str(tmp_path / "x2.safetensors")], "notes.png"),
        (["--images", str(images), "--out", str(out)], "already exists"),
        (["--images", str(images), "--out", str(out / "cb.safetensors")], "does not exist"),
        (["--images", str(images), "--out", str(tmp_path / "x3.safetensors"), "--prompt", "no placeholder"],
         "placeholder"),
    ]
    if os.geteuid() != 0:  # root writes anywhere: the permission case only means something for a user
        cases.append((["--images", str(images), "--out", str(readonly / "cb.safetensors")], "not writable"))
    for extra, message in cases:
        code = cli_main(["codebook", str(path), *extra])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (extra, err)
    assert not list(readonly.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("x")) == []


def test_dpc_knn_finds_separated_groups_and_jsd_is_zero_on_equal_rows():
    g = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(10, 4, generator=g) * 0.05 + c for c in (torch.ones(4) * 3, -torch.ones(4) * 3)])
    labels = dpc_knn(points, 2, knn=3)
    assert labels[:10].unique().numel() == 1 and labels[10:].unique().numel() == 1 and labels[0] != labels[10]
    logits = torch.randn(3, 20, generator=g)
    assert torch.allclose(restricted_jsd(logits, logits, 5), torch.zeros(3), atol=1e-7)
    assert (restricted_jsd(logits, logits.flip(-1), 5) > 0).all()
    assert neighbourhoods((3, 3), 1)[4].tolist() == list(range(9))
    assert neighbourhoods((3, 3), 1)[0].tolist() == [0, 1, 3, 4]
