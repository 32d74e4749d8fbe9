"""check_cuda.py's reading of pytest's output (junit file, or the progress marks of a group cut short)
and its summary.md: one section per step, tables of what was measured."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path


def parse_junit(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        kids = {c.tag: c for c in tc}
        bad = kids.get("failure", kids.get("error"))
        if bad is not None:
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            msg = (bad.get("message") or bad.text or "").strip()
            failures.append({"test": f"{tc.get('classname')}::{tc.get('name')}", "kind": bad.tag, "message": msg[:500]})
        elif "skipped" in kids:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def parse_progress(lines: list[str]) -> dict:
    """Counts from pytest -q's progress lines (a group killed before it wrote its junit file)."""
    marks = "".join(ln.split("[")[0].strip() for ln in lines if re.fullmatch(r"[.FEsxX]+\s*(\[\s*\d+%\])?", ln.strip()))
    return {"passed": marks.count("."), "failed": marks.count("F"), "errors": marks.count("E"),
            "skipped": marks.count("s"), "failures": [], "from": "progress marks (no junit: cut short)"}


def _f(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def _render_env(s: dict) -> list[str]:
    info = s.get("device_info", {})
    sc = s.get("self_check_tf32_default", {})
    return [f"- default device {s.get('default_device')}, mlx {s.get('mlx')}, CUDA available {s.get('cuda_available')}",
            f"- device: {info.get('device_name', info.get('error', '-'))}, memory {info.get('memory_size', '-')}",
            f"- first op: {s.get('first_op', {}).get('status')}; backend: {s.get('backend', {}).get('backend')}",
            f"- fp32 512x512 matmul relative error: {_f(s.get('matmul', {}).get('fp32_matmul_rel_error'))} "
            "(~1e-7 fp32, ~1e-4 TF32)",
            f"- kernel self-check, TF32 as MLX sets it: {sc.get('ok', sc.get('status', 'not run'))} "
            f"{sc.get('reason', sc.get('error', ''))}",
            f"- dispatcher's choice, TF32 as MLX sets it: {s.get('dispatcher_path_tf32_default', {}).get('value')}"]


def _render_tests(s: dict) -> list[str]:
    lines = [f"env {s.get('env')}, per-test timeout {s.get('per_test_timeout')}", "",
             "| group | passed | failed | errors | skipped | s | default device | note |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for g, r in s.get("groups", {}).items():
        note = "timed out" if r.get("timed_out") else ("" if r.get("rc") in (0, 1) else f"exit {r.get('rc')}")
        lines.append(f"| {g} | {r['passed']} | {r['failed']} | {r['errors']} | {r['skipped']} | {r['seconds']} | "
                     f"{r.get('default_device')} | {note} {r.get('from', '')} |")
    fails = [f for r in s.get("groups", {}).values() for f in r.get("failures", [])]
    lines += [""] + [f"- FAIL `{f['test']}`: {f['message'].splitlines()[0][:200] if f['message'] else ''}"
                     for f in fails[:40]]
    return lines


def _render_kernel(s: dict) -> list[str]:
    sc, sp = s.get("self_check", {}), s.get("speed_check", {})
    lines = [f"- self-check (TF32 off): {sc.get('ok', sc.get('status'))} {sc.get('reason', sc.get('error', ''))}",
             f"- speed check (L=2048 bf16): kernel {_f(sp.get('kernel_s'))} s, blockwise {_f(sp.get('blockwise_s'))} s "
             f"{sp.get('error', '')}",
             f"- dispatcher's choice (TF32 off): {s.get('dispatcher_path', {}).get('value')}", "",
             "| H/Hkv | L | D | causal | window | dtype | pass | rel err o/dq/dk/dv vs blockwise | vs fp32 CPU ref |",
             "|---|---:|---:|---|---|---|---|---|---|"]
    for c in s.get("cases", []):
        errs = ["/".join(_f(c[k][n]["rel"], ".1e") for n in ("o", "dq", "dk", "dv")) if "o" in c.get(k, {})
                else str(c.get(k, c).get("error", c.get("reason", c.get("status"))))[:80]
                for k in ("vs_blockwise", "vs_cpu_fp32_reference")]
        lines.append(f"| {c['H']}/{c['Hkv']} | {c['L']} | {c['D']} | {c['causal']} | {c['window']} | {c['dtype']} | "
                     f"{c.get('pass', c.get('status'))} | {errs[0]} | {errs[1]} |")
    return lines


def _render_speed(s: dict) -> list[str]:
    pts = s.get("points", [])
    lines = [f"config {s.get('config')}", "", "| impl | L | median s | peak GiB | status |", "|---|---:|---:|---:|---|"]
    lines += [f"| {p['impl']} | {p['L']} | {_f(p.get('median_s'))} | {_f(p.get('peak_gib'))} | "
              f"{p['status']} {p.get('reason', p.get('error', ''))[:100]} |" for p in pts]
    for L in sorted({p["L"] for p in pts}):
        ok = [p for p in pts if p["L"] == L and p["status"] == "ok"]
        if ok:
            best = min(ok, key=lambda p: p["median_s"])
            lines.append(f"- fastest at {L}: {best['impl']} ({best['median_s']:.3g} s)")
    agree = {k: v for k, v in s.get("agreement_vs_sdpa", {}).items() if k not in ("traceback", "seconds")}
    lines.append(f"- max |o - o_sdpa| at the first length: {agree}")
    return lines


def _render_lora(s: dict) -> list[str]:
    lines = [f"config {json.dumps({k: v for k, v in s.get('config', {}).items() if k != 'model'})}", "",
             "| system | L | tok/s | step s | peak GB | status |", "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {p['system']} | {p['L']} | {_f(p.get('tok_s'), '.0f')} | {_f(p.get('step_s'))} | "
              f"{_f(p.get('peak_gb'))} | {p['status']} {p.get('reason', p.get('error', ''))[:100]} |"
              for p in s.get("points", [])]
    pl = s.get("planner", {})
    if pl.get("status") == "ok":
        lines += ["", f"planner, probe {pl['probe']}", "", "| profile | L | predicted s | tok/s | peak GiB | fits |",
                  "|---|---:|---:|---:|---:|---|"]
        lines += [f"| {n} | {r['L']} | {_f(r['seconds'])} | {_f(r['tok_s'], '.0f')} | {_f(r['peak_gib'])} | "
                  f"{r['fits']} |" for n in ("h100", "this") for r in pl[n]]
    elif pl:
        lines.append(f"planner: {pl.get('error')}")
    return lines


RENDER = {"env": _render_env, "tests": _render_tests, "kernel": _render_kernel, "speed": _render_speed,
          "lora": _render_lora}


def render(results: dict) -> str:
    m = results["meta"]
    lines = [f"# check_cuda.py {'(dry run) ' if m['dry_run'] else ''}{m['started']}", "",
             f"budget {m['budget_s']} s, steps {m['steps']}; kernel status {m.get('kernel_status')}", ""]
    for step, s in results["steps"].items():
        lines += [f"## {step}: {s.get('status')} ({s.get('seconds', '-')} s)", ""]
        try:
            lines += RENDER[step](s)
        except Exception as e:  # a half-written step must not lose the others
            lines.append(f"(cannot render: {type(e).__name__}: {e})")
        lines += [f"    {t}" for t in s.get("tail", [])[-12:]] + [""]
    return "\n".join(lines) + "\n"
