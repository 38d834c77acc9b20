"""`calozoo tune --resume DIR` resumes only a sweep folder this user wrote (issue #15, item 1).

Resuming hands DIR/tune/tuner.pkl to Ray's Tuner.restore, which unpickles it: a planted pickle must
be refused before anything reads it (the check needs no Ray).
"""

import json
import os
import pickle

import pytest

from tune.sweep import check_resumable, resume_sweep


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling creates the marker file


def _sweep_folder(tmp_path, marker):
    out = tmp_path / "sweep"
    (out / "tune").mkdir(parents=True)
    (out / "sweep.json").write_text(json.dumps({"model": "fastcalogan", "data": "x.h5", "out_dir": str(out)}))
    (out / "tune" / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    for p in (out, out / "tune"):
        p.chmod(0o755)
    (out / "tune" / "tuner.pkl").chmod(0o644)
    (out / "sweep.json").chmod(0o644)
    return out


def test_a_world_writable_pickle_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "PWNED"
    out = _sweep_folder(tmp_path, marker)
    (out / "tune" / "tuner.pkl").chmod(0o666)
    with pytest.raises(ValueError, match=r"refusing to resume .*tuner\.pkl is writable by others") as info:
        resume_sweep(out)
    assert "\n" not in str(info.value) and "chmod -R go-w" in str(info.value)
    assert not marker.exists()


def test_a_group_writable_folder_is_refused(tmp_path):
    out = _sweep_folder(tmp_path, tmp_path / "PWNED")
    (out / "tune").chmod(0o775)
    with pytest.raises(ValueError, match=r"tune is writable by its group"):
        check_resumable(out)


def test_a_folder_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    out = _sweep_folder(tmp_path, marker)
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 4242)  # as if another user ran the resume
    with pytest.raises(ValueError, match=rf"is owned by uid {me}, not by you \(uid {me + 4242}\)"):
        resume_sweep(out)
    assert not marker.exists()


def test_a_symlinked_pickle_is_refused(tmp_path):
    out = _sweep_folder(tmp_path, tmp_path / "PWNED")
    elsewhere = tmp_path / "elsewhere.pkl"
    (out / "tune" / "tuner.pkl").rename(elsewhere)
    (out / "tune" / "tuner.pkl").symlink_to(elsewhere)
    with pytest.raises(ValueError, match="symbolic link"):
        check_resumable(out)


def test_a_folder_that_is_not_a_sweep_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a sweep folder to resume"):
        check_resumable(tmp_path)


def test_own_private_sweep_folder_passes(tmp_path):
    out = _sweep_folder(tmp_path, tmp_path / "PWNED")
    assert check_resumable(out) == out.resolve()
    assert not (tmp_path / "PWNED").exists()
