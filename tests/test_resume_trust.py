"""`calozoo tune --resume DIR` resumes only a sweep folder this user's calozoo wrote.

Resuming hands DIR/tune/tuner.pkl to Ray's Tuner.restore, which unpickles it: a planted pickle must
be refused before anything reads it, whether the folder is another user's or others may write it
(ownership), or it is this user's own, well-permissioned folder that calozoo did not sign (a folder
copied from a colleague, a shared disk or an archive). The checks need no Ray.
"""

import json
import os
import pickle
import stat

import pytest

from click.testing import CliRunner

from calozoo.cli import main
from tune.signing import key_path, sign_folder, unsigned_pickles
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


def test_a_planted_pickle_in_an_own_private_folder_is_refused_before_it_is_read(tmp_path):
    marker = tmp_path / "PWNED"
    out = _sweep_folder(tmp_path, marker)  # owned by this user, writable by no one else: ownership passes it
    with pytest.raises(ValueError, match=r"tune/tuner\.pkl carries no valid signature") as info:
        resume_sweep(out)
    text = str(info.value)
    assert "\n" not in text and f"calozoo tune --from {out.resolve() / 'sweep.json'}" in text
    assert not marker.exists()
    res = CliRunner().invoke(main, ["tune", "--resume", str(out), "--no-mlflow"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "carries no valid signature" in lines[0] and "--from" in lines[0], res.output
    assert not marker.exists()


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    folder = tmp_path / "config"
    monkeypatch.setenv("CALOZOO_CONFIG_DIR", str(folder))
    return folder


def test_a_signed_folder_passes_until_a_pickle_is_changed(tmp_path, config_dir):
    marker = tmp_path / "PWNED"
    out = _sweep_folder(tmp_path, marker)
    (out / "tune" / "tuner.pkl").write_bytes(pickle.dumps({"a": "harmless state"}))  # as a sweep of ours wrote it
    assert sign_folder(out) == 1
    assert check_resumable(out) == out.resolve()
    (out / "tune" / "tuner.pkl").write_bytes(pickle.dumps(_Payload(marker)))  # planted afterwards, same owner
    with pytest.raises(ValueError, match="carries no valid signature"):
        check_resumable(out)
    assert not marker.exists()


def test_a_folder_signed_with_another_users_key_is_refused(tmp_path, monkeypatch):
    out = _sweep_folder(tmp_path, tmp_path / "PWNED")
    monkeypatch.setenv("CALOZOO_CONFIG_DIR", str(tmp_path / "colleague"))
    sign_folder(out)  # their calozoo signed it; then they handed the folder over
    assert unsigned_pickles(out) == []
    monkeypatch.setenv("CALOZOO_CONFIG_DIR", str(tmp_path / "me"))
    with pytest.raises(ValueError, match="carries no valid signature"):
        check_resumable(out)


def test_signatures_bind_each_file_to_its_name(tmp_path, config_dir):
    out = _sweep_folder(tmp_path, tmp_path / "PWNED")
    state = out / "tune" / "experiment_state-x.json"
    state.write_text("{}")
    state.chmod(0o644)
    sign_folder(out)
    tuner, other = (out / "tune" / "tuner.pkl").read_bytes(), state.read_bytes()
    (out / "tune" / "tuner.pkl").write_bytes(other)  # each a signed file's bytes, under the other's name
    state.write_bytes(tuner)
    assert sorted(unsigned_pickles(out)) == ["experiment_state-x.json", "tuner.pkl"]


def test_the_key_is_made_private_and_a_key_others_can_read_is_refused(tmp_path, config_dir):
    out = _sweep_folder(tmp_path, tmp_path / "PWNED")
    sign_folder(out)
    key = config_dir / "sweep-signing.key"
    assert key_path() == key and len(key.read_bytes()) == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(config_dir.stat().st_mode) == 0o700
    key.chmod(0o644)
    with pytest.raises(ValueError, match=r"can be read or written by others .*chmod 600"):
        check_resumable(out)


def test_the_key_lives_in_xdg_config_home(tmp_path, monkeypatch):
    monkeypatch.delenv("CALOZOO_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    out = _sweep_folder(tmp_path, tmp_path / "PWNED")
    sign_folder(out)
    assert (tmp_path / "xdg" / "calozoo" / "sweep-signing.key").is_file()
    assert check_resumable(out) == out.resolve()
