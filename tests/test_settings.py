"""settings.py: the one reader of MOZGACH_* variables, and the README's table of them."""

import re
from pathlib import Path

import pytest

from mozgach_mlx import settings
from mozgach_mlx.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_no_other_module_reads_the_environment():
    for path in sorted((ROOT / "mozgach_mlx").rglob("*.py")):
        if path.name == "settings.py":
            continue
        text = path.read_text()
        # (libm's fegetenv reads the floating-point environment, not os.environ)
        assert "os.environ" not in text and not re.search(r"(?<!fe)getenv", text), f"{path} reads the environment"


def test_every_variable_the_package_names_is_in_the_table_and_the_readme():
    named = set()
    for path in sorted((ROOT / "mozgach_mlx").rglob("*.py")):
        named |= set(re.findall(r"MOZGACH_[A-Z_]+[A-Z]", path.read_text()))
    assert named == set(settings.VARIABLES)
    assert settings.readme_table() in (ROOT / "README.md").read_text()


def test_readers_parse_and_reject(monkeypatch):
    monkeypatch.delenv("MOZGACH_ATTENTION", raising=False)
    assert settings.attention() is None
    monkeypatch.setenv("MOZGACH_ATTENTION", " Blockwise ")
    assert settings.attention() == "blockwise"
    monkeypatch.setenv("MOZGACH_ATTENTION", "fast")
    with pytest.raises(ConfigError, match="MOZGACH_ATTENTION='fast'"):
        settings.attention()
    monkeypatch.setenv("MOZGACH_QMATMUL", "DEQUANT")
    assert settings.qmatmul() == "dequant"
    monkeypatch.setenv("MOZGACH_QMATMUL", "int4")
    with pytest.raises(ConfigError, match="MOZGACH_QMATMUL"):
        settings.qmatmul()
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("MOZGACH_ATTENTION_CPU_STREAMS", bad)
        with pytest.raises(ConfigError, match="MOZGACH_ATTENTION_CPU_STREAMS"):
            settings.attention_cpu_streams()
    monkeypatch.setenv("MOZGACH_ATTENTION_CPU_STREAMS", "3")
    assert settings.attention_cpu_streams() == 3
    monkeypatch.setenv("MOZGACH_BLAS", "NONE")
    assert settings.blas() == "none"
    monkeypatch.setenv("MOZGACH_BLAS", "/opt/lib/libopenblas.so")
    assert settings.blas() == "/opt/lib/libopenblas.so"
    monkeypatch.setenv("MOZGACH_BLAS_THREADS", "3")
    assert settings.blas_threads() == 3
    for bad in ("0", "all"):
        monkeypatch.setenv("MOZGACH_BLAS_THREADS", bad)
        with pytest.raises(ConfigError, match="MOZGACH_BLAS_THREADS"):
            settings.blas_threads()
    for word in ("pip", "System"):
        monkeypatch.setenv("MOZGACH_BLAS", word)
        assert settings.blas() == word.lower()
    monkeypatch.setenv("MOZGACH_MALLOC", "default")
    assert settings.malloc_default()
