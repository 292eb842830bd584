"""qkv.export.folder: an export takes its folder's place whole, or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from qkv.errors import QkvError
from qkv.export.folder import check_destination, written_whole


def test_an_export_that_fails_leaves_the_earlier_one_as_it_was(tmp_path):
    out = tmp_path / "ct2"
    with written_whole(out) as staging:
        (staging / "model.bin").write_text("first")
        (staging / "qkv_export.json").write_text("{}")
    with pytest.raises(RuntimeError), written_whole(out, replace=True) as staging:
        (staging / "model.bin").write_text("half of the second")
        raise RuntimeError("the exporter failed")
    assert (out / "model.bin").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["ct2"]  # nothing of the failed one beside it


def test_a_replaced_export_leaves_none_of_its_files(tmp_path):
    out = tmp_path / "export"
    with written_whole(out) as staging:
        (staging / "model.bin").write_text("CTranslate2's")
        (staging / "qkv_export.json").write_text("{}")
    with pytest.raises(QkvError, match="holds a model already: --force replaces it"):
        check_destination(out, replace=False)
    with written_whole(out, replace=True) as staging:
        (staging / "encoder.onnx").write_text("ONNX's")
        (staging / "qkv_onnx.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["encoder.onnx", "qkv_onnx.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_folder_of_other_files_or_a_file_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": 1}')
    with pytest.raises(QkvError, match=r"mine holds files that no export of qkv's wrote \(config"):
        check_destination(mine, replace=True)
    assert (mine / "config.json").read_text() == '{"mine": 1}'
    (tmp_path / "a_file").write_text("")
    with pytest.raises(QkvError, match="a_file is a file, not a directory"):
        check_destination(tmp_path / "a_file", replace=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with written_whole(empty) as staging:
        (staging / "model.bin").write_text("")
    assert [p.name for p in empty.iterdir()] == ["model.bin"]


def test_a_replaced_export_keeps_the_users_own_files_and_a_new_one_is_not_private(tmp_path):
    out = tmp_path / "export"
    with written_whole(out) as staging:
        (staging / "model.bin").write_text("CTranslate2's")
        (staging / "qkv_export.json").write_text("{}")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # the staging folder was 0700
    (out / "README.md").write_text("how we serve it")
    with written_whole(out, replace=True) as staging:
        (staging / "encoder.onnx").write_text("ONNX's")
        (staging / "qkv_onnx.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "encoder.onnx", "qkv_onnx.json"]
