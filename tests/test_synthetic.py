import json

import numpy as np
import pytest

from mozgach_mlx import data, synthetic
from mozgach_mlx.errors import DataError
from mozgach_mlx.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def corpus():
    return synthetic.default_corpus()


def test_names_ids_and_families(corpus):
    assert [d.id for d in corpus] == list(range(1, 109))
    assert corpus[0].name == "001_cycle_1" and corpus[12].name == "013_cycle_2"
    assert corpus[107].name == "108_brackets_9"
    assert len({d.name for d in corpus}) == 108
    for fam in synthetic.FAMILY_NAMES:
        assert sum(d.family == fam for d in corpus) == 9
    assert all(d.rule and d.alphabet in d.rule for d in corpus)


def test_deterministic_and_seeded(corpus):
    again = synthetic.default_corpus(n_domains=5)
    assert [d.train for d in again] == [d.train for d in corpus[:5]]
    other = synthetic.default_corpus(n_domains=5, seed=1)
    assert other[0].train != corpus[0].train


def test_alphabets_are_nearly_disjoint(corpus):
    sets = [set(d.alphabet) for d in corpus]
    assert all(len(s) == synthetic.ALPHABET_SIZE for s in sets)
    shared = [len(a & b) for i, a in enumerate(sets) for b in sets[i + 1:]]
    assert max(shared) <= 1
    for d in corpus:
        used = set("".join(d.train + d.valid))
        assert used <= set(d.alphabet) | {" "}, d.name


def test_texts_lengths_and_heldout_are_new(corpus):
    for d in corpus:
        assert len(d.train) == 128 and len(d.valid) == 16
        assert all(80 <= len(t) <= 160 + 30 for t in d.train + d.valid)
        assert not set(d.valid) & set(d.train), d.name


def _digits(s, a):
    n = 0
    for ch in s:
        n = n * len(a) + a.index(ch)
    return n


def _balanced(s, pairs):
    opens = {o: c for o, c in pairs}
    stack = []
    for ch in s:
        if ch in opens:
            stack.append(opens[ch])
        elif ch in opens.values():
            if not stack or stack.pop() != ch:
                return False
    return not stack


def test_every_unit_follows_its_family_rule(corpus):
    """Independent checks of each family's rule on the generated texts."""
    for d in corpus:
        a = d.alphabet
        units = [u for t in d.train + d.valid for u in t.split(" ")]
        if d.family == "cycle":
            assert all(a[(a.index(x) + 1) % len(a)] == y for u in units for x, y in zip(u, u[1:], strict=False))
        elif d.family == "mirror":
            assert all(u == u[::-1] and len(u) % 2 == 0 for u in units)
        elif d.family == "double":
            assert all(u[: len(u) // 2] * 2 == u for u in units)
        elif d.family == "sorted":
            assert all(list(u) == sorted(u, key=a.index) for u in units)
        elif d.family == "count":
            for t in d.train:
                nums = [_digits(u, a) for u in t.split(" ")]
                steps = np.diff(nums)
                assert (steps == 1).mean() >= 0.5  # runs of consecutive numbers (new run: a jump)
        elif d.family == "arith":
            digits, plus, eq, end = a[:3], a[3], a[4], a[5]
            for u in units:
                assert u.endswith(end)
                x, rest = u[:-1].split(plus)
                y, z = rest.split(eq)
                assert _digits(x, digits) + _digits(y, digits) == _digits(z, digits)
        elif d.family == "runs":
            for u in units:
                i = 0
                while i < len(u):
                    k = 1 + a.index(u[i]) % 4
                    assert u[i: i + k] == u[i] * k
                    i += k
        elif d.family == "brackets":
            assert all(_balanced(u, [(a[0], a[1]), (a[2], a[3])]) for u in units)
        elif d.family == "syllable":
            assert all(u[0] in a[2:] for u in units)  # words start with a consonant
    pairs = [d for d in corpus if d.family == "pairs"][0]
    partner = {}
    for u in [u for t in pairs.train for u in t.split(" ")]:
        for x, y in zip(u[::2], u[1::2], strict=True):
            assert partner.setdefault(x, y) == y and x != y


@pytest.mark.parametrize("order", [1, 2])
def test_proxy_routing_distinguishes_all_108(corpus, order):
    """A training-free proxy for routing by lowest loss: byte n-gram models fitted on each
    domain's train texts route every held-out text to its own domain, with margin."""
    r = synthetic.proxy_routing(corpus, order=order)
    assert r["accuracy"] == 1.0 and r["own_lowest"] == 1.0
    assert r["min_margin"] > 1.0  # nats/byte between own and best other domain
    loss = r["loss"]
    assert loss.shape == (108, 108)
    assert (np.diag(loss) < np.delete(loss, 0, 1).min() + 10).all()


def test_write_corpus_is_a_data_dir(tmp_path):
    root = synthetic.write_corpus(tmp_path / "c", n_domains=14, n_train=4, n_valid=2)
    doms = data.discover_domains(root)
    assert [(d.id, d.name) for d in doms] == [(i, synthetic.domain_name(i)) for i in range(1, 15)]
    assert all(d.valid is not None for d in doms)
    ds = data.load_domain(doms[0], ByteTokenizer(), 64)
    assert ds["train"].n_records == 4 and ds["valid"].n_records == 2
    meta = json.loads((root / synthetic.CORPUS_FILE).read_text())
    assert meta["domains"][0]["name"] == "001_cycle_1" and meta["spec"]["n_domains"] == 14
    before = (root / "001_cycle_1" / "train.jsonl").stat().st_mtime_ns
    synthetic.write_corpus(root, n_domains=14, n_train=4, n_valid=2)  # same corpus: untouched
    assert (root / "001_cycle_1" / "train.jsonl").stat().st_mtime_ns == before
    with pytest.raises(DataError, match="different synthetic corpus"):
        synthetic.write_corpus(root, n_domains=15, n_train=4, n_valid=2)


def test_bad_arguments():
    with pytest.raises(DataError):
        synthetic.default_corpus(n_domains=0)
    with pytest.raises(DataError):
        synthetic.default_corpus(min_chars=100, max_chars=50)
