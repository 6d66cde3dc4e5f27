"""Lots and their hash chains, on real SQLite files: membership, verification, and each kind of tampering."""
from __future__ import annotations

import sqlite3

import pytest

from station import lots
from station.records import Records, open_db

LOT = lots.LotInfo("L-1", "jp", "Sendai Urban Mining", consignment_ref="C-77", basel_ref="")


def _run_lot(path, make_item, n=6):
    r = Records(path, batch_s=0.02)
    r.start_run("sim-fast", "det-test", {})
    r.item_decided(make_item(1))                 # before the lot: belongs to none
    r.flush()
    lot = r.open_lot(LOT)
    for i in range(2, 2 + n):
        r.item_decided(make_item(i, command_id=100 + i))
    r.item_decided(make_item(50, cls="alkaline", bin_=0))
    r.flush()
    for i in range(2, 2 + n):
        r.item_outcome(100 + i, "acked", 3.0 + i)
        r.item_outcome(100 + i, "fired", 3.5 + i, fired_count=999)
    closed = r.close_lot("test", drain_s=2.0)
    r.item_decided(make_item(60))                # after the close: none
    r.end_run({})
    r.close()
    return lot, closed


def _verify(path, head=None):
    db = open_db(path)
    try:
        return lots.verify_lot([db], "L-1", printed_head=head)
    finally:
        db.close()


def test_items_sorted_while_open_belong_to_the_lot_and_the_chain_verifies(tmp_path, make_item):
    p = tmp_path / "r.sqlite"
    lot, closed = _run_lot(p, make_item)
    assert lot["lot_number"] == "L-1" and lot["origin_country"] == "JP" and lot["head_hash"] == lot["genesis_hash"]
    db = sqlite3.connect(p)
    members = db.execute("SELECT track_id FROM items WHERE lot_id=? ORDER BY id", (lot["id"],)).fetchall()
    assert [m[0] for m in members] == [2, 3, 4, 5, 6, 7, 50]
    assert db.execute("SELECT lot_id FROM items WHERE track_id IN (1, 60)").fetchall() == [(None,), (None,)]
    # 7 items + 12 outcome events, in commit order, positions 1..19
    seqs = db.execute("SELECT lot_seq FROM items WHERE lot_id=1 UNION ALL SELECT lot_seq FROM item_events "
                      "WHERE lot_id=1").fetchall()
    assert sorted(s[0] for s in seqs) == list(range(1, 20))
    assert closed["records"] == 19 and closed["sealed_head"] == closed["head_hash"]
    v = _verify(p, head=closed["head_hash"])
    assert v.ok, v.problems
    assert v.records == 19 and v.head == closed["head_hash"] and v.head_matches_link == 19


def test_an_edited_item_row_is_named(tmp_path, make_item):
    p = tmp_path / "r.sqlite"
    lot, closed = _run_lot(p, make_item)
    db = sqlite3.connect(p)
    victim = db.execute("SELECT id, lot_seq FROM items WHERE track_id=4").fetchone()
    db.execute("UPDATE items SET class_name='board_low' WHERE id=?", (victim[0],))
    db.commit()
    v = _verify(p, head=closed["head_hash"])
    assert not v.ok
    assert [b for b in v.broken_rows] == [{"lot_seq": victim[1], "table": "items", "id": victim[0],
                                            "why": "content edited"}]
    assert any(f"items row id={victim[0]}" in x and "edited" in x for x in v.problems)


def test_a_deleted_row_an_edited_outcome_and_a_rewritten_chain_are_caught(tmp_path, make_item):
    p = tmp_path / "r.sqlite"
    lot, closed = _run_lot(p, make_item)
    db = sqlite3.connect(p)
    # a fired event deleted: its position goes missing
    eid, seq = db.execute("SELECT id, lot_seq FROM item_events WHERE outcome='fired' ORDER BY id LIMIT 1").fetchone()
    db.execute("DELETE FROM item_events WHERE id=?", (eid,))
    # an outcome rewritten in place (the convenience copy on the item)
    iid = db.execute("SELECT id FROM items WHERE track_id=6").fetchone()[0]
    db.execute("UPDATE items SET outcome='missed' WHERE id=?", (iid,))
    db.commit()
    v = _verify(p)
    assert not v.ok
    assert f"lot link {seq} is missing: a record of this lot was deleted" in v.problems
    assert any(f"items row id={iid}" in x and "'missed'" in x for x in v.problems)

    # a forger who recomputes every link after editing a row fools the stored head, not a printed one
    p2 = tmp_path / "r2.sqlite"
    lot, closed = _run_lot(p2, make_item)
    db = sqlite3.connect(p2)
    db.row_factory = sqlite3.Row
    db.execute("UPDATE items SET bin=4 WHERE track_id=3")
    rows = [("items", dict(r)) for r in db.execute("SELECT * FROM items WHERE lot_id=1")]
    rows += [("item_events", dict(r)) for r in db.execute("SELECT * FROM item_events WHERE lot_id=1")]
    rows.sort(key=lambda tr: tr[1]["lot_seq"])
    head = closed["genesis_hash"]
    for table, row in rows:
        head = lots.link(head, table, row)
        db.execute(f"UPDATE {table} SET chain_hash=? WHERE id=?", (head, row["id"]))
    db.execute("UPDATE lots SET head_hash=? WHERE id=1", (head,))
    db.commit()
    assert _verify(p2).ok                                    # internally consistent again...
    v = _verify(p2, head=closed["head_hash"])                # ...but not the head printed on the report
    assert not v.ok and "not any link of this lot's chain" in v.problems[-1]


def test_lot_rules(tmp_path):
    db = open_db(tmp_path / "r.sqlite")
    with pytest.raises(lots.LotError, match="ISO 3166"):
        lots.open_lot(db, lots.LotInfo("L-2", "Japan", "x", "c"))
    with pytest.raises(lots.LotError, match="consignment reference or a Basel"):
        lots.open_lot(db, lots.LotInfo("L-2", "JP", "x"))
    lots.open_lot(db, lots.LotInfo("L-2", "JP", "x", basel_ref="JP-1"))
    with pytest.raises(lots.LotError, match="still open"):
        lots.open_lot(db, lots.LotInfo("L-3", "JP", "x", "c"))
    lots.close_lot(db, drain_s=0, settle_s=0)
    with pytest.raises(lots.LotError, match="used before"):
        lots.open_lot(db, lots.LotInfo("L-2", "JP", "x", "c"))
    with pytest.raises(lots.LotError, match="no lot is open"):
        lots.close_lot(db, drain_s=0, settle_s=0)
    # the header is part of the chain: an edited supplier breaks it
    db.execute("UPDATE lots SET supplier='someone else' WHERE lot_number='L-2'")
    v = lots.verify_lot([db], "L-2")
    assert not v.ok and "lot header" in v.problems[0]
    db.close()


def test_a_v1_database_is_migrated_keeping_rows_and_ids(tmp_path):
    p = tmp_path / "old.sqlite"
    db = sqlite3.connect(p)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE runs (id INTEGER PRIMARY KEY, started_at TEXT NOT NULL, ended_at TEXT, mode TEXT NOT NULL,
            model_version TEXT NOT NULL, config_json TEXT NOT NULL, summary_json TEXT);
        CREATE TABLE items (id INTEGER PRIMARY KEY, run_id INTEGER NOT NULL REFERENCES runs(id),
            track_id INTEGER NOT NULL, decided_at TEXT NOT NULL, first_seen_s REAL NOT NULL, decided_s REAL NOT NULL,
            class_name TEXT NOT NULL, confidence REAL NOT NULL, votes_json TEXT NOT NULL, views INTEGER NOT NULL,
            bin INTEGER NOT NULL, diverter_id INTEGER, reason TEXT NOT NULL, command_id INTEGER, fire_count INTEGER,
            outcome TEXT NOT NULL, outcome_s REAL, fired_count INTEGER, model_version TEXT NOT NULL,
            u_mm REAL, y_mm REAL, length_mm REAL, width_mm REAL, UNIQUE (run_id, track_id));
        INSERT INTO meta VALUES ('schema_version', '1');
        INSERT INTO runs VALUES (1, '2026-01-01T00:00:00.000+00:00', NULL, 'line', 'm', '{}', NULL);
        INSERT INTO items VALUES (7, 1, 3, '2026-01-01T00:00:01.000+00:00', 1, 2, 'nimh', 0.9, '{}', 5, 2, 2,
            'rule', 9, 100, 'fired', 3, 99, 'm', 0, 0, 50, 14);
    """)
    db.commit()
    db.close()
    r = Records(p)
    r.start_run("line", "m", {})
    r.item_decided(_plain_item())
    r.close()
    db = sqlite3.connect(p)
    rows = db.execute("SELECT id, outcome, decision_outcome FROM items ORDER BY id").fetchall()
    assert rows[0] == (7, "fired", "fired") and rows[1][0] == 8
    assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "2"


def _plain_item():
    from station.records import ItemRecord

    return ItemRecord(track_id=1, first_seen_s=0.0, decided_s=0.5, class_name="alkaline", confidence=0.8,
                      votes={"alkaline": 4.0}, views=4, bin=0, diverter_id=None, reason="low_confidence",
                      command_id=None, fire_count=None, outcome="manual", model_version="m", u_mm=0.0, y_mm=0.0,
                      length_mm=50.0, width_mm=14.0)
