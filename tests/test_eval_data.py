"""The evaluation readers read the right data (flux_eval/datasets.py), on small parquet files in the
Hub's schemas made here: a MagicBrush split only by name, and never the Hub's train/dev as the test
set; Emu Edit's rows of the asked split only, with ids that cannot collide; both caption file names;
images decoded as the reference's metric script decodes them, and as our editor does."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux_eval.datasets import Session, as_reference, read_emu, read_magicbrush, unique_ids
from flux_minimal.errors import FluxMinimalError
from tests.test_evaluate import emu_parquet, img, magicbrush_folder, magicbrush_hub, magicbrush_parquet, pa, pq


# ---- MagicBrush: a split by name -----------------------------------------------------------------

def test_the_hub_download_is_not_the_test_set(tmp_path):
    data = magicbrush_hub(tmp_path / "MagicBrush")
    with pytest.raises(FluxMinimalError) as e:
        read_magicbrush(data)  # --split test, the default
    msg = str(e.value)
    assert "no MagicBrush test parquet files; splits found: dev (3 rows), train (3 rows)" in msg
    assert "not on the Hub" in msg and "edit_sessions.json" in msg and "--split dev" in msg  # what to do
    sessions, report = read_magicbrush(data, "dev")
    assert [s.id for s in sessions] == ["301", "302"] and [len(s.turns) for s in sessions] == [2, 1]
    assert report.split == "dev" and dict(report.found) == {"train": 3, "dev": 3}
    assert report.describe() == "rows found per split: dev 3, train 3 (not read)"
    train, _ = read_magicbrush(data, "train")  # both shards
    assert [s.id for s in train] == ["11", "12"]


def test_a_parquet_file_that_names_no_split_is_refused(tmp_path):
    f = tmp_path / "data" / "magicbrush.parquet"
    magicbrush_parquet(tmp_path, "dev").joinpath("data", "dev-00000-of-00001.parquet").rename(f)
    with pytest.raises(FluxMinimalError, match=r"splits found: none; 1 file\(s\) whose name says no split .*"
                                               r"magicbrush.parquet.*name each after its split"):
        read_magicbrush(f)
    test_folder = tmp_path / "test"  # a folder named after the split names its files' split
    test_folder.mkdir()
    f.rename(test_folder / "part-0.parquet")
    sessions, report = read_magicbrush(tmp_path, "test")
    assert [s.id for s in sessions] == ["101", "202"] and dict(report.found) == {"test": 3}


def test_the_released_folder_is_the_test_set(tmp_path):
    folder = magicbrush_folder(tmp_path / "MagicBrush" / "test")
    for data in (folder, folder.parent):  # the folder itself, or the one holding test/
        sessions, report = read_magicbrush(data)
        assert [s.id for s in sessions] == ["101", "202"] and dict(report.found) == {"test": 3}
    with pytest.raises(FluxMinimalError, match="holds MagicBrush's test set, not dev; pass --split test"):
        read_magicbrush(folder, "dev")


@pytest.mark.parametrize("name", ["global_descriptions.json", "global_description.json"])
def test_either_caption_file_name_is_read(tmp_path, name):
    """The zip's global_descriptions.json, or image_eval.py's default global_description.json."""
    folder = magicbrush_folder(tmp_path / "mb")
    (folder / "global_descriptions.json").rename(folder / name)
    sessions, _ = read_magicbrush(folder)
    assert [t.caption for s in sessions for t in s.turns] == ["a cat", "a dog", "a car"]


def test_a_broken_caption_file_names_itself(tmp_path):
    folder = magicbrush_folder(tmp_path / "mb")
    (folder / "global_descriptions.json").write_text("{not json")
    with pytest.raises(FluxMinimalError, match=r"global_descriptions.json is not valid JSON"):
        read_magicbrush(folder)


# ---- Emu Edit: the split column ------------------------------------------------------------------

def test_emu_reads_the_asked_split_only(tmp_path):
    data = emu_parquet(tmp_path / "emu.parquet")
    test, report = read_emu(data)
    assert [s.id for s in test] == ["test_color_0", "test_background_3", "test_style_4"]
    assert dict(report.found) == {"test": 5, "validation": 2} and sum(report.dropped.values()) == 2
    val, report = read_emu(data, "validation")
    assert [s.id for s in val] == ["validation_color_0", "validation_background_3"]
    assert [t.instruction for s in val for t in s.turns] == ["make it green", "add snow"]
    assert report.describe() == "rows found per split: test 5 (not read), validation 2"
    with pytest.raises(FluxMinimalError, match=r"no Emu Edit rows whose split column is 'val'; found test \(5 rows\), "
                                               r"validation \(2 rows\)"):
        read_emu(data, "val")


def test_emu_splits_in_separate_files_and_repeated_ids(tmp_path):
    """The Hub's layout (one file per split, both with a split column); an idx repeated within a split
    gets a suffix rather than sharing an edits file."""
    rows = pq.read_table(emu_parquet(tmp_path / "all.parquet")).to_pylist()
    (tmp_path / "data").mkdir()
    for split in ("test", "validation"):
        part = [r for r in rows if r["split"] == split]
        if split == "test":
            part.append(dict(part[0], instruction="make it pink", output_caption="a pink car"))  # idx 0 again
        pq.write_table(pa.Table.from_pylist(part), tmp_path / "data" / f"{split}-00000-of-00001.parquet")
    sessions, report = read_emu(tmp_path / "data")
    assert [s.id for s in sessions] == ["test_color_0", "test_background_3", "test_style_4", "test_color_0_2"]
    assert sessions[3].turns[0].instruction == "make it pink"
    assert report.notes == ["1 repeated session id(s) given a suffix (_2, _3, ...)"]


def test_unique_ids_never_reuse_an_existing_id():
    sessions = [Session(i) for i in ("a", "a", "a_2", "b", "a")]
    assert unique_ids(sessions) == 2
    assert [s.id for s in sessions] == ["a", "a_3", "a_2", "b", "a_4"]


def test_emu_without_a_split_column_is_refused(tmp_path):
    rows = pq.read_table(emu_parquet(tmp_path / "e.parquet")).to_pylist()
    rows = [{k: v for k, v in r.items() if k != "split"} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "old.parquet")
    with pytest.raises(FluxMinimalError, match=r"old.parquet: missing column\(s\) \['split'\]"):
        read_emu(tmp_path / "old.parquet")


# ---- images: the reference's decoding for metrics, ours for editing -----------------------------

def rgba_with_exif(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 40x24 RGBA PNG, half transparent, tagged EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    rgb = np.asarray(img(7, 40))[:24]
    alpha = np.zeros((24, 40), np.uint8)
    alpha[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.dstack([rgb, alpha])).save(path, exif=exif)  # 4 uint8 channels: RGBA
    return rgb, alpha


def test_metrics_see_the_plain_convert_and_the_editor_ours(tmp_path):
    rgb, alpha = rgba_with_exif(tmp_path / "a.png")
    plain = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))  # MagicBrush's image_eval.py
    assert np.array_equal(plain, rgb)  # alpha dropped, no rotation
    data = {"bytes": (tmp_path / "a.png").read_bytes(), "path": None}
    rows = [{"img_id": "1", "turn_index": 1, "source_img": data, "mask_img": data, "instruction": "x",
             "target_img": data}]
    (tmp_path / "test").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test" / "test-00000-of-00001.parquet")
    turn = read_magicbrush(tmp_path / "test")[0][0].turns[0]
    assert np.array_equal(np.asarray(turn.source), plain) and np.array_equal(np.asarray(turn.target), plain)
    assert np.array_equal(np.asarray(as_reference(tmp_path / "a.png")), plain)
    ours = np.asarray(turn.source_for_edit, np.float64)  # EXIF applied, then alpha over white
    a = alpha[..., None] / 255.0
    want = np.rot90(rgb * a + 255 * (1 - a), k=-1)  # orientation 6: rotate 90 degrees clockwise
    assert ours.shape == (40, 24, 3) and np.abs(ours - want).max() <= 1  # alpha_composite rounds
