"""Images on disk: server-made names, atomic writes (temp + rename), failures that leave no file, traversal."""
from __future__ import annotations

import errno
import os
import shutil

import pytest
from PIL import Image

import api.storage
from api.app import create_app
from api.errors import StorageError, StorageFull
from api.storage import NAME_RE, ImageStore
from tests.unit.support import SMALL, PreloadedEngine, assert_json_error, make_settings, png_image, serve


def picture(width: int = 64, height: int = 48) -> Image.Image:
    return Image.new("RGB", (width, height), (200, 30, 90))


@pytest.fixture
def store(tmp_path):
    store = ImageStore(tmp_path / "images")
    store.ensure()
    return store


def test_save_publishes_a_complete_png_under_a_server_made_name(store):
    name = store.save(picture())
    assert NAME_RE.fullmatch(name)
    assert sorted(os.listdir(store.root)) == [name]
    path = store.path_for(name)
    assert path == store.root / name
    assert png_image(path.read_bytes()).size == (64, 48)
    assert store.save(picture()) != name  # names are never reused


def test_a_named_worker_prefixes_its_image_names_and_finds_them(tmp_path):
    store = ImageStore(tmp_path / "images", name_prefix="h10_0_0_5_8000")
    store.ensure()
    name = store.save(picture())
    assert name.startswith("h10_0_0_5_8000-") and NAME_RE.fullmatch(name)
    assert store.path_for(name) == store.root / name
    assert store.path_for("h10.0.0.5-" + name.split("-", 1)[1]) is None  # only id characters in a prefix


def test_the_write_goes_to_a_temp_file_that_is_renamed_into_place(store, monkeypatch):
    renames = []
    real_replace = os.replace

    def watching_replace(src, dst):
        src, dst = os.fspath(src), os.fspath(dst)
        # at the moment of the rename the final name does not exist yet and the temp file is complete
        renames.append((src, dst, os.path.exists(dst), open(src, "rb").read()))
        return real_replace(src, dst)

    monkeypatch.setattr(api.storage.os, "replace", watching_replace)
    name = store.save(picture())
    [(src, dst, existed, data)] = renames
    assert os.path.dirname(src) == os.path.dirname(dst) == str(store.root)  # same folder: an atomic rename
    assert os.path.basename(src) != name and os.path.basename(dst) == name
    assert store.path_for(os.path.basename(src)) is None  # a temp file is never served
    assert not existed
    assert data == (store.root / name).read_bytes()


def test_a_disk_filling_up_mid_write_leaves_no_file(store, monkeypatch):
    real_open = open

    def filling_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)

        class HalfWritten:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def write(self, data):
                handle.write(data[:len(data) // 2])
                handle.flush()
                raise OSError(errno.ENOSPC, "No space left on device")

        return HalfWritten()

    monkeypatch.setattr(api.storage, "open", filling_open, raising=False)
    with pytest.raises(StorageFull):
        store.save(picture())
    assert os.listdir(store.root) == []


def test_a_failing_rename_leaves_no_file(store, monkeypatch):
    def broken_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(api.storage.os, "replace", broken_replace)
    with pytest.raises(StorageError):
        store.save(picture())
    assert os.listdir(store.root) == []


def test_a_vanished_folder_is_a_storage_error(store):
    shutil.rmtree(store.root)
    store.root.write_text("not a folder")
    with pytest.raises(StorageError) as caught:
        store.save(picture())
    assert not isinstance(caught.value, StorageFull)


@pytest.mark.parametrize("name", [
    "../secret.png", "..", ".", "", "/etc/passwd", "a" * 32 + ".png/..", "A" * 32 + ".png", "g" * 32 + ".png",
    "0" * 31 + ".png", "0" * 32 + ".PNG", "0" * 32 + ".png.bak", "0" * 32, ".tmp-" + "0" * 32 + ".png",
    "0" * 32 + ".png\x00", "%2e%2e", "..%2fsecret.png",
])
def test_path_for_accepts_only_server_made_names(store, name):
    (store.root / ("0" * 32 + ".png")).write_bytes(b"x")
    (store.root / (".tmp-" + "0" * 32 + ".png")).write_bytes(b"x")
    (store.root.parent / "secret.png").write_bytes(b"x")
    assert store.path_for(name) is None


def test_delete_ignores_names_it_did_not_make(store):
    outside = store.root.parent / "keep.png"
    outside.write_bytes(b"x")
    store.delete("../keep.png")
    assert outside.exists()


def test_sweep_removes_old_images_and_stale_temp_files_only(store):
    old, fresh = store.save(picture()), store.save(picture())
    stale_tmp = store.root / f".tmp-{ImageStore.new_name()}"
    stale_tmp.write_bytes(b"partial")
    unrelated = store.root / "notes.txt"
    unrelated.write_text("not ours")
    hour_ago = os.path.getmtime(store.root / fresh) - 3600
    for path in (store.root / old, stale_tmp, unrelated):
        os.utime(path, (hour_ago, hour_ago))
    assert store.sweep(max_age_s=60) == 2
    assert sorted(os.listdir(store.root)) == sorted([fresh, "notes.txt"])


# ---- through HTTP -------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_a_full_disk_is_a_507_json_and_the_worker_recovers(bf16_engine, tmp_path, monkeypatch):
    app = create_app(make_settings(tmp_path), PreloadedEngine(bf16_engine))
    images = tmp_path / "images"
    async with serve(app) as http:
        with monkeypatch.context() as patch:
            patch.setattr(api.storage.os, "fsync", _raise(errno.ENOSPC))
            response = await http.post("/generate", json=SMALL)
        error = assert_json_error(response, 507, "storage_full")
        assert error["retryable"] is True
        assert os.listdir(images) == []
        assert (await http.get("/health")).status_code == 200
        ok = await http.post("/generate", json=SMALL)
        assert ok.status_code == 200
        assert len(os.listdir(images)) == 1


@pytest.mark.anyio
async def test_an_unwritable_output_folder_is_a_503_json(bf16_engine, tmp_path):
    app = create_app(make_settings(tmp_path), PreloadedEngine(bf16_engine))
    images = tmp_path / "images"
    async with serve(app) as http:
        shutil.rmtree(images)
        images.write_text("a file where the folder was")  # unwritable even for root
        response = await http.post("/generate", json=SMALL)
        error = assert_json_error(response, 503, "storage_error")
        assert error["retryable"] is True
        assert str(images) not in response.text
        images.unlink()
        images.mkdir()
        assert (await http.post("/generate", json=SMALL)).status_code == 200


def _raise(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.anyio
@pytest.mark.parametrize("path", [
    "/images/..%2F..%2Fetc%2Fpasswd", "/images/%2e%2e", "/images/%2e%2e%2fsecret.png", "/images/..%5csecret.png",
    "/images/secret.png", "/images/" + "A" * 32 + ".png", "/images/" + "z" * 32 + ".png",
    "/images/.tmp-" + "0" * 32 + ".png", "/images/" + "0" * 32, "/images/%00", "/images/",
])
async def test_images_route_refuses_anything_but_a_stored_name(bf16_engine, tmp_path, path):
    app = create_app(make_settings(tmp_path), PreloadedEngine(bf16_engine))
    images = tmp_path / "images"
    async with serve(app) as http:
        (tmp_path / "secret.png").write_bytes(b"top secret")
        (images / "secret.png").write_bytes(b"top secret")
        (images / (".tmp-" + "0" * 32 + ".png")).write_bytes(b"top secret")
        response = await http.get(path)
        assert_json_error(response, 404, "not_found")
        assert b"top secret" not in response.content


@pytest.mark.parametrize("fmt, suffix, magic", [("png", ".png", b"\x89PNG"), ("jpeg", ".jpg", b"\xff\xd8\xff"),
                                                ("webp", ".webp", b"RIFF")])
def test_each_output_format_is_stored_found_and_swept(store, fmt, suffix, magic):
    name = store.save(picture(), fmt, 80 if fmt != "png" else None)
    assert name.endswith(suffix) and store.path_for(name) is not None
    assert (store.root / name).read_bytes().startswith(magic)
    assert store.media_type(name) == {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}[fmt]
    old = os.path.getmtime(store.root / name) - 3600
    os.utime(store.root / name, (old, old))
    assert store.sweep(max_age_s=60) == 1 and store.path_for(name) is None
