"""Dashboard rendering: complete, offline, escaped HTML and valid Prometheus text."""

from __future__ import annotations

import math
import re
from html import escape
from html.parser import HTMLParser
from typing import Any

from shoal.peer.dashboard import odd_hashes, render_html
from shoal.peer.dashboard_chart import render_chart
from shoal.peer.dashboard_format import human_bytes
from shoal.peer.metrics import render_metrics

EVIL_ID = "<script>alert(1)</script>"
EVIL_ADDRESS = '"><img src=x onerror=alert(1)>'
ALLOWED_TAGS = {
    "html",
    "head",
    "meta",
    "noscript",
    "title",
    "style",
    "script",
    "body",
    "h1",
    "h2",
    "div",
    "span",
    "code",
    "a",
    "b",
    "table",
    "tr",
    "th",
    "td",
    "svg",
    "rect",
    "line",
    "text",
    "polyline",
    "circle",
}


def example_snapshot(**overrides: Any) -> dict[str, Any]:
    """Four peers: two in sync, one drifted, one dead with hostile strings."""

    def peer(pid: str, port: int, **kw: Any) -> dict[str, Any]:
        base = {
            "peer_id": pid,
            "address": f"http://127.0.0.1:{port}",
            "role": "replica",
            "alive": True,
            "round": 12,
            "step": 600,
            "train_loss": 3.41,
            "eval_loss": 3.52,
            "tokens_per_s": 5120.0,
            "bytes_sent": 12_345_678,
            "bytes_received": 9_000_000,
            "last_seen": 997.0,
            "weights_hash": "a1b2c3d4e5f60718",
        }
        return {**base, **kw}

    peers = [
        peer("peer-a", 7000),
        peer(
            "peer-b",
            7001,
            train_loss=None,
            eval_loss=float("nan"),
            tokens_per_s=None,
            last_seen=999.0,
        ),
        peer("peer-c", 7002, weights_hash="ffff0000deadbeef", bytes_sent=2_048, last_seen=960.0),
        peer(
            EVIL_ID,
            7003,
            address=EVIL_ADDRESS,
            role="<b>bold</b>",
            alive=False,
            round=4,
            step=200,
            last_seen=700.0,
            weights_hash=None,
        ),
    ]

    def curve(offset: float, rounds: int) -> list[dict[str, Any]]:
        return [
            {
                "round": r,
                "eval_loss": 7.8 * 0.75**r + 3 + offset,
                "train_loss": 7.6 * 0.75**r + 2.8 + offset + 0.15 * math.sin(r + 10 * offset),
            }
            for r in range(rounds)
        ]

    history = {
        "peer-a": curve(0.0, 13),
        "peer-b": curve(0.25, 5) + [{"round": 5, "eval_loss": None}],
        "peer-c": curve(0.5, 13),
        EVIL_ID: [{"round": r, "eval_loss": 8 - r} for r in range(4)],
    }
    snapshot = {
        "swarm_id": "swarm-7f3a",
        "self_id": "peer-a",
        "now": 1000.0,
        "run": {
            "model": "tiny",
            "outer": "diloco",
            "codec": "int8",
            "inner_steps": 50,
            "params": 1_234_567,
        },
        "round": 12,
        "peers": peers,
        "history": history,
    }
    return {**snapshot, **overrides}


class TagCollector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs


def parse(page: str) -> TagCollector:
    collector = TagCollector()
    collector.feed(page)
    return collector


def test_page_shows_every_peer_header_and_units() -> None:
    page = render_html(example_snapshot())
    assert page.startswith("<!doctype html>") and page.endswith("</html>")
    for pid in ("peer-a", "peer-b", "peer-c", escape(EVIL_ID)):
        assert pid in page
    for text in (
        "swarm-7f3a",
        "tiny",
        "diloco",
        "int8",
        "3 alive",
        "1 dead",
        "12.3 MB",
        "2.0 kB",
        "3 s ago",
        "5 min ago",
        "1,234,567",
        "(this peer)",
    ):
        assert text in page, text
    assert "–" in page and not re.search(r">\s*-?(nan|inf)\b", page, re.IGNORECASE)


def test_chart_has_a_polyline_per_peer_with_history() -> None:
    page = render_html(example_snapshot())
    assert page.count("<svg") == 1
    for pid in ("peer-a", "peer-b", "peer-c", escape(EVIL_ID)):
        assert re.search(
            rf'<polyline[^>]*stroke="#[0-9a-f]{{6}}"[^>]*data-peer="{re.escape(pid)}"', page
        ), pid
    assert page.count("<polyline") == 7  # eval for 4 peers, train for 3 (the dead peer has none)
    assert page.count('stroke-dasharray="5 4" stroke-opacity') == 3
    colours = set(re.findall(r'<polyline fill="none" stroke="(#[0-9a-f]{6})"', page))
    assert len(colours) == 4  # distinct per peer


def test_page_is_offline() -> None:
    page = render_html(example_snapshot())
    urls = [v for k, v in parse(page).attrs if k in ("src", "href", "action", "xlink:href") and v]
    assert urls and all(u.startswith("/") and not u.startswith("//") for u in urls), urls
    assert "url(" not in page and "@import" not in page and "<link" not in page


def test_network_strings_cannot_inject_markup() -> None:
    hostile = example_snapshot(
        swarm_id=EVIL_ID,
        self_id=EVIL_ADDRESS,
        run={"model": EVIL_ID, "outer": EVIL_ADDRESS, "codec": "<i>", EVIL_ID: EVIL_ADDRESS},
    )
    page = render_html(hostile)
    assert EVIL_ID not in page and "<img" not in page and "<b>bold" not in page
    tree = parse(page)
    assert set(tree.tags) <= ALLOWED_TAGS and tree.tags.count("script") == 1
    assert not any(name.startswith("on") for name, _ in tree.attrs)
    assert escape(EVIL_ADDRESS) in page


def test_dead_peer_and_drifted_hash_are_marked() -> None:
    page = render_html(example_snapshot())
    assert re.search(r'<tr class="dead">.*?&lt;script&gt;.*?<td class="st l">dead</td>', page)
    assert re.search(r'<td class="drift"[^>]*><code>ffff0000</code>', page)
    assert not re.search(r'<td class="drift"[^>]*><code>a1b2c3d4', page)
    assert ">a1b2c3d4<" in page and "a1b2c3d4e" not in page  # shortened to 8 chars


def test_hash_tie_flags_every_hash() -> None:
    peers = [
        {"peer_id": "x", "weights_hash": "11"},
        {"peer_id": "y", "weights_hash": "22"},
        {"peer_id": "z", "weights_hash": "33", "alive": False},
    ]
    assert odd_hashes(peers) == {"11", "22"}
    assert odd_hashes(peers[:1]) == set() and odd_hashes([]) == set()


def test_empty_swarm_history_and_garbage_render() -> None:
    for snapshot in (
        {},
        {"peers": [], "history": {}},
        {"peers": None, "run": None, "history": None},
    ):
        page = render_html(snapshot)
        assert "no losses reported yet" in page and "no peers known yet" in page
    page = render_html(
        {
            "peers": [
                {
                    "peer_id": "x",
                    "round": "<b>",
                    "step": True,
                    "bytes_sent": "9",
                    "weights_hash": 1234,
                    "last_seen": None,
                },
                "not a peer",
            ],
            "history": {"x": "garbage", "y": [None, {"round": "1", "eval_loss": 2.0}]},
            "now": "later",
        }
    )
    assert "&lt;b&gt;" not in page and "no losses reported yet" in page  # a string is not a number
    assert re.search(
        r"<tr class=\"alive\"><td class=\"l\"><span[^>]*></span><code>x</code></td>"
        r".*?<td>–</td><td>–</td>",
        page,
    )


def test_chart_with_one_point_and_skipped_values() -> None:
    one = render_chart({"p": [{"round": 2, "eval_loss": 3.0}]})
    assert one.count("<polyline") == 1 and "<circle" in one and ">2<" in one
    assert "no losses" in render_chart(
        {"p": [{"round": 1, "eval_loss": math.inf}, {"round": 2, "eval_loss": None}]}
    )
    gap = render_chart(
        {"p": [{"round": r, "eval_loss": None if r == 2 else 5.0 - r} for r in range(5)]}
    )
    assert len(re.search(r'points="([^"]*)"', gap).group(1).split()) == 4
    many = render_chart(
        {
            f"peer-{i:02d}": [{"round": r, "eval_loss": 4 - r / 100} for r in range(300)]
            for i in range(15)
        }
    )
    assert many.count("<polyline") == 15 and "<circle" not in many


def test_human_bytes() -> None:
    assert [
        human_bytes(n) for n in (0, 999, 1_500, 12_345_678, 3e12, None, float("nan"), -1, True)
    ] == ["0 B", "999 B", "1.5 kB", "12.3 MB", "3.0 TB", "–", "–", "–", "–"]


LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
LABELS = rf"\{{[a-zA-Z_][a-zA-Z0-9_]*={LABEL_VALUE}(?:,[a-zA-Z_][a-zA-Z0-9_]*={LABEL_VALUE})*\}}"
SAMPLE = re.compile(
    rf"^([a-zA-Z_:][a-zA-Z0-9_:]*)({LABELS})? (-?[0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)$"
)


def test_metrics_are_valid_prometheus_text() -> None:
    weird = 'a"b\\c\nd'
    snapshot = example_snapshot()
    snapshot["peers"].append({"peer_id": weird, "alive": True, "round": 2, "eval_loss": None})
    text = render_metrics(snapshot)
    assert text.endswith("\n")
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in typed and kind in ("gauge", "counter")
            typed[name] = kind
        elif not line.startswith("# HELP "):
            match = SAMPLE.match(line)
            assert match, line
            assert match.group(1) in typed, line  # declared before its samples
    assert 'shoal_peers{state="alive"} 4' in text and 'shoal_peers{state="dead"} 1' in text
    assert 'peer="a\\"b\\\\c\\nd"' in text
    assert (
        'shoal_peer_eval_loss{peer="peer-b"}' not in text
        and 'shoal_peer_tokens_per_second{peer="peer-b"}' not in text
    )
    assert 'shoal_peer_eval_loss{peer="a' not in text  # None skipped
    assert (
        'shoal_peer_bytes_sent_total{peer="peer-a"} 12345678' in text and "shoal_round 12\n" in text
    )
    assert (
        typed["shoal_peer_bytes_sent_total"] == "counter"
        and 'shoal_peer_alive{peer="peer-c"} 1' in text
    )
    assert 'shoal_peer_train_loss{peer="peer-a"} 3.41' in text


def test_metrics_of_an_empty_snapshot() -> None:
    text = render_metrics({})
    assert (
        'shoal_peers{state="alive"} 0' in text and "shoal_round" not in text and text.endswith("\n")
    )


def test_noloco_shows_partners_and_spread_instead_of_drift() -> None:
    snapshot = example_snapshot(
        run={"model": "tiny", "outer": "noloco", "codec": "int8", "inner_steps": 50}
    )
    for peer, partner, distance in zip(
        snapshot["peers"],
        ["peer-b", "peer-a", "peer-a", "peer-c"],
        [2e-3, 4e-3, 6e-3, 1.0],
        strict=True,
    ):
        peer.update(partner=partner, partner_distance=distance)
    page = render_html(snapshot)
    assert 'class="drift"' not in page  # differing hashes are expected without all-reduce
    assert "partner · distance" in page and "<code>peer-b</code> 2.00e-03" in page
    assert "spread 4.00e-03" in page and "max 6.00e-03" in page  # the dead peer's 1.0 is left out
    metrics = render_metrics(snapshot)
    assert 'shoal_peer_partner_distance{peer="peer-c"} 0.006' in metrics
    assert "partner" not in render_html(example_snapshot())  # DiLoCo pages are unchanged


def test_stage_map_shows_who_serves_each_stage_and_gaps() -> None:
    def stage_peer(pid: str, stage: int, weights_hash: str, **kw: Any) -> dict[str, Any]:
        return {
            "peer_id": pid,
            "address": "http://127.0.0.1:1",
            "role": "stage",
            "stage": stage,
            "activation": "subspace",
            "alive": True,
            "tokens_per_s": 1000.0,
            "weights_hash": weights_hash,
            **kw,
        }

    peers = [
        stage_peer("s0", 0, "aaaa"),
        stage_peer("s1a", 1, "bbbb"),
        stage_peer("s1b", 1, "bbbb"),
        stage_peer("s3", 3, "cccc", alive=False, status="dead"),
        stage_peer(EVIL_ID, 2, "dddd", activation=EVIL_ADDRESS),
    ]
    pipeline = {"stages": 4, "holds": ["embedding, head, loss", "blocks 0–1", "block 2", "block 3"]}
    page = render_html(example_snapshot(peers=peers, pipeline=pipeline))
    section = page[page.index("<h2>pipeline stages</h2>") : page.index("<h2>loss over rounds</h2>")]
    rows = section.split("<tr>")[2:]
    assert len(rows) == 4
    assert (
        "s1a" in rows[1] and "s1b" in rows[1] and "2,000" in rows[1]
    )  # two replicas, summed throughput
    assert "gap: no live peer" in rows[3] and "gap" not in rows[0]  # stage 3's only peer is dead
    assert EVIL_ID not in page and EVIL_ADDRESS not in page
    # stage peers hold different slices: their hashes differ from each other by design
    assert odd_hashes(peers) == set()
    assert odd_hashes([*peers, stage_peer("s1c", 1, "eeee"), stage_peer("s1d", 1, "bbbb")]) == {
        "eeee"
    }
    assert "pipeline stages" not in render_html(example_snapshot())


def test_stage_map_names_standby_peers_and_the_route_policy() -> None:
    peers = [
        {
            "peer_id": "s0",
            "address": "http://127.0.0.1:1",
            "role": "stage",
            "stage": 0,
            "activation": "none",
            "alive": True,
        },
        {
            "peer_id": "spare",
            "address": "http://127.0.0.1:2",
            "role": "stage",
            "stage": None,
            "alive": True,
        },
        {
            "peer_id": EVIL_ID,
            "address": "http://127.0.0.1:3",
            "role": "stage",
            "stage": None,
            "alive": True,
        },
    ]
    routes = {
        "paths": "skippipe",
        "skip_ratio": 0.33,
        "stages_per_path": 4,
        "estimated_iteration_s": None,
        "fallbacks": EVIL_ADDRESS,
    }
    page = render_html(
        example_snapshot(
            peers=peers, pipeline={"stages": 3, "holds": ["a", "b", "c"], "routes": routes}
        )
    )
    assert "standing by to take over a lost stage: <code>spare</code>" in page
    assert (
        "paths skippipe" in page
        and "skip_ratio 0.33" in page
        and "estimated_iteration_s" not in page
    )
    assert EVIL_ID not in page and EVIL_ADDRESS not in page


def test_loop_lag_and_task_failures_in_metrics() -> None:
    snapshot = example_snapshot(
        loop_lag_s_max=0.25,
        task_failures=[{"task": "resync", "error": "TimeoutError: x", "time": 990.0}] * 3,
    )
    snapshot["peers"][0]["loop_lag_ms_max"] = 12.5
    snapshot["peers"][1]["loop_lag_ms_max"] = None
    text = render_metrics(snapshot)
    lines = text.splitlines()
    assert "shoal_loop_lag_seconds_max 0.25" in lines
    assert "# TYPE shoal_loop_lag_seconds_max gauge" in lines
    assert any(line.startswith("# HELP shoal_loop_lag_seconds_max ") for line in lines)
    assert "shoal_task_failures_total 3" in lines
    assert 'shoal_peer_loop_lag_seconds_max{peer="peer-a"} 0.0125' in lines
    assert 'shoal_peer_loop_lag_seconds_max{peer="peer-b"}' not in text  # None is left out
    for line in lines:  # still valid exposition text
        assert line.startswith("# ") or SAMPLE.match(line), line
    assert 'shoal_peers{state="alive"} 3' in lines  # the existing metrics stay
    bare = render_metrics(example_snapshot())  # an older peer's snapshot: no lag, no failures
    assert "shoal_loop_lag_seconds_max" not in bare and "shoal_task_failures_total 0" in bare
    garbage = render_metrics(example_snapshot(loop_lag_s_max=float("nan"), task_failures="x"))
    assert "shoal_loop_lag_seconds_max" not in garbage and "shoal_task_failures_total 0" in garbage


def test_page_shows_loop_lag_column_and_task_failures() -> None:
    failures = [
        {"task": "checkpoint", "error": "OSError: disk full", "time": 940.0},
        {"task": "resync", "error": "TimeoutError: peer-b", "time": 995.0},
    ]
    snapshot = example_snapshot(loop_lag_s_max=0.0421, task_failures=failures)
    snapshot["peers"][0]["loop_lag_ms_max"] = 42.1
    snapshot["peers"][2]["loop_lag_ms_max"] = 350.0
    page = render_html(snapshot)
    table = page[page.index("<h2>peers</h2>") : page.index("</table>")]
    heads = re.findall(r"<th[^>]*>(.*?)</th>", table)
    column = heads.index("loop lag")
    assert heads[column - 1] == "received"
    lag_cells = {}
    for row in table.split("<tr")[2:]:
        cells = re.findall(r"<td[^>]*>.*?</td>", row)
        assert len(cells) == len(heads), row
        lag_cells[re.search(r"<code>(.*?)</code>", cells[0]).group(1)] = cells[column]
    assert lag_cells["peer-a"] == "<td>42 ms</td>" and lag_cells["peer-b"] == "<td>–</td>"
    assert re.fullmatch(r'<td class="warn"[^>]*>350 ms</td>', lag_cells["peer-c"])
    assert "loop lag (60 s max)<b>42 ms</b>" in page
    section = page[page.index("failed background tasks") : page.index("<h2>loss over rounds")]
    rows = section.split("<tr>")[2:]
    assert len(rows) == 2 and "resync" in rows[0] and "checkpoint" in rows[1]  # newest first
    assert "TimeoutError: peer-b" in rows[0] and "5 s ago" in rows[0] and "60 s ago" in rows[1]
    assert "failed background tasks" not in render_html(example_snapshot())
    assert "failed background tasks" not in render_html(example_snapshot(task_failures=[None]))


def test_task_failure_strings_cannot_inject_markup() -> None:
    failures = [{"task": EVIL_ID, "error": EVIL_ADDRESS, "time": "soon"}, "not a failure"]
    snapshot = example_snapshot(task_failures=failures)
    snapshot["peers"][0]["loop_lag_ms_max"] = EVIL_ID  # a string where a number belongs
    page = render_html(snapshot)
    assert "failed background tasks of this peer (1)" in page
    assert EVIL_ID not in page and EVIL_ADDRESS not in page and "<img" not in page
    assert escape(EVIL_ADDRESS) in page
    tree = parse(page)
    assert set(tree.tags) <= ALLOWED_TAGS and tree.tags.count("script") == 1
    assert not any(name.startswith("on") for name, _ in tree.attrs)
    metrics = render_metrics(snapshot)
    assert 'shoal_peer_loop_lag_seconds_max{peer="peer-a"}' not in metrics


def test_run_definition_is_shown_folded_and_escaped() -> None:
    definition = {
        "run": {"model_preset": EVIL_ID, "inner": {"lr": 0.003}, "tokenizer": "sha256:" + "a" * 64},
        "data_manifest_sha256": None,
    }
    page = render_html(
        example_snapshot(
            run={"model": "tiny", "definition": definition, "definition_sha256": "f" * 64}
        )
    )
    assert "<details><summary>run definition <code>ffffffffffffffff</code>" in page
    assert "<code>run.inner.lr</code>" in page and "0.003" in page
    assert EVIL_ID not in page and escape(EVIL_ID) in page
    tree = parse(page)
    assert set(tree.tags) <= ALLOWED_TAGS | {"details", "summary"}
    assert "run definition" not in render_html(example_snapshot(run={"model": "tiny"}))


def test_a_peer_behind_nat_shows_who_relays_it() -> None:
    snapshot = example_snapshot()
    nat = snapshot["peers"][0]
    nat["relayed_by"] = f"peer-b,{EVIL_ID}"
    nat["address"] = "http://127.0.0.1:7001/relay/peer-a"
    page = render_html(snapshot)
    assert "behind NAT · relayed by peer-b, " in page
    assert EVIL_ID not in page and escape(EVIL_ID) in page
    assert set(parse(page).tags) <= ALLOWED_TAGS
    assert page.count("behind NAT") == 1  # the others show their addresses
