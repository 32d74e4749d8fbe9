"""mozgach serve: the official ``openai`` client against a server on a free localhost port.

The server (in this process, uvicorn in a thread) serves the tiny base with three
adapters made here. Expected texts come from computations that share nothing with the
server's batching: greedy decoding that recomputes the whole sequence every step on a
fresh model with the adapter loaded by ``lora.load`` (base and single adapters), and
a separate :class:`AdapterBank`'s own ``generate`` / ``route`` (mixes, seeded sampling,
auto). Every bad request is checked for its status and OpenAI-shaped body, and the
server for still answering afterwards. Signals are checked on a ``mozgach serve``
subprocess.
"""

import asyncio
import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from test_bank import make_adapter  # noqa: E402

import mozgach_mlx as mz  # noqa: E402
from mozgach_mlx import lora  # noqa: E402
from mozgach_mlx.bank import AdapterBank  # noqa: E402
from mozgach_mlx.errors import ConfigError  # noqa: E402
from mozgach_mlx.serve import ServeConfig  # noqa: E402
from mozgach_mlx.serve.app import build_app  # noqa: E402
from mozgach_mlx.serve.engine import SlotCache, decode_step, prefill  # noqa: E402
from mozgach_mlx.serve.models import Target, load_served  # noqa: E402
from mozgach_mlx.serve.protocol import APIError  # noqa: E402
from mozgach_mlx.serve.scheduler import Job, Scheduler  # noqa: E402

KEY = "test-key"
TOKENS = 24
PROMPTS = ["hello world", "the quick brown fox jumps over", "abc", "Once upon a time, in a land far away"]
# name: (rank, targets) -- different ranks and targets in one bank
SPECS = {"a": (4, ("q_proj", "v_proj")), "b": (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
         "c": (4, ("o_proj", "down_proj"))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_adapters")
    return {n: make_adapter(root / n, seed=10 + i, r=r, targets=t, fmt="mlx-lm")
            for i, (n, (r, t)) in enumerate(SPECS.items())}


@pytest.fixture(scope="module")
def server(adapter_dirs):
    served = load_served(model="tiny", adapters=[str(d) for d in adapter_dirs.values()])
    port = free_port()
    cfg = ServeConfig(port=port, api_key=KEY, max_tokens=64, max_seqs=8, max_body_bytes=16_384)
    app = build_app(served, cfg)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield {"port": port, "app": app, "served": served}
    srv.should_exit = True
    thread.join(30)
    served.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref_bank(adapter_dirs):
    """An AdapterBank of its own (another model instance): the reference for mixes,
    seeded sampling and routing."""
    model, tok = mz.load("tiny")
    with AdapterBank(model, tok, list(adapter_dirs.values())) as bank:
        yield bank


def naive_greedy(adapter_dir, prompt: str, n: int = TOKENS) -> str:
    """Greedy continuation recomputing the whole sequence each step (no KV cache, no
    bank): a fresh tiny model with the adapter loaded by lora.load (None: the base)."""
    model, tok = mz.load("tiny")
    if adapter_dir is not None:
        lora.load(model, adapter_dir)
    model.eval()
    ids, out = tok.encode(prompt), []
    for _ in range(n):
        t = int(mx.argmax(model(mx.array([ids + out]))[0, -1]).item())
        if t == tok.eos_token_id:
            break
        out.append(t)
    return tok.decode(out)


@pytest.fixture(scope="module")
def expected(adapter_dirs):
    """Greedy texts per (model name, prompt) from :func:`naive_greedy`."""
    dirs = {"tiny": None, **adapter_dirs}
    return {(m, p): naive_greedy(d, p) for m, d in dirs.items() for p in PROMPTS}


def health(server) -> dict:
    return raw(server, "GET", "/health")[1]


def raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()


def assert_up(client):
    assert client.models.list().data, "the server stopped answering"


def wait_idle(server, timeout: float = 30.0) -> dict:
    """The health counters once no sequence is live or waiting (fails after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(server)
        if h["live_sequences"] == 0 and h["waiting"] == 0:
            return h
        assert time.monotonic() < deadline, f"sequences still live: {h}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- endpoints


def test_models_lists_base_adapters_and_auto(client, server):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny", "a", "b", "c", "auto"]
    assert client.models.retrieve("b").id == "b"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize("name", ["tiny", "a", "b", "c"])
def test_greedy_completion_equals_naive_decoding(client, expected, name):
    for prompt in PROMPTS[:2]:
        r = client.completions.create(model=name, prompt=prompt, max_tokens=TOKENS, temperature=0)
        assert r.choices[0].text == expected[(name, prompt)], (name, prompt)
        assert r.model == name and r.model_extra["adapter"] == (None if name == "tiny" else name)
        assert r.usage.prompt_tokens == len(prompt) + 1  # bytes + BOS
        assert r.usage.completion_tokens == TOKENS or r.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched_and_equal_alone(client, server, expected):
    """Requests with different adapters and prompt lengths in flight together: each
    text equals its own single-sequence reference, and the scheduler ran rows together."""
    jobs = [(m, p) for m in ("tiny", "a", "b", "c") for p in PROMPTS]
    before = health(server)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: client.completions.create(model=j[0], prompt=j[1], max_tokens=TOKENS,
                                                                temperature=0).choices[0].text, jobs))
    for job, text in zip(jobs, got, strict=True):
        assert text == expected[job], job
    after = wait_idle(server)
    rows, steps = after["step_rows"] - before.get("step_rows", 0), after["steps"] - before.get("steps", 0)
    assert rows > steps, f"no decode step held more than one sequence ({rows} rows in {steps} steps)"


def test_engine_decodes_rows_at_different_positions_exactly(adapter_dirs):
    """The batched decode step (per-row positions, per-row adapters) against the bank's
    own KV-cached generation of each row alone: the same tokens, deterministically."""
    model, tok = mz.load("tiny")
    with AdapterBank(model, tok, list(adapter_dirs.values())) as bank:
        rows = [("a", PROMPTS[0]), (None, PROMPTS[1]), ("c", PROMPTS[2]), ({"a": 0.5, "b": -1.0}, PROMPTS[3])]
        want = [bank.generate(p, adapter=a, max_tokens=12, return_ids=True) for a, p in rows]
        cache, out = SlotCache(len(model.layers)), []
        for a, p in rows:
            ids = tok.encode(p)
            with bank.use(a):
                logits, kv = prefill(model, np.array([ids], np.int32), [len(ids)])
            cache.add(kv, [len(ids)])
            out.append([int(mx.argmax(logits[0]).item())])
        for _ in range(11):
            with bank.use(bank.selection([a for a, _ in rows])):
                logits = decode_step(model, cache, [o[-1] for o in out])
            for o, t in zip(out, mx.argmax(logits, axis=-1).tolist(), strict=True):
                o.append(t)
        eos = tok.eos_token_id
        assert [o[: o.index(eos)] if eos in o else o for o in out] == want
        for slot in (1, 0, 1, 0):  # freeing compacts the slots and releases the buffers at the end
            cache.remove(slot)
        assert cache.live == 0 and cache.nbytes == 0


def test_slot_cache_gives_back_what_only_a_finished_sequence_needed():
    cache = SlotCache(1)
    kv = lambda L: [(mx.ones((1, 2, L, 4)), mx.ones((1, 2, L, 4)))]
    cache.add(kv(1000), [1000])
    cache.add(kv(10), [10])
    assert cache.keys[0].shape[2] == 1024 and cache.live == 2
    assert cache.remove(0) == 1  # the short one moves into slot 0
    assert cache.lengths == [10] and cache.keys[0].shape[2] == SlotCache.step
    np.testing.assert_array_equal(np.array(cache.keys[0][0, :, :10]), 1)


def test_chat_completion_uses_the_chat_template(client, adapter_dirs):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(model="b", messages=msgs, max_tokens=TOKENS, temperature=0)
    _, tok = mz.load("tiny")
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert r.choices[0].message.content == naive_greedy(adapter_dirs["b"], prompt)
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"


def test_streaming_equals_the_whole_answer_and_ends_in_done(client, server):
    kw = dict(model="a", prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    msgs = [{"role": "user", "content": "stream please"}]
    chat_whole = client.chat.completions.create(model="c", messages=msgs, max_tokens=TOKENS, temperature=0)
    chat_chunks = list(client.chat.completions.create(model="c", messages=msgs, max_tokens=TOKENS, temperature=0,
                                                      stream=True))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == chat_whole.choices[0].message.content
    # the wire itself: server-sent events ending in [DONE]
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**kw, "stream": True}),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.getheader("content-type").startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_auto_is_routed_by_the_bank_and_says_which_adapter(client, ref_bank, adapter_dirs):
    for prompt in PROMPTS[:3]:
        r = client.completions.create(model="auto", prompt=prompt, max_tokens=TOKENS, temperature=0)
        chosen = ref_bank.route(prompt, method="loss")[0]
        assert r.model == chosen and r.model_extra["adapter"] == chosen and r.model_extra["router"] == "loss"
        assert r.choices[0].text == naive_greedy(adapter_dirs[chosen], prompt)


def test_mix_equals_the_banks_own_mix(client, ref_bank):
    mix = {"a": 0.7, "c": 0.3}
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0,
                                  extra_body={"adapters": mix})
    assert r.choices[0].text == ref_bank.generate(PROMPTS[0], mix=mix, max_tokens=TOKENS)
    assert r.model == "tiny" and r.model_extra["adapter"] == mix


def test_seeded_sampling_is_reproducible_and_matches_the_bank(client, ref_bank, expected):
    kw = dict(model="b", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0.9, seed=1234)
    first, second = (client.completions.create(**kw).choices[0].text for _ in range(2))
    assert first == second == ref_bank.generate(PROMPTS[0], adapter="b", max_tokens=TOKENS, temperature=0.9,
                                                seed=1234)
    # a nucleus this small (or 0) keeps only the most probable token, and a temperature this
    # small leaves only it: greedy either way
    for extreme in ({"top_p": 1e-6}, {"top_p": 0.0}, {"temperature": 1e-30}):
        text = client.completions.create(**{**kw, **extreme}).choices[0].text
        assert text == expected[("b", PROMPTS[0])], extreme


def test_stop_strings_cut_the_text(client, expected):
    full = expected[("a", PROMPTS[0])]
    stop = full[8:10]
    assert stop and stop not in full[:8]
    r = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:8] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == full[:8]
    r = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


# ----------------------------------------------------------------------------- bad requests

GOOD = {"model": "a", "prompt": "hi", "max_tokens": 4}
BAD = [
    ("bad JSON", b'{"model": "a", "prompt": ', 400, "invalid_json"),
    ("not an object", b"[1, 2]", 400, None),
    ("unknown model", json.dumps({**GOOD, "model": "zzz"}).encode(), 404, "model_not_found"),
    ("model names a path", json.dumps({**GOOD, "model": "/etc/passwd"}).encode(), 400, "invalid_model"),
    ("model names a relative path", json.dumps({**GOOD, "model": "../a"}).encode(), 400, "invalid_model"),
    ("negative max_tokens", json.dumps({**GOOD, "max_tokens": -5}).encode(), 400, "invalid_value"),
    ("max_tokens over the limit", json.dumps({**GOOD, "max_tokens": 10_000}).encode(), 400, "invalid_value"),
    ("prompt over the window", json.dumps({**GOOD, "prompt": "x" * 2100}).encode(), 400,
     "context_length_exceeded"),
    ("body over the limit", json.dumps({**GOOD, "prompt": "x" * 20_000}).encode(), 413, "request_too_large"),
    ("mix with an adapter not loaded", json.dumps({**GOOD, "model": "tiny", "adapters": {"zz": 1}}).encode(), 404,
     "model_not_found"),
    ("mix weight not a number", json.dumps({**GOOD, "model": "tiny", "adapters": {"a": "x"}}).encode(), 400, None),
    ("n > 1", json.dumps({**GOOD, "n": 2}).encode(), 400, "unsupported_parameter"),
    ("temperature out of range", json.dumps({**GOOD, "temperature": 9}).encode(), 400, None),
    ("seed beyond 64 bits", json.dumps({**GOOD, "seed": 1 << 70, "temperature": 1}).encode(), 400, None),
    ("stop not strings", json.dumps({**GOOD, "stop": [1, 2]}).encode(), 400, None),
    ("empty messages", json.dumps({"model": "a", "messages": []}).encode(), 400, None),
    ("chat over the window", json.dumps({"model": "a", "messages": [{"role": "user", "content": "x" * 2100}]}).encode(),
     400, "context_length_exceeded"),
]


@pytest.mark.parametrize("what,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_shaped_errors_and_the_server_stays_up(server, client, what, body, status, code):
    path = "/v1/chat/completions" if b'"messages"' in body else "/v1/completions"
    got, err = raw(server, "POST", path, body, {"Content-Type": "application/json"})
    assert got == status, (what, err)
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    if code is not None:
        assert err["error"]["code"] == code
    assert_up(client)


def test_bad_requests_through_the_client_raise_its_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="path"):
        client.chat.completions.create(model="C:\\models\\x", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="a", messages=[{"role": "wizard", "content": "x"}])
    assert_up(client)


def test_api_key_is_required(server, client):
    base = f"http://127.0.0.1:{server['port']}/v1"
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=base, api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="a", prompt="x", max_tokens=2)
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=30)
    conn.request("GET", "/v1/models")  # no Authorization header at all
    resp = conn.getresponse()
    assert resp.status == 401 and json.loads(resp.read())["error"]["type"] == "authentication_error"
    conn.close()
    assert_up(client)


def test_a_full_queue_is_a_429(server):
    sched = Scheduler(server["served"], ServeConfig(max_queue=2))  # never started: requests only queue
    job = Job(ids=[1, 2], target=Target(None, "tiny"), max_tokens=4)
    loop = asyncio.new_event_loop()
    try:
        for _ in range(2):
            sched.submit(job, loop)
        with pytest.raises(APIError) as e:
            sched.submit(job, loop)
        assert e.value.status == 429 and e.value.body()["error"]["code"] == "queue_full"
        sched.stop()
        with pytest.raises(APIError) as e:
            sched.submit(job, loop)
        assert e.value.status == 503
    finally:
        loop.close()


def test_unknown_routes_and_methods_are_openai_errors(server):
    status, err = raw(server, "GET", "/v1/nothing")
    assert status == 404 and "error" in err
    status, err = raw(server, "GET", "/v1/completions")
    assert status == 405 and "error" in err


# ----------------------------------------------------------------------------- disconnects, leaks


def test_disconnects_cancel_their_sequences_and_free_the_cache(server, client):
    before = wait_idle(server)
    # streaming: read a little, then go away
    for _ in range(3):
        conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
        conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                     body=json.dumps({"model": "b", "prompt": "tell me", "max_tokens": 64, "temperature": 0,
                                      "stream": True, "stop": ["\x00\x01\x02"]}))
        resp = conn.getresponse()
        assert resp.read(20)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
    # not streaming: send the request and hang up before the answer
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server["port"])) as s:
            body = json.dumps({"model": "c", "prompt": "go on", "max_tokens": 64, "temperature": 0,
                               "stop": ["\x00\x01\x02"]}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.05)
    after = wait_idle(server)
    assert after["kv_cache_bytes"] == 0
    assert after["submitted"] - before["submitted"] == 6
    done = sum(after.get(k, 0) - before.get(k, 0) for k in ("finished", "cancelled"))
    assert done == 6, (before, after)
    assert_up(client)


# ----------------------------------------------------------------------------- run dirs, config, CLI


def test_serve_a_run_directory(tmp_path, adapter_dirs):
    from mozgach_mlx.rundir import Manifest

    out = tmp_path / "run"
    out.mkdir()
    m = Manifest(base={"source": "tiny"}, config={}, path=out / "manifest.json")
    for i, (name, d) in enumerate(adapter_dirs.items()):
        (out / name).mkdir()
        for f in Path(d).iterdir():
            (out / name / f.name).write_bytes(f.read_bytes())
        m.update(name, domain=f"dom{i}", domain_id=i, status="done" if name != "c" else "failed")
    served = load_served(out=str(out))
    try:
        assert served.ids() == ["tiny", "a", "b", "auto"] and served.router == "loss"
        assert served.resolve("a").spec == "a" and served.resolve("auto").auto
    finally:
        served.close()


def test_a_trained_run_serves_auto_with_its_best_measured_router(tmp_path):
    """``mozgach eval`` measured tokens best (eval.json): the server fits that router on the
    run's train data and routes with it, as the bank itself does after the same fit."""
    from click.testing import CliRunner

    from mozgach_mlx.cli import main

    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", "--model", "tiny", "--out", str(out), "--n-domains", "2",
                                  "--max-steps", "2", "--max-seq-length", "64", "--quiet"])
    assert r.exit_code == 0, r.output
    (out / "eval.json").write_text(json.dumps({"route_loss_accuracy": 0.5, "route_tokens_accuracy": 1.0}))
    served = load_served(out=str(out))
    try:
        assert served.router == "tokens" and served.ids()[1:] == ["mozgach108_001", "mozgach108_002", "auto"]
        texts = ["alpha beta gamma", "zeta eta theta iota"]
        assert served.bank.route(texts, method="auto") == served.bank.route(texts, method="tokens")
    finally:
        served.close()
    with pytest.raises(ConfigError, match="--router"):
        load_served(model="tiny", adapters=[str(out / "mozgach108_001")], router="probe")


def test_config_limits_and_the_exposure_warning():
    from mozgach_mlx.serve.server import exposure_warning

    assert exposure_warning(ServeConfig()) is None
    assert "without an API key" in exposure_warning(ServeConfig(host="0.0.0.0"))
    assert exposure_warning(ServeConfig(host="0.0.0.0", api_key="k")) is None
    for bad in ({"max_seqs": 0}, {"port": 70000}, {"router": "magic"}, {"api_key": " "}, {"max_body_bytes": -1}):
        with pytest.raises(ConfigError):
            ServeConfig(**bad)


def test_cli_without_a_source_is_a_one_line_error():
    from click.testing import CliRunner

    from mozgach_mlx.cli import main

    res = CliRunner().invoke(main, ["serve"])
    assert res.exit_code == 2 and "--out RUN" in res.output and len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_a_request_in_flight_exits_0(adapter_dirs, sig):
    port = free_port()
    env = {**os.environ, "MOZGACH_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "mozgach_mlx.cli", "serve", "--model", "tiny", "--adapter",
                             str(adapter_dirs["a"]), "--port", str(port), "--shutdown-seconds", "5"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            try:
                assert [m.id for m in c.models.list().data] == ["tiny", "a", "auto"]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
                time.sleep(0.1)
        stream = c.completions.create(model="a", prompt="hello", max_tokens=64, temperature=0, stream=True)
        next(iter(stream))  # a request in flight
        proc.send_signal(sig)
        list(stream)  # it finishes (or is cancelled) cleanly
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
