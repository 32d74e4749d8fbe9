"""rundir: the typed run manifest (schema, reading old and broken ones) and a run made
from Python without a RunConfig, which eval must rebuild from the manifest alone."""

import json

import pytest

import mozgach_mlx as mz
from mozgach_mlx import lora, rundir, synthetic
from mozgach_mlx.errors import ConfigError
from mozgach_mlx.evaluate import evaluate_run
from mozgach_mlx.rundir import AdapterRecord, Manifest, read_manifest


def test_manifest_round_trip_and_schema(tmp_path):
    m = Manifest(base={"source": "tiny", "fingerprint": "abc"}, config={"train": {"seed": 1}},
                 path=tmp_path / rundir.MANIFEST_FILE)
    m.update("mozgach108_001", domain="d1", domain_id=1, status="done", valid_loss=1.5, base_valid_loss=2.0,
             files={"adapter_config.json": "ff"})
    back = read_manifest(tmp_path)
    assert back.to_dict() == m.to_dict()
    assert back.schema_version == rundir.SCHEMA_VERSION and back.run is None
    assert back.config_fingerprint == rundir.fingerprint({"train": {"seed": 1}})
    rec = back.record("mozgach108_001")
    assert isinstance(rec, AdapterRecord) and rec.beats_base and rec.files == {"adapter_config.json": "ff"}
    with pytest.raises(ConfigError, match="no field 'nonsense'"):
        back.update("mozgach108_001", nonsense=1)


def test_old_newer_broken_and_missing_manifests(tmp_path):
    v1 = {"version": 1, "base": {"source": "tiny"}, "config": {"run": {"model": "tiny", "quiet": True}},
          "adapters": {"a": {"domain": "x", "domain_id": 3, "status": "failed", "error": "E"}}}
    (tmp_path / "manifest.json").write_text(json.dumps(v1))
    m = read_manifest(tmp_path)
    assert m.adapters["a"].status == "failed" and m.run == mz.RunConfig(model="tiny", quiet=True)
    (tmp_path / "manifest.json").write_text(json.dumps({**v1, "schema_version": 99}))
    with pytest.raises(ConfigError, match="schema version 99 is newer"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt manifest"):
        read_manifest(tmp_path)
    with pytest.raises(ConfigError, match="no manifest"):
        read_manifest(tmp_path / "elsewhere")


def _python_run(tmp_path, shared: bool):
    """A 2-domain fleet trained from Python (no RunConfig) over a 4-bit tiny base with a
    RoPE scaling, on per-domain folders or on one JSONL with a 'domain' field."""
    corpus = synthetic.write_corpus(tmp_path / "data", n_domains=2, n_train=6, n_valid=2)
    if shared:
        lines = []
        for split in ("train", "valid"):
            for d in sorted(p for p in corpus.iterdir() if p.is_dir()):
                for line in (d / f"{split}.jsonl").read_text().splitlines():
                    lines.append(json.dumps({**json.loads(line), "domain": d.name, "split": split}))
        (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n")
        source = tmp_path / "all.jsonl"
    else:
        source = corpus
    model, tok = mz.load("tiny", quantize=4, rope_scaling={"type": "linear", "factor": 2.0})
    cfg = mz.TrainConfig(max_steps=2, warmup_steps=1, grad_accumulation=1, batch_size=2, max_seq_length=64,
                         eval_every=0, save_every=0, progress=False, lora=lora.LoRAConfig(r=4, alpha=8, dropout=0.0))
    res = mz.train_fleet(model, tok, mz.data.discover_domains(source), cfg, tmp_path / "out")
    assert res.ok and len(res.done) == 2
    return tmp_path / "out"


@pytest.mark.parametrize("shared", [False, True])
def test_eval_rebuilds_a_python_run_from_its_manifest(tmp_path, shared):
    out = _python_run(tmp_path, shared)
    m = read_manifest(out)
    assert m.run is None
    assert m.base["quantization"]["bits"] == 4 and m.base["args"]["rope_scaling"]["factor"] == 2.0
    base, _ = rundir.load_run_base(m)  # the recorded source, quantization and RoPE; fingerprint checked
    assert base.args.rope_scaling["factor"] == 2.0
    rep = evaluate_run(out, route_samples=1, signature_samples=0, write=False)
    assert [r.domain_id for r in rep.rows] == [1, 2] and not rep.not_evaluated
    for r in rep.rows:  # the table's base loss is the one the fleet measured before training
        rec = m.adapters[r.adapter]
        assert rec.base_valid_loss is not None and rec.data["shared"] is shared


def test_a_different_base_is_refused(tmp_path):
    out = _python_run(tmp_path, shared=False)
    d = json.loads((out / "manifest.json").read_text())
    d["base"]["fingerprint"] = "0" * 16
    (out / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="not the one this run was trained over"):
        rundir.load_run_base(read_manifest(out))
