import math
import re

from shoal.peer.dashboard import render_chart, render_html, render_metrics

EVIL = '<script>alert(1)</script>'


def snapshot(**kw):
    peers = [
        {"peer_id": "peer-0", "address": "http://127.0.0.1:7000", "role": "replica", "alive": True, "status": "alive", "round": 3, "step": 150,
         "train_loss": 2.1, "eval_loss": 2.2, "tokens_per_s": 5000.0, "bytes_sent": 12_345_678, "bytes_received": 9_000_000, "last_seen": 99.0, "weights_hash": "aaaa1111"},
        {"peer_id": "peer-1", "address": "http://127.0.0.1:7001", "role": "replica", "alive": True, "round": 3, "step": 150,
         "train_loss": None, "eval_loss": float("nan"), "tokens_per_s": None, "bytes_sent": 10, "bytes_received": 20, "last_seen": 98.0, "weights_hash": "aaaa1111"},
        {"peer_id": "peer-2", "address": "http://127.0.0.1:7002", "role": "replica", "alive": True, "round": 3, "step": 150,
         "eval_loss": 2.3, "bytes_sent": 0, "bytes_received": 0, "last_seen": 97.0, "weights_hash": "bbbb2222"},
        {"peer_id": EVIL, "address": '"><img src=x onerror=alert(1)>', "role": "replica", "alive": False, "status": "dead", "round": 1, "step": 50,
         "bytes_sent": 0, "bytes_received": 0, "last_seen": 50.0, "weights_hash": None},
    ]
    history = {"peer-0": [{"round": 0, "eval_loss": 5.5, "train_loss": None}, {"round": 1, "eval_loss": 3.0, "train_loss": 3.2}, {"round": 3, "eval_loss": 2.2, "train_loss": 2.1}],
               "peer-1": [{"round": 1, "eval_loss": 3.1, "train_loss": None}], EVIL: [{"round": 1, "eval_loss": 4.0}]}
    base = {"swarm_id": "s1", "self_id": "peer-0", "now": 100.0, "run": {"model": "small", "outer": "diloco", "codec": "int8", "inner_steps": 50},
            "round": 3, "peers": peers, "history": history}
    return {**base, **kw}


def test_page_shows_every_peer_and_a_chart():
    page = render_html(snapshot())
    for pid in ("peer-0", "peer-1", "peer-2"):
        assert pid in page
    assert page.count("<svg") == 1 and page.count("<polyline") >= 4  # eval lines for 3 peers + train lines
    assert "12.3 MB" in page and "1 s ago" in page and 'http-equiv="refresh"' in page


def test_page_is_offline_and_escapes_network_strings():
    page = render_html(snapshot())
    assert EVIL not in page and "<img" not in page and "&lt;script&gt;" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "<script" not in page


def test_dead_and_drifted_peers_are_marked():
    page = render_html(snapshot())
    assert re.search(r'<tr class="dead">.*?&lt;script', page)
    assert re.search(r'class="drift"><code>bbbb2222', page)
    assert 'class="drift"><code>aaaa1111' not in page


def test_empty_swarm_and_odd_values_render():
    page = render_html({"peers": [], "history": {}})
    assert "no losses reported yet" in page
    assert "<svg" in render_chart({"p": [{"round": 2, "eval_loss": 3.0}]})  # one point
    assert "no losses" in render_chart({"p": [{"round": 1, "eval_loss": math.inf}]})
    render_html({"peers": [{"peer_id": "x"}], "history": {"x": "garbage"}})


METRIC_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*\})? [-+0-9.eE]+$')


def test_metrics_are_valid_prometheus_text():
    text = render_metrics(snapshot(peers=snapshot()["peers"] + [{"peer_id": 'a"b\\c\nd', "alive": True, "round": 2}]))
    assert text.endswith("\n")
    for line in text.splitlines():
        assert line.startswith("# ") or METRIC_LINE.match(line), line
    assert 'shoal_peers{state="alive"} 4' in text and 'shoal_peers{state="dead"} 1' in text
    assert 'peer="a\\"b\\\\c\\nd"' in text
    assert 'shoal_peer_eval_loss{peer="peer-1"}' not in text  # NaN skipped
    assert 'shoal_peer_bytes_sent_total{peer="peer-0"} 12345678' in text and "shoal_round 3" in text
